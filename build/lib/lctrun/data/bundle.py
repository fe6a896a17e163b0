"""A dataset held in memory as tensors, with the statistics its normalisation uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DataBundle:
    name: str
    train_x: torch.Tensor  # (N, C, H, W), uint8 (0..255) or float
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: torch.Tensor  # (C,) per-channel, from the training set only, on the 0..1 scale
    std: torch.Tensor
    augment: str = "none"  # none | flip | crop-flip

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def subset(self, train_size: int | None, test_size: int | None, seed: int) -> DataBundle:
        """First N of a seeded permutation of each split (statistics recomputed on what is kept)."""
        g = torch.Generator().manual_seed(seed)
        out = self
        if train_size is not None and train_size < len(self.train_y):
            keep = torch.randperm(len(self.train_y), generator=g)[:train_size]
            out = DataBundle(**{**out.__dict__, "train_x": out.train_x[keep], "train_y": out.train_y[keep]})
            out.mean, out.std = channel_stats(out.train_x)
        if test_size is not None and test_size < len(self.test_y):
            keep = torch.randperm(len(self.test_y), generator=g)[:test_size]
            out = DataBundle(**{**out.__dict__, "test_x": out.test_x[keep], "test_y": out.test_y[keep]})
        return out


def to_unit_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of (N, C, ...) data on the 0..1 scale, in chunks to bound memory."""
    c = x.shape[1]
    total, sq, count = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
    for start in range(0, len(x), chunk):
        part = to_unit_float(x[start : start + chunk]).transpose(0, 1).reshape(c, -1).double()
        total += part.sum(1)
        sq += (part * part).sum(1)
        count += part.shape[1]
    mean = total / count
    std = (sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()
