"""UDS: utility + diversity online batch selection (Zou et al., arXiv 2510.16882).

From a candidate batch of ``b`` samples keep the ``k`` with the largest

    s_i = z(u)_i + α · z(d)_i,

- ``u_i``: :func:`~adaptive.selection.uds_utility`, the nuclear norm of sample ``i``'s logits;
- ``d_i = (1/|M|) Σ_{m∈M} ‖P(L_i) − m‖₂``: mean Euclidean distance of the fixed random sketch
  ``P`` (:class:`~adaptive.selection.projection.FourierSketch`) of the logits to a FIFO memory
  ``M`` of the sketches of previously *selected* samples (0 while ``M`` is empty);
- ``z(x)_i = (x_i − mean(x)) / std(x)`` over the candidate set (population std; 0 where ``x`` is
  constant, e.g. before anything was selected).

Normalisation: the reference code adds the raw scores, so α depends on the logits' scale (the
authors tune α ∈ [1.5e-3, 2.5e-3] per backbone). Standardising both terms over the candidates
makes them unitless: multiplying the logits by any constant leaves the selection unchanged, and
α = 1 weighs one standard deviation of diversity as much as one of utility whatever the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from adaptive.selection._checks import (
    check_int,
    check_nonneg_float,
    check_positive_int,
    kept_count,
)
from adaptive.selection.projection import FourierSketch
from adaptive.selection.utility import masked_logits, nuclear_norms

Gather = Callable[[Tensor], Tensor]


def standardize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``(x − mean) / std`` over the last dimension; 0 where ``std ≤ eps·(|mean| + 1e-30)``."""
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, correction=0, keepdim=True)
    flat = std <= eps * (mean.abs() + 1e-30)
    return torch.where(flat, torch.zeros_like(x), (x - mean) / torch.where(flat, 1.0, std))


def mean_distance(points: Tensor, memory: Tensor) -> Tensor:
    """``d_i = mean_m ‖points_i − memory_m‖₂``; zeros when ``memory`` is empty."""
    if memory.shape[0] == 0:
        return points.new_zeros(points.shape[0])
    return torch.cdist(points, memory, p=2).mean(dim=-1)


