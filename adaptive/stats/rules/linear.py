"""``nn.Linear`` on inputs ``(b, in)`` or ``(b, *seq, in)``: the sequence axes share the weight.

In the grouped-matmul form of :mod:`adaptive.stats.rules.grouped` (one group, ``T`` the sequence
positions), the per-sample weight gradient is ``G_i = Δ_i X_iᵀ``, its squared norm
``‖x_i‖²‖δ_i‖²`` for ``T = 1``, else the Gram form ``Σ_{s,t} (x_is·x_it)(δ_is·δ_it)`` or the
materialised ``‖Δ_i X_iᵀ‖²``, whichever is cheaper (Goodfellow 2015, arXiv 1510.01799; the choice
Opacus' ghost clipping and BackPACK make for sequences). The pairing with a direction ``W`` is
``⟨G_i, W⟩ = Σ_t δ_it·(W x_it)``: the layer is linear in its weight, so one matmul over all
samples' positions, then a per-sample sum. The bias gradient is ``Σ_t δ_it``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from adaptive.stats import native, triton_norms
from adaptive.stats.rules.grouped import (
    _GroupedMatmulRule,
    _native_applies,
    _with_kernel,
    materialising_pays,
)

__all__ = ["LinearRule"]


class LinearRule(_GroupedMatmulRule):
    """``nn.Linear`` on inputs ``(b, in)`` or ``(b, *seq, in)``: the sequence axes share the weight."""

    def operands(self, module, a, d):
        b = d.shape[0]
        if a.dim() < 2:
            raise ValueError(
                f"Linear input must have a batch axis, got shape {tuple(a.shape)}; "
                "GradientStatistics reads axis 0 as the sample axis"
            )
        x = a.float().reshape(b, -1, a.shape[-1]).transpose(1, 2).unsqueeze(1)
        dd = d.float().reshape(b, -1, d.shape[-1]).transpose(1, 2).unsqueeze(1)
        return x, dd

    def dot(self, module, a, d, directions):
        """``⟨G_i, W⟩ = Σ_t δ_it·(W x_it)``: one matmul over all samples' positions (the layer is
        linear in its weight), then a per-sample sum."""
        b = d.shape[0]
        if a.dim() < 2:
            self.operands(module, a, d)  # raises with the message about the batch axis
        x = a.float().reshape(b, -1, a.shape[-1])
        dd = d.float().reshape(b, -1, d.shape[-1])
        out = torch.zeros(b, device=d.device, dtype=torch.float32)
        if "weight" in directions:
            y = x @ directions["weight"].float().t()
            out = out + (y * dd).reshape(b, -1).sum(1)
        if "bias" in directions:
            out = out + dd.sum(1) @ directions["bias"].float()
        return out

    def paths(self, module, a, names=frozenset({"weight", "bias"})):
        n_in, n_out = module.in_features, module.out_features
        t = a.numel() // max(1, a.shape[0] * n_in) if a.dim() >= 2 else 1
        if t <= 1 or "weight" not in names:
            return ("torch",)  # one position: ‖a_i‖²‖δ_i‖², nothing to choose
        order = ("materialise", "torch")
        return _with_kernel(a, order if materialising_pays(t, n_in, n_out) else order[::-1], True)

    def batch_grads(self, module, a, d, names):
        dd = d.float().reshape(-1, d.shape[-1])
        out = {}
        if "weight" in names:
            out["weight"] = dd.t() @ a.float().reshape(-1, a.shape[-1])
        if "bias" in names:
            out["bias"] = dd.sum(0)
        return out

    def native_sums(self, module, a, d, names, out, coordinates=False):
        if triton_norms.applies(a):
            return triton_norms.layer_sums_and_sq_norms(module, a, d, names, coordinates)
        if "weight" not in names or a.dim() < 3 or not _native_applies(a):
            return None
        # the kernel computes the bias gradients too (β_i = Σ_t δ_it, while it reads δ)
        bias = "bias" in names
        s, sq, q, bs, bq = native.linear_sums_and_norms(
            a.float(), d.float(), out, coordinates, bias
        )
        sums = {"weight": s}
        coords = None if q is None else {"weight": q}
        if bias:
            sums["bias"] = bs
            if coords is not None:
                coords["bias"] = bq
        return sums, sq, coords

    def per_sample_params(self, module, a, d, names, out=None):
        b = d.shape[0]
        x = a.float().reshape(b, -1, a.shape[-1])
        dd = d.float().reshape(b, -1, d.shape[-1])
        res: dict[str, Tensor] = {}
        if "weight" in names:
            shape = (b, dd.shape[-1], x.shape[-1])
            res["weight"] = torch.bmm(
                dd.transpose(1, 2), x, out=None if out is None else out(shape)
            )
        if "bias" in names:
            res["bias"] = dd.sum(1)
        return res
