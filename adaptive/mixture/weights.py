"""Validation and post-processing of mixture weights (probability vectors over the sources)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["apply_floor", "as_weights"]


def as_weights(
    weights: Sequence[float] | Tensor, num_sources: int, name: str = "weights"
) -> Tensor:
    """Check ``weights`` and return them normalised to sum to one, as a float64 CPU tensor.

    Weights are relative: ``[2, 1, 1]`` means ``[0.5, 0.25, 0.25]`` (they are divided by their sum,
    so a vector that does not sum to one is normalised, never rejected). Rejected with
    ``ValueError``: a length other than ``num_sources``, a negative, NaN or infinite entry, or an
    all-zero vector. A zero entry is allowed: that source is never drawn.
    """
    if isinstance(weights, Tensor):
        w = weights.detach().to(device="cpu", dtype=torch.float64).flatten()
    else:
        try:
            w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be a sequence of numbers, got {weights!r}") from err
    if w.numel() != num_sources:
        raise ValueError(
            f"{name} must have one entry per source ({num_sources}), got {w.numel()}: {w.tolist()}"
        )
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} must be finite (no NaN or inf), got {w.tolist()}")
    if bool((w < 0).any()):
        raise ValueError(f"{name} must be non-negative, got {w.tolist()}")
    total = float(w.sum())
    if total <= 0.0:
        raise ValueError(
            f"{name} must have a positive sum (some source must be drawn), got {w.tolist()}"
        )
    return w / total


def apply_floor(weights: Tensor, floor: float) -> Tensor:
    """Mix with the uniform vector so that every entry is at least ``floor``.

    ``w ← floor + (1 − k·floor)·w`` for a probability vector ``w`` of length ``k``; the result still
    sums to one. Requires ``0 ≤ floor < 1/k`` (``floor = 1/k`` would be the uniform vector).
    """
    k = weights.numel()
    check_floor(floor, k)
    if floor == 0.0:
        return weights
    return floor + (1.0 - k * floor) * weights


def check_floor(floor: float, num_sources: int) -> None:
    """Raise ``ValueError`` unless ``0 ≤ floor < 1/num_sources``."""
    if not (isinstance(floor, (int, float)) and math.isfinite(floor)):
        raise ValueError(f"floor must be a finite number, got {floor!r}")
    if not 0.0 <= floor < 1.0 / num_sources:
        raise ValueError(
            f"floor must lie in [0, 1/num_sources) = [0, {1.0 / num_sources:.4g}), got {floor}"
        )
