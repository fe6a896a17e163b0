"""Datasets: every one is loaded into memory as a DataBundle and batched by a TensorLoader."""

from __future__ import annotations

import difflib

from lctrun.config import DataConfig
from lctrun.data.bundle import DataBundle
from lctrun.data.loader import Batch, TensorLoader, test_loader, train_loader
from lctrun.errors import ConfigError

__all__ = ["DataBundle", "Batch", "TensorLoader", "train_loader", "test_loader", "load_data", "DATASETS"]

DATASETS = {
    "mnist": "MNIST digits, 28x28 grey, 60k/10k (torchvision files under the data root)",
    "fashion-mnist": "Fashion-MNIST, 28x28 grey, 60k/10k (torchvision files under the data root)",
    "cifar10": "CIFAR-10, 32x32 colour, 50k/10k; crop+flip augmentation (data.download=true to fetch)",
    "cifar100": "CIFAR-100, 32x32 colour, 50k/10k; crop+flip augmentation (data.download=true to fetch)",
    "shapes": "embedded: 10 classes of coloured shapes with noise and jitter, 32x32x3, generated from the seed",
    "fake": "random tensors of data.shape with data.num_classes labels, for speed benchmarks",
    "seqmnist": "MNIST read row by row (28 steps of 28 features) by the lstm-seq model; same files as mnist",
    "ptb": "word-level Penn Treebank <root>/ptb/ptb.{train,test}.txt (user-supplied), data.seq_len windows",
}
# the input shape of one sample, known without loading the data (None: only the loaded data knows)
IMAGE_SHAPES = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}
IMAGE_SHAPES["shapes"] = (3, 32, 32)


def input_shape(cfg: DataConfig) -> tuple[int, ...] | None:
    return tuple(cfg.shape) if cfg.name == "fake" else IMAGE_SHAPES.get(cfg.name)


def load_data(cfg: DataConfig, seed: int) -> DataBundle:
    if cfg.name in ("mnist", "fashion-mnist", "cifar10", "cifar100"):
        from lctrun.data.vision import load_vision

        bundle = load_vision(cfg.name, cfg.root, cfg.download)
    elif cfg.name == "shapes":
        from lctrun.data.shapes import load_shapes

        bundle = load_shapes(cfg.train_size or 10_000, cfg.test_size or 2_000, seed)
    elif cfg.name in ("seqmnist", "ptb"):
        from lctrun.data.text import load_ptb, load_seqmnist

        bundle = load_seqmnist(cfg.root, cfg.download) if cfg.name == "seqmnist" else load_ptb(cfg.root, cfg.seq_len)
    elif cfg.name == "fake":
        from lctrun.data.fake import load_fake

        return with_augmentation(load_fake(cfg.shape, cfg.num_classes, cfg.train_size, cfg.test_size, seed), cfg)
    else:
        near = difflib.get_close_matches(cfg.name, list(DATASETS), n=3)
        hint = f"did you mean {', '.join(near)}?" if near else f"known: {', '.join(DATASETS)}"
        raise ConfigError(f"unknown dataset '{cfg.name}': {hint}")
    return with_augmentation(bundle, cfg).subset(cfg.train_size, cfg.test_size, seed)


def with_augmentation(bundle: DataBundle, cfg: DataConfig) -> DataBundle:
    """data.augment: true keeps the dataset's standard augmentation, false turns it off, a name sets it."""
    if cfg.augment is False:
        bundle.augment = "none"
    elif isinstance(cfg.augment, str):
        bundle.augment = cfg.augment
    return bundle
