"""Batches from in-memory tensors, normalised and augmented on the training device.

Per-sample PIL pipelines would dominate a CPU epoch; here a batch is one index into a tensor,
and augmentation is a handful of batched tensor ops.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from lctrun.data.bundle import to_unit_float
from lctrun.precision import MEMORY_FORMATS


class Batch(NamedTuple):
    x: torch.Tensor | None  # None on workers that never look at the inputs
    y: torch.Tensor
    idx: torch.Tensor  # positions in the dataset (auxiliary-variable methods key on them)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """An independent random crop per sample after zero padding (v2.RandomCrop draws one for the batch).
    A channels-last batch stays channels-last: it is gathered as NHWC."""
    b, _, h, w = x.shape
    padded = F.pad(x, [padding] * 4)  # zeros on every side
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch[:, None], chan, rows[:, None], cols[:, None]]


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class TensorLoader:
    """Iterates over (x, y, idx) batches; the order depends only on (seed, epoch), so runs resume exactly."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
        augment: str = "none",
        seed: int = 0,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
        load_x: bool = True,
        memory_format: str | None = None,
    ):
        self.memory_format = MEMORY_FORMATS[memory_format] if memory_format else None  # None: as x is
        if x.dim() == 4 and self.memory_format:  # the whole set once (no copy when it is already), not per batch
            x = x.contiguous(memory_format=self.memory_format)
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.augment, self.seed, self.drop_last = shuffle, augment, seed, drop_last
        self.device, self.load_x = torch.device(device), load_x
        # shaped to broadcast over (batch, C, H, W) batches, made once rather than per batch
        self.mean = None if mean is None else mean.to(self.device, torch.float32).view(-1, 1, 1)
        self.std = None if std is None else std.to(self.device, torch.float32).view(-1, 1, 1)
        self.epoch = 0
        self._position: tuple[int, torch.Tensor] | None = None
        self.generator: torch.Generator | None = None
        self.data_seconds = 0.0  # time spent producing batches (for the data-share measurement)
        self.checked = False  # the first batch's layout

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def position(self, batches_done: int) -> tuple[int, torch.Tensor]:
        """Where the current pass stands after `batches_done` batches (for a mid-epoch checkpoint)."""
        return batches_done, self.generator.get_state()

    def resume_at(self, position: tuple[int, torch.Tensor]) -> None:
        """The next pass starts where `position` says, with the same order and augmentation as before."""
        self._position = position

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batch_len(self, step: int) -> int:
        """Samples in batch `step` (numbered from 1) of a pass."""
        return min(self.batch_size, len(self.y) - (step - 1) * self.batch_size)

    def prepare(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        x = to_unit_float(x.to(self.device, non_blocking=True))
        if generator is not None and self.augment != "none":
            if "crop" in self.augment:
                x = random_crop(x, max(2, x.shape[-1] // 8), generator)  # CIFAR: pad 4; MNIST: pad 3
            if "flip" in self.augment:
                x = random_flip(x, generator)
        if self.mean is not None and x.dim() == 4:
            x = (x - self.mean).div_(self.std)
        if not self.checked:  # every op above keeps the layout: checked once, not converted per batch
            self.checked = True
            if x.dim() == 4 and self.memory_format and not x.is_contiguous(memory_format=self.memory_format):
                raise RuntimeError(f"the loader made a batch that is not in {self.memory_format}")
        return x

    def __iter__(self):
        import time

        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.y)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        first, self._position = self._position, None
        if first is not None:  # continue an interrupted epoch: skip its done batches and their random draws
            g.set_state(first[1])
        self.generator = g
        for i in range(first[0] if first else 0, len(self)):
            start = time.perf_counter()
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.prepare(self.x[idx], g if self.shuffle else None) if self.load_x else None
            batch = Batch(x, self.y[idx].to(self.device, non_blocking=True), idx)
            self.data_seconds += time.perf_counter() - start
            yield batch


def train_loader(
    bundle, batch_size: int, seed: int, device="cpu", load_x: bool = True, memory_format: str | None = None
) -> TensorLoader:
    """Shuffled batches of a DataBundle's training split, with its standard augmentation."""
    return TensorLoader(
        bundle.train_x,
        bundle.train_y,
        batch_size,
        shuffle=True,
        mean=bundle.mean,
        std=bundle.std,
        augment=bundle.augment,
        seed=seed,
        device=device,
        load_x=load_x,
        memory_format=memory_format,
    )


def test_loader(
    bundle, batch_size: int, device="cpu", load_x: bool = True, memory_format: str | None = None
) -> TensorLoader:
    """The test split in order, normalised with the training statistics, never augmented."""
    return TensorLoader(
        bundle.test_x,
        bundle.test_y,
        batch_size,
        shuffle=False,
        mean=bundle.mean,
        std=bundle.std,
        device=device,
        load_x=load_x,
        memory_format=memory_format,
    )
