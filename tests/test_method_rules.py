"""One step of each local method against autograd of the rule it states (exact, like the lambda-formula
test of the layer-parallel methods): what every group, critic, head and synthesizer moves by.

Plain SGD (no momentum, no weight decay) for the groups and SGD for the auxiliary modules, whose first
step is -lr * grad whatever the momentum: a parameter's change is then -lr times its gradient, so a
wrong gradient and a module that never steps both show.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from lctrun.config import load_experiment
from lctrun.prepared import make_serial_runtime, prepare

LR, AUX_LR = 0.1, 0.01
TINY = [
    "data.name=fake",
    "data.shape=[1,28,28]",
    "data.train_size=32",
    "data.test_size=16",
    "data.batch_size=16",
    "model.name=cnn-small",
    f"optim.lr={LR}",
    "optim.momentum=0",
    "optim.weight_decay=0",
    "optim.nesterov=false",
    "optim.schedule=none",
    "critic.optim=sgd",
    f"critic.lr={AUX_LR}",
    "critic.channels=8",
]
SPLITS = {2: "[conv2]", 3: "[conv1,conv3]"}


def one_step(method, groups, extra=()):
    """(modules before the step, the runtime after one step, the batch)."""
    p = prepare(load_experiment(None, TINY + [f"method={method}", f"model.split={SPLITS[groups]}", *extra]))
    runtime = make_serial_runtime(p)
    for stage in runtime.stages:
        stage.train(True)
    before = [(copy.deepcopy(s.group), copy.deepcopy(s.aux)) for s in runtime.stages]
    x, y = p.data.train_x[:16], p.data.train_y[:16]
    runtime.step_batch(x, y, torch.arange(16), {})
    return before, runtime, x, y


def assert_moved_by(module_after, module_before, loss, lr):
    """module_after = module_before - lr * d(loss)/d(its parameters)."""
    params = list(module_before.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    moved = [
        (new.detach() - old.detach(), -lr * (torch.zeros_like(old) if g is None else g))
        for new, old, g in zip(module_after.parameters(), params, grads, strict=True)
    ]
    scale = max(expected.abs().max().item() for _, expected in moved)
    assert scale > 0, "the rule moves nothing: the check would be empty"
    for change, expected in moved:  # compared on the scale of the change, however small the step
        torch.testing.assert_close(change, expected, atol=1e-3 * scale, rtol=1e-3)


def chain(before, x):
    """Each group's output, recomputed from the pre-step copies (input of group k+1 = output of group k)."""
    hs, h = [], x
    for group, _ in before:
        h = group(h.detach())
        hs.append(h)
    return hs


@pytest.mark.parametrize(
    "groups, loss, target",
    [(2, "l1", "next"), (3, "l1", "next"), (2, "mse", "next"), (3, "mse", "next"), (3, "l1", "final")],
)
def test_lct_groups_and_critics_follow_the_cascade(groups, loss, target):
    """Group k < K: -lr grad of mean l_k, l_k = CE(c_k(h_k), y) with the pre-update critic; group K: the true
    loss; critic k: -lr grad of mean |l_k - l_{k+1}| (or squared), l_{k+1} detached; with critic.target=final
    (critic training) every critic matches l_K instead."""
    before, runtime, x, y = one_step("lct", groups, [f"critic.loss={loss}", f"critic.target={target}"])
    hs = chain(before, x)
    losses = [F.cross_entropy(aux(h), y, reduction="none") for (_, aux), h in zip(before[:-1], hs[:-1], strict=False)]
    losses.append(F.cross_entropy(hs[-1], y, reduction="none"))
    for k, stage in enumerate(runtime.stages):
        group, critic = before[k]
        assert_moved_by(stage.group, group, losses[k].mean(), LR)
        if k < groups - 1:
            diff = losses[k] - losses[k + 1 if target == "next" else -1].detach()
            assert_moved_by(stage.aux, critic, diff.abs().mean() if loss == "l1" else diff.pow(2).mean(), AUX_LR)


@pytest.mark.parametrize("groups", [2, 3])
def test_dgl_group_and_head_follow_the_heads_cross_entropy(groups):
    before, runtime, x, y = one_step("dgl", groups)
    hs = chain(before, x)
    for k, stage in enumerate(runtime.stages):
        group, head = before[k]
        if k == groups - 1:
            assert_moved_by(stage.group, group, F.cross_entropy(hs[k], y), LR)
            continue
        loss = F.cross_entropy(head(hs[k]), y)
        assert_moved_by(stage.aux, head, loss, LR)  # the head is trained with its group, by the main optimiser
        assert_moved_by(stage.group, group, F.cross_entropy(head(group(hs[k - 1].detach() if k else x)), y), LR)


def test_dni_synthesizer_regresses_onto_the_true_gradient():
    """Synthesizer: -lr grad of mean (s(h_1) - B dL/dh_1)^2, the true gradient of the batch-mean loss scaled by B;
    group 1 backpropagates s(h_1)/B (zero at the first step: the synthesizer's output layer starts at zero)."""
    before, runtime, x, y = one_step("dni", 2)
    (g1, synth), (g2, _) = before
    h1 = g1(x)
    h = h1.detach().requires_grad_()
    (true_grad,) = torch.autograd.grad(F.cross_entropy(g2(h), y), h)
    target = true_grad * len(y)
    assert target.abs().sum() > 0
    assert_moved_by(runtime.stages[0].aux, synth, F.mse_loss(synth(h1.detach()), target), AUX_LR)
    assert synth(h1.detach()).abs().max() == 0  # so group 1, which backpropagates s(h_1)/B, stays where it was
    assert all(torch.equal(a, b) for a, b in zip(runtime.stages[0].group.parameters(), g1.parameters(), strict=True))
    assert_moved_by(runtime.stages[1].group, g2, F.cross_entropy(g2(h1.detach()), y), LR)


def test_the_runtimes_declare_the_contract_the_loop_uses():
    """train.py checks isinstance(runtime, Runtime) at its start (so every distributed test checks that
    runtime); here the serial one, and a runtime missing a member is refused."""
    from lctrun.runtime.base import Runtime

    p = prepare(load_experiment(None, TINY + ["method=lct", "model.split=[conv2]"]))
    runtime = make_serial_runtime(p)
    assert isinstance(runtime, Runtime)
    members = {k: v for k, v in vars(type(runtime)).items() if not k.startswith("__") and k != "gather"}
    incomplete = type("Incomplete", (), members)()
    incomplete.worker_stats = []
    assert not isinstance(incomplete, Runtime)
