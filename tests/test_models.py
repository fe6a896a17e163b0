"""The model zoo: every model cuts into groups that compose back to exactly the whole model."""

from __future__ import annotations

import functools
import itertools
import random

import pytest
import torch

from lctrun.errors import ConfigError
from lctrun.models import MODELS, ChainModel, build_model, model_names, split_groups
from lctrun.models.chain import balanced_cuts, group_split_names
from lctrun.models.resnet import PreActBottleneck

NUM_CLASSES = 10
BATCH = 2


CASES = [
    ("cnn-small", (1, 28, 28)),
    ("vgg-lct", (3, 32, 32)),
    ("vgg-lct", (1, 28, 28)),
    ("resnet20", (3, 32, 32)),
    ("resnet20", (1, 28, 28)),
    ("resnet32", (3, 32, 32)),
    ("resnet56", (3, 32, 32)),
    ("resnet110", (3, 32, 32)),
    ("preact-resnet101", (3, 32, 32)),
    ("wrn-10-2", (3, 32, 32)),
    ("wrn-16-2", (1, 28, 28)),
    ("wrn-28-10", (3, 32, 32)),  # ~1 s on 2 cores: not worth a slow mark
]


@functools.cache
def built(name: str, in_shape: tuple[int, ...]) -> tuple[ChainModel, torch.Tensor, torch.Tensor]:
    """The model in eval mode (BN uses running stats, so outputs don't depend on the batch), an input
    batch and the whole model's output on it; cached because ResNet-101 is slow to build."""
    torch.manual_seed(0)
    model = build_model(name, NUM_CLASSES, in_shape).eval()
    x = torch.randn(BATCH, *in_shape)
    with torch.no_grad():
        return model, x, model(x)


def cuts_for(name: str) -> list[dict]:
    cuts = [dict(groups=1), dict(groups=2), dict(groups=3)]
    spec = MODELS.get(name)
    if spec is not None and spec.example_split:
        cuts.append(dict(split=list(spec.example_split)))
    if name == "preact-resnet101":
        cuts += [dict(split=["layer3.9"]), dict(split=["layer2", "layer3.7", "layer3.15"])]
    return cuts


@pytest.mark.parametrize("name, in_shape", CASES)
def test_groups_compose_to_the_whole_model(name, in_shape):
    model, x, expected = built(name, tuple(in_shape))
    assert expected.shape == (BATCH, NUM_CLASSES)
    params = list(model.parameters())
    for cut in cuts_for(name):
        groups = split_groups(model, **cut)
        assert len(groups) == cut.get("groups", len(cut.get("split", [])) + 1), cut
        # every block exactly once, in order
        assert [n for g in groups for n in g.block_names] == model.block_names(), cut
        group_params = [p for g in groups for p in g.parameters()]
        assert len(group_params) == len(params), cut
        assert {id(p) for p in group_params} == {id(p) for p in params}, cut
        out = x
        with torch.no_grad():
            for group in groups:
                out = group(out)
        assert torch.equal(out, expected), cut


