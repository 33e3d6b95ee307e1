"""Small reference models shared by the demo, benchmarks and tests."""

from __future__ import annotations

from torch import nn


def small_cnn(num_classes: int = 10) -> nn.Sequential:
    """Two 3x3 convolutions with max-pooling and one linear head (about 20k parameters).

    No BatchNorm: per-sample gradient statistics are undefined where samples are coupled.
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, num_classes),
    )
