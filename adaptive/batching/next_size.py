"""The batch-size rule and the split of a global batch into micro-batches and accumulation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["BatchPlan", "next_batch_size", "plan_batch"]


def _check_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def next_batch_size(
    current: int,
    proposed: torch.Tensor | float,
    max_batch_size: int,
    multiple_of: int = 1,
) -> int:
    """``b_{k+1} = min(b_max, ⌈max(b_k, b̂_k)⌉)``, rounded up to a multiple; never shrinks.

    The rule of Lau, Liu, Kolar (AdAdaGrad, arXiv 2402.11215). ``multiple_of`` is usually the
    number of data-parallel ranks times the accumulation steps, so that every rank gets an
    equal share. The cap is ``max_batch_size`` rounded *down* to the multiple.

    This is the one place a proposal is read to the host (one scalar, once per decision). A
    proposal of ``+inf`` (zero mean gradient with noise) goes to the cap; ``nan`` (a broken
    statistic, e.g. a NaN gradient) keeps the current size.

    Returns:
        the next global batch size, an int with ``current <= b <= cap``.
    """
    _check_int("current", current)
    _check_int("max_batch_size", max_batch_size)
    _check_int("multiple_of", multiple_of)
    cap = max_batch_size // multiple_of * multiple_of
    if cap < multiple_of:
        raise ValueError(
            f"max_batch_size={max_batch_size} is smaller than multiple_of={multiple_of}; "
            "no batch size fits"
        )
    if current > max_batch_size:
        raise ValueError(f"current={current} exceeds max_batch_size={max_batch_size}")
    value = float(proposed.detach().float().cpu()) if torch.is_tensor(proposed) else float(proposed)
    if math.isnan(value):
        return current
    target = max(float(current), value)
    if math.isinf(target) or target >= cap:
        return max(current, cap)
    size = math.ceil(target)
    size = -(-size // multiple_of) * multiple_of
    return max(current, min(size, cap))


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is made: ``global = micro × world × accumulation``."""

    micro_batch_size: int
    accumulation: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.world_size * self.accumulation


def plan_batch(
    global_batch_size: int,
    world_size: int = 1,
    max_micro_batch_size: int | None = None,
) -> BatchPlan:
    """Split a global batch into a per-rank micro-batch and an accumulation count.

    Below the memory limit the whole per-rank share is one micro-batch (accumulation 1). Past
    ``max_micro_batch_size`` the micro-batch stays fixed at that limit and the number of
    accumulation steps grows, ``A = ⌈b / (W · m_max)⌉``, so the realised global batch
    ``m_max · W · A`` is the request rounded up to a multiple of ``m_max · W`` (as in the
    AdAdaGrad code, which grows the accumulation once the micro-batch is capped).

    ``global_batch_size`` must be a multiple of ``world_size``.
    """
    _check_int("global_batch_size", global_batch_size)
    _check_int("world_size", world_size)
    if global_batch_size % world_size:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not a multiple of world_size={world_size}"
        )
    per_rank = global_batch_size // world_size
    if max_micro_batch_size is None or per_rank <= max_micro_batch_size:
        return BatchPlan(per_rank, 1, world_size)
    _check_int("max_micro_batch_size", max_micro_batch_size)
    accumulation = -(-per_rank // max_micro_batch_size)
    return BatchPlan(max_micro_batch_size, accumulation, world_size)
