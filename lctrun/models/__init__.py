"""Model registry: every model is a ChainModel that `split_groups` can cut into layer groups."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from lctrun.errors import ConfigError
from lctrun.models.chain import BlockSequence, ChainModel, Group, split_groups
from lctrun.models.cnn import cnn_small
from lctrun.models.lstm import lstm_lm, lstm_seq
from lctrun.models.resnet import (
    preact_resnet101,
    resnet8,
    resnet20,
    resnet32,
    resnet56,
    resnet110,
    wide_resnet,
    wrn_blocks_per_stage,
)
from lctrun.models.vgg import vgg_lct, vgg_lct_small

__all__ = ["ChainModel", "Group", "BlockSequence", "split_groups", "build_model", "find_model", "model_names", "MODELS"]


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[int, tuple[int, ...]], ChainModel]  # (num_classes, input shape) -> model
    description: str
    example_split: tuple[str, ...] = ()


MODELS: dict[str, ModelSpec] = {
    "cnn-small": ModelSpec(cnn_small, "3 conv-BN-pool stages + 2 FC, for 28x28 inputs (MNIST baseline)", ("conv2",)),
    "vgg-lct": ModelSpec(
        vgg_lct, "VGG-like 6-conv BN CNN + 2 FC of the LCT ICLR experiments", ("conv2", "conv4", "conv6")
    ),
    "vgg-lct-small": ModelSpec(
        vgg_lct_small, "vgg-lct at a quarter of the width (32..128 channels), for CPU runs", ("conv2", "conv4", "conv6")
    ),
    "resnet8": ModelSpec(
        resnet8, "CIFAR ResNet-8, one basic block per stage, 16/32/64 channels (0.08M)", ("layer1", "layer2")
    ),
    "resnet20": ModelSpec(resnet20, "CIFAR ResNet-20, basic blocks, 16/32/64 channels (0.27M)", ("layer1", "layer2")),
    "resnet32": ModelSpec(resnet32, "CIFAR ResNet-32, basic blocks, 16/32/64 channels (0.46M)", ("layer1", "layer2")),
    "resnet56": ModelSpec(resnet56, "CIFAR ResNet-56, basic blocks, 16/32/64 channels (0.85M)", ("layer1", "layer2")),
    "resnet110": ModelSpec(resnet110, "CIFAR ResNet-110, basic blocks, 16/32/64 channels (1.7M)", ("layer1", "layer2")),
    "preact-resnet101": ModelSpec(
        preact_resnet101,
        "pre-activation bottleneck ResNet-101, 3x3 stem, no max-pool (LCT TNNLS)",
        ("layer2", "layer3.7", "layer3.15"),
    ),
    "lstm-seq": ModelSpec(
        lstm_seq, "2-layer LSTM(128) reading images row by row, classifies the last step", ("lstm.0",)
    ),
    "lstm-lm": ModelSpec(
        lstm_lm, "word-level LM: embedding 200, 2 LSTM layers of 200, decoder to the vocab", ("lstm.0",)
    ),
}


def _wrn_spec(name: str) -> ModelSpec | None:
    match = re.fullmatch(r"wrn-(\d+)-(\d+)", name)
    if not match or "wrn" not in _FAMILIES:
        return None
    depth, width = int(match[1]), int(match[2])
    return _FAMILIES["wrn"](depth, width)


def wrn_spec(depth: int, width: int) -> ModelSpec:
    """Wide ResNet WRN-depth-width (Zagoruyko & Komodakis 2016), pre-activation blocks, no dropout."""
    wrn_blocks_per_stage(depth, width)  # reject a bad depth when the name is resolved, not later
    return ModelSpec(
        partial(wide_resnet, depth, width),
        f"WRN-{depth}-{width}: pre-activation basic blocks, widths {16 * width}/{32 * width}/{64 * width}",
        ("layer1", "layer2"),
    )


_FAMILIES: dict[str, Callable[..., ModelSpec]] = {"wrn": wrn_spec}

# name patterns of the families, for `lctrun list`
FAMILY_PATTERNS: dict[str, str] = {
    "wrn-D-K": "Wide ResNet of depth D = 6n+4 and width factor K (e.g. wrn-16-4, wrn-28-10)",
}


def model_names() -> list[tuple[str, str]]:
    """(name, description) of every registered model, then the family name patterns."""
    return [(name, spec.description) for name, spec in MODELS.items()] + list(FAMILY_PATTERNS.items())


def find_model(name: str) -> ModelSpec | None:
    return MODELS.get(name) or _wrn_spec(name)


def build_model(name: str, num_classes: int, in_shape: tuple[int, ...]) -> ChainModel:
    spec = find_model(name)
    if spec is None:
        import difflib

        near = difflib.get_close_matches(name, list(MODELS), n=3)
        hint = f"did you mean {', '.join(near)}?" if near else "see `lctrun list` for the models"
        raise ConfigError(f"unknown model '{name}': {hint}")
    return spec.build(num_classes, tuple(in_shape))
