"""Binding of the compiled CPU kernel ``_kernels.c``: per-sample weight-gradient norms and their
batch sum in one pass, without storing the per-sample gradients.

The kernel is built when the package is installed (``setup.py``, optional extensions: without a
C compiler the install goes on and the sensor uses its torch code), once per instruction set
(``TARGETS``), each with its own register blocking. At run time the best build this CPU supports
is loaded (``target()``); ``ADAPTIVE_NATIVE=0`` switches the kernel off and
``ADAPTIVE_NATIVE=avx2`` (any name in ``TARGETS``) picks a build. The builds are plain shared
libraries, loaded with ctypes; they run on torch's OpenMP threads (see ``_kernels.c``). Nothing is
compiled at run time. Whether the kernel is used for a given layer is decided per shape by
:mod:`adaptive.stats.planner`, which measures it against the torch paths.

For sample ``i`` with output gradients ``δ_it`` (``O`` values) and input rows ``x_it`` (``N``
values) at positions ``t``, the per-sample weight gradient is ``G_i = Σ_t δ_it x_itᵀ``; the kernel
returns ``Σ_i G_i`` (autograd's batch weight gradient) and ``‖G_i‖²`` for every ``i`` (for a
Linear also the bias gradients ``β_i = Σ_t δ_it``, read in the same pass). Layers with small
parameters get one-pass norms too: LayerNorm and RMSNorm (``rownorm_sq_norms``) and Embedding
(``embedding_sq_norms``, each sample's positions sorted by id).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.machinery
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "TARGETS",
    "available",
    "conv2d_sums_and_norms",
    "cpu_features",
    "embedding_sq_norms",
    "linear_sums_and_norms",
    "machine",
    "rownorm_sq_norms",
    "supported",
    "takes_small_layer",
    "target",
    "targets_built",
    "using",
]

_P = ctypes.c_void_p
_L = ctypes.c_long
_I = ctypes.c_int
# d and its three strides, a, geometry, then the sizes (linear: b, t_len, o_len, n; conv: b,
# o_len, n), then s, q (may be None), the linear kernel's bias sums bs and bq (may be None),
# split, threads, norms, (linear) copies, scratch
_SIGNATURES = {
    "adaptive_psg_linear": [_P, _L, _L, _L, _P, _P, _L, _L, _L, _L, _P, _P, _P, _P, _I, _I, _P]
    + [_P, _P],
    "adaptive_psg_conv": [_P, _L, _L, _L, _P, _P, _L, _L, _L, _P, _P, _I, _I, _P, _P],
    # b, t_len, o_len, n, coordinates, bias, split, threads, sizes (out)
    "adaptive_psg_linear_sizes": [_L, _L, _L, _L, _I, _I, _I, _I, _P],
    # a, d, b, t_len, c, eps, rms, weight, bias, threads, norms, scratch
    "adaptive_psg_rownorm": [_P, _P, _L, _L, _L, ctypes.c_float, _I, _I, _I, _I, _P, _P],
    # ids, d, b, t_len, c, padding, threads, norms, tokens, scratch
    "adaptive_psg_embedding": [_P, _P, _L, _L, _L, _L, _I, _P, _P, _P],
}
# functions that return nothing
_VOID = ("adaptive_psg_linear_sizes", "adaptive_psg_rownorm", "adaptive_psg_embedding")
_lib: ctypes.CDLL | None = None
_lib_target: str | None = None
_tried = False

# ADAPTIVE_NATIVE=0 uses the torch code paths even where the kernel is built; a target name
# (ADAPTIVE_NATIVE=avx2) loads that build instead of the best one the CPU supports.
_ENV = "ADAPTIVE_NATIVE"

# Builds in order of preference, with the CPU flags (as /proc/cpuinfo names them) each needs;
# "generic" is the architecture's baseline (SSE2 on x86-64, NEON on 64-bit Arm).
TARGETS: dict[str, frozenset[str]] = {
    "avx512": frozenset({"avx512f", "avx512vl", "avx512bw", "avx512dq", "avx2", "fma"}),
    "avx2": frozenset({"avx2", "fma"}),
    "generic": frozenset(),
}
# The register blocking each build reports (VW·10⁴ + LIN_ROWS·1000 + LIN_NV·100 + CONV_OV·10 +
# CONV_NR,
# see _kernels.c): a check that a build is what its name says.
_BLOCKING = {"avx512": 166428, "avx2": 86226}

# torch's own capability names, for systems without /proc/cpuinfo
_TORCH_CAPABILITY = {
    "AVX512": TARGETS["avx512"],
    "AVX2": TARGETS["avx2"],
}


def cpu_features() -> frozenset[str]:
    """The CPU's instruction-set flags (``/proc/cpuinfo``; else torch's CPU capability)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return _TORCH_CAPABILITY.get(torch.backends.cpu.get_cpu_capability(), frozenset())


