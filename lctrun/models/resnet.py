"""ResNets for 32x32 inputs: CIFAR ResNet-6n+2, pre-activation ResNet-101 and Wide ResNets.

Every model is a ChainModel `stem, layer1..layerN, head` whose stages are `BlockSequence`s, so each residual
block is a cut point (`layer3.9`). Inputs of other sizes (28x28 MNIST) work because the head pools
adaptively.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from lctrun.errors import ConfigError
from lctrun.models.chain import BlockSequence, ChainModel


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation basic block (He et al. 2016a)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != planes:
            # option B: a projection rather than zero-padding, so the block stays a plain nn.Module
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016b), the Wide ResNet block with dropout 0."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv3x3(cin, planes, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(planes), conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or cin != planes:
            self.shortcut = nn.Conv2d(cin, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        # a projection sees the pre-activated input; the identity path stays untouched
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck block: 1x1 -> 3x3 (strided) -> 1x1, 4x expansion."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, planes, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(planes), conv3x3(planes, planes, stride)
        self.bn3, self.conv3 = nn.BatchNorm2d(planes), nn.Conv2d(planes, cout, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + shortcut


def make_stage(block: type[nn.Module], cin: int, planes: int, n: int, stride: int) -> tuple[BlockSequence, int]:
    """n blocks, the first one strided; returns the stage and its output channels."""
    blocks = []
    for i in range(n):
        blocks.append(block(cin, planes, stride if i == 0 else 1))
        cin = planes * block.expansion
    return BlockSequence(*blocks), cin


def _resnet(block, widths, counts, strides, num_classes, in_channels, preact):
    stem = [conv3x3(in_channels, widths[0])]
    if not preact:  # pre-activation blocks normalise their own input
        stem += [nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
    children: dict[str, nn.Module] = {"stem": nn.Sequential(*stem)}
    cin = widths[0]
    for i, (planes, n, stride) in enumerate(zip(widths[1:], counts, strides, strict=True), start=1):
        children[f"layer{i}"], cin = make_stage(block, cin, planes, n, stride)
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    if preact:  # the last block's output is not yet normalised
        head = [nn.BatchNorm2d(cin), nn.ReLU(inplace=True), *head]
    children["head"] = nn.Sequential(*head)
    return ChainModel(children)


def cifar_resnet(depth: int, num_classes: int, in_shape: tuple[int, ...]) -> ChainModel:
    if (depth - 2) % 6 != 0:
        raise ConfigError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
    n = (depth - 2) // 6
    return _resnet(BasicBlock, (16, 16, 32, 64), (n, n, n), (1, 2, 2), num_classes, in_shape[0], preact=False)


resnet8 = partial(cifar_resnet, 8)  # one block per stage: the smallest, for CPU runs on MNIST
resnet20 = partial(cifar_resnet, 20)
resnet32 = partial(cifar_resnet, 32)
resnet56 = partial(cifar_resnet, 56)
resnet110 = partial(cifar_resnet, 110)


def preact_resnet101(num_classes: int, in_shape: tuple[int, ...]) -> ChainModel:
    """As in the LCT TNNLS code: 3x3 stride-1 stem and no max-pool, since inputs are 32x32."""
    return _resnet(
        PreActBottleneck, (64, 64, 128, 256, 512), (3, 4, 23, 3), (1, 2, 2, 2), num_classes, in_shape[0], True
    )


def wrn_blocks_per_stage(depth: int, width: int) -> int:
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ConfigError(f"wrn-{depth}-{width}: WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40)")
    if width < 1:
        raise ConfigError(f"wrn-{depth}-{width}: WRN width must be at least 1")
    return (depth - 4) // 6


def wide_resnet(depth: int, width: int, num_classes: int, in_shape: tuple[int, ...]) -> ChainModel:
    n = wrn_blocks_per_stage(depth, width)
    widths = (16, 16 * width, 32 * width, 64 * width)
    return _resnet(PreActBlock, widths, (n, n, n), (1, 2, 2), num_classes, in_shape[0], preact=True)
