"""LAMB (You et al. 2019, arXiv 1904.00962, Algorithm 2) on CUDA as two multi-tensor Triton
kernels, the CUDA branch of :class:`adaptive.optim.Lamb`'s fast path.

For every tensor ``x`` of a group with gradient ``g`` at step ``t`` (the formula of
:class:`~adaptive.optim.Lamb`, every option of it):

- pass 1, one read of ``x, g, m, v`` and one write of ``m, v``:
  ``g ← g/c`` (``c`` the global clipping divisor), ``m ← β₁m + (1−β₁)g``,
  ``v ← β₂v + (1−β₂)g²``, ``u = m̂/(√v̂ + ε) + λ_in·x``, ``x' = s·x``, and ``‖x'‖², ‖u‖²`` summed
  per tensor by atomic adds (``λ_in = λ, s = 1``; decoupled decay ``λ_in = 0, s = 1 − ηλ``);
- pass 2, one read of ``x, m, v`` and one write of ``x``: ``u`` rebuilt from the new moments,
  ``x ← x' − η·r·u`` with the trust ratio ``r = clamp(φ(‖x'‖)/‖u‖)``, 1 where a norm is 0, read
  by each program from the device (no host synchronisation).

Without the trust ratio (``adapt=False``) pass 1 takes the step itself: one pass. The traffic is
``(4 + 2) + (3 + 1)`` tensor reads and writes per element with the ratio (the minimum is 7:
``x, g, m, v`` read, ``x, m, v`` written) and 6 without; every tensor of a group (of one
parameter/gradient dtype) is handled by one launch per pass, through a table of addresses.

Moments are float32 (bf16/fp16 parameters keep float32 moments, as the reference does); the step
is computed in float32 and written back in the parameter's dtype. float64 parameters, non-dense
tensors and gradients laid out unlike their parameter stay on the foreach path
(:func:`applies` says which).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from adaptive import _triton_loader

__all__ = ["applies", "available", "lamb_step", "takes"]

# Set ADAPTIVE_TRITON=0 to keep the foreach path on CUDA.
_ENV = "ADAPTIVE_TRITON"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK = 4096
_TABLES: OrderedDict[tuple, tuple[Tensor, ...]] = OrderedDict()
_MAX_TABLES = 32


def available() -> bool:
    """Whether triton is installed (and ``ADAPTIVE_TRITON`` is not ``0``); does not import it."""
    return _triton_loader.available(_ENV)


def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``numel`` consecutive slots."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda p: p[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def applies(xs: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor]) -> bool:
    """Whether :func:`lamb_step` takes these tensors: CUDA (or the Triton interpreter),
    float32/bfloat16/float16 parameters with float32 moments, one dtype each of parameters and
    gradients, and every parameter's gradient and moments dense with its strides."""
    if not xs or not available():
        return False
    if xs[0].device.type != "cuda" and not _triton_loader.interpreting():
        return False
    xd, gd = xs[0].dtype, gs[0].dtype
    for x, g, m, v in zip(xs, gs, ms, vs, strict=True):
        if x.dtype != xd or g.dtype != gd or xd not in _DTYPES or gd not in _DTYPES:
            return False
        if m.dtype != torch.float32 or v.dtype != torch.float32:
            return False
        if not (x.stride() == g.stride() == m.stride() == v.stride() and _dense(x)):
            return False
    return True


def takes(xs: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor]) -> bool:
    """The dispatch of :class:`~adaptive.optim.Lamb`'s fast path: CUDA tensors that
    :func:`applies` accepts."""
    return bool(xs) and xs[0].device.type == "cuda" and applies(xs, gs, ms, vs)


