"""The CUDA paths, each beside its CPU twin: skipped without a GPU (CI has none; every path here also runs on the
CPU in the other tests). On a lent GPU machine scripts/gpu_check.sh runs this file first."""

import pytest
import torch
from test_distributed import TINY as DISTRIBUTED_TINY

from lctrun.config import load_experiment
from lctrun.launch import run_training

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# the distributed tests' tiny run, with the same samples on both devices whatever each device's random stream
TINY = [*DISTRIBUTED_TINY, "data.augment=false"]


@pytest.fixture(autouse=True)
def full_fp32():
    """TF32 convolutions and matmuls would move a GPU run off the CPU's by 1e-3 after a step."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def params(run_dir, replicas: bool = False) -> list[torch.Tensor]:
    """The final parameters, group by group (one checkpoint per worker: rank 0's alone for replicas), without
    BatchNorm's running statistics (replicas and micro-batches update them on half batches, differently)."""
    out = []
    paths = sorted(run_dir.glob("ckpt-e*.pt"))
    for path in paths[:1] if replicas else paths:
        for stage in torch.load(path, weights_only=False, map_location="cpu")["runtime"]["stages"]:
            state = {**stage["group"], **stage.get("aux", {})}
            out += [v.float() for k, v in state.items() if "running_" not in k and "num_batches" not in k]
    return out


def same_run(a, b, replicas: bool = False) -> None:
    x, y = params(a.run_dir), params(b.run_dir, replicas)
    assert len(x) == len(y) > 0
    for p, q in zip(x, y, strict=True):
        assert torch.allclose(p, q, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("method", ["bp", "lct", "dgl", "dni"])
def test_a_serial_run_on_the_gpu_matches_the_cpu(tmp_path, method):
    cfg = TINY + [f"method={method}", "model.split=[conv2]", "pipeline_depth=1"]
    cpu = run_training(load_experiment(None, cfg + ["devices=[cpu]"]), run_dir=tmp_path / "cpu")
    gpu = run_training(load_experiment(None, cfg + ["devices=[cuda]"]), run_dir=tmp_path / "gpu")
    same_run(cpu, gpu)
    assert gpu.final["test_acc"] == pytest.approx(cpu.final["test_acc"], abs=2.0)


@pytest.mark.parametrize("method", ["bp", "lct"])
def test_two_workers_on_one_gpu_match_the_serial_run(tmp_path, method):
    """Two workers on one GPU (gloo between them, as NCCL needs a GPU per rank): the serial run's update."""
    cfg = TINY + [f"method={method}", "model.split=[conv2]", "pipeline_depth=1", "devices=[cuda:0,cuda:0]"]
    serial = run_training(load_experiment(None, cfg), run_dir=tmp_path / "serial")
    dist = run_training(load_experiment(None, cfg + ["runtime=distributed"]), run_dir=tmp_path / "dist")
    same_run(serial, dist)


def test_data_parallel_replicas_on_the_gpu_match_one_process(tmp_path):
    """DDP on one GPU (gloo): the update of one process accumulating the same two half batches (BatchNorm on
    each half, as each replica normalises its own)."""
    one = TINY + ["method=bp", "model.groups=1", "model.split=[]", "devices=[cuda]"]
    serial = run_training(load_experiment(None, one + ["pipeline.microbatches=2"]), run_dir=tmp_path / "one")
    replicas = one + ["runtime=distributed", "data_parallel=true", "workers=2"]
    ddp = run_training(load_experiment(None, replicas), run_dir=tmp_path / "ddp")
    same_run(serial, ddp, replicas=True)


def test_bf16_autocast_trains_on_the_gpu(tmp_path):
    cfg = TINY + ["method=lct", "model.split=[conv2]", "precision=bf16", "devices=[cuda]", "epochs=2"]
    run = run_training(load_experiment(None, cfg), run_dir=tmp_path / "bf16")
    assert run.final["test_acc"] > 0 and all(torch.isfinite(p).all() for p in params(run.run_dir))


@pytest.mark.parametrize("overrides", [[], ["precision=bf16", "memory_format=channels_last"]])
def test_the_projection_profiles_on_the_gpu(tmp_path, overrides):
    from lctrun.projection.project import project

    frame = project(
        "cnn-small",
        [2, 4],
        batch=32,
        shape=(1, 28, 28),
        links=["pcie4"],
        device="cuda",
        repeats=1,
        overrides=overrides,
        out=tmp_path / "p",
    )
    assert (frame["projected_samples_per_s"] > 0).all()
    assert {"bp 1 device", "bp data-parallel, 4 devices", "lct 2 devices, depth 2"} <= set(frame["config"])
    header = (tmp_path / "p.md").read_text()
    assert "(cuda," in header and ("precision bf16" in header) == bool(overrides)
