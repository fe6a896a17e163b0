"""The distributed runtime (gloo over loopback): same updates as the serial one, learning, faults, counters."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from children import descendants, still_alive

from lctrun.config import load_experiment
from lctrun.errors import LctrunError
from lctrun.launch import run_training
from lctrun.reporting.rundir import read_rows

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.name=fake",
    "data.shape=[1,28,28]",
    "data.train_size=96",
    "data.test_size=64",
    "data.batch_size=32",
    "model.name=cnn-small",
    "epochs=1",
    "optim.lr=0.05",
    "critic.lr=0.001",
    "critic.channels=16",
]


def group_params(run_dir: Path) -> list[torch.Tensor]:
    """The parameters in the run's final checkpoints, group by group (one file, or one per worker)."""
    out = []
    for path in sorted(run_dir.glob("ckpt-e*.pt")):
        for stage in torch.load(path, weights_only=False)["runtime"]["stages"]:
            out += [v.float() for v in stage["group"].values()] + [v.float() for v in stage.get("aux", {}).values()]
    return out


@pytest.mark.parametrize(
    "method, split",
    [(m, s) for m in ("bp", "lct", "dgl", "dni") for s in (["conv2"], ["conv1", "fc1"])]
    + [("lct critic.target=final", ["conv1", "fc1"])],  # l_K relayed from group 3 to group 1
)
def test_distributed_equals_serial(tmp_path, method, split):
    method, *extra = method.split()
    overrides = TINY + [f"method={method}", f"model.split=[{','.join(split)}]", "pipeline_depth=1", *extra]
    serial = run_training(load_experiment(None, overrides), run_dir=tmp_path / "serial")
    dist = run_training(load_experiment(None, overrides + ["runtime=distributed"]), run_dir=tmp_path / "dist")
    a, b = group_params(serial.run_dir), group_params(dist.run_dir)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-4)
    assert serial.final["test_acc"] == pytest.approx(dist.final["test_acc"], abs=0.01)  # eval through the workers


@pytest.mark.parametrize("schedule, split", [("gpipe", ["conv2"]), ("1f1b", ["conv1", "fc1"])])
def test_pipelined_bp_equals_microbatch_accumulation(tmp_path, schedule, split):
    """torch.distributed.pipelining's schedule over K workers gives the update of backprop in one process that
    sums the gradients of the same 4 micro-batches (BatchNorm per micro-batch in both): the same parameters,
    running statistics included, after 3 steps. Model-parallel bp without micro-batches differs (BN sees the
    whole batch) but sends the same bytes."""
    overrides = TINY + ["method=bp", f"model.split=[{','.join(split)}]", "data.augment=false", "threads_per_worker=1"]
    serial = run_training(load_experiment(None, overrides + ["pipeline.microbatches=4"]), run_dir=tmp_path / "serial")
    piped = overrides + ["pipeline.microbatches=4", f"pipeline.schedule={schedule}", "runtime=distributed"]
    dist = run_training(load_experiment(None, piped), run_dir=tmp_path / "dist")
    whole = run_training(load_experiment(None, overrides + ["runtime=distributed"]), run_dir=tmp_path / "whole")
    a, b, c = group_params(serial.run_dir), group_params(dist.run_dir), group_params(whole.run_dir)
    for x, y in zip(a, b, strict=True):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-4)
    assert max(float((x - z).abs().max()) for x, z in zip(a, c, strict=True)) > 1e-3
    assert serial.rows[-1]["train_loss"] == pytest.approx(dist.rows[-1]["train_loss"], rel=1e-5)
    piped_workers = read_rows(dist.run_dir / "workers.csv")
    assert [w["bytes_sent"] for w in piped_workers] == [
        w["bytes_sent"] for w in read_rows(whole.run_dir / "workers.csv")
    ]
    assert all(w["compute_s"] > 0 and w["wait_s"] >= 0 for w in piped_workers)


