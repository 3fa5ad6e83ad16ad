"""A user's own models, as a user would write them (plain nn.Modules, no kdsweep imports), for test_your_models.py.

Named on the command line as `kd_user_models:teacher` etc.; the bad factories below are the bad inputs.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class ConvClassifier(nn.Module):
    def __init__(self, in_channels: int, width: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.body(x)).flatten(1))


def teacher(num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
    return ConvClassifier(in_shape[0], 16, num_classes)


def student(num_classes: int) -> nn.Module:
    return ConvClassifier(1, 4, num_classes)  # knows its data: 1-channel digits


class Flat(nn.Module):
    """An MLP: no spatial map anywhere."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.net(x)


class AllConv(nn.Module):
    """A classifier without any nn.Linear: its logits come from a 1x1 convolution and pooling."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 1))

    def forward(self, x):
        return self.body(x).mean((2, 3))


class TwoOutputs(ConvClassifier):
    def forward(self, x):
        f = self.body(x)
        return self.head(self.pool(f).flatten(1)), f


def raises(num_classes: int):
    raise RuntimeError("out of coffee")


def not_a_module(num_classes: int):
    return 42


def seven_classes(num_classes: int) -> nn.Module:
    return ConvClassifier(1, 8, 7)  # ignores num_classes


def two_outputs(num_classes: int) -> nn.Module:
    return TwoOutputs(1, 4, num_classes)


def scalar_output(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 1), nn.Flatten(0))  # (batch,): no class dimension


NOT_CALLABLE = torch.zeros(1)
