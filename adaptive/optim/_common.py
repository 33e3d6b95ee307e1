"""Shared checks and small helpers for the optimizers in :mod:`adaptive.optim`."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__: list[str] = []

# Elements per piece in the cache-blocked CPU path: 4 MiB per fp32 stream, so the five streams a
# LAMB piece touches (param, grad, both moments, scratch) stay in a 32 MiB L3 between ops. Measured
# on ResNet-18 against 2**16..2**19: larger pieces also mean fewer ops, which matters most when
# the OpenMP threads are descheduled on a busy machine (benchmarks/optim_speed.py).
DEFAULT_CPU_BLOCK = 1 << 20


def check_number(
    name: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = True,
) -> float:
    """Return ``value`` as a float, or raise a ValueError naming the argument, value and range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if math.isnan(value) or too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {left}{low}, {high}{right}, got {value!r}")
    return value


def check_betas(name: str, betas: Any) -> tuple[float, float]:
    """Validate a (beta1, beta2) pair, each in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), each in [0, 1), got {betas!r}")
    b1 = check_number(f"{name}[0]", betas[0], low=0.0, high=1.0)
    b2 = check_number(f"{name}[1]", betas[1], low=0.0, high=1.0)
    return (b1, b2)


def check_interval(name: str, value: Any) -> tuple[float, float] | None:
    """Validate an optional clipping interval (low, high) with 0 <= low <= high."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(
            f"{name} must be None or a pair (low, high) with 0 <= low <= high, got {value!r}"
        )
    low = check_number(f"{name}[0]", value[0], low=0.0)
    high = check_number(f"{name}[1]", value[1], low=0.0)
    if low > high:
        raise ValueError(f"{name} must satisfy low <= high, got {value!r}")
    return (low, high)


def check_foreach(foreach: Any) -> bool | None:
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(f"foreach must be None, True or False, got {foreach!r}")
    return foreach


def check_cpu_block(cpu_block: Any) -> int:
    if isinstance(cpu_block, bool) or not isinstance(cpu_block, int) or cpu_block < 0:
        raise ValueError(
            f"cpu_block must be an int >= 0 (0 disables CPU cache blocking), got {cpu_block!r}"
        )
    return cpu_block


def dense_grad(optimizer: str, p: Tensor, group_index: int, param_index: int) -> Tensor | None:
    """Return ``p.grad`` or None, rejecting sparse gradients with a clear message."""
    g = p.grad
    if g is not None and g.layout != torch.strided:
        raise ValueError(
            f"{optimizer} does not support sparse gradients: parameter {param_index} of group "
            f"{group_index} has a gradient with layout {g.layout}. Use dense gradients "
            "(e.g. nn.Embedding(..., sparse=False)) or torch.optim.SparseAdam."
        )
    return g


def fp32_view(t: Tensor) -> Tensor:
    """The tensor itself if it is fp32 (or fp64), else an fp32 copy (bf16/fp16 params)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def state_dtype(p: Tensor) -> torch.dtype:
    """Moments are kept in fp32 for low-precision params, in the param's dtype otherwise."""
    return p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32


def restore_state_dtypes(
    optimizer: torch.optim.Optimizer, saved: dict[str, Any], keys: Iterable[str]
) -> None:
    """Undo torch's cast of saved state to the param dtype (it rounds fp32 moments of bf16 params).

    ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to the param's dtype
    and leaves ``step`` where it was saved; this puts each key back in the dtype we keep it in, on
    the param's device, from the uncast saved tensors.
    """
    keys = tuple(keys)
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        for p, pid in zip(group["params"], saved_group["params"], strict=True):
            saved_state = saved["state"].get(pid)
            if not saved_state:
                continue
            st = optimizer.state[p]
            for key in keys:
                if key in saved_state and isinstance(saved_state[key], Tensor):
                    dtype = torch.float32 if key == "step" else state_dtype(p)
                    st[key] = saved_state[key].to(device=p.device, dtype=dtype, copy=True)
