"""Per-sample weight-gradient norms of Linear and convolution layers on CUDA, by Triton kernels.

For sample ``i`` with layer input rows ``x_it`` (``N`` values) and output gradients ``δ_it``
(``O`` values) at the ``T`` positions ``t`` that share the weight (sequence positions of a
Linear, output pixels of a convolution after im2col), the per-sample weight gradient is
``G_i = Σ_t δ_it x_itᵀ`` and, without forming it,

- Gram ("ghost") form: ``‖G_i‖² = Σ_{s,t} (x_is·x_it)(δ_is·δ_it)``, ``T²(N + O)`` multiply-adds
  per sample (Li et al. 2022, "Large Language Models Can Be Strong Differentially Private
  Learners", ghost clipping, arXiv 2110.05679);
- materialised form: ``G_i`` built tile by tile in registers and squared there, ``T·N·O``
  multiply-adds per sample, never written to memory;

chosen per layer by the cheaper count, ``T(N + O) < N·O`` for the Gram form, as the hybrid
book-keeping of Bu et al. 2023 ("Differentially Private Optimization on Large Model at Small
Cost", fastDP, arXiv 2210.00038) chooses per layer. A bias is a weight column whose input is 1
at every position: the Gram form adds 1 to every ``x_is·x_it`` and so gives ``‖G_i‖² + ‖b_i‖²``
in the same pass; the materialised form adds ``‖Σ_t δ_it‖²``.

:func:`sums_and_sq_norms` takes the materialised form and also returns the batch gradient
``Σ_i G_i`` (and, if asked, ``Σ_i G_i²``) from the same pass over ``X`` and ``Δ``: a fused layer
then needs no second weight-gradient computation by autograd.

Precision. The operands are read in their own dtype (float32, bfloat16, float16); where the
output gradient is bfloat16/float16 (autocast or a half-precision model) both operands are cast
to it before each matrix product, which is the product autograd takes under autocast; float32
operands use IEEE float32 products (no TF32). Every product and sum accumulates in float32.

No host synchronisation: every size is known from the shapes, results stay on the device. The
kernels run where :func:`applies` says so (a CUDA tensor and triton importable, unless
``ADAPTIVE_TRITON=0``). Under ``TRITON_INTERPRET=1`` they also run on CPU tensors, which is how
the test suite checks their logic without a GPU.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive import _triton_loader

__all__ = [
    "applies",
    "available",
    "conv_operands",
    "gram_pays",
    "layer_sq_norms",
    "layer_sums_and_sq_norms",
    "linear_operands",
    "sq_norms",
    "sums_and_sq_norms",
]

# Set ADAPTIVE_TRITON=0 to keep the torch code paths on CUDA.
_ENV = "ADAPTIVE_TRITON"
_HALF = (torch.bfloat16, torch.float16)
_FLOATS = (torch.float32, *_HALF)


def _interpreting() -> bool:
    return _triton_loader.interpreting()


def _installed() -> bool:
    return _triton_loader.installed()


def _load() -> ModuleType | None:
    """The kernels module (None without triton); an interpreted copy under TRITON_INTERPRET=1."""
    return _triton_loader.load(__package__ or "adaptive.stats", "_triton_kernels")


def available() -> bool:
    """Whether triton is installed (and ``ADAPTIVE_TRITON`` is not ``0``); does not import it."""
    return _triton_loader.available(_ENV)


def applies(t: Tensor) -> bool:
    """Whether the kernels take a layer whose output gradient is ``t``: a CUDA tensor of float32,
    bfloat16 or float16, triton available."""
    return t.device.type == "cuda" and t.dtype in _FLOATS and available()


def gram_pays(t: int, n: int, o: int) -> bool:
    """The Gram form costs ``T²(N+O)`` per sample, the materialised form ``T·N·O``."""
    return t * (n + o) < n * o


def _check(x: Tensor, d: Tensor) -> None:
    if x.dim() != 3 or d.dim() != 3 or x.shape[:2] != d.shape[:2]:
        raise ValueError(
            f"expected x (B, T, N) and d (B, T, O) with the same B and T, got {tuple(x.shape)} "
            f"and {tuple(d.shape)}"
        )
    if x.dtype not in _FLOATS or d.dtype not in _FLOATS:
        raise TypeError(f"float32/bfloat16/float16 operands only, got {x.dtype} and {d.dtype}")
    if x.device != d.device:
        raise ValueError(f"x on {x.device} and d on {d.device}")
    if x.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors (got {x.device}); on CPU they run only "
            "under TRITON_INTERPRET=1 (tests)"
        )
    if _load() is None:
        raise RuntimeError("triton is not installed; the torch code paths of adaptive.stats apply")


def _precision(x: Tensor, d: Tensor) -> dict:
    """The kernels' COMPUTE, DOT and PREC arguments: the operands' precision in the products
    (the output gradient's where it is half precision), the dtype ``tl.dot`` sees (float32 under
    the interpreter, see the kernels module) and ``input_precision`` (IEEE float32, no TF32)."""
    tl = sys.modules["triton.language"]
    compute = tl.float32
    if d.dtype in _HALF:
        compute = tl.bfloat16 if d.dtype == torch.bfloat16 else tl.float16
    return {"COMPUTE": compute, "DOT": tl.float32 if _interpreting() else compute, "PREC": "ieee"}


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def sq_norms(
    x: Tensor,
    d: Tensor,
    *,
    bias: bool = False,
    form: str = "auto",
    block_t: int | None = None,
    block_k: int | None = None,
) -> Tensor:
    """``‖G_i‖²`` (plus ``‖Σ_t δ_it‖²`` with ``bias``), float32 of shape ``(B,)``.

    Args:
        x: layer inputs ``(B, T, N)``; d: output gradients ``(B, T, O)`` (any strides).
        bias: include the bias gradient's squared norm.
        form: ``"auto"`` (:func:`gram_pays`), ``"gram"`` or ``"materialised"``.
        block_t, block_k: tile sizes (powers of two >= 16; tests use 16 to cover several tiles).
    """
    _check(x, d)
    if form not in ("auto", "gram", "materialised"):
        raise ValueError(f"form must be 'auto', 'gram' or 'materialised', got {form!r}")
    b, t, n = x.shape
    o = d.shape[2]
    if form == "auto":
        form = "gram" if gram_pays(t, n, o) else "materialised"
    out = torch.zeros(b, dtype=torch.float32, device=x.device)
    if b == 0 or t == 0:
        return out
    if form == "materialised":
        _, out, _ = _materialised(x, d, sums=False, coordinates=False, block=block_t)
        if bias:
            out = out + d.sum(1, dtype=torch.float32).square().sum(1)
        return out
    k = _load()
    assert k is not None
    bt = block_t or (16 if t <= 16 else 32 if t <= 32 else 64)
    bk = block_k or 32
    nt = triton_cdiv(t, bt)
    k.gram_sq_norms_kernel[(b, nt, nt)](
        x,
        d,
        out,
        t,
        n,
        o,
        *x.stride(),
        *d.stride(),
        BIAS=bias,
        BT=bt,
        BK=bk,
        **_precision(x, d),
    )
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _materialised(
    x: Tensor, d: Tensor, *, sums: bool, coordinates: bool, block: int | None = None
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    k = _load()
    assert k is not None
    b, t, n = x.shape
    o = d.shape[2]
    bo = bn = block or 64
    bt = block or 32
    norms = torch.zeros(b, dtype=torch.float32, device=x.device)
    s = torch.zeros(o, n, dtype=torch.float32, device=x.device) if sums else None
    q = torch.zeros(o, n, dtype=torch.float32, device=x.device) if coordinates else None
    tiles = triton_cdiv(o, bo) * triton_cdiv(n, bn)
    # enough programs for every multiprocessor twice over; each split adds one atomic sum
    splits = max(1, min(b, triton_cdiv(2 * _sm_count(x.device), tiles)))
    per = triton_cdiv(b, splits)
    splits = triton_cdiv(b, per)
    k.materialised_kernel[(triton_cdiv(o, bo), triton_cdiv(n, bn), splits)](
        x,
        d,
        norms,
        norms if s is None else s,
        norms if q is None else q,
        b,
        t,
        n,
        o,
        per,
        *x.stride(),
        *d.stride(),
        SUMS=sums,
        COORD=coordinates,
        BO=bo,
        BN=bn,
        BT=bt,
        **_precision(x, d),
    )
    return s, norms, q


def sums_and_sq_norms(
    x: Tensor, d: Tensor, *, coordinates: bool = False, block: int | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(Σ_i G_i  (O, N), ‖G_i‖²  (B,), Σ_i G_i² (O, N) or None)`` in one pass over ``x`` and
    ``d`` (the materialised form; ``G_i`` never leaves registers). The same contract as the CPU
    kernel's :func:`adaptive.stats.native.linear_sums_and_norms`, float32 results."""
    _check(x, d)
    b, t, n = x.shape
    o = d.shape[2]
    if b == 0 or t == 0:
        z = torch.zeros(o, n, dtype=torch.float32, device=x.device)
        return (
            z,
            torch.zeros(b, dtype=torch.float32, device=x.device),
            (z.clone() if coordinates else None),
        )
    s, norms, q = _materialised(x, d, sums=True, coordinates=coordinates, block=block)
    assert s is not None
    return s, norms, q


