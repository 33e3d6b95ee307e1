"""Argument checks shared by the selectors (clear errors naming the argument and what is valid)."""

from __future__ import annotations

import numbers

import torch


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if int(value) <= 0:
        raise ValueError(f"{name} must be a positive int (>= 1), got {value}")
    return int(value)


def check_nonneg_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number >= 0, got {type(value).__name__} {value!r}")
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite real number >= 0, got {value}")
    return float(value)


def check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def check_scores(name: str, scores: object) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (b,), got {type(scores).__name__}")
    if scores.dim() != 1 or scores.shape[0] == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D tensor (one score per candidate), got shape "
            f"{tuple(scores.shape)}"
        )
    return scores


def kept_count(k: int, n: int) -> int:
    """Samples kept from ``n`` candidates: ``k``, or all of them when fewer than ``k`` arrived."""
    return min(k, n)
