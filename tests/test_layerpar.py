"""Penalty / augmented-Lagrangian layer-parallel training: the identities that define it, SPH, filters, learning."""

import copy
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lctrun.cli import app
from lctrun.config import ConfigError, load_experiment
from lctrun.data import TensorLoader
from lctrun.launch import run_training
from lctrun.methods import get_method
from lctrun.models import MODELS, ModelSpec
from lctrun.models.cnn import cnn_small
from lctrun.prepared import begin_epoch, make_loaders, make_serial_runtime, prepare
from lctrun.reporting.rundir import read_rows

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
    stage = runtime.stages[k]
    twin = copy.deepcopy(stage)
    target = None if k == 2 else torch.randn(len(y), *stage.wire.feedback_shape)  # what group k+1 sends
    before = [flat(s.group) for s in runtime.stages]

    if target is not None:
        stage.feedback(target)
    stage.train_step(x if k == 0 else None, y, idx)
    after = [flat(s.group) for s in runtime.stages]
    for j in range(3):
        assert torch.equal(before[j], after[j]) == (j != k)

    # the twin holds another phi from group k-1 (it only enters the lambda update): the parameters move the same way
    if k > 0:
        twin.phi[idx] = twin.phi[idx] * 3 + 1
    if target is not None:
        twin.feedback(target)
    twin.train_step(x if k == 0 else None, y, idx)
    assert torch.equal(flat(twin.group), after[k])


def test_al_multiplier_update_is_mu_plus_beta_times_residual():
    p, runtime = parallel_runtime(["method=al", "model.split=[conv2]", "layerpar.beta=3", "layerpar.lambda_lr=0.5"])
    stage = runtime.stages[1]
    x, y, idx = batch(p)
    stage.mu[idx] = torch.randn_like(stage.mu[idx])  # a multiplier from earlier iterations
    lam_old, mu_old = stage.lam[idx].clone(), stage.mu[idx].clone()
    phi = torch.randn_like(lam_old)  # what group 1 sent at its last visit: D Phi_1(lambda_0)
    stage.phi[idx] = phi

    # g, the gradient of group 2's loss wrt lambda, as the stage computes it from its batch-mean loss
    lam = lam_old.clone().requires_grad_()
    torch.nn.functional.cross_entropy(copy.deepcopy(stage.group)(lam), y).backward()
    g = lam.grad * len(y)

    out = stage.train_step(None, y, idx)
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
    overrides += ["layerpar.beta=1"]
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
    assert all(r["train_residual"] > 0 for r in rows if r["phase"] == "parallel")  # lambda moved off phi


