"""Downsampling filters for what crosses a group boundary and what is stored there (docs/methods.md section 6.6).

D shrinks a (B, C, H, W) state by a factor f per spatial dimension before it is sent or stored; U
brings it back to the size the next group expects. `avg`: average pooling down, nearest up (cheap,
exact for piecewise-constant states); `bilinear`: antialiased bilinear down, bilinear up (smoother).
Odd sizes round up (a 7x7 state becomes 4x4 at f=2). States that are not spatial pass unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class BoundaryFilter:
    def __init__(self, factor: int = 1, kind: str = "avg"):
        self.factor, self.kind = factor, kind

    def applies(self, shape: tuple[int, ...]) -> bool:
        return self.factor > 1 and len(shape) == 3

    def down(self, h: torch.Tensor) -> torch.Tensor:
        if not self.applies(tuple(h.shape[1:])):
            return h
        if self.kind == "avg":
            return F.avg_pool2d(h, self.factor, ceil_mode=True)
        size = [-(-s // self.factor) for s in h.shape[-2:]]
        return F.interpolate(h, size=size, mode="bilinear", antialias=True, align_corners=False)

    def up(self, z: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Back to the per-sample `shape` the state had before `down`."""
        if not self.applies(shape):
            return z
        mode = "nearest" if self.kind == "avg" else "bilinear"
        return F.interpolate(
            z, size=list(shape[-2:]), mode=mode, **({} if mode == "nearest" else {"align_corners": False})
        )

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-sample shape after `down`."""
        if not self.applies(shape):
            return shape
        return (shape[0], *(-(-s // self.factor) for s in shape[1:]))
