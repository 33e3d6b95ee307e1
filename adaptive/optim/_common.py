"""Shared checks and small helpers for the optimizers in :mod:`adaptive.optim`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__: list[str] = []

# Elements per piece in the cache-blocked CPU path: 4 MiB per fp32 stream, so the five streams a
# LAMB piece touches (param, grad, both moments, scratch) stay in a 32 MiB L3 between ops. Measured
# on ResNet-18 against 2**16..2**19: larger pieces also mean fewer ops, which matters most when
# the OpenMP threads are descheduled on a busy machine (benchmarks/optim_speed.py).
DEFAULT_CPU_BLOCK = 1 << 20


class StateMismatchError(ValueError, RuntimeError):
    """Optimizer state that does not fit its parameter (shape, dtype or device).

    A ValueError (a bad value was loaded) and a RuntimeError (what torch's own optimizers raise
    when their kernels meet such state), so either ``except`` catches it.
    """


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


def check_lr(value: Any) -> float | Tensor:
    """A learning rate >= 0: a real number (returned as a float) or a one-element real tensor.

    A tensor is returned as it is, the same object, so that an LR scheduler's in-place
    ``fill_`` reaches the optimizer (``torch.compile`` needs a tensor for a changing lr). Its
    value is read once here to check it (as torch's SGD and Adagrad do).
    """
    if not isinstance(value, Tensor):
        return check_number("lr", value, low=0.0)
    if value.numel() != 1:
        raise ValueError(f"a tensor lr must have one element, got shape {tuple(value.shape)}")
    if value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"a tensor lr must be real, got dtype {value.dtype}")
    check_number("lr", float(value.detach().reshape(())), low=0.0)
    return value


def step_lr(lr: float | Tensor) -> float | Tensor:
    """The learning rate for one step: a float whenever reading it costs no device sync.

    A CPU tensor is read on the host, so a tensor lr gives exactly the numbers of the same float
    lr; a device tensor (reading it would wait for the device) and any tensor while
    ``torch.compile`` traces (reading it would break the graph) stay 0-dim tensors.
    """
    if not isinstance(lr, Tensor):
        return lr
    if lr.device.type == "cpu" and not torch.compiler.is_compiling():
        return float(lr)
    return lr.detach().reshape(())


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


def settle_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``__setstate__`` (unpickling, copying, ``load_state_dict``): drop the
    ``differentiable`` key torch adds to ``defaults`` for its own old pickles (ours never had it,
    and a copy's defaults should equal the original's), and give every group the options it lacks
    (a checkpoint saved before an option existed) from ``defaults``."""
    optimizer.defaults.pop("differentiable", None)
    for group in optimizer.param_groups:
        for key, value in optimizer.defaults.items():
            group.setdefault(key, value)


def check_state(
    optimizer: str,
    group_index: int,
    param_index: int,
    p: Tensor,
    state: dict[str, Any],
    keys: Iterable[str],
) -> None:
    """Raise :class:`StateMismatchError` unless each ``state[key]`` has the shape of ``p``, its
    state dtype and its device.

    Only tensor metadata is read (no device sync). Run before any kernel touches the state: the
    fused CPU kernels do not check shapes and write out of bounds on a mismatch (a checkpoint
    saved with the parameters in another order, say).
    """
    want = state_dtype(p)
    for key in keys:
        t = state.get(key)
        if not isinstance(t, Tensor):
            raise StateMismatchError(
                f"{optimizer}: state {key!r} of parameter {param_index} in group {group_index} "
                f"is {type(t).__name__}, expected a tensor"
            )
        if t.shape != p.shape or t.dtype != want or t.device != p.device:
            raise StateMismatchError(
                f"{optimizer}: state {key!r} of parameter {param_index} in group {group_index} "
                f"has shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}, but the "
                f"parameter needs shape {tuple(p.shape)}, dtype {want}, device {p.device}. Was "
                "the state dict saved for other parameters, or for these in another order?"
            )


def check_step(optimizer: str, group_index: int, param_index: int, p: Tensor, step: Any) -> None:
    """The step count must be a 0-dim float32 tensor on the parameter's device."""
    if (
        not isinstance(step, Tensor)
        or step.dim() != 0
        or step.dtype != torch.float32
        or step.device != p.device
    ):
        what = (
            f"shape {tuple(step.shape)}, dtype {step.dtype}, device {step.device}"
            if isinstance(step, Tensor)
            else type(step).__name__
        )
        raise StateMismatchError(
            f"{optimizer}: state 'step' of parameter {param_index} in group {group_index} is "
            f"{what}; expected a 0-dim float32 tensor on {p.device}"
        )


def load_state_dict_restoring(
    optimizer: torch.optim.Optimizer,
    state_dict: dict[str, Any],
    load: Callable[[dict[str, Any]], None],
    restore: Callable[[torch.optim.Optimizer, dict[str, Any]], None],
    convert: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> None:
    """Run torch's ``load_state_dict`` (``load``) with our state handling inside its hook order.

    ``convert`` (old checkpoint formats) and the capture of the dict to restore from run as the
    last pre-hook, after the user's pre-hooks (which may remap the dict); ``restore`` runs as the
    first post-hook, before the user's post-hooks (whose changes it must not overwrite).
    """
    source: dict[str, Any] = state_dict

    def capture(_opt: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any] | None:
        nonlocal source
        if convert is not None:
            sd = convert(sd)
        source = sd
        return sd

    def post(opt: torch.optim.Optimizer) -> None:
        restore(opt, source)

    pre_handle = optimizer.register_load_state_dict_pre_hook(capture)
    post_handle = optimizer.register_load_state_dict_post_hook(post, prepend=True)
    try:
        load(state_dict)
    finally:
        pre_handle.remove()
        post_handle.remove()


def as_step_tensor(value: Any, device: torch.device) -> Tensor:
    """A saved step count (tensor or plain number, as older checkpoints have it) as a float32
    tensor on ``device``."""
    if isinstance(value, Tensor):
        return value.detach().reshape(()).to(device=device, dtype=torch.float32, copy=True)
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def restore_state_dtypes(
    optimizer: torch.optim.Optimizer, saved: dict[str, Any], keys: Iterable[str]
) -> None:
    """Undo torch's cast of saved state to the param dtype (it rounds fp32 moments of bf16 params).

    ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to the param's dtype
    and leaves ``step`` as it was saved; this puts each key back in the dtype we keep it in, on
    the param's device, copied from the uncast saved tensors (``saved``: the dict torch loaded,
    after the pre-hooks). A ``step`` saved as a plain number becomes a float32 tensor.
    """
    keys = tuple(keys)
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        for p, pid in zip(group["params"], saved_group["params"], strict=True):
            saved_state = saved["state"].get(pid)
            if not saved_state:
                continue
            st = optimizer.state[p]
            for key in keys:
                value = saved_state.get(key)
                if key == "step" and isinstance(value, (int, float, Tensor)):
                    st[key] = as_step_tensor(value, p.device)
                elif isinstance(value, Tensor):
                    st[key] = value.to(device=p.device, dtype=state_dtype(p), copy=True)
