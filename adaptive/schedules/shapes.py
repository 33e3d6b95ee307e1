"""Warmup and decay shapes shared by the sample-clocked schedules.

Every shape is a function of the fraction ``p`` in [0, 1] of its phase that has been consumed.

Decay shapes go from 1 at ``p = 0`` to ``m`` (the minimum-lr ratio) at ``p = 1``:

- ``linear``:      ``m + (1 - m) (1 - p)``
- ``cosine``:      ``m + (1 - m) (1 + cos(pi p)) / 2``
- ``1-sqrt``:      ``m + (1 - m) (1 - sqrt(p))``  (Hägele et al. 2024, arXiv 2405.18392)
- ``exponential``: ``m + (1 - m) (exp(-k p) - exp(-k)) / (1 - exp(-k))``; with ``k = 1`` this is
  the exponential annealing of IBM's power-scheduler code (``A e^{-p} + B``), the WSD
  (MiniCPM, arXiv 2404.06395) tradition of an exponential cool-down, pinned to end at ``m``.

Warmup shapes are the decay shapes run backwards with ``m = 0``: ``warm(p) = decay(1 - p)``,
so they go from 0 to 1 (linear ``p``, cosine ``(1 - cos(pi p)) / 2``, 1-sqrt ``1 - sqrt(1 - p)``).
"""

from __future__ import annotations

import math
from typing import Literal

Shape = Literal["linear", "cosine", "1-sqrt", "exponential"]
SHAPES: tuple[str, ...] = ("linear", "cosine", "1-sqrt", "exponential")


def check_shape(name: str, value: object) -> None:
    """Raise ValueError unless ``value`` is one of :data:`SHAPES`."""
    if value not in SHAPES:
        raise ValueError(f"{name}={value!r} is not a known shape; use one of {list(SHAPES)}")


def decay_factor(shape: str, p: float, min_ratio: float = 0.0, rate: float = 1.0) -> float:
    """Decay multiplier at phase fraction ``p`` (clipped to [0, 1]): 1 at 0, ``min_ratio`` at 1."""
    p = min(max(p, 0.0), 1.0)
    if shape == "linear":
        unit = 1.0 - p
    elif shape == "cosine":
        unit = 0.5 * (1.0 + math.cos(math.pi * p))
    elif shape == "1-sqrt":
        unit = 1.0 - math.sqrt(p)
    elif shape == "exponential":
        floor = math.exp(-rate)
        unit = (math.exp(-rate * p) - floor) / (1.0 - floor)
    else:
        check_shape("shape", shape)
        raise AssertionError("unreachable")
    return min_ratio + (1.0 - min_ratio) * unit


def warmup_factor(shape: str, p: float, rate: float = 1.0) -> float:
    """Warmup multiplier at phase fraction ``p``: 0 at 0, 1 at 1 (the decay shape run backwards)."""
    p = min(max(p, 0.0), 1.0)
    return decay_factor(shape, 1.0 - p, 0.0, rate)
