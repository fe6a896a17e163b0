"""BatchNorm layers that normalise with their running statistics and leave them alone."""

from __future__ import annotations

from torch import nn


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every BatchNorm layer of `module` in eval mode (its affine weights still learn): a sample's
    output no longer depends on the rest of its batch, and the running statistics stay as they are."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
