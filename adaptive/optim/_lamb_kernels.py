"""Triton kernels behind :mod:`adaptive.optim.lamb_triton` (imports triton: load it lazily).

Multi-tensor layout: program ``p`` handles ``BLOCK`` elements of tensor ``j = owner[p]`` from
element ``start[p]``. ``table[j]`` holds the addresses of tensor j's parameter, gradient, first
and second moment (all four dense with the same strides, so one flat index serves them), and
``numel[j]`` its size. ``bc1[j]``, ``bc2[j]`` are the bias corrections ``1 - β^t`` of its step.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _update(x, g, m, v, clip, bc1, bc2, beta1, beta2, eps, wd_in, shrink):
    """The moments, then ``x' = shrink·x`` and ``u = m̂/(√v̂ + ε) + λ_in·x`` (float32)."""
    g = g / clip
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    r = (m / bc1) / (tl.sqrt(v / bc2) + eps)
    u = r + wd_in * x
    return m, v, shrink * x, u


@triton.jit
def _pointers(table_ptr, j, X: tl.constexpr, G: tl.constexpr):
    row = table_ptr + j * 4
    xp = tl.load(row).to(tl.pointer_type(X))
    gp = tl.load(row + 1).to(tl.pointer_type(G))
    mp = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    vp = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    return xp, gp, mp, vp


@triton.jit
def lamb_pass1_kernel(
    table_ptr,
    owner_ptr,
    start_ptr,
    numel_ptr,
    bc1_ptr,
    bc2_ptr,
    clip_ptr,
    norms_ptr,
    lr,
    beta1,
    beta2,
    eps,
    wd_in,
    shrink,
    X: tl.constexpr,
    G: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    ADAPT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Moments written back; with ``ADAPT`` the squared norms ``‖x'‖², ‖u‖²`` of each tensor
    summed into ``norms[j]``, without it the step ``x ← x' − lr·u`` taken at once (one pass)."""
    p = tl.program_id(0)
    j = tl.load(owner_ptr + p).to(tl.int64)
    offs = tl.load(start_ptr + p).to(tl.int64) + tl.arange(0, BLOCK)
    mask = offs < tl.load(numel_ptr + j)
    xp, gp, mp, vp = _pointers(table_ptr, j, X, G)
    x = tl.load(xp + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gp + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(mp + offs, mask=mask, other=0.0)
    v = tl.load(vp + offs, mask=mask, other=0.0)
    clip = 1.0
    if HAS_CLIP:
        clip = tl.load(clip_ptr)
    bc1 = tl.load(bc1_ptr + j)
    bc2 = tl.load(bc2_ptr + j)
    m, v, x, u = _update(x, g, m, v, clip, bc1, bc2, beta1, beta2, eps, wd_in, shrink)
    tl.store(mp + offs, m, mask=mask)
    tl.store(vp + offs, v, mask=mask)
    if ADAPT:
        u = tl.where(mask, u, 0.0)
        tl.atomic_add(norms_ptr + 2 * j, tl.sum(x * x, axis=0))
        tl.atomic_add(norms_ptr + 2 * j + 1, tl.sum(u * u, axis=0))
    else:
        tl.store(xp + offs, (x - lr * u).to(X), mask=mask)


@triton.jit
def lamb_pass2_kernel(
    table_ptr,
    owner_ptr,
    start_ptr,
    numel_ptr,
    bc1_ptr,
    bc2_ptr,
    norms_ptr,
    lr,
    eps,
    wd_in,
    shrink,
    phi_lo,
    phi_hi,
    ratio_lo,
    ratio_hi,
    X: tl.constexpr,
    G: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``x ← x' − lr·ratio·u`` with ``u`` rebuilt from the new moments and the old ``x`` (no
    buffer for it), ``ratio = clamp(clamp(‖x'‖, φ) / ‖u‖)``, 1 where a norm is 0."""
    p = tl.program_id(0)
    j = tl.load(owner_ptr + p).to(tl.int64)
    offs = tl.load(start_ptr + p).to(tl.int64) + tl.arange(0, BLOCK)
    mask = offs < tl.load(numel_ptr + j)
    xp, _gp, mp, vp = _pointers(table_ptr, j, X, G)
    x = tl.load(xp + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(mp + offs, mask=mask, other=0.0)
    v = tl.load(vp + offs, mask=mask, other=0.0)
    bc1 = tl.load(bc1_ptr + j)
    bc2 = tl.load(bc2_ptr + j)
    u = (m / bc1) / (tl.sqrt(v / bc2) + eps) + wd_in * x
    x = shrink * x
    w_norm = tl.sqrt(tl.load(norms_ptr + 2 * j))
    u_norm = tl.sqrt(tl.load(norms_ptr + 2 * j + 1))
    phi = tl.minimum(tl.maximum(w_norm, phi_lo), phi_hi)
    ratio = tl.minimum(tl.maximum(phi / u_norm, ratio_lo), ratio_hi)
    ratio = tl.where((w_norm > 0) & (u_norm > 0), ratio, 1.0)
    tl.store(xp + offs, (x - lr * ratio * u).to(X), mask=mask)
