"""What the sensor's hooks share: the hook on a layer's output gradient, the autograd node that
hands a fused layer's parameter gradients back to autograd, and the float32 arithmetic they do.

A tensor hook on a layer's output sees its gradient ``δ``, except on a view modified in place
afterwards (:func:`_grad_hook` hooks the base or an alias instead). A fused layer runs with its
parameters' ``requires_grad`` off; :class:`_FusedWeightGrads` then supplies ``Σ_i g_i`` from the
per-sample gradients the sensor builds anyway. :func:`_batch_sum` is that sum over the sample axis.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from adaptive.stats.last_resort import Tap


def _float32(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off for the hooks' own matmuls (the statistics are float32); a no-op context when
    autocast is off already, which is cheaper than switching it off again in every hook."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _add(acc: Tensor | None, x: Tensor) -> Tensor:
    return x if acc is None else acc + x


def _batch_sum(g: Tensor) -> Tensor:
    """Σ_i g_i over axis 0; a batch laid out densely with the samples outermost (contiguous, or a
    permuted view of such a tensor) goes through a matrix-vector product, which reads it once in
    order (``sum(0)`` is a strided reduction, about twice as slow on CPU). Small batches (a
    norm's weight, a bias: a few thousand numbers) take ``sum(0)``, which skips the product's
    set-up (2 against 20 µs at (32, 64))."""
    if g.dim() < 2 or g.numel() <= 1 << 14:
        return g.sum(0)
    order = sorted(range(1, g.dim()), key=lambda i: -g.stride(i))
    dense = g.permute(0, *order)
    if not dense.is_contiguous():
        return g.sum(0)
    ones = torch.ones(g.shape[0], dtype=g.dtype, device=g.device)
    total = (ones @ dense.reshape(g.shape[0], -1)).reshape(dense.shape[1:])
    back = [0] * len(order)
    for pos, dim in enumerate(order):
        back[dim - 1] = pos
    return total.permute(*back)


def _grad_hook(output: Tensor, handler: Any) -> Tensor | None:
    """Call ``handler(δ)`` with the gradient of a layer's ``output`` in backward; returns what the
    forward hook should return. A tensor hook does it, except on a view (Linear on a sequence
    returns one): a view modified in place afterwards (``h.mul_(gamma)``) gets a new grad_fn
    and its hooks never fire: a reshaped view is hooked on its base, another view replaced by
    an alias from :class:`Tap`."""
    if not output._is_view():
        output.register_hook(handler)
        return None
    base = output._base
    if base.numel() == output.numel() and base.is_contiguous() and output.is_contiguous():
        # a reshape of its base (F.linear's (b, t, out) view of the (b·t, out) product): the
        # base's hook sees the same gradient, in place or not
        shape = output.shape
        base.register_hook(lambda g: handler(g.reshape(shape)))
        return None

    def on_grads(grads: tuple[Tensor | None, ...]) -> None:
        if grads[0] is not None:
            handler(grads[0])

    return Tap.apply(on_grads, output)[0]


class _FusedWeightGrads(torch.autograd.Function):
    """Identity on a layer's output whose backward hands the output gradient to the sensor, which
    returns the layer's parameter gradients as sums of the per-sample gradients it builds anyway.

    The layer ran with its parameters' ``requires_grad`` off, so autograd computes only the
    input gradient; this node supplies the parameter gradients. The output is a detached alias of
    the layer's output (not a view), so in-place activations after the layer stay legal.
    """

    @staticmethod
    def forward(ctx: Any, out: Tensor, handler: Any, *params: Tensor) -> Tensor:
        ctx.handler = handler
        return out.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return (grad, None, *ctx.handler(grad))