@pytest.mark.parametrize("name", ["resnet20", "wrn-10-2"])
def test_train_mode_backward_reaches_every_parameter(name):
    # in-place ReLUs next to residual additions must not break autograd
    torch.manual_seed(0)
    model = build_model(name, NUM_CLASSES, (3, 32, 32)).train()
    model(torch.randn(BATCH, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_preact_bottleneck_backward_with_projection():
    block = PreActBottleneck(16, 8, stride=2).train()
    x = torch.randn(BATCH, 16, 8, 8, requires_grad=True)
    out = block(x)
    assert out.shape == (BATCH, 32, 4, 4)
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in block.parameters())


def test_lct_resnet101_split_points():
    model, _, _ = built("preact-resnet101", (3, 32, 32))
    two = split_groups(model, split=["layer3.9"])
    # stem, 3 + 4 blocks of layer1/layer2, then blocks 0..9 of layer3
    assert len(two[0].block_names) == 1 + 3 + 4 + 10
    assert group_split_names(two) == ["layer3.9"]
    four = split_groups(model, split=["layer2", "layer3.7", "layer3.15"])
    assert group_split_names(four) == ["layer2.3", "layer3.7", "layer3.15"]
    assert [len(g.block_names) for g in four] == [8, 8, 8, 11]


@pytest.mark.parametrize(
    "cut, message",
    [
        (dict(split=["layer4"]), "'layer4' does not exist"),
        (dict(split=["layer2.7"]), "'layer2.7' does not exist"),
        (dict(split=["head"]), "last block"),
        (dict(split=["layer2", "layer1"]), "distinct and in model order"),
        (dict(split=["layer1", "layer1.2"]), "distinct and in model order"),
        (dict(groups=12), "only 11 blocks"),
    ],
)
def test_bad_cuts_raise_config_error(cut, message):
    model, _, _ = built("resnet20", (3, 32, 32))
    with pytest.raises(ConfigError, match=message):
        split_groups(model, **cut)


def test_unknown_and_malformed_models_raise_config_error():
    with pytest.raises(ConfigError, match="unknown model 'resnet21'.*resnet20"):
        build_model("resnet21", NUM_CLASSES, (3, 32, 32))
    with pytest.raises(ConfigError, match=r"wrn-15-2: WRN depth must be 6n\+4"):
        build_model("wrn-15-2", NUM_CLASSES, (3, 32, 32))


def test_model_names_lists_registry_and_families():
    names = [n for n, _ in model_names()]
    expected = ["vgg-lct", "resnet20", "resnet32", "resnet56", "resnet110", "preact-resnet101", "wrn-D-K"]
    assert set(expected) <= set(names)
    assert all(description for _, description in model_names())


def test_balanced_cuts_simple():
    assert balanced_cuts([1, 1, 1, 1], 2) == [1]
    assert balanced_cuts([1, 1, 1, 1], 4) == [0, 1, 2]
    assert balanced_cuts([5, 1, 1, 1, 1, 1], 2) == [0]
    assert balanced_cuts([3, 3, 3], 1) == []


def _max_group_cost(costs: list[int], cuts: list[int]) -> int:
    bounds = [-1, *cuts, len(costs) - 1]
    return max(sum(costs[a + 1 : b + 1]) for a, b in itertools.pairwise(bounds))


def test_balanced_cuts_optimal_vs_brute_force():
    rng = random.Random(0)
    for _ in range(40):
        n = rng.randint(1, 8)
        costs = [rng.randint(1, 20) for _ in range(n)]
        k = rng.randint(1, n)
        cuts = balanced_cuts(costs, k)
        assert len(cuts) == k - 1 and cuts == sorted(set(cuts))
        assert all(0 <= c < n - 1 for c in cuts)
        best = min(_max_group_cost(costs, list(c)) for c in itertools.combinations(range(n - 1), k - 1))
        assert _max_group_cost(costs, cuts) == best, (costs, k, cuts)


def test_balanced_cuts_price_each_groups_own_critic():
    """end[j][i]: group j+1's critic after block i; critics of different depths (critic.convs=[5,4,3]) weigh
    differently, and the cut is optimal for that, not for group 1's critic everywhere."""
    rng = random.Random(1)
    for _ in range(40):
        n, k = rng.randint(3, 7), rng.randint(2, 3)
        costs = [rng.randint(1, 20) for _ in range(n)]
        end = [[rng.randint(0, 30) for _ in range(n)] for _ in range(k - 1)]

        def cost(cuts, costs=costs, end=end, n=n, k=k):
            bounds = [-1, *cuts, n - 1]
            return max(
                sum(costs[a + 1 : b + 1]) + (end[g][b] if g < k - 1 else 0)
                for g, (a, b) in enumerate(itertools.pairwise(bounds))
            )

        best = min(cost(list(c)) for c in itertools.combinations(range(n - 1), k - 1))
        assert cost(balanced_cuts(costs, k, end)) == best, (costs, end, k)


def test_a_balanced_cut_prices_every_critic_at_its_own_depth():
    from lctrun.config import load_experiment
    from lctrun.methods import get_method
    from lctrun.models.chain import block_flop_costs

    cfg = load_experiment(None, ["method=lct", "model.groups=3", "critic.convs=[3,1]", "critic.channels=8"])
    method, model = get_method("lct"), build_model("cnn-small", 10, (1, 28, 28))
    aux_for = lambda shape, j: method.aux_module(shape, cfg.critic, 10, j, 2)  # noqa: E731
    _, end = block_flop_costs(model.named_blocks()[:3], torch.randn(4, 1, 28, 28), aux_for, 2)
    assert len(end) == 2 and all(deep > shallow for deep, shallow in zip(end[0], end[1], strict=True))


@pytest.mark.parametrize(
    "name, millions", [("resnet20", 0.27), ("resnet56", 0.85), ("resnet110", 1.7), ("wrn-28-10", 36.5)]
)
def test_parameter_counts_match_published(name, millions):
    torch.manual_seed(0)
    model = build_model(name, NUM_CLASSES, (3, 32, 32))
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - millions) / millions < 0.05, f"{name}: {count:.3f}M parameters, published {millions}M"


def test_timing_the_blocks_for_a_cut_leaves_batchnorm_statistics_alone():
    """balance=time runs each block in train mode; a serial run must still start from the model a
    distributed worker builds (which never times): BN running statistics as initialised."""
    model = build_model("cnn-small", 10, (1, 28, 28))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    groups = split_groups(model, [], 2, "time", torch.randn(16, 1, 28, 28) * 3 + 1)
    after = model.state_dict()  # the groups hold the model's own blocks
    assert len(groups) == 2 and any("running_mean" in k for k in fresh)
    for k, v in fresh.items():
        assert torch.equal(v, after[k]), k


def test_a_time_balanced_cut_prices_the_critics_time(monkeypatch):
    """balance=time times the critic a method would attach after each block, not only the blocks: with equal
    blocks and a critic that is costly after the first three, the cut moves past them (after fc1). Priced without
    the critics' time it would sit in the middle (after conv2 or conv3). The timer is replaced by a table of
    costs, so no clock decides."""
    import lctrun.models.chain as chain

    model = build_model("cnn-small", 10, (1, 28, 28))
    blocks = [name for name, _ in model.named_blocks()]  # conv1, conv2, conv3, fc1, head
    expensive = torch.nn.Flatten()  # stands for a costly critic
    costs = {id(block): 1.0 for _, block in model.named_blocks()}

    def fake_time_step(module, x, repeats=3):
        with torch.no_grad():
            y = module(x)
        return costs.get(id(module), 10.0 if module is expensive else 0.0), y

    monkeypatch.setattr(chain, "time_step", fake_time_step)
    costly_after = {(32, 14, 14), (64, 7, 7), (128, 3, 3)}  # the outputs of conv1, conv2, conv3
    aux_for = lambda shape, j: expensive if shape in costly_after else torch.nn.Flatten()  # noqa: E731
    sample = torch.randn(4, 1, 28, 28)
    unpriced = group_split_names(split_groups(model, [], 2, "time", sample, None))
    assert unpriced[0] in ("conv2", "conv3")
    priced = group_split_names(split_groups(model, [], 2, "time", sample, aux_for))
    assert priced == ["fc1"] and blocks.index(priced[0]) == 3