# ---------------------------------------------------------------- layer operands


def linear_operands(a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """``nn.Linear``: input ``(b, *seq, N)`` and output gradient ``(b, *seq, O)`` as
    ``(b, T, N)``, ``(b, T, O)`` (views where the layout allows)."""
    if a.dim() < 2:
        raise ValueError(f"Linear input must have a batch axis, got shape {tuple(a.shape)}")
    b = d.shape[0]
    return a.reshape(b, -1, a.shape[-1]), d.reshape(b, -1, d.shape[-1])


def conv_operands(conv: nn.Module, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor, int]:
    """``nn.Conv1d``/``nn.Conv2d``: im2col of the (padded) input in its own dtype, read as
    ``(b·g, L, C_in/g·kh·kw)``, and the output gradient as ``(b·g, L, C_out/g)`` (views of the
    im2col copy and of ``d``); returns ``(x, d, g)``."""
    if not isinstance(conv, nn.Conv1d | nn.Conv2d):
        raise TypeError(f"Conv1d or Conv2d expected, got {type(conv).__name__}")
    pads = conv._reversed_padding_repeated_twice
    if any(p != 0 for p in pads):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        a = F.pad(a, pads, mode=mode)
    kernel, dilation, stride = conv.kernel_size, conv.dilation, conv.stride
    if isinstance(conv, nn.Conv1d):
        a, d = a.unsqueeze(2), d.unsqueeze(2)
        kernel, dilation, stride = (1, *kernel), (1, *dilation), (1, *stride)
    b, g = a.shape[0], conv.groups
    cols = F.unfold(a, kernel, dilation=dilation, stride=stride)  # (b, C·kh·kw, L)
    length = cols.shape[-1]
    x = cols.reshape(b * g, -1, length).transpose(1, 2)
    dd = d.reshape(b * g, -1, length).transpose(1, 2)
    return x, dd, g


def layer_sq_norms(module: nn.Module, a: Tensor, d: Tensor, names: frozenset[str]) -> Tensor:
    """``Σ_p ‖∂ℓ/∂p‖²_i`` over the parameters ``names`` (``weight``, ``bias``) of a Linear or
    Conv layer with input ``a`` and output gradient ``d``, shape ``(b,)`` float32: the CUDA branch
    of :class:`adaptive.stats.rules.LinearRule`/``ConvRule``."""
    b = d.shape[0]
    bias = "bias" in names and getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear):
        x, dd = linear_operands(a, d)
        g = 1
    else:
        x, dd, g = conv_operands(module, a, d)
    if "weight" in names:
        out = sq_norms(x, dd, bias=bias)
    else:
        out = (
            dd.sum(1, dtype=torch.float32).square().sum(1)
            if bias
            else x.new_zeros(x.shape[0], dtype=torch.float32)
        )
    return out.view(b, g).sum(1) if g > 1 else out


