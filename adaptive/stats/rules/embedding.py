"""``nn.Embedding``: the per-sample gradient of row v is ``Σ_{t: id_t = v} δ_t``.

``‖g_i‖² = Σ_{s,t} [id_s = id_t] δ_s·δ_t`` (a masked Gram matrix over the sample's tokens), so
no vocabulary-sized tensor is formed per sample; on CPU the compiled kernel
(:func:`adaptive.stats.native.embedding_sq_norms`) sums each run of equal ids instead, in
``O(T·d)``. Tokens equal to ``padding_idx`` get no gradient. Per coordinate, the row sum
``S_t`` of sample i's gradient at token t's row is shared by the ``count_t`` positions holding
the same id: ``Σ`` over distinct rows of ``S² = Σ_t S_t² / count_t``.
Sparse gradients and ``scale_grad_by_freq`` (which couples the samples) are refused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from adaptive.stats import native
from adaptive.stats.rules.base import LayerRule, UnsupportedModuleError

__all__ = ["EmbeddingRule"]


class EmbeddingRule(LayerRule):
    """``nn.Embedding``: the per-sample gradient of row v is ``Σ_{t: id_t = v} δ_t``.

    ``‖g_i‖² = Σ_{s,t} [id_s = id_t] δ_s·δ_t`` (a masked Gram matrix over the sample's tokens), so
    no vocabulary-sized tensor is formed per sample. Tokens equal to ``padding_idx`` get no gradient.
    """

    def _prepare(self, module: nn.Embedding, ids: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        b = d.shape[0]
        ids = ids.reshape(b, -1)
        dd = d.float().reshape(b, ids.shape[1], -1)
        if module.padding_idx is not None:
            dd = dd * (ids != module.padding_idx).unsqueeze(-1)
        return ids, dd

    def sq_norms(self, module, a, d, names):
        if native.takes_small_layer(d):
            # the compiled kernel: positions sorted by id, each run of equal ids summed, in one
            # pass over δ instead of a T×T Gram matrix
            return native.embedding_sq_norms(a, d, module.padding_idx)
        ids, dd = self._prepare(module, a, d)
        if ids.shape[1] == 1:
            return dd.square().sum((1, 2))
        same = (ids.unsqueeze(2) == ids.unsqueeze(1)).float()
        return ((dd @ dd.transpose(1, 2)) * same).sum((1, 2))

    def coordinate_sq(self, module, a, d, names):
        ids, dd = self._prepare(module, a, d)
        same = (ids.unsqueeze(2) == ids.unsqueeze(1)).float()
        # Row sum S_t of sample i's gradient at token t's row, shared by the `count_t` positions
        # holding the same id: Σ over distinct rows of S² = Σ_t S_t² / count_t.
        rows = same @ dd
        share = rows.square() / same.sum(2, keepdim=True)
        out = torch.zeros_like(module.weight, dtype=torch.float32)
        out.index_add_(0, ids.reshape(-1), share.reshape(-1, share.shape[-1]))
        return {"weight": out}

    def dot(self, module, a, d, directions):
        ids, dd = self._prepare(module, a, d)
        w = directions["weight"].float()
        return (w[ids] * dd).sum((1, 2))

    def check(self, name, module):
        if module.sparse:
            raise UnsupportedModuleError(
                f"module '{name}' (Embedding) uses sparse gradients; use sparse=False or "
                "fallback='groups'"
            )
        if module.scale_grad_by_freq:
            raise UnsupportedModuleError(
                f"module '{name}' (Embedding) has scale_grad_by_freq=True, which scales each "
                "row by its frequency in the whole batch and so couples the samples; set it to "
                "False or pass fallback='groups'"
            )
