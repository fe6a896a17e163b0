"""One device's profile of a model for one batch: every block's forward, backward, optimiser step, saved
activations and output bytes, at each batch size a schedule needs (the batch, its micro-batches, its 1/K
shares); and every auxiliary net a method would attach after a block (critic, head, synthesizer). Everything
runs as training runs it (precision.py): forwards under autocast in the run's precision, on the model, the
auxiliary nets and the batch in its memory format; so a bf16 profile times bf16 kernels and counts bf16
activations."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from lctrun.config import CriticConfig
from lctrun.methods import get_method
from lctrun.methods.critics import make_aux_optimizer
from lctrun.precision import autocast, to_memory_format
from lctrun.runtime.accounting import SavedTensors, tensor_bytes


@dataclass(frozen=True)
class BlockProfile:
    forward: float  # seconds, at the batch size it was measured at
    backward: float
    optimizer: float
    out_bytes: float  # its output, for one (micro-)batch of the size it was measured at
    saved_bytes: float  # what autograd saves for its backward
    param_bytes: float


@dataclass(frozen=True)
class AuxProfile:
    forward: float
    backward: float  # through its parameters and into its input
    optimizer: float
    saved_bytes: float
    param_bytes: float
    optim_state_bytes: float  # Adam: 2 x parameters; SGD with momentum: 1 x


@dataclass
class Profile:
    names: list[str]  # block names
    blocks: dict[int, list[BlockProfile]] = field(default_factory=dict)  # batch size -> per block
    aux: dict[tuple, AuxProfile] = field(default_factory=dict)  # (method, block index) -> after that block
    out_shapes: list[tuple[int, ...]] = field(default_factory=list)  # per sample, per block


def best_of(run, repeats: int) -> float:
    run()  # warm-up (allocator, kernels' first call)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_module(
    module: nn.Module,
    xs: list[torch.Tensor],
    backward_from,
    optimizer,
    repeats: int,
    input_grad: bool = True,
    precision: str = "fp32",
) -> tuple:
    """Best-of-`repeats` seconds per input of the forward, the backward (from `backward_from(output)`, the tensor
    and gradient it starts from, made before the clock starts; into the input too where `input_grad`) and the
    optimiser step; the bytes autograd saves for one input; the outputs. The inputs `xs` are the micro-batches of
    one batch, run as a pipeline runs them: every forward, then every backward, with every micro-batch's
    activations alive (timing one small batch over and over, from warm caches, is optimistic). Forwards run
    under autocast in `precision`; the backward follows the forward's dtypes."""
    xs = [x.detach().requires_grad_(input_grad and x.is_floating_point()) for x in xs]
    cast = lambda: autocast(precision, [xs[0].device])  # noqa: E731

    def forward() -> list[torch.Tensor]:
        with cast():
            outs = [module(x) for x in xs]
        sync(xs[0].device)
        return outs

    fwd = best_of(forward, repeats) / len(xs)
    bwd = float("inf")
    for i in range(repeats + 1):  # the first is a warm-up
        roots = [backward_from(out) for out in forward()]
        sync(xs[0].device)
        start = time.perf_counter()
        for tensor, grad in roots:
            tensor.backward(grad)
        sync(xs[0].device)
        bwd = min(bwd, (time.perf_counter() - start) / len(xs)) if i else bwd
    with SavedTensors() as saved, cast():
        module(xs[0])
    with torch.no_grad():
        outs = forward()
    opt = best_of(lambda: (optimizer.step(), sync(xs[0].device)), repeats)
    optimizer.zero_grad(set_to_none=True)
    return fwd, bwd, opt, saved.bytes, outs


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(list(params), lr=1e-9, momentum=0.9)


def profile_blocks(
    blocks: list[tuple[str, nn.Module]], xs: list[torch.Tensor], repeats: int, precision: str = "fp32"
) -> list[BlockProfile]:
    """Every block on the micro-batches `xs` of one batch (a list of one: the whole batch), per micro-batch."""
    # a stage's backward starts from the gradient the next stage sends: in its output's dtype and layout (a loss
    # such as o.float().sum() would add a cast of a broadcast gradient, 25% of a bf16 backward)
    from_next = lambda o: (o, torch.ones_like(o))  # noqa: E731
    out = []
    for i, (_, block) in enumerate(blocks):
        buffers = {k: v.clone() for k, v in block.state_dict().items()}  # timing must not move BN statistics
        params = [p for p in block.parameters() if p.requires_grad]
        # training never takes the gradient of the data: the first block's backward stops at its weights
        fwd, bwd, opt, saved, ys = time_module(block, xs, from_next, sgd(params), repeats, i > 0, precision)
        block.load_state_dict(buffers)
        out.append(BlockProfile(fwd, bwd, opt if params else 0.0, tensor_bytes(ys[:1]), saved, tensor_bytes(params)))
        xs = ys
    return out


