"""Models as ordered chains of named blocks, and how to cut them into layer groups.

A `ChainModel` is an nn.Sequential whose children are either single blocks (`stem`, `head`) or
`Stage`s, sequences of blocks named `<stage>.<i>` (`layer3.8`). The flattened block list is what
a split refers to: `split: [layer2, layer3.8]` cuts after the last block of `layer2` and after
block 8 of `layer3`, giving three groups.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from lctrun.errors import ConfigError


class Stage(nn.Sequential):
    """A run of blocks inside a ChainModel whose blocks can be cut between (e.g. a ResNet layer)."""


class ChainModel(nn.Sequential):
    """forward(x) = blocks[-1](... blocks[0](x)); `named_blocks()` is the cuttable sequence."""

    def __init__(self, children: dict[str, nn.Module]):
        super().__init__(OrderedDict(children))

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        blocks = []
        for name, child in self.named_children():
            if isinstance(child, Stage):
                blocks += [(f"{name}.{i}", block) for i, block in enumerate(child)]
            else:
                blocks.append((name, child))
        return blocks

    def block_names(self) -> list[str]:
        return [name for name, _ in self.named_blocks()]


class Group(nn.Sequential):
    """A contiguous run of a ChainModel's blocks (the blocks are shared, not copied)."""

    def __init__(self, blocks: list[tuple[str, nn.Module]]):
        super().__init__(*[m for _, m in blocks])
        self.block_names = [n for n, _ in blocks]

    def extra_repr(self) -> str:
        return f"blocks={self.block_names[0]}..{self.block_names[-1]}"


def resolve_split(names: list[str], split: list[str]) -> list[int]:
    """Indices (into `names`) of the last block of each group but the last."""
    cuts = []
    for point in split:
        if point in names:
            index = names.index(point)
        else:
            inside = [i for i, n in enumerate(names) if n.startswith(point + ".")]
            if not inside:
                raise ConfigError(
                    f"split point '{point}' does not exist in this model; valid points: {_summarise(names[:-1])}"
                )
            index = inside[-1]
        if index == len(names) - 1:
            raise ConfigError(f"split point '{point}' is the model's last block: a cut there leaves an empty group")
        cuts.append(index)
    if cuts != sorted(set(cuts)):
        raise ConfigError(f"split points {split} must be distinct and in model order")
    return cuts


def _summarise(names: list[str]) -> str:
    """`stem, layer1.0-2, layer2.0-2` rather than every block name."""
    out, i = [], 0
    while i < len(names):
        stage, _, idx = names[i].rpartition(".")
        j = i
        while stage and j + 1 < len(names) and names[j + 1].rpartition(".")[0] == stage:
            j += 1
        out.append(f"{names[i]}-{names[j].rpartition('.')[2]}" if j > i else names[i])
        i = j + 1
    return ", ".join(out)


def balanced_cuts(costs: list[float], k: int) -> list[int]:
    """Cut a sequence of block costs into k contiguous groups minimising the largest group's cost."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[j][i]: minimal max-group cost of splitting the first i blocks into j groups
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    arg = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n + 1):
            for m in range(j - 1, i):
                cost = max(best[j - 1][m], prefix[i] - prefix[m])
                if cost < best[j][i]:
                    best[j][i], arg[j][i] = cost, m
    cuts, i = [], n
    for j in range(k, 1, -1):
        i = arg[j][i]
        cuts.append(i - 1)
    return sorted(cuts)


def block_param_costs(blocks: list[tuple[str, nn.Module]]) -> list[float]:
    return [float(sum(p.numel() for p in m.parameters())) + 1.0 for _, m in blocks]


def block_time_costs(blocks: list[tuple[str, nn.Module]], sample: torch.Tensor, repeats: int = 3) -> list[float]:
    """Measured forward+backward seconds of each block on `sample` (a small batch)."""
    costs, x = [], sample
    for _, block in blocks:
        x = x.detach().requires_grad_(x.is_floating_point())
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            y = block(x)
            y.float().sum().backward()
            best = min(best, time.perf_counter() - start)
        block.zero_grad(set_to_none=True)
        costs.append(best)
        x = y
    return costs


def split_groups(
    model: ChainModel,
    split: list[str] | None = None,
    groups: int = 1,
    balance: str = "params",
    sample: torch.Tensor | None = None,
    cost_fn: Callable[[list[tuple[str, nn.Module]]], list[float]] | None = None,
) -> list[Group]:
    """Cut `model` into groups at the named `split` points, or into `groups` balanced groups."""
    blocks = model.named_blocks()
    names = [n for n, _ in blocks]
    if split:
        cuts = resolve_split(names, split)
    else:
        if groups > len(blocks):
            raise ConfigError(f"model.groups={groups} but the model has only {len(blocks)} blocks to cut between")
        if groups == 1:
            cuts = []
        else:
            if cost_fn is not None:
                costs = cost_fn(blocks)
            elif balance == "time":
                if sample is None:
                    raise ConfigError("model.balance=time needs a sample batch to time the blocks")
                costs = block_time_costs(blocks, sample)
            else:
                costs = block_param_costs(blocks)
            cuts = balanced_cuts(costs, groups)
    bounds = [-1, *cuts, len(blocks) - 1]
    return [Group(blocks[bounds[i] + 1 : bounds[i + 1] + 1]) for i in range(len(bounds) - 1)]


def group_split_names(groups: list[Group]) -> list[str]:
    """The split points that reproduce `groups` (the last block name of every group but the last)."""
    return [g.block_names[-1] for g in groups[:-1]]
