"""What the reweighting rules read: per-domain losses, counts, reference losses, alignments."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DomainLossMeter", "MixtureSignals", "check_losses", "domain_sums"]


@dataclass
class MixtureSignals:
    """Per-domain measurements over one update interval.

    Attributes:
        losses: ``(k,)`` mean training loss of each domain's samples in the interval (any value
            where ``counts`` is 0).
        counts: ``(k,)`` number of samples of each domain in the interval.
        reference_losses: ``(k,)`` mean reference-model loss on the same samples (DoReMi), or None.
        alignment: ``(n, k)`` or ``(k,)`` alignment of each domain's mean gradient with ``n``
            target gradients (group influence), or None.
    """

    losses: Tensor
    counts: Tensor
    reference_losses: Tensor | None = None
    alignment: Tensor | None = None


def check_losses(values: Tensor, k: int, name: str, mask: Tensor | None = None) -> Tensor:
    """``values`` as a ``(k,)`` float64 CPU tensor; NaN/inf where ``mask`` is set: ValueError."""
    v = torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float64).flatten()
    if v.numel() != k:
        raise ValueError(
            f"{name} must have one entry per domain ({k}), got shape {tuple(values.shape)}"
        )
    bad = ~torch.isfinite(v)
    if mask is not None:
        bad &= mask.to(device="cpu", dtype=torch.bool)
    if bool(bad.any()):
        domains = torch.nonzero(bad).flatten().tolist()
        raise ValueError(
            f"{name} is NaN or infinite for domain(s) {domains}: {v.tolist()}; check the loss "
            "(or use DynamicMixture(nan_policy='skip') to skip such updates)"
        )
    return v


def domain_sums(values: Tensor, sources: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-domain sums of per-sample ``values`` and per-domain counts, on ``values``' device.

    ``sums_i = Σ_{j: sources_j = i} values_j`` and ``counts_i = |{j: sources_j = i}|``, by
    ``scatter_add`` (no host synchronisation).
    """
    if values.shape != sources.shape or values.ndim != 1:
        raise ValueError(
            f"per-sample values and source ids must be 1-D of the same length, got "
            f"{tuple(values.shape)} and {tuple(sources.shape)}"
        )
    idx = sources.to(device=values.device, dtype=torch.long)
    sums = torch.zeros(k, dtype=torch.float64, device=values.device)
    sums.scatter_add_(0, idx, values.detach().to(torch.float64))
    counts = torch.zeros(k, dtype=torch.float64, device=values.device)
    counts.scatter_add_(0, idx, torch.ones_like(sums[idx]))
    return sums, counts


class DomainLossMeter:
    """Accumulates per-domain loss sums and counts over an interval, on the device.

    ``add`` costs two ``scatter_add`` calls and never synchronises; ``signals()`` reads the totals
    (once per interval) and ``reset()`` starts the next interval. Under DDP, ``all_reduce=True`` in
    :meth:`signals` sums the totals over ranks first, so every rank sees the same numbers.
    """

    def __init__(self, num_domains: int) -> None:
        if not isinstance(num_domains, int) or num_domains < 1:
            raise ValueError(f"num_domains must be a positive integer, got {num_domains!r}")
        self.num_domains = num_domains
        self._totals: Tensor | None = None  # rows: loss sums, counts, reference sums

    def add(self, losses: Tensor, sources: Tensor, reference_losses: Tensor | None = None) -> None:
        k = self.num_domains
        sums, counts = domain_sums(losses.flatten(), sources.flatten(), k)
        ref = torch.zeros_like(sums)
        if reference_losses is not None:
            ref, _ = domain_sums(reference_losses.flatten(), sources.flatten(), k)
        row = torch.stack(
            [sums, counts, ref, torch.full_like(sums, float(reference_losses is not None))]
        )
        self._totals = row if self._totals is None else self._totals.to(row.device) + row

    def reset(self) -> None:
        self._totals = None

    def state_dict(self) -> dict[str, Tensor | None]:
        """The partial interval's totals (CPU), so a checkpoint mid-interval resumes exactly."""
        return {"totals": None if self._totals is None else self._totals.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Tensor | None]) -> None:
        totals = state["totals"]
        self._totals = None if totals is None else torch.as_tensor(totals, dtype=torch.float64)

    def signals(self, all_reduce: bool = False) -> MixtureSignals:
        k = self.num_domains
        totals = (
            self._totals if self._totals is not None else torch.zeros(4, k, dtype=torch.float64)
        )
        if all_reduce:
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                totals = totals.clone()
                dist.all_reduce(totals)
        totals = totals.cpu()
        sums, counts, ref_sums, has_ref = totals
        denom = counts.clamp_min(1.0)
        reference = ref_sums / denom if bool((has_ref > 0).all()) else None
        return MixtureSignals(losses=sums / denom, counts=counts, reference_losses=reference)