@pytest.mark.parametrize(
    "method, split",
    [("penalty", ["conv2"]), ("al", ["conv1", "fc1"])],  # fc1's output is not spatial: sent unfiltered
)
def test_layer_parallel_distributed_equals_serial(tmp_path, method, split):
    """Parallel phases (workers run ahead), a serial phase, a refresh, filters: the same as one process.
    One thread everywhere: the lower groups learn fast enough to turn thread-order rounding into 1e-4."""
    overrides = TINY + [f"method={method}", f"model.split=[{','.join(split)}]", "epochs=4", "layerpar.sph=true"]
    overrides += ["threads_per_worker=1"]
    overrides += ["layerpar.parallel_epochs=2", "layerpar.downsample=2", "data.augment=crop"]
    serial = run_training(load_experiment(None, overrides), run_dir=tmp_path / "serial")
    dist = run_training(load_experiment(None, overrides + ["runtime=distributed"]), run_dir=tmp_path / "dist")
    a, b = group_params(serial.run_dir), group_params(dist.run_dir)
    for x, y in zip(a, b, strict=True):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-4)
    for r, s in zip(serial.rows, dist.rows, strict=True):
        assert r["phase"] == s["phase"] and r["train_loss"] == pytest.approx(s["train_loss"], rel=1e-4)
        if r["phase"] == "parallel":
            assert r["train_residual"] == pytest.approx(s["train_residual"], rel=1e-3)


def test_downsampling_by_f_cuts_bytes_sent_by_f_squared(tmp_path):
    """Measured by the channel counters in a parallel epoch, forward (states) and backward (targets)."""
    sent = {}
    for f in [1, 2, 4]:
        overrides = ["data.name=fake", "data.shape=[3,16,16]", "data.train_size=64", "data.test_size=32"]
        overrides += ["data.batch_size=32", "model.name=resnet8", "model.split=[layer1]", "method=penalty"]
        cfg = load_experiment(None, overrides + [f"layerpar.downsample={f}", "runtime=distributed"])
        workers = read_rows(run_training(cfg, run_dir=tmp_path / str(f)).run_dir / "workers.csv")
        sent[f] = (workers[0]["bytes_sent"], workers[1]["bytes_sent"])
    state = 16 * 16 * 16 * 4  # layer1's output per sample, fp32
    assert sent[1] == (2 * 64 * state, 64 * state)  # refresh + epoch forward; one target per sample back
    for f in [2, 4]:
        assert sent[1][0] == f * f * sent[f][0] and sent[1][1] == f * f * sent[f][1]


def test_counters_match_the_tensors_sent(tmp_path):
    cfg = load_experiment(None, TINY + ["method=lct", "model.split=[conv2]", "runtime=distributed"])
    result = run_training(cfg, run_dir=tmp_path)
    workers = read_rows(result.run_dir / "workers.csv")
    first, second = workers[0], workers[1]
    activation = 64 * 7 * 7 * 4  # conv2 output per sample, fp32
    assert first["bytes_sent"] == 96 * activation == second["bytes_received"]
    assert second["bytes_sent"] == 96 * 4 == first["bytes_received"]  # lct sends one loss per sample back
    for w in workers:
        assert w["peak_mem_mb"] > 0 and w["params_mb"] > 0 and w["activations_mb"] > 0 and w["compute_s"] > 0


def test_pipelined_lct_learns_mnist(tmp_path, data_root):
    cfg = load_experiment(
        "experiments/mnist-cnn.yaml",
        [
            f"data.root={data_root}",
            "epochs=1",
            "data.train_size=4000",
            "data.test_size=1000",
            "method=lct",
            "model.split=[conv1]",
            "runtime=distributed",
            "pipeline_depth=4",
        ],
    )
    result = run_training(cfg, run_dir=tmp_path)
    assert result.final["test_acc"] >= 60.0, result.final


