"""VGG-like BN CNN of the Local Critic Training experiments (Lee, Hsieh & Lee, LCT).

Six conv3x3-BN-ReLU layers (128, 128, 256, 256, 512, 512 channels, a max-pool after every pair) and a
two-layer classifier (1024 hidden units). Each conv layer is its own block so that the LCT 4-group split
(`conv2, conv4, conv6`) puts one conv pair in each of the first three groups.
"""

from __future__ import annotations

from torch import nn

from lctrun.models.chain import ChainModel
from lctrun.models.cnn import conv_bn_relu


def vgg_lct(num_classes: int, in_shape: tuple[int, ...], width: int = 128) -> ChainModel:
    c, h, w = in_shape
    a, b, d = width, 2 * width, 4 * width
    pool = lambda block: nn.Sequential(block, nn.MaxPool2d(2))
    return ChainModel(
        dict(
            conv1=conv_bn_relu(c, a),
            conv2=pool(conv_bn_relu(a, a)),
            conv3=conv_bn_relu(a, b),
            conv4=pool(conv_bn_relu(b, b)),
            conv5=conv_bn_relu(b, d),
            conv6=pool(conv_bn_relu(d, d)),
            # three floor-halvings: 32 -> 4, 28 -> 3
            fc1=nn.Sequential(nn.Flatten(), nn.Linear(d * (h // 8) * (w // 8), 8 * width), nn.ReLU(inplace=True)),
            head=nn.Linear(8 * width, num_classes),
        )
    )


def vgg_lct_small(num_classes: int, in_shape: tuple[int, ...]) -> ChainModel:
    """The same layers at a quarter of the width (32..128 channels, 256 hidden): for CPU-scale tables."""
    return vgg_lct(num_classes, in_shape, width=32)
