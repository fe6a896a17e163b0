"""Backprop: learns on real MNIST; model-parallel bp over K groups computes exactly bp's update."""

import pytest
import torch

from lctrun.config import load_experiment
from lctrun.prepared import make_serial_runtime, prepare
from lctrun.train import train


def small(overrides, **kw):
    base = [
        "data.name=fake",
        "data.shape=[1,28,28]",
        "data.train_size=64",
        "data.test_size=32",
        "data.batch_size=16",
        "optim.weight_decay=5e-4",
        "optim.momentum=0.9",
    ]
    return load_experiment(None, base + overrides)


def params_after(cfg, steps=3):
    p = prepare(cfg)
    runtime = make_serial_runtime(p)
    loader_x, loader_y = p.data.train_x[: 16 * steps], p.data.train_y[: 16 * steps]
    for i in range(steps):
        runtime.step_batch(loader_x[i * 16 : (i + 1) * 16], loader_y[i * 16 : (i + 1) * 16], torch.arange(16), {})
    return torch.cat([q.detach().flatten() for s in runtime.stages for q in s.group.parameters()])


@pytest.mark.parametrize("split", [["conv2"], ["conv1", "fc1"], ["conv1", "conv2", "conv3", "fc1"]])
def test_model_parallel_bp_equals_bp(split):
    whole = params_after(small(["method=bp"]))
    cut = params_after(small(["method=bp", f"model.split=[{','.join(split)}]"]))
    assert torch.allclose(whole, cut, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(whole, params_after(small(["method=bp"]), steps=0))  # the steps moved something


@pytest.mark.slow
def test_bp_learns_mnist(tmp_path, data_root):
    cfg = load_experiment(
        "experiments/mnist-cnn.yaml",
        [f"data.root={data_root}", "epochs=1", "data.train_size=10000", "data.test_size=2000"],
    )
    result = train(cfg, run_dir=tmp_path)
    assert result.final["test_acc"] >= 95.0, result.final


def test_schedules_advance_every_step():
    from lctrun.config import OptimConfig
    from lctrun.methods.optim import lr_factor

    cosine = OptimConfig(schedule="cosine")
    assert lr_factor(cosine, 0, 100, 10) == 1.0
    assert lr_factor(cosine, 50, 100, 10) == pytest.approx(0.5)
    assert lr_factor(cosine, 100, 100, 10) == pytest.approx(0.0)
    steps = OptimConfig(schedule="multistep", milestones=[2, 3], gamma=0.1)
    assert [lr_factor(steps, s, 40, 10) for s in (19, 20, 29, 30)] == pytest.approx([1, 0.1, 0.1, 0.01])
    cfg = small(["method=bp", "optim.schedule=cosine", "epochs=2"])
    p = prepare(cfg)
    runtime = make_serial_runtime(p)
    lrs = []
    for i in range(4):  # 64 samples / 16 = 4 steps per epoch, 8 in all
        runtime.step_batch(
            p.data.train_x[i * 16 : (i + 1) * 16], p.data.train_y[i * 16 : (i + 1) * 16], torch.arange(16), {}
        )
        lrs.append(runtime.lr)
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(cfg.optim.lr * 0.5)
