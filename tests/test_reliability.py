"""Reliability: resume gives the run that never stopped, interrupts and faults keep what was written,
divergence stops with a message saying where, and runs are deterministic (serial, CPU)."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from children import descendants, still_alive
from test_cli import lctrun

from lctrun.checkpoints import common_epoch, resumable_epoch, resume_point
from lctrun.config import load_experiment
from lctrun.errors import ConfigError, LctrunError
from lctrun.launch import run_training
from lctrun.models import MODELS, ModelSpec
from lctrun.models.cnn import cnn_small
from lctrun.reporting import rundir
from lctrun.reporting.rundir import read_rows

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.name=fake",
    "data.shape=[1,16,16]",
    "data.train_size=64",
    "data.test_size=32",
    "data.batch_size=16",
    "epochs=3",
    "optim.lr=0.05",
    "optim.schedule=cosine",
    "critic.channels=8",
]
STEPS = 4  # per epoch: 64 samples / 16
TIMING = {"seconds", "samples_per_s", "data_seconds", "peak_mem_mb"}  # wall-clock: never reproducible
METHODS = {  # every method, on a model it runs on
    "bp": ["model.name=cnn-small", "model.split=[conv2]"],
    "lct": ["model.name=cnn-small", "model.split=[conv1,conv2]", "critic.update_every=2"],
    "dgl": ["model.name=cnn-small", "model.split=[conv2]"],
    "dni": ["model.name=cnn-small", "model.split=[conv2]"],
    "penalty": ["model.name=resnet8", "model.split=[layer1]", "layerpar.sph=true"],
    "al": ["model.name=resnet8", "model.split=[layer1]", "layerpar.downsample=2"],
}


def same_rows(a: list[dict], b: list[dict], rel: float = 1e-6) -> None:
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for x, y in zip(a, b, strict=True):
        x, y = ({k: v for k, v in r.items() if v not in (None, "")} for r in (x, y))  # a CSV's empty cells
        assert x.keys() == y.keys()
        for key in x.keys() - TIMING:
            if isinstance(x[key], float):
                assert x[key] == pytest.approx(y[key], rel=rel, abs=1e-9), (x["epoch"], key)
            else:
                assert x[key] == y[key], (x["epoch"], key)


@pytest.mark.parametrize("method", list(METHODS))
def test_interrupt_then_resume_gives_the_run_that_never_stopped(tmp_path, monkeypatch, method):
    """Ctrl-C in epoch 2 (a real SIGINT): the step finishes, its state is saved, and --resume continues
    from the next step to the same metrics as one uninterrupted run."""
    cfg = load_experiment(None, TINY + [f"method={method}"] + METHODS[method])
    whole = run_training(cfg, run_dir=tmp_path / "whole")
    monkeypatch.setenv("LCTRUN_INJECT_FAULT", f"0:{STEPS + 3}:interrupt")  # in step 3 of epoch 2
    words = r"interrupted after step 3/4 of epoch 2 \(saved\); .* keeps epoch 1 and a mid-epoch checkpoint; continue"
    with pytest.raises(LctrunError, match=words):
        run_training(cfg, run_dir=tmp_path / "part")
    assert [r["epoch"] for r in read_rows(tmp_path / "part" / "metrics.csv")] == [1]
    assert (tmp_path / "part" / "ckpt-partial.pt").exists()
    monkeypatch.delenv("LCTRUN_INJECT_FAULT")
    resumed = run_training(cfg, run_dir=tmp_path / "part", resume=True)
    same_rows(whole.rows, resumed.rows)
    same_rows(whole.rows, read_rows(tmp_path / "part" / "metrics.csv"))
    assert sorted(f.name for f in (tmp_path / "part").glob("ckpt-*")) == ["ckpt-e3.pt"]  # older ones dropped


def cnn_with_dropout(num_classes, in_shape):
    """cnn-small with dropout before its head: training draws from the global RNG at every step."""
    model = cnn_small(num_classes, in_shape)
    model.fc1.append(torch.nn.Dropout(0.5))
    return model


def final_parameters(run_dir: Path) -> list[torch.Tensor]:
    state = torch.load(run_dir / "ckpt-e3.pt", weights_only=False)["runtime"]["stages"]
    return [v for stage in state for v in stage["group"].values()]


@pytest.mark.parametrize(
    "overrides",
    [
        ["method=lct", "model.name=cnn-small", "model.split=[conv2]", "data.augment=crop-flip"],  # loader generator
        ["method=bp", "model.name=cnn-dropout"],  # global RNG
    ],
    ids=["augmentation", "dropout"],
)
def test_resume_keeps_every_random_stream(tmp_path, monkeypatch, overrides):
    """Interrupted in epoch 2 and resumed: the same metric rows and bitwise the same final parameters, with
    random crops and flips (the loader's generator) and dropout (torch's global RNG) on."""
    monkeypatch.setitem(MODELS, "cnn-dropout", ModelSpec(cnn_with_dropout, "cnn-small with dropout"))
    cfg = load_experiment(None, TINY + overrides)
    whole = run_training(cfg, run_dir=tmp_path / "whole")
    monkeypatch.setenv("LCTRUN_INJECT_FAULT", f"0:{STEPS + 2}:interrupt")
    with pytest.raises(LctrunError, match="interrupted after step 2/4 of epoch 2"):
        run_training(cfg, run_dir=tmp_path / "part")
    monkeypatch.delenv("LCTRUN_INJECT_FAULT")
    resumed = run_training(cfg, run_dir=tmp_path / "part", resume=True)
    same_rows(whole.rows, resumed.rows)
    for a, b in zip(final_parameters(whole.run_dir), final_parameters(resumed.run_dir), strict=True):
        assert torch.equal(a, b)


def test_a_failed_checkpoint_write_keeps_the_last_good_one_and_no_row_twice(tmp_path, monkeypatch):
    """The disk fills while epoch 2's checkpoint is written, after its metrics row: the previous checkpoint
    stays whole, no temporary file is left, and the resume gives rows 1, 2, 3 once, as the run that never
    failed."""
    cfg = load_experiment(None, TINY + METHODS["lct"] + ["method=lct"])
    whole = run_training(cfg, run_dir=tmp_path / "whole")
    fsync = os.fsync

    def full_disk(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(f".ckpt-e2.pt.tmp{os.getpid()}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(rundir.os, "fsync", full_disk)
    with pytest.raises(LctrunError, match=r"cannot write .*ckpt-e2.pt \(No space left on device\)"):
        run_training(cfg, run_dir=tmp_path / "part")
    monkeypatch.setattr(rundir.os, "fsync", fsync)
    part = tmp_path / "part"
    assert [r["epoch"] for r in read_rows(part / "metrics.csv")] == [1, 2]  # the row came before the checkpoint
    assert sorted(f.name for f in part.iterdir() if f.name.startswith((".", "ckpt"))) == ["ckpt-e1.pt"]
    torch.load(part / "ckpt-e1.pt", weights_only=False)  # whole
    resumed = run_training(cfg, run_dir=part, resume=True)
    same_rows(whole.rows, resumed.rows)
    same_rows(whole.rows, read_rows(part / "metrics.csv"))


@pytest.fixture
def tiny_disk(tmp_path):
    """A 200 KiB tmpfs (root only: skipped where mounting is not allowed)."""
    where = tmp_path / "disk"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["serial", "distributed"])
def test_a_full_disk_is_one_line_naming_the_file_and_keeps_what_was_written(tiny_disk, runtime):
    """On a 200 KiB disk the first checkpoint does not fit: exit 2, one line naming the file, no temporary
    file left, config and the finished epoch's metrics kept."""
    from test_bad_input import run_cli

    out = tiny_disk / "run"
    args = [*TINY, *METHODS["lct"], "method=lct", "model.name=cnn-small", f"runtime={runtime}", "--out", str(out)]
    code, err = run_cli(["train", str(ROOT / "experiments" / "mnist-cnn.yaml"), *args])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and f"cannot write {out}/ckpt-e1" in lines[0], err
    assert "No space left on device" in lines[0] and f"lctrun train --resume {out}" in lines[0]
    assert not [f.name for f in out.iterdir() if ".tmp" in f.name]
    assert {"config.yaml", "metrics.csv"} <= {f.name for f in out.iterdir()}
    assert [r["epoch"] for r in read_rows(out / "metrics.csv")] == [1]


