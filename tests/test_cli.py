"""The CLI end to end, in a subprocess as a user runs it: train, list, and one-line errors."""

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def lctrun(*args, env=None, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "lctrun", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def test_version_and_list():
    out = lctrun("--version")
    assert out.returncode == 0 and "lctrun 0." in out.stdout
    out = lctrun("list")
    assert out.returncode == 0
    for name in ["mnist-cnn", "shapes", "fashion-mnist", "resnet20", "wrn-D-K", "bp"]:
        assert name in out.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["optim.lrr=0.1"], ["unknown config key 'optim.lrr'", "optim.lr"]),
        (["model.name=resnet21"], ["unknown model 'resnet21'", "resnet20"]),
        (["data.name=mnits"], ["unknown dataset 'mnits'", "mnist"]),
        (["method=lcx"], ["unknown method 'lcx'"]),
        (["model.split=[conv9]"], ["split point 'conv9' does not exist", "conv2"]),
        (["devices=[cpu,cpu]", "model.groups=3"], ["3 groups but only 2 devices"]),
        (  # said by the workers themselves, as under torchrun, where no launcher checks first
            ["devices=[cpu,cpu]", "model.split=[conv1,conv2]", "runtime=distributed", "data.name=fake"],
            ["3 groups but only 2 devices"],
        ),
        (
            ["data.root=/nonexistent"],
            ["dataset 'mnist' not found under /nonexistent/MNIST/raw", "LCTRUN_DATA", "download"],
        ),
    ],
)
def test_bad_input_is_one_line_without_traceback(args, words):
    out = lctrun("train", "experiments/mnist-cnn.yaml", *args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr + out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for word in words:
        assert word in lines[0]


def test_missing_experiment_file():
    out = lctrun("train", "experiments/nope.yaml")
    assert out.returncode == 2 and "experiment file not found: experiments/nope.yaml" in out.stderr


def test_train_writes_a_run_directory(tmp_path, data_root):
    run_dir = tmp_path / "run"
    out = lctrun(
        "train",
        "experiments/mnist-cnn.yaml",
        "epochs=2",
        "data.train_size=1000",
        "data.test_size=500",
        "--out",
        str(run_dir),
        env={"LCTRUN_DATA": str(data_root)},
    )
    assert out.returncode == 0, out.stderr
    assert str(run_dir) in out.stdout and "test_acc" in out.stdout
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["epochs"] == 2 and config["data"]["train_size"] == 1000 and config["optim"]["nesterov"] is True
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for column in [
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "lr",
        "seconds",
        "samples_per_s",
        "peak_mem_mb",
    ]:
        assert column in rows[0]
    assert float(rows[-1]["test_acc"]) > 30  # chance is 10
    assert (run_dir / "ckpt-e2.pt").exists() and (run_dir / "env.json").exists()
    # stdout is a pipe here, as in a batch job's log: one plain line per finished epoch, no progress bar
    epochs = [line for line in out.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"] and "\r" not in out.stdout


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--groups", "0"], "--groups must be >= 1"),
        (["--groups", "50"], "--groups 50: resnet20 has"),
        (["--methods", "bp,nonsense"], "unknown method 'nonsense'"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_bench_refuses_bad_input_before_running_anything(tmp_path, args, problem):
    from test_bad_input import run_cli  # the real entry point, in this process

    start = time.time()
    code, err = run_cli(["bench", "resnet20", *args, "--out", str(tmp_path / "bench")])
    assert code == 2 and problem in err and len(err.strip().splitlines()) == 1, err
    assert time.time() - start < 10 and not (tmp_path / "bench").exists()
