"""Per-layer rules for per-sample gradient quantities from a layer's input and output gradient.

One module per rule family (the layout of Opacus' ``grad_sample/``):

- :mod:`~adaptive.stats.rules.base`: the :class:`LayerRule` interface and what its methods return
  (per-sample ``sq_norms``, ``coordinate_sq``, ``dot`` from ``a_i`` and ``δ_i``; Goodfellow 2015,
  arXiv 1510.01799), :class:`UnsupportedModuleError`;
- :mod:`~adaptive.stats.rules.grouped`: Linear and convolution layers as one grouped matmul
  ``G_i = Δ_i X_iᵀ`` (Gram, materialised and compiled-kernel forms, the cost model);
- :mod:`~adaptive.stats.rules.linear`, :mod:`~adaptive.stats.rules.conv`: ``nn.Linear``,
  ``nn.Conv1d``/``nn.Conv2d`` (im2col);
- :mod:`~adaptive.stats.rules.embedding`: ``nn.Embedding`` (a masked Gram matrix over the
  tokens; on CPU the compiled kernel's runs of equal ids);
- :mod:`~adaptive.stats.rules.norms`: LayerNorm, RMSNorm, GroupNorm, BatchNorm in eval mode.

This module assembles the built-in table; :mod:`adaptive.stats.registry` adds the rules users
register and the subclass checks.
"""

from __future__ import annotations

from torch import nn

from adaptive.stats.rules.base import LayerRule, UnsupportedModuleError, Workspace
from adaptive.stats.rules.conv import ConvRule
from adaptive.stats.rules.embedding import EmbeddingRule
from adaptive.stats.rules.grouped import materialising_pays
from adaptive.stats.rules.linear import LinearRule
from adaptive.stats.rules.norms import (
    BatchNormEvalRule,
    GroupNormRule,
    LayerNormRule,
    RMSNormRule,
)

__all__ = [
    "SUPPORTED_MODULES",
    "BatchNormEvalRule",
    "ConvRule",
    "EmbeddingRule",
    "GroupNormRule",
    "LayerNormRule",
    "LayerRule",
    "LinearRule",
    "RMSNormRule",
    "UnsupportedModuleError",
    "Workspace",
    "find_rule",
    "materialising_pays",
]

_NormBatch = nn.modules.batchnorm._BatchNorm

# Order matters: the first isinstance match wins.
_RULES: tuple[tuple[type[nn.Module], LayerRule], ...] = (
    (nn.Linear, LinearRule()),
    (nn.Conv1d, ConvRule()),
    (nn.Conv2d, ConvRule()),
    (nn.Embedding, EmbeddingRule()),
    (nn.LayerNorm, LayerNormRule()),
    (nn.GroupNorm, GroupNormRule()),
    (nn.RMSNorm, RMSNormRule()),
    (_NormBatch, BatchNormEvalRule()),
)

SUPPORTED_MODULES: tuple[str, ...] = (
    "Linear",
    "Conv1d",
    "Conv2d",
    "Embedding",
    "LayerNorm",
    "GroupNorm",
    "RMSNorm",
    "BatchNorm (eval mode)",
)


def find_rule(module: nn.Module) -> LayerRule | None:
    """The rule for ``module``'s type, or None."""
    for cls, rule in _RULES:
        if isinstance(module, cls):
            return rule
    return None
