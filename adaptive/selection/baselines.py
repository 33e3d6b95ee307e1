"""Baseline online selectors: uniform, high loss (selective backprop) and RHO-LOSS.

Each keeps ``k`` of the ``b`` candidates of a batch:

- :class:`UniformSelector`: ``k`` indices drawn uniformly without replacement (the control).
- :class:`HighLossSelector`: the ``k`` largest per-sample training losses ``ℓ_θ(x_i)``; the
  deterministic top-k form of selective backprop (Jiang et al., "Accelerating Deep Learning by
  Focusing on the Biggest Losers", arXiv 1910.00762, which samples with probability growing
  with the loss percentile).
- :class:`RhoLossSelector`: the ``k`` largest reducible losses ``ℓ_θ(x_i) − ℓ_holdout(x_i)``,
  where the irreducible loss comes from a model trained on holdout data (Mindermann et al.,
  "Prioritized Training on Points that are Learnable, Worth Learning, and Not Yet Learnt",
  ICML 2022, arXiv 2206.07137).

Per-sample losses come from :func:`per_sample_loss` or the user's own unreduced loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from adaptive.selection._checks import check_int, check_positive_int, check_scores, kept_count


def per_sample_loss(
    logits: Tensor, labels: Tensor, *, ignore_index: int = -100, shift: bool = False
) -> Tensor:
    """Per-sample cross-entropy: ``(b,)``.

    ``(b, C)`` logits with ``(b,)`` labels: ``ℓ_i = −log softmax(l_i)[y_i]``. ``(b, T, V)`` logits
    with ``(b, T)`` labels: the mean of the token losses over positions whose label is not
    ``ignore_index`` (0 for a sample with none). ``shift=True`` scores token ``t`` against label
    ``t+1`` (causal LMs whose labels equal their inputs, as in HF ``labels=input_ids``).
    """
    if logits.dim() == 2:
        if labels.shape != logits.shape[:1]:
            raise ValueError(
                f"labels for (b, C) logits must have shape (b,) = {tuple(logits.shape[:1])}, "
                f"got {tuple(labels.shape)}"
            )
        return F.cross_entropy(logits.float(), labels, reduction="none")
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            "per_sample_loss takes (b, C) logits with (b,) labels or (b, T, V) logits with "
            f"(b, T) labels; got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    tokens = F.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=ignore_index, reduction="none"
    )
    valid = (labels != ignore_index).to(tokens.dtype)
    return (tokens * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1.0)


class UniformSelector:
    """``k`` of the ``n`` candidates uniformly at random, from a seeded CPU generator.

    ``selector(n, device)`` returns ``(min(k, n),)`` indices. Every rank with the same seed
    draws the same positions (of its own local batch).
    """

    def __init__(self, k: int, seed: int = 0) -> None:
        self.k = check_positive_int("k", k)
        self.seed = check_int("seed", seed)
        self._gen = torch.Generator().manual_seed(self.seed)

    def __call__(self, n: int, device: torch.device | str | None = None) -> Tensor:
        n = check_positive_int("n", n)
        return torch.randperm(n, generator=self._gen)[: kept_count(self.k, n)].to(device)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._gen.get_state(), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._gen.set_state(state["generator"])


class HighLossSelector:
    """The ``k`` candidates with the largest per-sample loss (top-k selective backprop).

    ``selector(losses)`` with ``(b,)`` losses returns ``(min(k, b),)`` indices, largest first.
    """

    def __init__(self, k: int) -> None:
        self.k = check_positive_int("k", k)

    def __call__(self, losses: Tensor) -> Tensor:
        losses = check_scores("losses", losses)
        return torch.topk(losses, kept_count(self.k, losses.shape[0])).indices

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class RhoLossSelector:
    """The ``k`` candidates with the largest reducible loss ``ℓ_train − ℓ_holdout``.

    ``selector(losses, holdout_losses)`` with two ``(b,)`` tensors returns ``(min(k, b),)``
    indices, largest reducible loss first. ``holdout_losses`` are the losses of an
    "irreducible loss" model trained on holdout data (computed on the fly or precomputed per
    sample index, as in the RHO-LOSS paper).
    """

    def __init__(self, k: int) -> None:
        self.k = check_positive_int("k", k)

    def __call__(self, losses: Tensor, holdout_losses: Tensor) -> Tensor:
        losses = check_scores("losses", losses)
        holdout_losses = check_scores("holdout_losses", holdout_losses)
        if holdout_losses.shape != losses.shape:
            raise ValueError(
                f"holdout_losses has shape {tuple(holdout_losses.shape)}, losses "
                f"{tuple(losses.shape)}; both need one value per candidate"
            )
        reducible = losses - holdout_losses.to(losses.device, losses.dtype)
        return torch.topk(reducible, kept_count(self.k, losses.shape[0])).indices

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
