"""Random tensors of any shape: for speed benchmarks, where what is learnt does not matter."""

from __future__ import annotations

import torch

from lctrun.data.bundle import DataBundle


def load_fake(shape: list[int], num_classes: int, train_size: int | None, test_size: int | None, seed: int):
    g = torch.Generator().manual_seed(seed)
    n_train, n_test = train_size or 2048, test_size or 512
    c = shape[0]
    return DataBundle(
        name="fake",
        train_x=torch.randn(n_train, *shape, generator=g),
        train_y=torch.randint(0, num_classes, (n_train,), generator=g),
        test_x=torch.randn(n_test, *shape, generator=g),
        test_y=torch.randint(0, num_classes, (n_test,), generator=g),
        num_classes=num_classes,
        mean=torch.zeros(c),
        std=torch.ones(c),
    )