def test_refresh_makes_every_residual_zero():
    """After the forward pass that starts a parallel phase, lambda_k = phi_k = D Phi_k(U lambda_{k-1}) exactly,
    and phi_k of a sample does not depend on its batch."""
    p, runtime = parallel_runtime(["method=penalty", "model.split=[conv1,conv2]", "layerpar.downsample=2"])
    first, middle, last = runtime.stages
    assert torch.equal(middle.phi, middle.lam) and torch.equal(last.phi, last.lam)
    ordered = next(
        iter(TensorLoader(p.data.train_x, p.data.train_y, 16, shuffle=False, mean=p.data.mean, std=p.data.std))
    )
    assert not any(m.training for m in first.group.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():  # a lower group's BatchNorm uses its running statistics in a parallel phase
        expected = middle.filter.down(first.group(ordered.x))
    torch.testing.assert_close(middle.lam[:16], expected)
    assert middle.lam.shape[1:] == (32, 7, 7)  # conv1's 32x14x14 output, averaged over 2x2
    assert middle.wire.in_shape == (32, 7, 7) and first.wire.feedback_shape == (32, 7, 7)
    assert first.wire.order == middle.wire.order == "backward"


def test_the_refresh_before_each_parallel_phase_sets_mu_to_zero():
    """al with SPH: a parallel epoch moves mu, a serial epoch follows, and the refresh that starts the next parallel
    phase sets lambda = phi and mu = 0 for every sample (docs/methods.md section 6)."""
    p = prepare(load_experiment(None, TINY + ["method=al", "model.split=[conv2]", "layerpar.sph=true", "epochs=3"]))
    runtime = make_serial_runtime(p)
    loader, _ = make_loaders(p, "cpu")
    for epoch in (1, 2):  # parallel (mu moves), then serial
        begin_epoch(p, runtime, epoch, loader)
        runtime.train_epoch(loader)
    stage = runtime.stages[1]
    assert float(stage.mu.abs().sum()) > 0 and not torch.equal(stage.lam, stage.phi)
    plan = begin_epoch(p, runtime, 3, loader)  # the refresh of the next parallel phase
    assert plan.phase == "parallel" and plan.refresh
    assert int(torch.count_nonzero(stage.mu)) == 0 and torch.equal(stage.lam, stage.phi)


def test_refresh_leaves_batchnorm_running_statistics_alone():
    p = prepare(load_experiment(None, TINY + ["method=al", "model.split=[conv1,conv2]"]))
    runtime = make_serial_runtime(p)
    stats = [b.clone() for s in runtime.stages for name, b in s.group.named_buffers() if "running" in name]
    assert stats
    begin_epoch(p, runtime, 1, make_loaders(p, "cpu")[0])
    assert runtime.stages[1].lam is not None  # the refresh ran
    after = [b for s in runtime.stages for name, b in s.group.named_buffers() if "running" in name]
    assert all(torch.equal(a, b) for a, b in zip(stats, after, strict=True))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_auxiliary_variables_are_stored_at_the_configured_precision(precision):
    _, runtime = parallel_runtime(["method=al", "model.split=[conv2]", f"layerpar.storage={precision}"])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert runtime.stages[1].lam.dtype == runtime.stages[1].mu.dtype == runtime.stages[1].phi.dtype == dtype


def cnn_without_batchnorm(num_classes, in_shape):
    """cnn-small with its BatchNorm layers taken out: a step's update is then a function of its batch alone."""
    model = cnn_small(num_classes, in_shape)
    for block in (model.conv1, model.conv2, model.conv3):
        block[1] = torch.nn.Identity()
    return model


@pytest.fixture
def plain_cnn(monkeypatch):
    monkeypatch.setitem(MODELS, "cnn-plain", ModelSpec(cnn_without_batchnorm, "cnn-small without BN"))
    return ["model.name=cnn-plain", "optim.momentum=0", "optim.weight_decay=0", "optim.nesterov=false"]


def group_update(overrides, method):
    """Group 1's parameter change over the first step of epoch 1 (after the refresh), in one process."""
    p = prepare(load_experiment(None, TINY + overrides + [f"method={method}"]))
    runtime = make_serial_runtime(p)
    loader, _ = make_loaders(p, "cpu")
    begin_epoch(p, runtime, 1, loader)
    b = next(iter(loader))
    before = flat(runtime.stages[0].group)
    runtime.step_batch(b.x, b.y, b.idx, {})
    return flat(runtime.stages[0].group) - before


@pytest.mark.parametrize("method", ["penalty", "al"])
@pytest.mark.parametrize("split", [["conv2"], ["conv1", "conv2"]])
def test_lower_group_learns_like_backprop_in_the_first_parallel_step(plain_cnn, method, split):
    """Right after a refresh, group 1's sub-problem gradient is beta/(beta + 1/eta) times backprop's for penalty,
    and twice that for al (its target also moves by mu/beta): the lower groups learn from the first step."""
    overrides = plain_cnn + [f"model.split=[{','.join(split)}]", "layerpar.beta=2", "layerpar.lambda_lr=0.5"]
    overrides += ["layerpar.fit_step=1e30"]  # no cap on the step: the plain SGD step on the stated objective
    bp = group_update(overrides, "bp")
    ours = group_update(overrides, method)
    scale = 2 / (2 + 1 / 0.5) * (2 if method == "al" else 1)
    if len(split) == 2:  # group 1's target comes through group 2's regression: the same chain rule, one hop later
        scale *= 2 / (2 + 1 / 0.5) * (2 if method == "al" else 1)
    assert 0.1 < ours.norm() / bp.norm() < 10 and torch.nn.functional.cosine_similarity(ours, bp, dim=0) > 0.99
    torch.testing.assert_close(ours, scale * bp, atol=1e-7, rtol=1e-3)
    # the default cap on the regression step (fit_step) shortens the step, never turns it
    capped = group_update(overrides[:-1], method)
    assert capped.norm() <= ours.norm() * (1 + 1e-5) and torch.nn.functional.cosine_similarity(capped, bp, dim=0) > 0.99


def test_penalty_and_al_differ_with_one_parallel_epoch_per_sph_cycle(tmp_path):
    """The default SPH schedule (1 parallel + 1 serial epoch): the multipliers reach the weights."""
    finals = {}
    for method in ("penalty", "al"):
        cfg = load_experiment(None, TINY + [f"method={method}", "model.split=[conv2]", "layerpar.sph=true", "epochs=2"])
        run_dir = run_training(cfg, run_dir=tmp_path / method).run_dir
        state = torch.load(run_dir / "ckpt-e2.pt", weights_only=False)["runtime"]["stages"][0]["group"]
        finals[method] = torch.cat([v.float().flatten() for v in state.values()])
    assert not torch.allclose(finals["penalty"], finals["al"], atol=1e-4)


def test_al_target_uses_the_beta_in_force():
    """In epoch 2 (beta = 2 beta_0) group 1 regresses onto lambda + mu/beta with beta = 2 beta_0."""
    p = prepare(load_experiment(None, TINY + ["method=al", "model.split=[conv2]", "epochs=2", "layerpar.beta=3"]))
    runtime = make_serial_runtime(p)
    loader, _ = make_loaders(p, "cpu")
    begin_epoch(p, runtime, 1, loader)
    runtime.train_epoch(loader)
    begin_epoch(p, runtime, 2, loader)
    first, second = runtime.stages
    assert second.beta == 6.0
    seen = []
    take = first.feedback
    first.feedback = lambda msg: (seen.append(msg.clone()), take(msg))[1]
    b = next(iter(loader))
    runtime.step_batch(b.x, b.y, b.idx, {})
    torch.testing.assert_close(seen[0], second.lam[b.idx] + second.mu[b.idx] / 6.0)


@pytest.mark.parametrize("method", ["penalty", "al"])
@pytest.mark.parametrize("downsample", [1, 2])
def test_regression_gradient_is_autograd_of_the_stated_objective(method, downsample):
    """Middle group of K = 3: grad of mean_batch beta/2 ||D Phi_k(U lambda_{k-1}) - t_k||^2 (summed over elements)."""
    overrides = [
        f"method={method}",
        "model.split=[conv1,conv2]",
        "layerpar.beta=5",
        f"layerpar.downsample={downsample}",
        "layerpar.fit_step=1e30",  # no cap on the step
    ]
    p, runtime = parallel_runtime(overrides)
    stage = runtime.stages[1]
    x, y, idx = batch(p)
    target = torch.randn(len(y), *stage.wire.feedback_shape)
    twin = copy.deepcopy(stage.group)
    lam = stage.lam[idx].float().requires_grad_()
    phi = stage.filter.down(twin(stage.filter.up(lam, stage.ctx.in_shape)))
    (5.0 / 2 * (phi - target).pow(2).flatten(1).sum(1).mean()).backward()

    stage.feedback(target)
    stage.train_step(None, y, idx)
    for ours, expected in zip(stage.group.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, expected.grad, atol=1e-6, rtol=1e-4)
    # and lambda moved by the proximal step with g = B * d(objective)/d lambda
    eta = p.cfg.layerpar.lambda_lr
    phi_old = stage.phi[idx].float()
    expected_lam = (5.0 * phi_old - lam.grad * len(y) + lam.detach() / eta) / (5.0 + 1 / eta)
    torch.testing.assert_close(stage.lam[idx], expected_lam, atol=1e-5, rtol=1e-4)


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
    assert all(r["g1_update_norm"] > 0.01 for r in rows if r["phase"] == "parallel")  # group 1 learns there too
    assert rows[2]["test_acc"] > 50.0  # after a parallel epoch
    assert rows[-1]["test_acc"] >= 80.0, rows[-1]  # chance is 10%


@pytest.mark.parametrize(
    "overrides, problem",
    [
        (["method=penalty", "layerpar.beta=0"], "layerpar.beta must be a finite number > 0"),
        (["method=al", "layerpar.lambda_lr=-1"], "layerpar.lambda_lr must be a finite number > 0"),
        (["method=al", "layerpar.downsample=3"], "layerpar.downsample=3 is not one of: 1, 2, 4"),
        (["method=lct", "model.split=[conv2]", "layerpar.beta=3"], "layerpar.beta only apply to method=penalty"),
    ],
)
def test_bad_layer_parallel_input_is_one_clear_line(tmp_path, overrides, problem):
    out = tmp_path / "run"
    args = [
        "train",
        str(Path(__file__).resolve().parents[1] / "experiments" / "mnist-cnn.yaml"),
        "--out",
        str(out),
        *TINY,
        *overrides,
    ]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, ConfigError), result.output
    assert problem in str(result.exception) and "\n" not in str(result.exception)
    assert not out.exists()