def test_sigterm_from_the_cli_keeps_every_row_once_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", "experiments/mnist-cnn.yaml", *TINY, "model.name=cnn-small", "method=lct", "model.split=[conv2]"]
    out = lctrun(*args, "--out", str(run_dir), env={"LCTRUN_INJECT_FAULT": f"0:{2 * STEPS + 1}:term"})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    message = f"interrupted after step 1/4 of epoch 3 (saved); {run_dir} keeps epochs 1-2 and a mid-epoch checkpoint"
    assert f"{message}; continue with: lctrun train --resume {run_dir}" in " ".join(out.stderr.split())
    assert [r["epoch"] for r in read_rows(run_dir / "metrics.csv")] == [1, 2]

    again = lctrun(*args, "--out", str(run_dir))  # a new run over it would lose it: refused
    assert again.returncode == 2 and "already holds a run" in again.stderr and "--resume" in again.stderr

    resumed = lctrun("train", "--resume", str(run_dir))  # the run's own config
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "after epoch 2, at step 1 of epoch 3" in " ".join(resumed.stdout.split())
    assert [r["epoch"] for r in read_rows(run_dir / "metrics.csv")] == [1, 2, 3]

    longer = lctrun("train", "--resume", str(run_dir), "epochs=4")  # train on: only the length may change
    assert longer.returncode == 0, longer.stderr
    assert [r["epoch"] for r in read_rows(run_dir / "metrics.csv")] == [1, 2, 3, 4]