def _tables(
    xs: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], block: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(addresses (n, 4) int64, owner per program, start per program, numel per tensor) on the
    device, cached by the addresses (a changed gradient buffer builds a new table). The host
    copy is pinned and sent without blocking (no synchronisation); it stays referenced in the
    cache while its copy may be in flight."""
    device = xs[0].device
    key = (
        device,
        block,
        tuple(
            (x.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), x.numel())
            for x, g, m, v in zip(xs, gs, ms, vs, strict=True)
        ),
    )
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit[:4]  # type: ignore[return-value]
    addresses, owner, start, numel = [], [], [], []
    for j, (x, g, m, v) in enumerate(zip(xs, gs, ms, vs, strict=True)):
        addresses.extend((x.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr()))
        n = x.numel()
        numel.append(n)
        for s in range(0, n, block):
            owner.append(j)
            start.append(s)
    host = [
        torch.tensor(addresses, dtype=torch.int64).view(-1, 4),
        torch.tensor(owner, dtype=torch.int32),
        torch.tensor(start, dtype=torch.int64),
        torch.tensor(numel, dtype=torch.int64),
    ]
    if device.type == "cuda":
        host = [h.pin_memory() for h in host]
        dev = [h.to(device, non_blocking=True) for h in host]
    else:
        dev = host
    _TABLES[key] = (*dev, *host)
    while len(_TABLES) > _MAX_TABLES:
        _TABLES.popitem(last=False)
    return dev[0], dev[1], dev[2], dev[3]


_TL_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def lamb_step(
    xs: list[Tensor],
    gs: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor],
    steps: list[Tensor],
    hp: dict[str, Any],
    *,
    block: int | None = None,
) -> None:
    """One LAMB step for the tensors of one group (``hp`` as built by ``adaptive.optim.lamb``:
    lr, beta1, beta2, eps, weight_decay, adapt, bias_correction, decoupled, weight_norm_clip,
    trust_clip, clip). ``steps`` are the tensors' step counts, already incremented; ``ms``,
    ``vs`` and ``xs`` are updated in place. Check :func:`applies` first."""
    if not applies(xs, gs, ms, vs):
        raise ValueError(
            "lamb_step: these tensors are not for the Triton kernels (need CUDA, float32/bf16/"
            "fp16 parameters of one dtype, float32 moments, dense tensors laid out alike)"
        )
    k = _triton_loader.load("adaptive.optim", "_lamb_kernels")
    if k is None:
        raise RuntimeError("triton is not installed")
    import triton.language as tl

    device = xs[0].device
    block = block or _BLOCK
    table, owner, start, numel = _tables(xs, gs, ms, vs, block)
    lr, beta1, beta2, wd = hp["lr"], hp["beta1"], hp["beta2"], hp["weight_decay"]
    if hp["bias_correction"]:
        t = torch.stack(steps).to(device, torch.float32)
        bc1, bc2 = 1 - torch.pow(beta1, t), 1 - torch.pow(beta2, t)
    else:
        bc1 = bc2 = torch.ones(len(xs), dtype=torch.float32, device=device)
    wd_in = 0.0 if hp["decoupled"] else wd
    shrink = 1.0 - lr * wd if hp["decoupled"] else 1.0
    clip = hp["clip"]
    adapt = bool(hp["adapt"])
    norms = torch.zeros(len(xs), 2, dtype=torch.float32, device=device)
    dtypes = {
        "X": getattr(tl, _TL_DTYPES[xs[0].dtype]),
        "G": getattr(tl, _TL_DTYPES[gs[0].dtype]),
    }
    grid = (owner.numel(),)
    k.lamb_pass1_kernel[grid](
        table,
        owner,
        start,
        numel,
        bc1,
        bc2,
        norms if clip is None else clip.to(device, torch.float32),
        norms,
        float(lr),
        float(beta1),
        float(beta2),
        float(hp["eps"]),
        float(wd_in),
        float(shrink),
        HAS_CLIP=clip is not None,
        ADAPT=adapt,
        BLOCK=block,
        **dtypes,
    )
    if not adapt:
        return
    phi = hp["weight_norm_clip"] or (0.0, math.inf)
    ratio = hp["trust_clip"] or (0.0, math.inf)
    k.lamb_pass2_kernel[grid](
        table,
        owner,
        start,
        numel,
        bc1,
        bc2,
        norms,
        float(lr),
        float(hp["eps"]),
        float(wd_in),
        float(shrink),
        float(phi[0]),
        float(phi[1]),
        float(ratio[0]),
        float(ratio[1]),
        BLOCK=block,
        **dtypes,
    )