def combined(a, b, how):
    """Two timings of the same block or auxiliary net, each time `how` of the two (bytes are the same in both)."""
    return replace(a, forward=how(a.forward, b.forward), backward=how(a.backward, b.backward),
                   optimizer=how(a.optimizer, b.optimizer))  # fmt: skip


def fastest(first: list[BlockProfile], second: list[BlockProfile]) -> list[BlockProfile]:
    """Block by block, the faster of two timings of the same blocks."""
    return [combined(a, b, min) for a, b in zip(first, second, strict=True)]


def compute_seconds(prof: Profile, size: int) -> float:
    """One batch of `size` through every block: forward, backward and step."""
    return sum(b.forward + b.backward + b.optimizer for b in prof.blocks[size])


def mean_of(first: Profile, second: Profile) -> Profile:
    """Two profiles of the same model, every time the mean of the two: what a machine whose speed drifts
    computed on average between them."""

    def mean(u: float, v: float) -> float:
        return (u + v) / 2

    blocks = {
        size: [combined(a, b, mean) for a, b in zip(timed, second.blocks[size], strict=True)]
        for size, timed in first.blocks.items()
    }
    aux = {key: combined(a, second.aux[key], mean) for key, a in first.aux.items()}
    return replace(first, blocks=blocks, aux=aux)


def profile_aux(
    method: str,
    h: torch.Tensor,
    critic: CriticConfig,
    num_classes: int,
    repeats: int,
    precision: str = "fp32",
    memory_format: str = "contiguous",
):
    """The auxiliary net `method` attaches after an output like h (None: the method attaches none)."""
    aux = get_method(method).aux_module(tuple(h.shape[1:]), critic, num_classes, 0, 1)
    if aux is None:
        return None
    aux = to_memory_format(aux.to(h.device), memory_format)
    params = list(aux.parameters())
    y = torch.randint(0, num_classes, (len(h),), device=h.device)
    if method == "dni":  # the methods take their losses in fp32 (methods/base.py, dni.py)
        loss_of = lambda out: (F.mse_loss(out.float(), torch.zeros_like(out, dtype=torch.float32)), None)  # noqa: E731
    else:
        loss_of = lambda out: (F.cross_entropy(out.float(), y), None)  # noqa: E731
    # lct and dni step their auxiliary nets with critic.optim (Adam by default); dgl with the group's SGD
    optimizer = sgd(params) if method == "dgl" else make_aux_optimizer(params, critic)
    fwd, bwd, opt, saved, _ = time_module(aux, [h], loss_of, optimizer, repeats, True, precision)
    state = 2 if isinstance(optimizer, torch.optim.Adam) else 1
    return AuxProfile(fwd, bwd, opt, saved, tensor_bytes(params), state * tensor_bytes(params))


def profile(
    model: nn.Module,
    sample: torch.Tensor,
    sizes: list[int],
    methods: list[str],
    critic: CriticConfig,
    num_classes: int,
    repeats: int = 2,
    precision: str = "fp32",
    memory_format: str = "contiguous",
) -> Profile:
    """Every block at every batch size in `sizes` (`sample` split into micro-batches of that size, timed as a
    pipeline runs them), and each method's auxiliary net after every block but the last, at the whole batch
    (local methods do not split batches). The blocks are timed in `repeats` rounds over the sizes, the fastest
    of each kept: a slow spell of a shared machine then costs one round, not every timing of one size.
    `model` and `sample` are in `memory_format` already (as training holds them); the auxiliary nets are put in
    it here."""
    blocks = model.named_blocks()
    result = Profile([n for n, _ in blocks])
    with torch.random.fork_rng(devices=[]):
        for _ in range(repeats):
            for size in sorted(set(sizes), reverse=True):
                timed = profile_blocks(blocks, list(sample.split(size)), 1, precision)
                result.blocks[size] = fastest(result.blocks[size], timed) if size in result.blocks else timed
        outputs, x = [], sample
        with torch.no_grad(), autocast(precision, [sample.device]):
            model.eval()
            for _, block in blocks:
                x = block(x)
                outputs.append(x)
            model.train()
        result.out_shapes = [tuple(h.shape[1:]) for h in outputs]
        measured: dict[tuple, AuxProfile | None] = {}
        for method in methods:
            for i, h in enumerate(outputs[:-1]):
                key = (method, result.out_shapes[i])
                if key not in measured:
                    measured[key] = profile_aux(method, h, critic, num_classes, repeats, precision, memory_format)
                if measured[key] is not None:
                    result.aux[(method, i)] = measured[key]
    return result
