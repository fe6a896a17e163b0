"""Local critic training and its relatives: the identities that define them, and learning on MNIST."""

import pytest
import torch

from lctrun.config import load_experiment
from lctrun.prepared import make_serial_runtime, prepare
from lctrun.train import train

TINY = [
    "data.name=fake",
    "data.shape=[1,28,28]",
    "data.train_size=64",
    "data.test_size=32",
    "data.batch_size=16",
    "model.name=cnn-small",
    "optim.lr=0.05",
    "critic.lr=0.01",
    "critic.channels=8",
]


def runtime_for(overrides):
    p = prepare(load_experiment(None, TINY + overrides))
    return p, make_serial_runtime(p)


def steps(runtime, p, n=2):
    for i in range(n):
        sl = slice(i * 16, (i + 1) * 16)
        runtime.step_batch(p.data.train_x[sl], p.data.train_y[sl], torch.arange(16), {})


def flat(module):
    return torch.cat([q.detach().flatten() for q in module.parameters()])


@pytest.mark.parametrize("method", ["lct", "dgl"])
@pytest.mark.parametrize("k", [0, 1])
def test_no_gradient_crosses_a_group_boundary(method, k):
    """Group k's update is the same whatever the parameters of the groups after it."""
    p1, r1 = runtime_for([f"method={method}", "model.split=[conv1,conv3]"])
    p2, r2 = runtime_for([f"method={method}", "model.split=[conv1,conv3]"])
    assert torch.equal(flat(r1.stages[k].group), flat(r2.stages[k].group))
    with torch.no_grad():  # make the two models differ only after group k
        for stage in r2.stages[k + 1 :]:
            for q in stage.group.parameters():
                q.mul_(-3.0).add_(0.1)
    # One step: later steps of lct legitimately depend on later groups through critic k, which learns
    # from l_{k+1} (a loss value, not a gradient).
    steps(r1, p1, 1)
    steps(r2, p2, 1)
    before = flat(prepare(load_experiment(None, TINY + [f"method={method}", "model.split=[conv1,conv3]"])).groups[k])
    assert not torch.equal(before, flat(r1.stages[k].group))  # it did learn
    assert torch.equal(flat(r1.stages[k].group), flat(r2.stages[k].group))
    assert not torch.equal(flat(r1.stages[-1].group), flat(r2.stages[-1].group))


def test_critic_target_is_detached():
    """Critic k's cascade loss reaches critic k only: the next group gets no gradient from it."""
    p, runtime = runtime_for(["method=lct", "model.split=[conv2]"])
    first, second = runtime.stages
    x, y = p.data.train_x[:16], p.data.train_y[:16]
    out = first.train_step(x, y, torch.arange(16))
    last_out = second.train_step(out.forward, y, torch.arange(16))
    for q in [*first.group.parameters(), *second.group.parameters()]:
        q.grad = None  # left over from the groups' own steps
    critic_before, groups_before = flat(first.aux), [flat(first.group), flat(second.group)]
    first.feedback(last_out.backward)
    # (the critic's gradient itself, with l_{k+1} detached, is checked exactly in test_method_rules.py)
    after = [flat(first.group), flat(second.group)]
    assert all(torch.equal(a, b) for a, b in zip(after, groups_before, strict=True))  # the critic step moves no group
    assert not torch.equal(critic_before, flat(first.aux))
    assert last_out.backward.shape == (16,) and not last_out.backward.requires_grad


@pytest.mark.parametrize("method", ["lct", "dgl", "dni"])
def test_one_group_equals_backprop(method):
    """With K=1 there is nothing local: every method is backprop, step for step."""
    pb, bp = runtime_for(["method=bp"])
    pm, other = runtime_for([f"method={method}"])
    for i in range(3):
        steps(bp, pb, 1)
        steps(other, pm, 1)
        assert torch.equal(flat(bp.stages[0].group), flat(other.stages[0].group)), f"step {i}"


def test_critic_update_every_n_steps():
    p, runtime = runtime_for(["method=lct", "model.split=[conv2]", "critic.update_every=2"])
    critic = runtime.stages[0].aux
    start = flat(critic)
    steps(runtime, p, 1)
    assert torch.equal(start, flat(critic))  # step 1: no critic update
    steps(runtime, p, 1)
    assert not torch.equal(start, flat(critic))