def test_resume_with_another_config_is_refused(tmp_path):
    cfg = load_experiment(None, TINY + ["model.name=cnn-small", "epochs=1"])
    run_training(cfg, run_dir=tmp_path)
    changed = load_experiment(None, TINY + ["model.name=cnn-small", "epochs=1", "optim.lr=0.1"])
    with pytest.raises(ConfigError, match=r"config differs from the run's \(optim.lr=0.05 in the run but 0.1 now\)"):
        run_training(changed, run_dir=tmp_path, resume=True)


def test_a_damaged_checkpoint_is_a_clear_error(tmp_path):
    cfg = load_experiment(None, TINY + ["model.name=cnn-small", "epochs=1"])
    run_training(cfg, run_dir=tmp_path)
    (tmp_path / "ckpt-e1.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(LctrunError, match=r"cannot resume from .*ckpt-e1.pt: the checkpoint is unreadable"):
        run_training(cfg, run_dir=tmp_path, resume=True)


def test_bad_resume_requests_are_one_line_errors(tmp_path):
    out = lctrun("train", "--resume", str(tmp_path / "nope"))
    assert out.returncode == 2 and "not a run directory (no config.yaml there)" in out.stderr
    assert "Traceback" not in out.stderr
    out = lctrun("train")
    assert out.returncode == 2 and "give an experiment" in out.stderr


def test_a_run_resumes_from_the_last_epoch_every_worker_has(tmp_path):
    for name in ["ckpt-e1.rank0.pt", "ckpt-e2.rank0.pt", "ckpt-e1.rank1.pt", "ckpt-e1.rank2.pt", "ckpt-e2.rank2.pt"]:
        (tmp_path / name).touch()  # killed while rank 1 was writing epoch 2
    assert resumable_epoch(tmp_path) == 1
    assert common_epoch([{1, 2}, {2, 3}]) == 2 and common_epoch([{1}, {2}]) == 0 and common_epoch([]) == 0


@pytest.mark.slow
def test_a_killed_distributed_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    """kill -9 of worker 1 in epoch 2: the run stops in bounded time, then resumes from epoch 1 on every
    worker (one checkpoint file each) and ends where an uninterrupted distributed run ends."""
    cfg = load_experiment(
        None, TINY + ["model.name=cnn-small", "model.split=[conv2]", "method=lct", "runtime=distributed"]
    )
    whole = run_training(cfg, run_dir=tmp_path / "whole")
    monkeypatch.setenv("LCTRUN_INJECT_FAULT", f"1:{STEPS + 2}:kill")
    start = time.time()
    with pytest.raises(LctrunError, match=r"worker 1 \(group 2\) failed: died \(signal 9\).* keeps epoch 1; contin"):
        run_training(cfg, run_dir=tmp_path / "part")
    assert time.time() - start < 60
    assert sorted(f.name for f in (tmp_path / "part").glob("ckpt-*")) == ["ckpt-e1.rank0.pt", "ckpt-e1.rank1.pt"]
    monkeypatch.delenv("LCTRUN_INJECT_FAULT")
    resumed = run_training(cfg, run_dir=tmp_path / "part", resume=True)
    same_rows(whole.rows, resumed.rows, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, batch, stopped",
    [
        (["model.name=cnn-small", "model.split=[conv2]", "method=lct"], 4, "8/16"),
        # parallel phases run group k+1 ahead of group k: all stop 4 (pipeline) steps per later group after the ask
        (["model.name=resnet8", "model.split=[layer1,layer2]", "method=al", "data.train_size=48"], 2, "16/24"),
    ],
)
def test_a_stopped_distributed_run_saves_every_worker_at_one_step_and_resumes(
    tmp_path, monkeypatch, overrides, batch, stopped
):
    """The launcher's stop request reaches rank 0, which ends the epoch for every worker at one step (it asks
    every 8; the decision travels with the activations, or to every worker for the layer-parallel methods);
    each saves that step, and the resume continues from it. With pipeline_depth=1 (lct) and for the parallel
    phases of penalty/al, the result equals the uninterrupted run."""
    overrides = overrides + ["runtime=distributed", "pipeline_depth=1", f"data.batch_size={batch}", "epochs=2"]
    cfg = load_experiment(None, TINY + overrides)  # 16 or 32 steps; asked every 8
    whole = run_training(cfg, run_dir=tmp_path / "whole")
    steps = cfg.data.train_size // batch
    monkeypatch.setenv("LCTRUN_INJECT_FAULT", f"0:{steps + 3}:stop")
    with pytest.raises(LctrunError, match=rf"interrupted after step {stopped} of epoch 2 \(saved\)"):
        run_training(cfg, run_dir=tmp_path / "part")
    workers = len(cfg.model.split) + 1
    partial = sorted(f.name for f in (tmp_path / "part").glob("ckpt-partial*"))
    assert partial == [f"ckpt-partial.rank{k}.pt" for k in range(workers)]
    monkeypatch.delenv("LCTRUN_INJECT_FAULT")
    resumed = run_training(cfg, run_dir=tmp_path / "part", resume=True)
    same_rows(whole.rows, resumed.rows, rel=1e-5)
    assert not list((tmp_path / "part").glob("ckpt-partial*"))
    traffic = lambda run: [(w["epoch"], w["worker"], w["bytes_sent"], w["bytes_received"]) for w in run]  # noqa: E731
    # workers.csv counts the whole stopped epoch, the steps before the stop too
    assert traffic(read_rows(tmp_path / "whole" / "workers.csv")) == traffic(
        read_rows(tmp_path / "part" / "workers.csv")
    )


@pytest.mark.parametrize("runtime", ["serial", pytest.param("distributed", marks=pytest.mark.slow)])
def test_divergence_names_method_group_and_step(tmp_path, runtime):
    overrides = TINY + METHODS["dgl"] + ["method=dgl", "optim.lr=1e12", f"runtime={runtime}"]
    words = r"training diverged: \w*loss is (nan|inf) in method dgl, group \d, epoch 1, by step \d+ "
    words += r"\(try a smaller optim.lr\)"
    with pytest.raises(LctrunError, match=words):
        run_training(load_experiment(None, overrides), run_dir=tmp_path)
    assert not (tmp_path / "metrics.csv").exists()  # nothing finished: no row, and nothing half-written


@pytest.mark.parametrize("method", ["lct", "al"])
def test_same_seed_same_metrics(tmp_path, method):
    """Serial runtime, CPU: one seed twice gives the same metrics.csv (timings aside); another seed does not."""
    overrides = TINY + [f"method={method}"] + METHODS[method]
    files = []
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        run_training(load_experiment(None, overrides + [f"seed={seed}"]), run_dir=tmp_path / name)
        files.append(
            [{k: v for k, v in r.items() if k not in TIMING} for r in read_rows(tmp_path / name / "metrics.csv")]
        )
    assert files[0] == files[1]
    assert files[0] != files[2]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_the_launcher_leaves_no_orphan_workers(tmp_path, sig):
    """SIGTERM: the launcher stops its workers and says how to resume; SIGKILL: the workers notice and exit."""
    args = [*TINY, "model.name=cnn-small", "model.split=[conv2]", "epochs=500", "runtime=distributed"]
    scratch = tmp_path / "tmp"  # the launcher's temporary folder goes here, to see that none is left
    scratch.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lctrun", "train", "experiments/mnist-cnn.yaml", *args, "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    deadline = time.time() + 90
    while len(read_rows(tmp_path / "metrics.csv")) < 2 and time.time() < deadline:
        time.sleep(0.3)
    workers = descendants(proc.pid)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    if sig == signal.SIGTERM:
        assert proc.returncode == 2 and "Traceback" not in err, err
        assert "interrupted: all 2 workers stopped;" in err and f"--resume {tmp_path}" in " ".join(err.split())
    assert workers and still_alive(workers) == [], "orphan worker processes"
    assert read_rows(tmp_path / "metrics.csv")  # what was written stays
    assert list(scratch.iterdir()) == [] and "leaked semaphore" not in err, err  # nothing left behind


def test_the_worker_that_died_first_is_named():
    from lctrun.runtime.processes import root_cause

    lost = (0, "RuntimeError: Connection closed by peer [127.0.0.1]:1234", "")
    assert root_cause([None, -9], [lost])[:2] == (1, "died (signal 9)")  # rank 0 only lost its peer
    assert root_cause([None, 3], [lost, (1, "training diverged: loss is nan", "")])[:2] == (
        1,
        "training diverged: loss is nan",
    )
    assert root_cause([None, 1], [])[:2] == (1, "died (exit code 1)")


def test_a_stopped_isolated_run_saves_its_step_and_resumes(tmp_path, monkeypatch):
    """`reproduce` runs serial runs in a child process, which its launcher stops with SIGTERM."""
    cfg = load_experiment(None, TINY + ["method=lct"] + METHODS["lct"])
    whole = run_training(cfg, run_dir=tmp_path / "whole")
    monkeypatch.setenv("LCTRUN_INJECT_FAULT", f"0:{STEPS + 1}:term")
    with pytest.raises(LctrunError, match=r"run failed: interrupted after step 1/4 of epoch 2 \(saved\)"):
        run_training(cfg, run_dir=tmp_path / "part", isolated=True)
    monkeypatch.delenv("LCTRUN_INJECT_FAULT")
    resumed = run_training(cfg, run_dir=tmp_path / "part", resume=True, isolated=True)
    same_rows(whole.rows, resumed.rows)


def test_a_missing_worker_checkpoint_is_refused_not_a_silent_restart(tmp_path):
    """Worker 1 lost its checkpoints while worker 0 holds epoch 2: resuming from scratch would drop two finished
    epochs without a word, so the resume is refused, naming the worker."""
    (tmp_path / "ckpt-e2.rank0.pt").write_bytes(b"")

    class TwoWorkers:
        checkpoint_tag = ".rank0"

        def gather(self, value):
            return [value, set()]  # what worker 1 holds: nothing

    with pytest.raises(LctrunError, match=r"cannot resume .*: worker\(s\) 1 hold no checkpoint of epoch 1 or 2"):
        resume_point(tmp_path, TwoWorkers())


class Payload:
    """Anything but tensors and plain containers: what a weights-only load refuses to build."""

    def __reduce__(self):
        return (print, ("a checkpoint ran code",))


def test_checkpoints_load_as_data_only(tmp_path):
    """Every method resumes through weights-only loads (the resume tests above); a checkpoint that would run
    code when unpickled is refused in one line instead."""
    from lctrun.checkpoints import load

    path = tmp_path / "ckpt-e1.pt"
    torch.save({"epoch": 1, "runtime": Payload()}, path)
    with pytest.raises(LctrunError, match="cannot resume from .*ckpt-e1.pt: the checkpoint is unreadable"):
        load(path)
    torch.save({"epoch": 1, "runtime": {"w": torch.ones(2)}, "rng": {"python": (3, (1, 2), None)}}, path)
    assert load(path)["runtime"]["w"].sum() == 2


def cli_run(*extra: str) -> list[str]:
    """`lctrun train` of a tiny lct run (serial), as a user types it."""
    return ["train", "experiments/mnist-cnn.yaml", *TINY, *METHODS["lct"], "method=lct", *extra]


def test_two_runs_started_into_one_directory_one_runs_and_the_other_is_refused(tmp_path):
    """Two `train --out D` at once: one runs, the other is refused in one line (the lock's holder, or the run
    already there if the first one ended before the second looked), and D holds the one run's files only."""
    run_dir = tmp_path / "run"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "lctrun", *cli_run("--out", str(run_dir))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    lines = outs[loser][1].strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in outs[loser][1], outs[loser][1]
    assert f"is in use by lctrun process {procs[winner].pid}" in lines[0] or "already holds a run" in lines[0]
    tables = {f"{t}.{ext}" for t in ("submodels", "ensembles", "progressive") for ext in ("csv", "md")}
    assert {f.name for f in run_dir.iterdir()} == {"config.yaml", "env.json", "metrics.csv", "workers.csv"} | {
        "ckpt-e3.pt"
    } | tables
    assert json.loads((run_dir / "env.json").read_text())["pid"] == procs[winner].pid
    assert [r["epoch"] for r in read_rows(run_dir / "metrics.csv")] == [1, 2, 3]


def test_a_held_run_directory_is_refused_to_train_resume_and_compare(tmp_path):
    """While a process holds a directory's lock, every command that would write there is refused in one line
    naming the holder, and nothing is written; once it is released, --resume runs."""
    from test_bad_input import run_cli

    from lctrun.runlock import LOCK_NAME, run_lock

    run_dir = tmp_path / "run"
    assert run_cli([*cli_run("epochs=1"), "--out", str(run_dir)])[0] == 0
    before = {f.name: f.stat().st_mtime_ns for f in run_dir.iterdir()}
    fresh = tmp_path / "fresh"  # held by a run that has written nothing yet
    with run_lock(run_dir), run_lock(fresh):
        holder = f"is in use by lctrun process {os.getpid()} on "
        for args in (
            cli_run("epochs=1", "--out", str(fresh)),
            ["train", "--resume", str(run_dir), "epochs=2"],
            ["compare", "experiments/mnist-cnn.yaml", *TINY, "--methods", "bp", "--out", str(run_dir)],
        ):
            code, err = run_cli(args)
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and holder in lines[0], (args, err)
        assert [f.name for f in fresh.iterdir()] == [LOCK_NAME]
        after = {f.name: f.stat().st_mtime_ns for f in run_dir.iterdir() if f.name != LOCK_NAME}
        assert after == before  # nothing written, nothing removed
    assert not (run_dir / LOCK_NAME).exists() and not fresh.exists()  # made by the lock, left empty: removed
    assert run_cli(["train", "--resume", str(run_dir), "epochs=2"])[0] == 0
    assert [r["epoch"] for r in read_rows(run_dir / "metrics.csv")] == [1, 2]


def test_a_killed_run_leaves_a_stale_lock_that_resume_takes_over_to_the_same_result(tmp_path):
    """kill -9 in epoch 2 leaves the lock behind (no clean-up runs); --resume finds its process gone, takes the
    lock over and says so, and ends with the metrics of the run that was never killed."""
    from lctrun.runlock import LOCK_NAME, read_holder

    whole = lctrun(*cli_run("--out", str(tmp_path / "whole")))
    assert whole.returncode == 0, whole.stderr
    part = tmp_path / "part"
    killed = lctrun(*cli_run("--out", str(part)), env={"LCTRUN_INJECT_FAULT": f"0:{STEPS + 2}:kill"})
    assert killed.returncode == -signal.SIGKILL
    stale = read_holder(part / LOCK_NAME)
    assert stale is not None and not os.path.exists(f"/proc/{stale['pid']}")
    resumed = lctrun("train", "--resume", str(part))
    assert resumed.returncode == 0, resumed.stderr
    said = " ".join(resumed.stdout.split())
    assert f"took over the lock of {part} from lctrun process {stale['pid']}" in said and "no longer runs" in said
    assert not (part / LOCK_NAME).exists()
    same_rows(read_rows(tmp_path / "whole" / "metrics.csv"), read_rows(part / "metrics.csv"))


def test_a_worker_drops_its_older_checkpoint_only_after_every_worker_wrote_the_new_one(tmp_path):
    """checkpoints.save: the older checkpoint survives until the barrier (every worker holds the new one), so a run
    killed while one worker still writes resumes from the last epoch all of them hold."""
    from lctrun import checkpoints

    class Worker:
        checkpoint_tag = ".rank1"

        def __init__(self):
            self.at_barrier = []

        def state_dict(self):
            return {"stages": []}

        def barrier(self):  # what this worker's directory holds when it reaches the barrier
            self.at_barrier.append(sorted(p.name for p in tmp_path.glob("ckpt-*")))

    worker = Worker()
    checkpoints.save(tmp_path, 1, worker, {})
    checkpoints.save(tmp_path, 2, worker, {})
    assert worker.at_barrier == [["ckpt-e1.rank1.pt"], ["ckpt-e1.rank1.pt", "ckpt-e2.rank1.pt"]]
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-e2.rank1.pt"]


def test_a_second_signal_stops_at_once():
    """The first Ctrl-C (or SIGTERM) asks for a stop between two steps; a second one stops at once
    (KeyboardInterrupt), which train turns into the one-line stop that keeps the finished epochs."""
    import os
    import signal

    from lctrun.runtime.stop import StopRequest

    with StopRequest((signal.SIGUSR1,)) as stop:
        assert not stop
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop and stop.signal == signal.SIGUSR1  # asked, the step goes on
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGUSR1)
    assert signal.getsignal(signal.SIGUSR1) != stop._handle  # the previous handler is back