def layer_sums_and_sq_norms(
    module: nn.Module,
    a: Tensor,
    d: Tensor,
    names: frozenset[str],
    coordinates: bool = False,
) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor] | None] | None:
    """A Linear or ``groups == 1`` Conv layer's ``(Σ_i g_i per parameter, Σ_p ‖g_i‖² (b,),
    Σ_i g_i² per parameter or None)`` from one pass of :func:`sums_and_sq_norms` (the weight's
    per-sample gradients never leave registers): the contract of
    :meth:`adaptive.stats.rules.LayerRule.native_sums`, for its CUDA branch. None where it does
    not apply (no ``weight`` in ``names``, grouped convolutions)."""
    if "weight" not in names:
        return None
    if isinstance(module, nn.Linear):
        x, dd = linear_operands(a, d)
    elif isinstance(module, nn.Conv1d | nn.Conv2d) and module.groups == 1:
        x, dd, _ = conv_operands(module, a, d)
    else:
        return None
    s, sq, q = sums_and_sq_norms(x, dd, coordinates=coordinates)
    sums = {"weight": s.view(module.weight.shape)}
    coords = None if q is None else {"weight": q.view(module.weight.shape)}
    if "bias" in names and getattr(module, "bias", None) is not None:
        per = dd.sum(1, dtype=torch.float32)  # per-sample bias gradients (b, O)
        sums["bias"] = per.sum(0)
        sq = sq + per.square().sum(1)
        if coords is not None:
            coords["bias"] = per.square().sum(0)
    return sums, sq, coords
