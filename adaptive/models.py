"""Small reference models shared by the demo, benchmarks and tests."""

from __future__ import annotations

from torch import nn


def small_cnn(
    num_classes: int = 10, kernel_size: int = 3, hidden: int | None = None
) -> nn.Sequential:
    """Two convolutions (16 and 32 channels, "same" padding) with max-pooling and a linear head.

    ``kernel_size=3`` (default, about 20k parameters) is the demo's model; ``kernel_size=5`` is
    the MNIST CNN of the AdAdaGrad experiments (Lau, Liu, Kolar, arXiv 2402.11215); ``hidden``
    adds a fully connected ReLU layer of that width before the head. No BatchNorm: per-sample
    gradient statistics are undefined where samples are coupled.
    """
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")
    pad = kernel_size // 2
    head: list[nn.Module] = (
        [nn.Linear(32 * 7 * 7, num_classes)]
        if hidden is None
        else [nn.Linear(32 * 7 * 7, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
    )
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size, padding=pad),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, kernel_size, padding=pad),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        *head,
    )