class UDSSelector:
    """Keep the ``k`` candidates with the largest standardised utility + α · diversity.

    Args:
        k: samples kept per candidate batch (all of them if fewer arrive).
        alpha: weight ``α ≥ 0`` of the standardised diversity (0: utility only). Default 1.0:
            both terms are z-scores over the candidates, so α = 1 weighs one standard deviation
            of diversity as much as one of utility whatever the model and the logits' scale.
            (The paper's α ∈ [1.5e-3, 2.5e-3] weighs *raw* scores and does not transfer here.)
        memory_size: FIFO capacity ``|M|`` in selected samples (1024 in the paper's script).
        projection_dim: ``(r₁, r₂)`` rows × columns of the sketch (8 × 128 = 1024-d in the
            reference); capped at the matrix size (so classifier logits give ``1 × min(r₂, C)``).
        max_length: longest sequence the sketch accepts (rows are zero-padded to it).
        seed: seed of the fixed sketch.
        per_row_utility: divide each utility by the sample's number of unmasked rows. A nuclear
            norm grows with the row count (between ``r√n`` and ``n·r`` for ``n`` rows of norm
            ``r``), so the paper's utility prefers long sequences; on SmolLM2-135M's GCIDE
            definitions (``examples/selection_lm_sft.py``) the kept responses average 15.7
            tokens against 10.7 for all candidates, and 9.9 with this option
            (``benchmarks/selection_length_bias.py``). Off by default (the paper's utility).

    Call ``selector(logits, attention_mask)`` with ``(b, T, V)`` or ``(b, C)`` logits: returns the
    ``(min(k, b),)`` kept indices (best first, on the logits' device) and pushes their sketches
    into the memory. Under DDP pass ``gather`` (local ``(k, d)`` → global ``(world·k, d)`` in rank
    order) so every rank's memory holds every rank's selections and the ranks stay identical.

    Example::

        sel = UDSSelector(k=8, alpha=1.0)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask)
        keep = sel(out.logits, mask)
        loss = model(**{n: t[keep] for n, t in batch.items()}).loss

    Reference: Zou et al., arXiv 2510.16882; code gfyddha/UDS (unnormalised scores, no mask).
    """

    def __init__(
        self,
        k: int,
        alpha: float = 1.0,
        memory_size: int = 1024,
        projection_dim: tuple[int, int] = (8, 128),
        max_length: int = 512,
        seed: int = 0,
        per_row_utility: bool = False,
    ) -> None:
        self.k = check_positive_int("k", k)
        if not isinstance(per_row_utility, bool):
            raise TypeError(f"per_row_utility must be True or False, got {per_row_utility!r}")
        self.per_row_utility = per_row_utility
        self.alpha = check_nonneg_float("alpha", alpha)
        self.memory_size = check_positive_int("memory_size", memory_size)
        if not (isinstance(projection_dim, (tuple, list)) and len(projection_dim) == 2):
            raise TypeError(
                f"projection_dim must be a pair (rows, columns) such as (8, 128), got "
                f"{projection_dim!r}"
            )
        self.projection_dim = (
            check_positive_int("projection_dim[0]", projection_dim[0]),
            check_positive_int("projection_dim[1]", projection_dim[1]),
        )
        self.max_length = check_positive_int("max_length", max_length)
        self.seed = check_int("seed", seed)
        self._sketch: FourierSketch | None = None
        self._memory: Tensor | None = None
        self.count = 0  # filled memory slots
        self.ptr = 0  # next slot to overwrite
        self.last_utility: Tensor | None = None
        self.last_diversity: Tensor | None = None

    # -- pieces ---------------------------------------------------------------------------
    def _sketch_for(self, matrices: Tensor, two_d: bool) -> FourierSketch:
        rows = 1 if two_d else self.max_length
        if matrices.shape[1] > rows:
            raise ValueError(
                f"sequence length {matrices.shape[1]} exceeds max_length={self.max_length}; "
                "raise UDSSelector(max_length=...)"
            )
        if self._sketch is None:
            self._sketch = FourierSketch(
                rows, matrices.shape[2], self.projection_dim[0], self.projection_dim[1], self.seed
            )
        elif (self._sketch.num_rows, self._sketch.num_columns) != (rows, matrices.shape[2]):
            raise ValueError(
                f"UDSSelector saw logits of vocabulary {self._sketch.num_columns} "
                f"({'2-D' if self._sketch.num_rows == 1 else '3-D'}) before and now "
                f"{matrices.shape[2]} ({'2-D' if two_d else '3-D'}); one selector serves one model"
            )
        return self._sketch

    def memory(self) -> Tensor | None:
        """The filled part of the memory, oldest slot order not guaranteed (a set)."""
        return None if self._memory is None else self._memory[: self.count]

    def score(
        self, logits: Tensor, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(s, sketches, utility)`` for the candidates, without touching the memory."""
        matrices = masked_logits(logits, attention_mask)
        utility = nuclear_norms(matrices)
        if self.per_row_utility:
            rows = (
                attention_mask.to(utility.device).sum(-1).clamp_min(1).to(utility.dtype)
                if attention_mask is not None
                else float(matrices.shape[1])
            )
            utility = utility / rows
        sketches = self._sketch_for(matrices, logits.dim() == 2)(matrices)
        memory = self.memory()
        if memory is None:
            diversity = sketches.new_zeros(sketches.shape[0])
        else:
            diversity = mean_distance(sketches, memory.to(sketches.device, sketches.dtype))
        self.last_utility, self.last_diversity = utility, diversity
        return standardize(utility) + self.alpha * standardize(diversity), sketches, utility

    def push(self, sketches: Tensor) -> None:
        """Append selected sketches ``(m, d)`` to the FIFO memory (oldest overwritten)."""
        m = sketches.shape[0]
        if m == 0:
            return
        if self._memory is None:
            self._memory = sketches.new_zeros(self.memory_size, sketches.shape[1])
        elif self._memory.device != sketches.device:
            self._memory = self._memory.to(sketches.device)
        if m > self.memory_size:
            sketches = sketches[-self.memory_size :]
            m = self.memory_size
        slots = (torch.arange(m, device=sketches.device) + self.ptr) % self.memory_size
        self._memory.index_copy_(0, slots, sketches.to(self._memory.dtype))
        self.ptr = (self.ptr + m) % self.memory_size
        self.count = min(self.count + m, self.memory_size)

    @torch.no_grad()
    def __call__(
        self, logits: Tensor, attention_mask: Tensor | None = None, *, gather: Gather | None = None
    ) -> Tensor:
        scores, sketches, _ = self.score(logits, attention_mask)
        keep = torch.topk(scores, kept_count(self.k, scores.shape[0])).indices
        chosen = sketches.index_select(0, keep)
        self.push(chosen if gather is None else gather(chosen))
        return keep

    # -- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sketch = self._sketch
        return {
            "memory": (
                torch.zeros(0) if self._memory is None else self._memory[: self.count].cpu()
            ),
            "count": self.count,
            "ptr": self.ptr,
            "sketch_shape": [] if sketch is None else [sketch.num_rows, sketch.num_columns],
            "seed": self.seed,
            "memory_size": self.memory_size,
            "projection_dim": list(self.projection_dim),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "memory_size"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"checkpoint has UDSSelector {key}={state[key]}, this selector "
                    f"{getattr(self, key)}; build the selector with the checkpoint's settings"
                )
        if tuple(state["projection_dim"]) != self.projection_dim:
            raise ValueError(
                f"checkpoint has projection_dim={tuple(state['projection_dim'])}, this selector "
                f"{self.projection_dim}"
            )
        shape = state["sketch_shape"]
        self._sketch = (
            FourierSketch(shape[0], shape[1], *self.projection_dim, self.seed) if shape else None
        )
        self.count, self.ptr = int(state["count"]), int(state["ptr"])
        memory = state["memory"]
        if self.count == 0:
            self._memory = None
            return
        device = self._memory.device if self._memory is not None else memory.device
        self._memory = memory.new_zeros(self.memory_size, memory.shape[1]).to(device)
        self._memory[: self.count] = memory.to(device)