# Instruction sets worth naming in a speed result (x86 and Arm flag names)
_NAMED_SETS = (
    "sse2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_vnni",
    "avx512_bf16",
    "amx_bf16",
    "asimd",
    "sve",
    "sve2",
)
# Variables that make torch's own libraries use fewer instruction sets than the CPU has (a
# benchmark can thereby measure an AVX2 machine on an AVX-512 one); recorded when set.
_ISA_CAPS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", _ENV)


def machine() -> dict[str, object]:
    """What a speed result depends on: the CPU model, its instruction sets, torch's CPU
    capability and threads, the kernel builds installed and the one in use, and any variable
    that caps the instruction sets torch or the kernel use."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "CPU part"):
                    model = value.strip()
                    break
    except OSError:
        pass
    import platform

    flags = cpu_features()
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "arch": platform.machine(),
        "instruction_sets": [f for f in _NAMED_SETS if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "kernel_builds": targets_built(),
        "kernel_build_used": target(),
        "isa_caps": {k: os.environ[k] for k in _ISA_CAPS if k in os.environ},
    }


def supported(name: str) -> bool:
    """Whether this CPU runs the build ``name`` (a key of ``TARGETS``)."""
    if name not in TARGETS:
        raise ValueError(f"unknown kernel target {name!r}; valid: {', '.join(TARGETS)}")
    return TARGETS[name] <= cpu_features()


def _path(name: str) -> Path | None:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_kernels_{name}{suffix}"
        if path.exists():
            return path
    return None


def targets_built() -> list[str]:
    """The builds installed for this architecture, in order of preference."""
    return [name for name in TARGETS if _path(name) is not None]


_opened: dict[str, ctypes.CDLL] = {}  # each build is loaded and checked once per process


def _open(name: str) -> ctypes.CDLL:
    path = _path(name)
    if path is None:
        raise ValueError(
            f"the kernel build {name!r} is not installed (built: {targets_built() or 'none'}); "
            "reinstall with a C compiler that accepts its flags"
        )
    if not supported(name):
        raise ValueError(
            f"this CPU cannot run the kernel build {name!r} (it needs "
            f"{', '.join(sorted(TARGETS[name]))}); valid here: "
            f"{[t for t in targets_built() if supported(t)]}"
        )
    if name in _opened:
        return _opened[name]
    lib = ctypes.CDLL(str(path))
    for fn, argtypes in _SIGNATURES.items():
        getattr(lib, fn).restype = None if fn in _VOID else ctypes.c_int
        getattr(lib, fn).argtypes = argtypes
    lib.adaptive_psg_blocking.restype = ctypes.c_int
    want = _BLOCKING.get(name)
    if want is not None and lib.adaptive_psg_blocking() != want:
        raise RuntimeError(f"kernel build {name!r} has the wrong register blocking: rebuild it")
    _opened[name] = lib
    return lib


def _load() -> ctypes.CDLL | None:
    global _lib, _lib_target, _tried
    if _tried:
        return _lib
    _tried = True
    wanted = os.environ.get(_ENV, "1")
    if wanted not in ("0", "1", "", *TARGETS):
        raise ValueError(
            f"{_ENV}={wanted!r}: valid are 0 (off), 1 (the best build this CPU runs) or a "
            f"build name: {', '.join(TARGETS)}"
        )
    if wanted in TARGETS:
        _lib, _lib_target = _open(wanted), wanted
        return _lib
    for name in targets_built():
        if supported(name):
            _lib, _lib_target = _open(name), name
            break
    return _lib


def available() -> bool:
    """Whether the compiled kernel is installed and not switched off (``ADAPTIVE_NATIVE=0``)."""
    return os.environ.get(_ENV, "1") != "0" and _load() is not None


def target() -> str | None:
    """The build in use (``"avx512"``, ``"avx2"`` or ``"generic"``), None where none is."""
    return _lib_target if available() else None


@contextlib.contextmanager
def using(name: str) -> Iterator[None]:
    """Run the block with the build ``name`` (tests and benchmarks compare the builds)."""
    global _lib, _lib_target, _tried
    saved = (_lib, _lib_target, _tried)
    _lib, _lib_target, _tried = _open(name), name, True
    try:
        yield
    finally:
        _lib, _lib_target, _tried = saved


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


def linear_sums_and_norms(
    a: Tensor, d: Tensor, out: Workspace, coordinates: bool = False, bias: bool = False
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """``(Σ_i G_i, ‖G_i‖² (+ ‖β_i‖²), Σ_i G_i², Σ_i β_i, Σ_i β_i²)`` for a Linear layer: ``a``
    (b, ..., N) input, ``d`` (b, ..., O) output gradient, float32 on CPU; shapes ``(O, N)``,
    ``(b,)``, ``(O, N)``, ``(O,)`` and ``(O,)``. ``β_i = Σ_t δ_it`` is sample i's bias gradient,
    computed only with ``bias`` (else the last two are None); the elementwise squares only with
    ``coordinates``. The kernel writes its sums into new tensors (autograd keeps them as the
    gradients) and adds the threads' parts itself."""
    lib = _load()
    assert lib is not None
    b, n, o = a.shape[0], a.shape[-1], d.shape[-1]
    x = a.reshape(b, -1, n)
    dd = d.reshape(b, -1, o)
    t_len = x.shape[1]
    padded = -(-n // 16) * 16
    threads, split = _plan(b, o * padded, coordinates)
    sizes = (ctypes.c_long * 2)()
    lib.adaptive_psg_linear_sizes(
        b, t_len, o, n, int(coordinates), int(bias), int(split), threads, sizes
    )
    copies = out((max(1, sizes[0]),), slot=0)
    scratch = out((sizes[1],), slot=1)
    total = torch.empty(o, padded, dtype=torch.float32)
    squares = torch.empty(o, padded, dtype=torch.float32) if coordinates else None
    bias_sum = torch.empty(o, dtype=torch.float32) if bias else None
    bias_squares = torch.empty(o, dtype=torch.float32) if bias and coordinates else None
    norms = torch.empty(b, dtype=torch.float32)

    def ptr(t: Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    lib.adaptive_psg_linear(
        dd.data_ptr(),
        *dd.stride(),
        x.data_ptr(),
        _longs(list(x.stride())),
        b,
        t_len,
        o,
        n,
        total.data_ptr(),
        ptr(squares),
        ptr(bias_sum),
        ptr(bias_squares),
        int(split),
        threads,
        norms.data_ptr(),
        copies.data_ptr(),
        scratch.data_ptr(),
    )
    coords = None if squares is None else squares[:, :n]
    return total[:, :n], norms, coords, bias_sum, bias_squares


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


def _sample_threads(b: int) -> int:
    return max(1, min(torch.get_num_threads(), b))


def takes_small_layer(a: Tensor) -> bool:
    """Whether the kernels for normalisation layers and embeddings take a call: the kernel
    installed, a CPU tensor, and at least as many samples as threads (they split the samples, so
    fewer samples would leave threads idle that torch's own operations use)."""
    return a.device.type == "cpu" and a.shape[0] >= torch.get_num_threads() and available()


def rownorm_sq_norms(
    a: Tensor, d: Tensor, c: int, eps: float, rms: bool, weight: bool, bias: bool
) -> Tensor:
    """``‖w_i‖² + ‖β_i‖²`` of a LayerNorm (``rms`` False) or RMSNorm over the last ``c`` values
    of each row: ``w_i = Σ_t δ_it ⊙ x̂_it``, ``β_i = Σ_t δ_it`` (each only where asked for), from
    the layer's input ``a`` and output gradient ``d`` (b, ..., c), on CPU; shape ``(b,)``."""
    lib = _load()
    assert lib is not None
    b = d.shape[0]
    x = a.float().reshape(b, -1, c).contiguous()
    dd = d.float().reshape(b, -1, c).contiguous()
    threads = _sample_threads(b)
    norms = torch.empty(b, dtype=torch.float32)
    scratch = torch.empty(threads, 2, c, dtype=torch.float32)
    lib.adaptive_psg_rownorm(
        x.data_ptr(),
        dd.data_ptr(),
        b,
        x.shape[1],
        c,
        eps,
        int(rms),
        int(weight),
        int(bias),
        threads,
        norms.data_ptr(),
        scratch.data_ptr(),
    )
    return norms


def embedding_sq_norms(ids: Tensor, d: Tensor, padding_idx: int | None) -> Tensor:
    """``‖g_i‖²`` of an Embedding, ``g_i[v] = Σ_{t: id_it = v} δ_it`` (no gradient at
    ``padding_idx``), from the ids (b, ...) and the output gradient (b, ..., c), on CPU: the
    positions sorted by id, each run of equal ids summed; shape ``(b,)``."""
    lib = _load()
    assert lib is not None
    b, c = d.shape[0], d.shape[-1]
    tok = ids.reshape(b, -1).long().contiguous()
    dd = d.float().reshape(b, -1, c).contiguous()
    threads = _sample_threads(b)
    norms = torch.empty(b, dtype=torch.float32)
    tokens = torch.empty(threads, tok.shape[1], 2, dtype=torch.long)
    scratch = torch.empty(threads, c, dtype=torch.float32)
    lib.adaptive_psg_embedding(
        tok.data_ptr(),
        dd.data_ptr(),
        b,
        tok.shape[1],
        c,
        -1 if padding_idx is None else padding_idx,
        threads,
        norms.data_ptr(),
        tokens.data_ptr(),
        scratch.data_ptr(),
    )
    return norms
