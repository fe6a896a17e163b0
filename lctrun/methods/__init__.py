"""Method registry and how a method's stages are built from a model's layer groups."""

from __future__ import annotations

import difflib

import torch
from torch import nn

from lctrun.errors import ConfigError
from lctrun.methods.base import EpochPlan, Method, Stage, StageContext, StageSettings, StepOut, Wire
from lctrun.methods.bp import Backprop
from lctrun.precision import to_memory_format

__all__ = [
    "Method",
    "Stage",
    "StageContext",
    "StageSettings",
    "StepOut",
    "Wire",
    "EpochPlan",
    "METHODS",
    "get_method",
    "group_shapes",
    "build_stage",
]

METHODS: dict[str, Method] = {m.name: m for m in [Backprop()]}


def register(method: Method) -> None:
    METHODS[method.name] = method


def get_method(name: str) -> Method:
    _load_all()
    if name not in METHODS:
        near = difflib.get_close_matches(name, list(METHODS), n=3)
        hint = f"did you mean {', '.join(near)}?" if near else f"known: {', '.join(METHODS)}"
        raise ConfigError(f"unknown method '{name}': {hint}")
    return METHODS[name]


def _load_all() -> None:
    """Import the method modules, which register themselves (lazily, to keep `import lctrun` light)."""
    import lctrun.methods.dni  # noqa: F401
    import lctrun.methods.layerpar  # noqa: F401
    import lctrun.methods.lct  # noqa: F401


@torch.no_grad()
def group_shapes(groups: list[nn.Module], in_shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input shape, output shape) per sample of every group, from a dry run in eval mode."""
    x = torch.zeros(2, *in_shape)
    shapes = []
    for g in groups:
        mode = g.training
        g.eval()
        h = g(x)
        g.train(mode)
        shapes.append((tuple(x.shape[1:]), tuple(h.shape[1:])))
        x = h
    return shapes


def build_stage(p, k: int, device: torch.device) -> Stage:
    """Stage k of a prepared run (lctrun.train.Prepared) on `device`."""
    cfg = p.cfg
    steps_per_epoch = -(-len(p.data.train_y) // cfg.data.batch_size)
    in_shape, out_shape = p.shapes[k]
    num_samples = len(p.data.train_y)
    ctx = StageContext(
        StageSettings.of(cfg),
        k,
        len(p.groups),
        p.data.num_classes,
        in_shape,
        out_shape,
        device,
        steps_per_epoch,
        num_samples,
        cfg.precision,
    )
    # Each stage initialises its auxiliary modules from its own stream, so that a worker that builds
    # only stage k gets the same critic as a process that builds every stage in turn.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 1009 + k + 1)
        stage = p.method.make_stage(p.groups[k], ctx)
    for module in stage.modules():  # the group and its critic, head or synthesizer, once (not per step)
        to_memory_format(module, cfg.memory_format)
    stage.wire = p.method.wire(ctx)
    return stage
