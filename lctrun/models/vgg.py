"""VGG-like BN CNN of the Local Critic Training experiments (Lee, Hsieh & Lee, LCT).

Six conv3x3-BN-ReLU layers (128, 128, 256, 256, 512, 512 channels, a max-pool after every pair) and a
two-layer classifier (1024 hidden units). Each conv layer is its own block so that the LCT 4-group split
(`conv2, conv4, conv6`) puts one conv pair in each of the first three groups.
"""

from __future__ import annotations

from torch import nn

from lctrun.models.chain import ChainModel
from lctrun.models.cnn import conv_bn_relu


def vgg_lct(num_classes: int, in_shape: tuple[int, ...]) -> ChainModel:
    c, h, w = in_shape
    pool = lambda block: nn.Sequential(block, nn.MaxPool2d(2))
    return ChainModel(
        dict(
            conv1=conv_bn_relu(c, 128),
            conv2=pool(conv_bn_relu(128, 128)),
            conv3=conv_bn_relu(128, 256),
            conv4=pool(conv_bn_relu(256, 256)),
            conv5=conv_bn_relu(256, 512),
            conv6=pool(conv_bn_relu(512, 512)),
            # three floor-halvings: 32 -> 4, 28 -> 3
            fc1=nn.Sequential(nn.Flatten(), nn.Linear(512 * (h // 8) * (w // 8), 1024), nn.ReLU(inplace=True)),
            head=nn.Linear(1024, num_classes),
        )
    )