def test_a_failing_worker_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("LCTRUN_INJECT_FAULT", "1:3")
    cfg = load_experiment(None, TINY + ["method=lct", "model.split=[conv1,fc1]", "runtime=distributed"])
    start = time.time()
    with pytest.raises(LctrunError, match=r"worker 1 \(group 2\) failed: RuntimeError: injected fault at step 3"):
        run_training(cfg, run_dir=tmp_path)
    assert time.time() - start < 60


def test_a_killed_worker_stops_the_run_from_the_cli(tmp_path):
    start = time.time()
    args = [*TINY, "method=lct", "model.split=[conv2]", "runtime=distributed", "--out", str(tmp_path)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lctrun", "train", "experiments/mnist-cnn.yaml", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "LCTRUN_INJECT_FAULT": "0:2:kill"},
    )
    workers: set[int] = set()
    while proc.poll() is None and time.time() - start < 120:  # the launcher's children, while it has them
        workers |= descendants(proc.pid)
        time.sleep(0.05)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "Traceback" not in err
    assert "worker 0 (group 1) failed: died (signal 9)" in err
    assert time.time() - start < 90
    assert workers and still_alive(workers) == []


def test_ctrl_c_stops_every_worker(tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lctrun",
            "train",
            "experiments/mnist-cnn.yaml",
            *TINY,
            "epochs=500",
            "method=lct",
            "model.split=[conv2]",
            "runtime=distributed",
            "--out",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    deadline = time.time() + 90
    while not (tmp_path / "metrics.csv").exists() and time.time() < deadline:  # wait for training to run
        time.sleep(0.5)
    workers = descendants(proc.pid)
    proc.send_signal(signal.SIGINT)
    start = time.time()
    _, err = proc.communicate(timeout=30)
    assert time.time() - start < 15
    assert proc.returncode == 2 and "interrupted" in err and "Traceback" not in err  # exit 2, as the README says
    assert workers and still_alive(workers) == []
    assert read_rows(tmp_path / "metrics.csv")  # what was written stays
    assert f"continue with: lctrun train --resume {tmp_path}" in " ".join(err.split())


RELEASE = """
import os
import torch.distributed as dist
import lctrun.runtime.distributed  # what a worker imports before it joins its process group

threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
import torch._dynamo  # torch imports it lazily, after the worker has joined (and it imports torch.distributed.nn)
box = [before]
dist.broadcast_object_list(box, src=0)
dist.destroy_process_group()
print(before, threads())
"""


RELEASE_DDP = """
import gc
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from lctrun.config import load_experiment
from lctrun.prepared import make_loaders
from lctrun.runtime import distributed

held = []
def destroy(destroy=dist.destroy_process_group):
    held.append(sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects()))
    destroy()
distributed.dist.destroy_process_group = destroy
store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
overrides = ["data.name=fake", "data.shape=[1,8,8]", "data.train_size=32", "data.test_size=8", "data.batch_size=16"]
overrides += ["model.name=cnn-small", "runtime=distributed", "data_parallel=true", "workers=1"]
job = lambda p, runtime, console: runtime.train_epoch(make_loaders(p, "cpu")[0])
distributed.run_worker(load_experiment(None, overrides), 0, 1, 0, f"store://127.0.0.1:{store.port}", job)
print(held[0])
"""


def test_a_data_parallel_worker_lets_go_of_its_replica_before_it_leaves_the_group():
    """DDP's reducer holds the process group: a replica still alive at destroy_process_group keeps gloo's threads
    running into interpreter shutdown (the bench's data-parallel row aborted with signal 6 once)."""
    out = subprocess.run([sys.executable, "-c", RELEASE_DDP], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "0"  # no DistributedDataParallel object left when the group is destroyed


def test_a_worker_lets_go_of_its_process_group_before_it_exits():
    """Nothing may keep the process group alive past destroy_process_group: its gloo threads would run into
    interpreter shutdown, where one can free a tensor and abort the worker after its work is done
    (signal 6 in about 1 of 60 runs, when torch.distributed.nn was first imported after joining)."""
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = map(int, out.stdout.split())
    assert after == before  # gloo's threads joined
