"""Schedule refinement from a logged gradient-norm history (Defazio, Cutkosky, Mehta,
Mishchenko 2023, "When, Why and How Much? Adaptive Learning Rate Scheduling by Refinement",
arXiv 2310.07831).

Run once, log the gradient norm ``G_t`` of every step ``t = 0..T-1``, then:

1. smooth ``G`` with a median filter of width ``≈ filter_fraction · T`` (odd, >= 1);
2. weights ``w_t = G_t^-2`` for SGD (ℓ2 norms) or ``w_t = G_t^-1`` for Adam-type optimizers
   (where ``G_t`` should be the ℓ1 norm of the gradient);
3. ``η_t ∝ w_t · Σ_{p > t} w_p`` (so ``η_{T-1} = 0``), normalised so that ``max_t η_t = 1``;
   the schedule multiplies each param group's initial (peak) lr.

With constant ``G`` this is ``η_t ∝ T - 1 - t``: linear decay. The refined schedule is laid
over the new run's token budget: the new run at ``n`` tokens reads the history at position
``n / N · (T - 1)`` by linear interpolation, so a history logged at one batch size refines a run
at another.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from scipy.ndimage import median_filter
from torch.optim import Optimizer

from .clock import SampleClockedScheduler, check_nonneg

_WEIGHT_POWER = {"sgd": 2.0, "adam": 1.0}


def load_grad_norms(path: str | Path, column: str | int | None = None) -> np.ndarray:
    """Read a gradient-norm history from a CSV file.

    The file may have a header row. ``column`` picks a column by header name or index; by
    default a single-column file is read as is, and a file with a header uses the first column
    whose name ends in ``grad_norm`` (e.g. ``grad_stats/grad_norm`` written by
    ``callbacks.gradient_statistics.GradientStatisticsLogger`` through Lightning's
    ``CSVLogger``). Rows whose cell is empty (other metrics logged on their own rows) are
    skipped.
    """
    path = Path(path)
    with path.open(newline="") as f:
        rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    if not rows:
        raise ValueError(f"{path} holds no rows of gradient norms")

    def _numeric(row: list[str]) -> bool:
        try:
            [float(cell) for cell in row if cell.strip()]
        except ValueError:
            return False
        return True

    header = None if _numeric(rows[0]) else [cell.strip() for cell in rows[0]]
    body = rows if header is None else rows[1:]
    if isinstance(column, str):
        if header is None or column not in header:
            raise ValueError(f"column={column!r} is not in the header of {path}: {header}")
        index = header.index(column)
    elif isinstance(column, int):
        index = column
    elif header is None and body and len(body[0]) == 1:
        index = 0
    else:
        names = [n for n in header or [] if n.endswith("grad_norm")]
        if not names:
            raise ValueError(
                f"{path} has no column named *grad_norm (header {header}); pass column= to pick "
                "the gradient norms"
            )
        index = header.index(names[0])  # type: ignore[union-attr]
    try:
        cells = [row[index].strip() for row in body if index < len(row)]
        values = np.array([float(c) for c in cells if c], dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"column {index} of {path} is not all numbers: {exc}") from exc
    if values.size == 0:
        raise ValueError(f"column {index} of {path} holds no values")
    return values


def refine_schedule(
    grad_norms: Sequence[float] | np.ndarray | torch.Tensor,
    optimizer: Literal["sgd", "adam"] = "sgd",
    filter_fraction: float = 0.05,
) -> np.ndarray:
    """The refined schedule ``η_t / max η`` for ``t = 0..T-1`` (arXiv 2310.07831, see module doc).

    Args:
        grad_norms: ``G_t`` per step (ℓ2 norms for SGD, ℓ1 norms for Adam-type), length >= 2.
        optimizer: "sgd" (``w = G^-2``) or "adam" (``w = G^-1``).
        filter_fraction: median-filter width as a fraction of ``T``; 0 disables the filter.
    """
    if optimizer not in _WEIGHT_POWER:
        raise ValueError(f"optimizer={optimizer!r} must be 'sgd' (w = G^-2) or 'adam' (w = G^-1)")
    if not 0.0 <= filter_fraction < 1.0:
        raise ValueError(f"filter_fraction must be in [0, 1), got {filter_fraction}")
    if isinstance(grad_norms, torch.Tensor):
        g = grad_norms.detach().to("cpu", torch.float64).numpy()
    else:
        g = np.asarray(grad_norms, dtype=np.float64)
    if g.ndim != 1 or g.size < 2:
        raise ValueError(f"grad_norms must be a 1-D history of >= 2 steps, got shape {g.shape}")
    bad = ~np.isfinite(g) | (g <= 0)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"grad_norms must be finite and > 0; entry {first} is {g[first]} "
            f"({int(bad.sum())} bad entries)"
        )
    width = 2 * (int(filter_fraction * g.size) // 2) + 1
    if width > 1:
        g = median_filter(g, size=width, mode="reflect")
    w = g ** (-_WEIGHT_POWER[optimizer])
    tail = np.concatenate([np.cumsum(w[::-1])[::-1][1:], [0.0]])  # Σ_{p>t} w_p
    eta = w * tail
    return eta / eta.max()


class RefinedScheduler(SampleClockedScheduler):
    """The refined schedule of arXiv 2310.07831 from a gradient-norm history, over a token budget.

    Args:
        optimizer: the optimizer; each group's initial lr is the peak lr.
        grad_norms: the history ``G_t`` (sequence, array, tensor) or a CSV file path.
        total_tokens: the new run's budget N; the schedule ends at 0 there.
        optimizer_kind: "sgd" (``w = G^-2``, ℓ2 norms) or "adam" (``w = G^-1``, ℓ1 norms).
        filter_fraction: median-filter width as a fraction of the history length.
        column: CSV column (name or index) when ``grad_norms`` is a path.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        grad_norms: Sequence[float] | np.ndarray | torch.Tensor | str | Path,
        total_tokens: float,
        optimizer_kind: Literal["sgd", "adam"] = "sgd",
        filter_fraction: float = 0.05,
        column: str | int | None = None,
    ) -> None:
        if isinstance(grad_norms, (str, Path)):
            grad_norms = load_grad_norms(grad_norms, column)
        total = check_nonneg("total_tokens", total_tokens)
        if total == 0:
            raise ValueError("total_tokens must be > 0, got 0")
        schedule = refine_schedule(grad_norms, optimizer_kind, filter_fraction)
        self.total_tokens = total
        self.optimizer_kind = optimizer_kind
        self.filter_fraction = float(filter_fraction)
        self.schedule = [float(v) for v in schedule]  # plain floats: weights_only-loadable
        super().__init__(optimizer)

    def multiplier(self, tokens: float, batch_samples: int) -> float:
        last = len(self.schedule) - 1
        x = min(max(tokens / self.total_tokens, 0.0), 1.0) * last
        i = min(math.floor(x), last - 1)
        frac = x - i
        return (1.0 - frac) * self.schedule[i] + frac * self.schedule[i + 1]
