"""Reference per-sample gradients by ``torch.func`` (vmap over grad), and statistics computed from
them by the definitions. Slow and memory-hungry (b × |θ|); used by the tests and the benchmark.

The pattern is the one of the PyTorch tutorial "Per-sample gradients" (functional_call + vmap(grad)).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = ["per_sample_gradients", "reference_statistics"]


def per_sample_gradients(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """``g_i = ∇_θ loss_fn(model(x_i), y_i)`` for every sample, as ``name -> (b, *param.shape)``.

    ``loss_fn`` receives a batch of one sample; only parameters with ``requires_grad`` are
    differentiated.
    """
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    buffers = dict(model.named_buffers())

    def one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, ({**p, **frozen}, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    return vmap(grad(one), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, inputs, targets)


def reference_statistics(
    grads: Mapping[str, Tensor],
    *,
    target: Mapping[str, Tensor] | None = None,
    group_ids: Tensor | None = None,
    num_groups: int | None = None,
) -> dict[str, Tensor | dict[str, Tensor]]:
    """Every quantity of :class:`~adaptive.stats.StatisticsResult` from explicit per-sample gradients,
    in float64, straight from the definitions (no shortcut formulas)."""
    names = list(grads)
    flat = torch.cat([grads[n].reshape(grads[n].shape[0], -1).double() for n in names], 1)
    b = flat.shape[0]
    mean = flat.mean(0)
    sq = flat.square().sum(1)
    gsq = mean.square().sum()
    var = flat.var(0, unbiased=True).sum()
    inner = flat @ mean
    ortho = flat - (inner / gsq).unsqueeze(1) * mean.unsqueeze(0)
    out: dict[str, Tensor | dict[str, Tensor]] = {
        "per_sample_sq_norms": sq,
        "sum_sq_norms": sq.sum(),
        "grad_sq_norm": gsq,
        "variance": var,
        "noise_scale": var / gsq,
        "inner_product_variance": inner.var(unbiased=True),
        "orthogonality_variance": ortho.var(0, unbiased=True).sum(),
        "coordinate_sq_sums": {n: grads[n].double().square().sum(0) for n in names},
        "mean_grads": {n: grads[n].double().mean(0) for n in names},
    }
    if num_groups is not None and group_ids is not None:
        ids = group_ids.long()
        counts = torch.zeros(num_groups, dtype=torch.float64).index_add_(
            0, ids.cpu(), torch.ones(b, dtype=torch.float64)
        )
        out["group_counts"] = counts
        out["group_sum_sq_norms"] = torch.zeros(num_groups, dtype=torch.float64).index_add_(
            0, ids.cpu(), sq.cpu()
        )
        if target is not None:
            d = torch.cat(
                [
                    (target[n] if n in target else torch.zeros_like(grads[n][0]))
                    .reshape(-1)
                    .double()
                    for n in names
                ]
            )
            out["group_grad_dots"] = torch.zeros(num_groups, dtype=torch.float64).index_add_(
                0, ids.cpu(), (flat @ d.to(flat.device)).cpu()
            )
    return out
