"""Models as ordered chains of named blocks, and how to cut them into layer groups.

A `ChainModel` is an nn.Sequential whose children are either single blocks (`stem`, `head`) or
`BlockSequence`s, sequences of blocks named `<stage>.<i>` (`layer3.8`). The flattened block list is what
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


class BlockSequence(nn.Sequential):
    """A run of blocks inside a ChainModel whose blocks can be cut between (e.g. a ResNet layer)."""


class ChainModel(nn.Sequential):
    """forward(x) = blocks[-1](... blocks[0](x)); `named_blocks()` is the cuttable sequence."""

    def __init__(self, children: dict[str, nn.Module]):
        super().__init__(OrderedDict(children))

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        blocks = []
        for name, child in self.named_children():
            if isinstance(child, BlockSequence):
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


def balanced_cuts(costs: list[float], k: int, end_costs: list[list[float]] | None = None) -> list[int]:
    """Cut a sequence of block costs into k contiguous groups minimising the largest group's cost.

    end_costs[j][i]: extra cost of group j+1 (not the last) when it ends at block i, e.g. its local
    critic there (critics may differ per group: critic.convs=[5,4,3])."""
    n = len(costs)
    end = end_costs or [[0.0] * n]
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
                extra = end[min(j - 1, len(end) - 1)][i - 1] if i < n and j < k else 0.0  # the last has none
                cost = max(best[j - 1][m], prefix[i] - prefix[m] + extra)
                if cost < best[j][i]:
                    best[j][i], arg[j][i] = cost, m
    cuts, i = [], n
    for j in range(k, 1, -1):
        i = arg[j][i]
        cuts.append(i - 1)
    return sorted(cuts)


def aux_costs(outputs: list[torch.Tensor], aux_for: Callable | None, n_aux: int, measure) -> list[list[float]]:
    """[j][i]: cost of the module `aux_for(shape, j)` that group j+1 would attach after block i, measured
    once per distinct module (with one critic depth for all, once per block)."""
    if aux_for is None or n_aux < 1:
        return [[0.0] * len(outputs)]
    measured: dict[tuple, float] = {}
    out = []
    for j in range(n_aux):
        row = []
        for i, x in enumerate(outputs):
            aux = aux_for(tuple(x.shape[1:]), j)
            key = (i, str(aux))
            if key not in measured:
                measured[key] = measure(aux, x)[0] if aux is not None else 0.0
            row.append(measured[key])
        out.append(row)
    return out


def block_param_costs(blocks: list[tuple[str, nn.Module]]) -> list[float]:
    return [float(sum(p.numel() for p in m.parameters())) + 1.0 for _, m in blocks]


def time_step(module: nn.Module, x: torch.Tensor, repeats: int = 3) -> tuple[float, torch.Tensor]:
    """Best-of-`repeats` seconds of one forward+backward of `module` on `x`, and its output."""
    x = x.detach().requires_grad_(x.is_floating_point())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        y = module(x)
        y.float().sum().backward()
        best = min(best, time.perf_counter() - start)
    module.zero_grad(set_to_none=True)
    return best, y.detach()


def block_time_costs(
    blocks: list[tuple[str, nn.Module]], sample: torch.Tensor, aux_for: Callable | None = None, n_aux: int = 1
) -> tuple[list[float], list[list[float]]]:
    """Measured forward+backward seconds of each block on `sample` (a small batch), and of the
    auxiliary modules `aux_for(output_shape, j)` a method would attach after that block (aux_costs)."""
    costs, outputs, x = [], [], sample
    for _, block in blocks:
        # timed in train mode (the cost that matters), but the BN running statistics it updates are put
        # back: the cut must not change the model's starting state (the distributed path never times here)
        buffers = {k: v.clone() for k, v in block.state_dict().items() if "running_" in k or "num_batches" in k}
        seconds, x = time_step(block, x)
        block.load_state_dict(buffers, strict=False)
        costs.append(seconds)
        outputs.append(x)
    return costs, aux_costs(outputs, aux_for, n_aux, time_step)


def forward_flops(module: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """FLOPs of one forward pass of `module` on `x` (no grad), by FlopCounterMode, and its output.

    FlopCounterMode counts the matrix products (linear, conv, bmm, attention): a multiply-add is 2 FLOPs,
    so nn.Linear(a, b) costs 2ab and a conv 2*Cin*Cout*k*k*Hout*Wout; biases, BN, activations and pooling
    are not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        y = module(x)
    return int(counter.get_total_flops()), y


def block_flop_costs(
    blocks: list[tuple[str, nn.Module]], sample: torch.Tensor, aux_for: Callable | None = None, n_aux: int = 1
) -> tuple[list[float], list[list[float]]]:
    """Forward FLOPs of each block on `sample`, and of the auxiliary modules attached after it.

    Deterministic, unlike timings; on CPU the time of conv nets follows their FLOPs closely."""

    def flops(module: nn.Module, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        count, y = forward_flops(module, x)
        return count + 1.0, y  # never 0: a cut must still weigh an empty block

    costs, outputs, x = [], [], sample
    modes = [m.training for _, m in blocks]
    for _, block in blocks:
        block.eval()  # keep BN running statistics untouched
        cost, x = flops(block, x)
        costs.append(cost)
        outputs.append(x)
    for (_, block), mode in zip(blocks, modes, strict=True):
        block.train(mode)
    return costs, aux_costs(outputs, aux_for, n_aux, flops)


def split_groups(
    model: ChainModel,
    split: list[str] | None = None,
    groups: int = 1,
    balance: str = "params",
    sample: torch.Tensor | None = None,
    aux_for: Callable[[tuple[int, ...], int], nn.Module | None] | None = None,
) -> list[Group]:
    """Cut `model` into groups at the named `split` points, or into `groups` balanced groups.

    balance=time (or flops) measures every block on `sample`, plus the auxiliary module
    `aux_for(shape, j)` that the method attaches at the j-th cut, so that a group's critic counts towards
    its share."""
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
            if balance in ("time", "flops"):
                if sample is None:
                    raise ConfigError(f"model.balance={balance} needs a sample batch to measure the blocks")
                measure = block_time_costs if balance == "time" else block_flop_costs
                with torch.random.fork_rng(devices=[]):
                    costs, end_costs = measure(blocks, sample, aux_for, groups - 1)
            else:
                costs, end_costs = block_param_costs(blocks), None
            cuts = balanced_cuts(costs, groups, end_costs)
    bounds = [-1, *cuts, len(blocks) - 1]
    return [Group(blocks[bounds[i] + 1 : bounds[i + 1] + 1]) for i in range(len(bounds) - 1)]


def group_split_names(groups: list[Group]) -> list[str]:
    """The split points that reproduce `groups` (the last block name of every group but the last)."""
    return [g.block_names[-1] for g in groups[:-1]]