def test_critic_depths_follow_the_config():
    _, runtime = runtime_for(["method=lct", "model.split=[conv1,conv2,conv3]", "critic.convs=[3,2,1]"])
    convs = [sum(isinstance(m, torch.nn.Conv2d) for m in s.aux.modules()) for s in runtime.stages[:-1]]
    assert convs == [3, 2, 1]
    from lctrun.errors import ConfigError

    with pytest.raises(ConfigError, match="has 2 entries but the cut gives 3 critics"):
        runtime_for(["method=lct", "model.split=[conv1,conv2,conv3]", "critic.convs=[3,2]"])


def test_dni_synthesizer_learns_the_true_gradient():
    p, runtime = runtime_for(["method=dni", "model.split=[conv2]", "critic.lr=0.001"])
    synth = runtime.stages[0].aux
    start = flat(synth)
    assert start.abs().sum() > 0  # only the output layer starts at zero
    steps(runtime, p, 2)
    assert not torch.equal(start, flat(synth))


@pytest.mark.slow
def test_lct_learns_mnist_close_to_bp(tmp_path, data_root):
    base = [f"data.root={data_root}", "epochs=2", "data.train_size=10000", "data.test_size=2000", "submodels=false"]
    cfg = lambda extra: load_experiment("experiments/mnist-cnn.yaml", base + extra)  # noqa: E731
    bp = train(cfg(["method=bp"]), run_dir=tmp_path / "bp").final["test_acc"]
    lct2 = train(cfg(["method=lct", "model.split=[conv2]"]), run_dir=tmp_path / "lct2").final
    lct3 = train(cfg(["method=lct", "model.split=[conv1,conv3]"]), run_dir=tmp_path / "lct3").final
    assert bp >= 96.0
    assert lct2["test_acc"] >= bp - 1.5, (bp, lct2)
    assert lct3["test_acc"] >= bp - 1.5, (bp, lct3)
    assert lct2["g1_test_acc"] > 80.0


@pytest.mark.parametrize("shape", [(16, 32, 32), (16, 8, 4)])
def test_pooled_critic_is_cheaper_and_classifies(shape):
    """critic.pool=4: features averaged to at most 4x4 first; the convs cost (16 / (H W)) of the official
    critic's, and the classifier still maps (B, *shape) to (B, classes)."""
    from lctrun.methods.lct import make_critic
    from lctrun.models.chain import forward_flops

    x = torch.randn(2, *shape)
    official = make_critic(shape, load_experiment(None, ["critic.channels=32"]).critic, 10)
    pooled = make_critic(shape, load_experiment(None, ["critic.channels=32", "critic.pool=4"]).critic, 10)
    (full, a), (cheap, b) = forward_flops(official, x), forward_flops(pooled, x)
    assert a.shape == b.shape == (2, 10)
    cells = shape[1] * shape[2]
    assert cheap < full * 1.1 * min(16, cells) / cells + 1e4 and (cheap < full) == (cells > 16)


def test_a_pipelined_critic_steps_on_the_weights_its_forward_saw():
    """Weight stashing: at depth 2 critic 1 updates on batch 1's feedback between batch 2's forward and batch 2's
    feedback; batch 2's critic gradient must still be the one at the weights batch 2's forward used. The gradient
    each critic step applies is compared with one recomputed at the weights saved at forward time."""
    p, runtime = runtime_for(["method=lct", "model.split=[conv2]", "pipeline_depth=2", "critic.lr=0.1"])
    stage = runtime.stages[0]
    assert stage.wire.depth == 2
    inputs, applied = [], []
    hook = stage.aux.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach().clone()))
    step = stage.aux_opt.step
    stage.aux_opt.step = lambda *a: (applied.append([q.grad.clone() for q in stage.aux.parameters()]), step(*a))[1]
    batches = [(p.data.train_x[i * 16 : (i + 1) * 16].float(), p.data.train_y[i * 16 : (i + 1) * 16]) for i in (0, 1)]
    seen = []
    for x, y in batches:  # two forwards before any feedback
        seen.append({n: q.detach().clone() for n, q in stage.aux.named_parameters()})
        stage.train_step(x, y, torch.arange(16))
    next_losses = [torch.rand(16) * 2 for _ in batches]
    for losses in next_losses:
        stage.feedback(losses)
    assert not torch.equal(seen[1]["0.weight"], dict(stage.aux.named_parameters())["0.weight"])  # it did update
    hook.remove()
    for (_, y), h, weights, target, grads in zip(batches, inputs, seen, next_losses, applied, strict=True):
        w = {n: v.clone().requires_grad_() for n, v in weights.items()}
        logits = torch.func.functional_call(stage.aux, w, (h,))
        loss = (torch.nn.functional.cross_entropy(logits, y, reduction="none") - target).abs().mean()
        expected = torch.autograd.grad(loss, list(w.values()))
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
