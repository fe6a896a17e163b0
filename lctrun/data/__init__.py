"""Datasets: every one is loaded into memory as a DataBundle and batched by a TensorLoader."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from lctrun.config import DataConfig
from lctrun.data.bundle import DataBundle
from lctrun.data.loader import Batch, TensorLoader, test_loader, train_loader
from lctrun.errors import ConfigError

__all__ = ["DataBundle", "Batch", "TensorLoader", "train_loader", "test_loader", "load_data", "DATASETS"]


# each loader imports its module when called, so listing or checking datasets reads no files and builds nothing
def _vision(cfg: DataConfig, seed: int) -> DataBundle:
    from lctrun.data.vision import load_vision

    return load_vision(cfg.name, cfg.root, cfg.download)


def _shapes(cfg: DataConfig, seed: int) -> DataBundle:
    from lctrun.data.shapes import load_shapes

    return load_shapes(cfg.train_size or 10_000, cfg.test_size or 2_000, seed)


def _seqmnist(cfg: DataConfig, seed: int) -> DataBundle:
    from lctrun.data.text import load_seqmnist

    return load_seqmnist(cfg.root, cfg.download)


def _ptb(cfg: DataConfig, seed: int) -> DataBundle:
    from lctrun.data.text import load_ptb

    return load_ptb(cfg.root, cfg.seq_len)


def _fake(cfg: DataConfig, seed: int) -> DataBundle:
    from lctrun.data.fake import load_fake

    return load_fake(cfg.shape, cfg.num_classes, cfg.train_size, cfg.test_size, seed)


@dataclass(frozen=True)
class DatasetSpec:
    load: Callable[[DataConfig, int], DataBundle]  # (data config, seed) -> the whole dataset in memory
    description: str
    shape: tuple[int, ...] | None = None  # one sample's input shape, known without loading (None: only the data knows)
    sized: bool = False  # the loader makes exactly data.train_size / test_size samples: no subset taken after


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        _vision, "MNIST digits, 28x28 grey, 60k/10k (torchvision files under the data root)", (1, 28, 28)
    ),
    "fashion-mnist": DatasetSpec(
        _vision, "Fashion-MNIST, 28x28 grey, 60k/10k (torchvision files under the data root)", (1, 28, 28)
    ),
    "cifar10": DatasetSpec(
        _vision, "CIFAR-10, 32x32 colour, 50k/10k; crop+flip augmentation (data.download=true to fetch)", (3, 32, 32)
    ),
    "cifar100": DatasetSpec(
        _vision, "CIFAR-100, 32x32 colour, 50k/10k; crop+flip augmentation (data.download=true to fetch)", (3, 32, 32)
    ),
    "shapes": DatasetSpec(
        _shapes,
        "embedded: 10 classes of coloured shapes with noise and jitter, 32x32x3, generated from the seed",
        (3, 32, 32),
    ),
    "fake": DatasetSpec(
        _fake, "random tensors of data.shape with data.num_classes labels, for speed benchmarks", sized=True
    ),
    "seqmnist": DatasetSpec(
        _seqmnist, "MNIST read row by row (28 steps of 28 features) by the lstm-seq model; same files as mnist"
    ),
    "ptb": DatasetSpec(
        _ptb, "word-level Penn Treebank <root>/ptb/ptb.{train,test}.txt (user-supplied), data.seq_len windows"
    ),
}


def find_dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        near = difflib.get_close_matches(name, list(DATASETS), n=3)
        hint = f"did you mean {', '.join(near)}?" if near else f"known: {', '.join(DATASETS)}"
        raise ConfigError(f"unknown dataset '{name}': {hint}")
    return DATASETS[name]


def input_shape(cfg: DataConfig) -> tuple[int, ...] | None:
    return tuple(cfg.shape) if cfg.name == "fake" else find_dataset(cfg.name).shape


def load_data(cfg: DataConfig, seed: int) -> DataBundle:
    spec = find_dataset(cfg.name)
    bundle = with_augmentation(spec.load(cfg, seed), cfg)
    return bundle if spec.sized else bundle.subset(cfg.train_size, cfg.test_size, seed)


def with_augmentation(bundle: DataBundle, cfg: DataConfig) -> DataBundle:
    """data.augment: true keeps the dataset's standard augmentation, false turns it off, a name sets it."""
    if cfg.augment is False:
        bundle.augment = "none"
    elif isinstance(cfg.augment, str):
        bundle.augment = cfg.augment
    return bundle
