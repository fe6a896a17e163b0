"""Penalty / augmented-Lagrangian layer-parallel training: the identities that define it, SPH, filters, learning."""

import copy

import pytest
import torch

from lctrun.config import load_experiment
from lctrun.launch import run_training
from lctrun.methods import get_method
from lctrun.reporting.rundir import read_rows
from lctrun.train import begin_epoch, make_loaders, make_serial_runtime, prepare

TINY = [
    "data.name=fake",
    "data.shape=[1,28,28]",
    "data.train_size=64",
    "data.test_size=32",
    "data.batch_size=16",
    "model.name=cnn-small",
    "optim.lr=0.05",
]


def parallel_runtime(overrides):
    """A serial runtime of a layer-parallel method, refreshed and ready for its first parallel epoch."""
    p = prepare(load_experiment(None, TINY + overrides))
    runtime = make_serial_runtime(p)
    loader, _ = make_loaders(p, "cpu")
    begin_epoch(p, runtime, 1, loader)
    return p, runtime


def flat(module):
    return torch.cat([q.detach().flatten() for q in module.parameters()])


def batch(p, n=16):
    return next(iter(make_loaders(p, "cpu")[0]))


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # deepcopy of a stage
@pytest.mark.parametrize("method", ["penalty", "al"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_subproblems_are_independent_with_lambda_fixed(method, k):
    """A parallel step of group k changes only group k, and its update depends on no other group."""
    p, runtime = parallel_runtime([f"method={method}", "model.split=[conv1,conv2]"])
    x, y, idx = batch(p)
    stage_input = x if k == 0 else torch.randn(len(y), *runtime.stages[k].wire.in_shape)
    twin = copy.deepcopy(runtime.stages[k])
    before = [flat(s.group) for s in runtime.stages]

    runtime.stages[k].train_step(stage_input, y, idx)
    after = [flat(s.group) for s in runtime.stages]
    for j in range(3):
        assert torch.equal(before[j], after[j]) == (j != k)

    # the twin sees another neighbour message (what group k-1 sends): its parameters move the same way
    other_input = x if k == 0 else stage_input * 3 + 1
    twin.train_step(other_input, y, idx)
    assert torch.equal(flat(twin.group), after[k])


def test_al_multiplier_update_is_mu_plus_beta_times_residual():
    p, runtime = parallel_runtime(["method=al", "model.split=[conv2]", "layerpar.beta=3", "layerpar.lambda_lr=0.5"])
    stage = runtime.stages[1]
    x, y, idx = batch(p)
    stage.mu[idx] = torch.randn_like(stage.mu[idx])  # a multiplier from earlier iterations
    lam_old, mu_old = stage.lam[idx].clone(), stage.mu[idx].clone()
    phi = torch.randn_like(lam_old)  # what group 1 sends: D Phi_1(lambda_0)

    # g, the gradient of group 2's loss wrt lambda, as the stage computes it from its batch-mean loss
    lam = lam_old.clone().requires_grad_()
    torch.nn.functional.cross_entropy(copy.deepcopy(stage.group)(lam), y).backward()
    g = lam.grad * len(y)

    out = stage.train_step(phi, y, idx)
    beta, eta = 3.0, 0.5
    expected_lam = (beta * phi - mu_old - g + lam_old / eta) / (beta + 1 / eta)
    torch.testing.assert_close(stage.lam[idx], expected_lam, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stage.mu[idx], mu_old + beta * (stage.lam[idx] - phi), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.backward, stage.lam[idx] + stage.mu[idx] / beta)  # group 1's new target


def test_penalty_residual_falls_as_beta_grows(tmp_path):
    residuals = []
    for beta in [0.1, 1.0, 10.0, 100.0]:
        cfg = load_experiment(None, TINY + ["method=penalty", "model.split=[conv2]", f"layerpar.beta={beta}"])
        result = run_training(cfg, run_dir=tmp_path / str(beta))
        residuals.append(result.final["train_residual"])
    assert all(a > 2 * b for a, b in zip(residuals, residuals[1:], strict=False)), residuals


def test_sph_runs_phases_in_order_with_augmentation_only_in_serial_phases(tmp_path):
    overrides = ["method=al", "model.split=[conv2]", "epochs=6", "data.augment=crop-flip", "layerpar.sph=true"]
    overrides += ["layerpar.parallel_epochs=2", "layerpar.serial_epochs=1", "layerpar.cycles=2"]
    cfg = load_experiment(None, TINY + overrides)
    method = get_method("al")
    plans = [method.plan(cfg, e) for e in range(1, 7)]
    assert [pl.phase for pl in plans] == ["parallel", "parallel", "serial"] * 2
    assert [pl.refresh for pl in plans] == [True, False, False, True, False, False]
    assert [pl.beta for pl in plans] == [1.0, 2.0, None, 4.0, 8.0, None]

    rows = read_rows(run_training(cfg, run_dir=tmp_path).run_dir / "metrics.csv")
    assert [r["phase"] for r in rows] == ["parallel", "parallel", "serial"] * 2
    assert [r["augment"] for r in rows] == ["none", "none", "crop-flip"] * 2
    assert all(r["train_residual"] >= 0 for r in rows if r["phase"] == "parallel")


def test_refresh_makes_every_residual_zero():
    """After the forward pass that starts a parallel phase, lambda_k = D Phi_k(U lambda_{k-1}) exactly."""
    p, runtime = parallel_runtime(["method=penalty", "model.split=[conv1,conv2]", "layerpar.downsample=2"])
    first, middle, last = runtime.stages
    assert torch.equal(first.target, middle.lam) and torch.equal(middle.target, last.lam)
    assert middle.lam.shape[1:] == (32, 7, 7)  # conv1's 32x14x14 output, averaged over 2x2
    assert middle.wire.in_shape == (32, 7, 7) and first.wire.feedback_shape == (32, 7, 7)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_auxiliary_variables_are_stored_at_the_configured_precision(precision):
    _, runtime = parallel_runtime(["method=al", "model.split=[conv2]", f"layerpar.precision={precision}"])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert runtime.stages[1].lam.dtype == runtime.stages[1].mu.dtype == runtime.stages[0].target.dtype == dtype


def test_resume_restores_auxiliary_variables(tmp_path):
    """Stopping after a parallel epoch and resuming gives the run that never stopped."""
    overrides = TINY + ["method=al", "model.split=[conv2]", "layerpar.sph=true", "layerpar.parallel_epochs=2"]
    whole = run_training(load_experiment(None, overrides + ["epochs=3"]), run_dir=tmp_path / "whole")
    run_training(load_experiment(None, overrides + ["epochs=2"]), run_dir=tmp_path / "part")
    resumed = run_training(load_experiment(None, overrides + ["epochs=3"]), run_dir=tmp_path / "part", resume=True)
    for a, b in zip(whole.rows, resumed.rows, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["penalty", "al"])
def test_layer_parallel_with_sph_learns_mnist(tmp_path, data_root, method):
    cfg = load_experiment(
        "experiments/mnist-cnn.yaml",
        [
            f"data.root={data_root}",
            "data.train_size=4000",
            "data.test_size=1000",
            "data.augment=crop",
            "model.name=resnet8",
            "model.split=[layer2]",
            "submodels=false",
            f"method={method}",
            "epochs=4",
            "layerpar.sph=true",
        ],
    )
    rows = run_training(cfg, run_dir=tmp_path).rows
    assert [r["phase"] for r in rows] == ["parallel", "serial"] * 2
    assert rows[0]["test_acc"] > 30.0  # the parallel phase alone learns
    assert rows[-1]["test_acc"] >= 80.0, rows[-1]  # chance is 10%
