"""Triton kernels behind :mod:`adaptive.stats.triton_norms` (imports triton: load it lazily).

Both kernels take a layer's input rows ``X_i`` as ``(B, T, N)`` and its output gradients ``Δ_i``
as ``(B, T, O)``, each with arbitrary strides (a Linear's ``(b, T, N)`` activations, or an
im2col matrix ``(b, N, L)`` read transposed), in float32, bfloat16 or float16. Every product is
accumulated in float32; the operands are cast to ``COMPUTE`` before the matrix products (the
output gradient's precision under autocast, so the products are the ones autograd takes).
``DOT`` is the dtype the products take: ``COMPUTE`` when compiled; float32 under the Triton
interpreter, whose bfloat16 ``tl.dot`` is wrong (triton 3.8), after rounding to ``COMPUTE``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gram_sq_norms_kernel(
    x_ptr,
    d_ptr,
    out_ptr,
    T,
    N,
    O,
    sxb,
    sxt,
    sxn,
    sdb,
    sdt,
    sdo,
    BIAS: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    COMPUTE: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """``out[i] += Σ_{s∈S, t∈T'} w·(x_is·x_it + BIAS)(δ_is·δ_it)`` for the position tiles
    ``S = program 1``, ``T' = program 2`` (``S ≤ T'``; ``w = 2`` off the diagonal, the Gram
    matrices being symmetric)."""
    i = tl.program_id(0).to(tl.int64)
    ts = tl.program_id(1)
    tt = tl.program_id(2)
    if ts <= tt:
        rs = ts * BT + tl.arange(0, BT)
        rt = tt * BT + tl.arange(0, BT)
        rk = tl.arange(0, BK)
        xb = x_ptr + i * sxb
        db = d_ptr + i * sdb
        gx = tl.zeros((BT, BT), dtype=tl.float32)
        for k in range(0, N, BK):
            kk = k + rk
            a = (
                tl.load(
                    xb + rs[:, None] * sxt + kk[None, :] * sxn,
                    mask=(rs[:, None] < T) & (kk[None, :] < N),
                    other=0.0,
                )
                .to(COMPUTE)
                .to(DOT)
            )
            c = (
                tl.load(
                    xb + kk[:, None] * sxn + rt[None, :] * sxt,
                    mask=(kk[:, None] < N) & (rt[None, :] < T),
                    other=0.0,
                )
                .to(COMPUTE)
                .to(DOT)
            )
            gx = tl.dot(a, c, gx, input_precision=PREC)
        gd = tl.zeros((BT, BT), dtype=tl.float32)
        for k in range(0, O, BK):
            kk = k + rk
            a = (
                tl.load(
                    db + rs[:, None] * sdt + kk[None, :] * sdo,
                    mask=(rs[:, None] < T) & (kk[None, :] < O),
                    other=0.0,
                )
                .to(COMPUTE)
                .to(DOT)
            )
            c = (
                tl.load(
                    db + kk[:, None] * sdo + rt[None, :] * sdt,
                    mask=(kk[:, None] < O) & (rt[None, :] < T),
                    other=0.0,
                )
                .to(COMPUTE)
                .to(DOT)
            )
            gd = tl.dot(a, c, gd, input_precision=PREC)
        if BIAS:
            gx = gx + 1.0  # padded positions have gd = 0, so the 1s there add nothing
        val = tl.sum(tl.sum(gx * gd, axis=1), axis=0)
        val = tl.where(ts == tt, val, 2.0 * val)
        tl.atomic_add(out_ptr + i, val)


@triton.jit
def materialised_kernel(
    x_ptr,
    d_ptr,
    norms_ptr,
    sums_ptr,
    coord_ptr,
    B,
    T,
    N,
    O,
    per_split,
    sxb,
    sxt,
    sxn,
    sdb,
    sdt,
    sdo,
    SUMS: tl.constexpr,
    COORD: tl.constexpr,
    BO: tl.constexpr,
    BN: tl.constexpr,
    BT: tl.constexpr,
    COMPUTE: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """For the weight tile ``(program 0, program 1)`` and the samples of split ``program 2``:
    ``G_i = Σ_t δ_it x_itᵀ`` in registers, ``norms[i] += ‖G_i tile‖²``, and (``SUMS``)
    ``sums += Σ_i G_i``, (``COORD``) ``coord += Σ_i G_i²`` over the split's samples."""
    po = tl.program_id(0)
    pn = tl.program_id(1)
    ps = tl.program_id(2)
    ro = po * BO + tl.arange(0, BO)
    rn = pn * BN + tl.arange(0, BN)
    rt = tl.arange(0, BT)
    s_acc = tl.zeros((BO, BN), dtype=tl.float32)
    c_acc = tl.zeros((BO, BN), dtype=tl.float32)
    i0 = ps.to(tl.int64) * per_split  # int64: the sample offsets below can pass 2**31
    i1 = tl.minimum(i0 + per_split, B)
    for i in range(i0, i1):
        xb = x_ptr + i * sxb
        db = d_ptr + i * sdb
        acc = tl.zeros((BO, BN), dtype=tl.float32)
        for t in range(0, T, BT):
            tt = t + rt
            dt = (
                tl.load(
                    db + ro[:, None] * sdo + tt[None, :] * sdt,
                    mask=(ro[:, None] < O) & (tt[None, :] < T),
                    other=0.0,
                )
                .to(COMPUTE)
                .to(DOT)
            )
            xx = (
                tl.load(
                    xb + tt[:, None] * sxt + rn[None, :] * sxn,
                    mask=(tt[:, None] < T) & (rn[None, :] < N),
                    other=0.0,
                )
                .to(COMPUTE)
                .to(DOT)
            )
            acc = tl.dot(dt, xx, acc, input_precision=PREC)
        tl.atomic_add(norms_ptr + i, tl.sum(tl.sum(acc * acc, axis=1), axis=0))
        if SUMS:
            s_acc += acc
        if COORD:
            c_acc += acc * acc
    inside = (ro[:, None] < O) & (rn[None, :] < N)
    offs = ro[:, None] * N + rn[None, :]
    if SUMS:
        tl.atomic_add(sums_ptr + offs, s_acc, mask=inside)
    if COORD:
        tl.atomic_add(coord_ptr + offs, c_acc, mask=inside)
