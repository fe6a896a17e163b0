"""Small CNN for MNIST-sized inputs: three conv-BN-ReLU-pool stages and a two-layer classifier."""

from __future__ import annotations

from torch import nn

from lctrun.models.chain import ChainModel


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def conv_bn_relu_pool(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(*conv_bn_relu(cin, cout), nn.MaxPool2d(2))


def cnn_small(num_classes: int, in_shape: tuple[int, ...]) -> ChainModel:
    c, h, w = in_shape
    return ChainModel(
        dict(
            conv1=conv_bn_relu_pool(c, 32),
            conv2=conv_bn_relu_pool(32, 64),
            conv3=conv_bn_relu_pool(64, 128),
            fc1=nn.Sequential(nn.Flatten(), nn.Linear(128 * (h // 8) * (w // 8), 256), nn.ReLU(inplace=True)),
            head=nn.Linear(256, num_classes),
        )
    )
