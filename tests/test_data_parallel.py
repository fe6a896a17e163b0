"""Data-parallel bp (runtime=distributed data_parallel=true): K replicas under DistributedDataParallel."""

from pathlib import Path

import pytest
import torch

from lctrun.config import load_experiment
from lctrun.errors import ConfigError
from lctrun.launch import run_training

pytestmark = pytest.mark.slow
TINY = [
    "data.name=fake",
    "data.shape=[1,28,28]",
    "data.train_size=96",
    "data.test_size=64",
    "data.batch_size=32",
    "data.augment=false",
    "model.name=cnn-small",
    "method=bp",
    "optim.lr=0.05",
    "threads_per_worker=1",
]
REPLICAS = ["runtime=distributed", "data_parallel=true", "workers=2"]


def parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model's parameters in the run's last checkpoint (rank 0's when there is one per worker), without
    BatchNorm's running statistics."""
    path = sorted(run_dir.glob("ckpt-e*.pt"))[0]
    group = torch.load(path, weights_only=False)["runtime"]["stages"][0]["group"]
    return {k: v for k, v in group.items() if "running_" not in k and "num_batches" not in k}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key


def test_replicas_take_the_update_of_one_process_and_resume(tmp_path):
    """Two replicas on half a batch each, BatchNorm on each half: the parameters of one process that accumulates
    the gradients of the same two halves (pipeline.microbatches=2), after 2 epochs of 3 steps, the second one
    resumed from the first's checkpoints."""
    serial = run_training(load_experiment(None, TINY + ["epochs=2", "pipeline.microbatches=2"]), tmp_path / "one")
    first = load_experiment(None, TINY + REPLICAS + ["epochs=1"])
    run_training(first, tmp_path / "dp")
    resumed = load_experiment(tmp_path / "dp" / "config.yaml", ["epochs=2"])
    dp = run_training(resumed, tmp_path / "dp", resume=True)
    assert [r["epoch"] for r in dp.rows] == [1, 2]
    assert_same(parameters(serial.run_dir), parameters(dp.run_dir))
    assert dp.rows[-1]["train_loss"] == pytest.approx(serial.rows[-1]["train_loss"], rel=1e-5)
    assert len(list(dp.run_dir.glob("ckpt-e2*.pt"))) == 2  # one per replica
    assert 0 <= dp.rows[-1]["test_acc"] <= 100


def test_uneven_parts_give_the_whole_batch_gradient(tmp_path):
    """Without BatchNorm (an LSTM) the replicas' update is the whole batch's, also when the last batch (23
    samples) splits 12 + 11: each replica's gradient is weighted by its share."""
    tiny = [o for o in TINY if not o.startswith("model.")] + ["model.name=lstm-seq", "data.train_size=87"]
    one = run_training(load_experiment(None, tiny), tmp_path / "one")
    dp = run_training(load_experiment(None, tiny + REPLICAS), tmp_path / "dp")
    assert_same(parameters(one.run_dir), parameters(dp.run_dir))


@pytest.mark.parametrize(
    "overrides, problem",
    [
        (["runtime=distributed", "data_parallel=true"], "workers=2"),
        (["data_parallel=true", "workers=2"], "runtime=distributed"),
        (REPLICAS + ["method=lct"], "method=bp"),
        (REPLICAS + ["model.split=[conv2]"], "model.groups=1"),
    ],
)
def test_bad_data_parallel_configs_are_one_line(overrides, problem):
    with pytest.raises(ConfigError, match=problem):
        load_experiment(None, overrides)
