"""Normalisation layers ``y = x̂·w + β``: per-sample ``∂w = Σ δ·x̂``, ``∂β = Σ δ``.

The per-sample gradients are materialised (the parameters are small), summed over the positions
that share a parameter: the leading axes for norms over the trailing ``normalized_shape`` dims
(LayerNorm, RMSNorm), the spatial axes for a per-channel affine on axis 1 (GroupNorm, BatchNorm
in eval mode). BatchNorm in eval mode normalises with running statistics, so it acts per sample;
in training (or with ``track_running_stats=False``) it normalises with batch statistics, which
couples the samples of a batch, and is refused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive.stats import native
from adaptive.stats.rules.base import LayerRule, UnsupportedModuleError

__all__ = [
    "BatchNormEvalRule",
    "GroupNormRule",
    "LayerNormRule",
    "RMSNormRule",
]


class _AffineNormRule(LayerRule):
    """Normalisation layers ``y = x̂·w + β``: per-sample ``∂w = Σ δ·x̂``, ``∂β = Σ δ`` (materialised:
    the parameters are small)."""

    def normalized(self, module: nn.Module, a: Tensor) -> Tensor:
        raise NotImplementedError

    def reduce_to_param(self, module: nn.Module, t: Tensor) -> Tensor:
        """Sum a (b, *input) tensor to (b, *param_shape)."""
        raise NotImplementedError

    def per_sample(self, module, a, d, names) -> dict[str, Tensor]:
        dd = d.float()
        res: dict[str, Tensor] = {}
        if "weight" in names:
            res["weight"] = self.reduce_to_param(module, dd * self.normalized(module, a))
        if "bias" in names:
            res["bias"] = self.reduce_to_param(module, dd)
        return res

    def sq_norms(self, module, a, d, names):
        out = torch.zeros(d.shape[0], device=d.device, dtype=torch.float32)
        for g in self.per_sample(module, a, d, names).values():
            out = out + g.reshape(g.shape[0], -1).square().sum(1)
        return out

    def coordinate_sq(self, module, a, d, names):
        return {k: g.square().sum(0) for k, g in self.per_sample(module, a, d, names).items()}

    def dot(self, module, a, d, directions):
        out = torch.zeros(d.shape[0], device=d.device, dtype=torch.float32)
        for k, g in self.per_sample(module, a, d, frozenset(directions)).items():
            out = out + (g * directions[k].float()).reshape(g.shape[0], -1).sum(1)
        return out


class _LastDimsNormRule(_AffineNormRule):
    """Norms over the trailing ``normalized_shape`` dims (LayerNorm, RMSNorm).

    On CPU with the compiled kernel (:func:`adaptive.stats.native.rownorm_sq_norms`) the
    squared norms take one pass over the operands instead of torch's five or six."""

    rms = False

    def eps(self, module: nn.Module, a: Tensor) -> float:
        return module.eps

    def reduce_to_param(self, module, t):
        k = len(module.normalized_shape)
        lead = tuple(range(1, t.dim() - k))
        return t.sum(lead) if lead else t

    def sq_norms(self, module, a, d, names):
        if not native.takes_small_layer(a):
            return super().sq_norms(module, a, d, names)
        c = math.prod(module.normalized_shape)
        weight, bias = "weight" in names, "bias" in names
        return native.rownorm_sq_norms(a, d, c, self.eps(module, a), self.rms, weight, bias)


class LayerNormRule(_LastDimsNormRule):
    def normalized(self, module, a):
        # a unit weight gives the same x̂ bit for bit; torch 2.14's CPU kernel without a weight
        # takes a path about twice as slow
        ones = torch.ones(module.normalized_shape, device=a.device)
        return F.layer_norm(a.float(), module.normalized_shape, ones, eps=module.eps)


class RMSNormRule(_LastDimsNormRule):
    rms = True

    def eps(self, module, a):
        return module.eps if module.eps is not None else torch.finfo(a.dtype).eps

    def normalized(self, module, a):
        return F.rms_norm(a.float(), module.normalized_shape, eps=self.eps(module, a))


class _ChannelNormRule(_AffineNormRule):
    """Per-channel affine on axis 1 (GroupNorm, BatchNorm in eval mode)."""

    def reduce_to_param(self, module, t):
        return t.sum(tuple(range(2, t.dim()))) if t.dim() > 2 else t


class GroupNormRule(_ChannelNormRule):
    def normalized(self, module, a):
        return F.group_norm(a.float(), module.num_groups, eps=module.eps)


class BatchNormEvalRule(_ChannelNormRule):
    """BatchNorm in eval mode normalises with running statistics, so it acts per sample."""

    def normalized(self, module, a):
        x = a.float()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = module.running_mean.float().reshape(shape)
        var = module.running_var.float().reshape(shape)
        return (x - mean) * torch.rsqrt(var + module.eps)

    def check(self, name, module):
        if module.training or module.running_mean is None:
            raise UnsupportedModuleError(
                f"module '{name}' ({type(module).__name__}) normalises with batch statistics "
                "(training mode or track_running_stats=False), which couples the samples of a "
                "batch: per-sample gradients are not defined. Use GroupNorm or LayerNorm, put "
                "the layer in eval mode, or pass fallback='groups'"
            )
