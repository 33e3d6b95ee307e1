"""Shared code for Linear and convolution layers, written as one "grouped matmul".

Input ``X`` of shape ``(b, g, n_in, T)`` and output gradient ``Δ`` of shape ``(b, g, n_out, T)``,
where ``T`` is the number of positions sharing the weight (sequence positions, or output pixels
after im2col) and ``g`` the convolution groups. The per-sample weight gradient is
``G_i = Δ_i X_iᵀ`` (Goodfellow 2015, arXiv 1510.01799) and

- ``T = 1``: ``‖G_i‖² = ‖x_i‖²‖δ_i‖²``;
- Gram form: ``‖G_i‖² = Σ_{s,t} (x_is·x_it)(δ_is·δ_it)``, cost ``T²(n_in + n_out)`` per sample;
- materialised form: ``‖Δ_i X_iᵀ‖²``, cost ``T·n_in·n_out`` per sample;

whichever is cheaper is used (the choice Opacus' ghost clipping and BackPACK make for sequences).

On CPU, where the compiled kernel of :mod:`adaptive.stats.native` is installed, Linear layers on
sequences and ``groups == 1`` convolutions take a fourth form (``native_sums``): the kernel builds
each ``G_i`` block by block in registers and keeps only ``‖G_i‖²`` and ``Σ_i G_i``, which then
serves as the layer's batch gradient in place of autograd's (about the cost of that gradient).
:func:`materialising_pays` is the cost model between the other forms.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from adaptive.stats import native, triton_norms
from adaptive.stats.rules.base import LayerRule

__all__ = ["materialising_pays"]


def _grouped_sq_norms(x: Tensor, d: Tensor, bias: bool = False) -> Tensor:
    """Σ_g ‖Δ_ig X_igᵀ‖² for x (b,g,n_in,T), d (b,g,n_out,T), plus the bias gradients'
    ``Σ_g ‖Δ_ig 1‖²`` where ``bias``; picks the cheaper contraction.

    The bias rides along for free in the Gram and one-position forms: a bias is a weight column
    whose input is 1 at every position, so it adds 1 to every input inner product
    (``‖G_i‖² + ‖b_i‖² = Σ_{s,t} (x_is·x_it + 1)(δ_is·δ_it)``), with no extra pass over Δ.
    """
    b, _, n_in, t = x.shape
    n_out = d.shape[2]
    if t == 1:
        xx = x.square().sum(2)
        if bias:
            xx = xx + 1
        return (xx * d.square().sum(2)).reshape(b, -1).sum(1)
    if t * (n_in + n_out) < n_in * n_out:
        xt = x.transpose(-1, -2)
        dt = d.transpose(-1, -2)
        gram_x = xt @ x  # (b,g,T,T)
        if bias:
            gram_x += 1
        gram_d = dt @ d
        return (gram_x * gram_d).reshape(b, -1).sum(1)
    g = d @ x.transpose(-1, -2)  # (b,g,n_out,n_in)
    out = g.square().reshape(b, -1).sum(1)
    if bias:
        out = out + d.sum(-1).square().reshape(b, -1).sum(1)
    return out


def materialising_pays(t: int, n_in: int, n_out: int) -> bool:
    """Whether to materialise the per-sample weight gradients ``(b, n_out, n_in)`` of a layer with
    ``t`` positions and hand their sum to autograd as the batch gradient ("fusing"), where the
    compiled kernel does not take the call (on CUDA, or without it; with it every ``t > 1``
    call fuses).

    Fused, the per-sample contraction replaces autograd's own weight gradient (same MACs), but on
    CPU it costs about as much again (``t·n_in·n_out``: a batch of small matmuls runs well below
    one large one's speed, and the per-sample result, with a convolution's im2col operand, goes
    through memory rather than cache), plus two passes over the ``n_in·n_out`` result (norm and
    batch sum, about 8 MAC-equivalents per element); the Gram form
    adds ``t²(n_in + n_out)`` MACs per sample on top of autograd. Measured with
    ``benchmarks/stats_overhead.py`` (2 threads): the transformer block's 64-position Linears
    stay on the Gram form (1.25× a plain step; fusing them gave 1.36×), the small CNN's
    convolutions fuse.
    """
    return t > 1 and t * t * (n_in + n_out) >= n_in * n_out * (8 + t)


def _with_bias(
    module: nn.Module, s: Tensor, sq: Tensor, q: Tensor | None, bias: Tensor | None
) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor] | None]:
    """The kernel's weight sums, shaped like the weight, with the per-sample bias gradients
    ``bias`` (b, O) folded in."""
    sums = {"weight": s.reshape(module.weight.shape)}
    coords = None if q is None else {"weight": q.reshape(module.weight.shape)}
    if bias is not None:
        sums["bias"] = bias.sum(0)
        sq = sq + bias.square().sum(1)
        if coords is not None:
            coords["bias"] = bias.square().sum(0)
    return sums, sq, coords


def _native_applies(a: Tensor) -> bool:
    """Whether the compiled kernel takes this call: a CPU tensor, and the kernel installed."""
    return a.device.type == "cpu" and native.available()


def _with_kernel(a: Tensor, order: tuple[str, ...], eligible: bool) -> tuple[str, ...]:
    """The cost model's ``order`` of paths with the one-pass kernel's ``"native"`` path where it
    takes the call (``eligible``): first on CPU (the C kernel; the planner times every candidate
    there anyway); last on CUDA (the Triton kernels of :mod:`adaptive.stats.triton_norms`: not
    timed there, so used only when asked for, ``paths="native"``, until measured on a GPU)."""
    if not eligible:
        return order
    if _native_applies(a):
        return ("native", *order)
    if triton_norms.applies(a):
        return (*order, "native")
    return order


def _grouped_coordinate_sq(x: Tensor, d: Tensor) -> Tensor:
    """Σ_i (Δ_i X_iᵀ)² elementwise, shape (g, n_out, n_in)."""
    if x.shape[-1] == 1:
        # (δ²)ᵀ(x²): one matmul over the batch instead of b outer products.
        return torch.einsum("bgo,bgi->goi", d[..., 0].square(), x[..., 0].square())
    return (d @ x.transpose(-1, -2)).square().sum(0)


class _GroupedMatmulRule(LayerRule):
    """Shared code for Linear and Conv: subclasses build X (b,g,n_in,T) and Δ (b,g,n_out,T)."""

    def operands(self, module: nn.Module, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def sq_norms(self, module, a, d, names):
        if triton_norms.applies(d):  # CUDA: Triton kernels, half-precision operands read as is
            return triton_norms.layer_sq_norms(module, a, d, names)
        x, dd = self.operands(module, a, d)
        if "weight" in names:
            return _grouped_sq_norms(x, dd, bias="bias" in names)
        b = x.shape[0]
        out = torch.zeros(b, device=d.device, dtype=torch.float32)
        if "bias" in names:
            out = out + dd.sum(-1).square().reshape(b, -1).sum(1)
        return out

    def coordinate_sq(self, module, a, d, names):
        x, dd = self.operands(module, a, d)
        res: dict[str, Tensor] = {}
        if "weight" in names:
            res["weight"] = _grouped_coordinate_sq(x, dd).reshape(module.weight.shape)
        if "bias" in names:
            res["bias"] = dd.sum(-1).reshape(dd.shape[0], -1).square().sum(0)
        return res
