"""Binding of the compiled CPU kernel ``_kernels.c``: per-sample weight-gradient norms and their
batch sum in one pass, without storing the per-sample gradients.

The kernel is built when the package is installed (``setup.py``, an optional extension: without a
C compiler the install goes on and the sensor uses its torch code). It is a plain shared library,
loaded with ctypes; it runs on torch's OpenMP threads (see ``_kernels.c``). Nothing is compiled
at run time.

For sample ``i`` with output gradients ``δ_it`` (``O`` values) and input rows ``x_it`` (``N``
values) at positions ``t``, the per-sample weight gradient is ``G_i = Σ_t δ_it x_itᵀ``; the kernel
returns ``Σ_i G_i`` (autograd's batch weight gradient) and ``‖G_i‖²`` for every ``i``.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "conv2d_sums_and_norms", "linear_sums_and_norms"]

_P = ctypes.c_void_p
_L = ctypes.c_long
_I = ctypes.c_int
# d and its three strides, a, geometry, then the sizes (linear: b, t_len, o_len, n; conv: b,
# o_len, n), then s, q (may be None), split, threads, norms, scratch
_SIGNATURES = {
    "adaptive_psg_linear": [_P, _L, _L, _L, _P, _P, _L, _L, _L, _L, _P, _P, _I, _I, _P, _P],
    "adaptive_psg_conv": [_P, _L, _L, _L, _P, _P, _L, _L, _L, _P, _P, _I, _I, _P, _P],
}
_lib: ctypes.CDLL | None = None
_tried = False

# Set ADAPTIVE_NATIVE=0 to use the torch code paths even where the kernel is built.
_ENV = "ADAPTIVE_NATIVE"


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_kernels{suffix}"
        if path.exists():
            lib = ctypes.CDLL(str(path))
            for name, argtypes in _SIGNATURES.items():
                getattr(lib, name).restype = ctypes.c_int
                getattr(lib, name).argtypes = argtypes
            _lib = lib
            break
    return _lib


def available() -> bool:
    """Whether the compiled kernel is installed and not switched off (``ADAPTIVE_NATIVE=0``)."""
    return os.environ.get(_ENV, "1") != "0" and _load() is not None


Workspace = Callable[..., Tensor]


# Above this many bytes of per-thread sums, the threads share one sum (each writes its own
# rows) instead of keeping one each: a large layer (a language-model head) would otherwise
# need a copy of its gradient per thread.
_PER_THREAD_SUMS_BYTES = 16 << 20


def _plan(b: int, sum_elements: int, coordinates: bool) -> tuple[int, bool]:
    """(threads, split): split the sums' rows across threads where per-thread copies are large."""
    threads = max(1, torch.get_num_threads())
    copies = 2 if coordinates else 1
    split = threads > 1 and threads * sum_elements * copies * 4 > _PER_THREAD_SUMS_BYTES
    return (threads if split else max(1, min(threads, b))), split


def _finish(
    s: Tensor, q: Tensor | None, norms: Tensor, used: int, split: bool
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Sum the per-thread parts (new tensors: the workspace is reused by the next layer, and
    autograd keeps the sum as the gradient)."""
    blocks = 1 if split else used
    total = s[:blocks].sum(0)
    coords = None if q is None else q[:blocks].sum(0)
    return total, coords, norms[:used].sum(0) if split else norms[0]


def _longs(values: list[int]) -> ctypes.Array:
    return (ctypes.c_long * len(values))(*values)


Sums = tuple[Tensor, Tensor, Tensor | None]


def _run(
    fn: Callable[..., int],
    d: Tensor,
    d_strides: tuple[int, int, int],
    a: Tensor,
    geom: list[int],
    sizes: list[int],
    sum_shape: tuple[int, int],
    scratch_shape: tuple[int, int],
    out: Workspace,
    coordinates: bool,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Call one kernel with buffers from the workspace; (sum, squares or None, norms)."""
    b = d.shape[0]
    threads, split = _plan(b, sum_shape[0] * sum_shape[1], coordinates)
    blocks = 1 if split else threads
    s = out((blocks, *sum_shape), slot=0)
    scratch = out((threads, *scratch_shape), slot=1)
    q = out((blocks, *sum_shape), slot=2) if coordinates else None
    norms = torch.empty(threads if split else 1, b, dtype=torch.float32)
    used = fn(
        d.data_ptr(),
        *d_strides,
        a.data_ptr(),
        _longs(geom),
        *sizes,
        s.data_ptr(),
        None if q is None else q.data_ptr(),
        int(split),
        threads,
        norms.data_ptr(),
        scratch.data_ptr(),
    )
    if used == 0:
        raise MemoryError("adaptive_psg: out of memory for the column offsets")
    return _finish(s, q, norms, used, split)


def linear_sums_and_norms(a: Tensor, d: Tensor, out: Workspace, coordinates: bool = False) -> Sums:
    """``(Σ_i G_i, ‖G_i‖², Σ_i G_i² or None)`` for a Linear layer: ``a`` (b, ..., N) input, ``d``
    (b, ..., O) output gradient, float32 on CPU; shapes ``(O, N)``, ``(b,)`` and ``(O, N)`` (the
    elementwise squares only with ``coordinates``)."""
    lib = _load()
    assert lib is not None
    b, n, o = a.shape[0], a.shape[-1], d.shape[-1]
    x = a.reshape(b, -1, n)
    dd = d.reshape(b, -1, o)
    t_len = x.shape[1]
    padded = -(-n // 16) * 16
    total, coords, norms = _run(
        lib.adaptive_psg_linear,
        dd,
        (dd.stride(0), dd.stride(1), dd.stride(2)),
        x,
        [x.stride(0), x.stride(1), x.stride(2)],
        [b, t_len, o, n],
        (o, padded),
        (t_len, padded),
        out,
        coordinates,
    )
    return total[:, :n], norms, None if coords is None else coords[:, :n]


def conv2d_sums_and_norms(
    x: Tensor,
    d: Tensor,
    kernel: tuple[int, int],
    dilation: tuple[int, int],
    stride: tuple[int, int],
    out: Workspace,
    coordinates: bool = False,
) -> Sums:
    """``(Σ_i G_i, ‖G_i‖², Σ_i G_i² or None)`` for a convolution with ``groups == 1``: ``x`` the
    padded input (b, C, H, W), ``d`` the output gradient (b, O, Ho, Wo), float32 on CPU; the sums
    have shape ``(O, C·kh·kw)`` in the weight's ``(c, kh, kw)`` order."""
    lib = _load()
    assert lib is not None
    b, c = x.shape[:2]
    o, ho, wo = d.shape[1:]
    d3 = d.reshape(b, o, ho * wo)
    n = c * kernel[0] * kernel[1]
    padded_o, padded_n = -(-o // 16) * 16, -(-n // 16) * 16
    # the kernel keeps the sums transposed, (n, o): its vectors run along the channels
    total, coords, norms = _run(
        lib.adaptive_psg_conv,
        d3,
        (d3.stride(0), d3.stride(1), d3.stride(2)),
        x,
        [*x.stride(), wo, *kernel, *stride, *dilation, ho],
        [b, o, n],
        (padded_n, padded_o),
        (ho * wo, padded_o),
        out,
        coordinates,
    )
    return total[:n, :o].t(), norms, None if coords is None else coords[:n, :o].t()
