"""Layers called once for the whole batch on an input broadcast over it (axis 0 of size 1 while
the model's batch has ``b > 1`` samples): BERT's and GPT-2's position embeddings, looked up with
ids of shape ``(1, T)`` and added to the ``(b, T, d)`` token embeddings.

Autograd sums the gradient of such an output over the samples before the layer sees it, which
loses the per-sample gradients. The sensor therefore runs the layer's statistics on the output
expanded to ``(b, …)`` (a view; ``δ_i`` is then sample ``i``'s own output gradient, and the
layer's per-sample gradient is its rule applied to the expanded input and ``δ_i``), and hands the
model a :class:`BatchBroadcast` in place of the output. That tensor lets through, with the
expanded view in its place, exactly the operations where broadcasting would have expanded it
anyway: elementwise arithmetic with an operand whose axis 0 has the ``b`` samples. Metadata reads
and no-op conversions (``.to()`` to the same dtype and device) return what they return on the
plain output; any other use would compute with the unexpanded output and is refused, naming the
layer and the operation, rather than giving per-sample numbers that leave it out.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from adaptive.stats.rules import UnsupportedModuleError

__all__ = ["BatchBroadcast", "broadcast_output"]

_ARITHMETIC = {
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    Tensor.add,
    Tensor.sub,
    Tensor.mul,
    Tensor.div,
    Tensor.add_,
    Tensor.sub_,
    Tensor.mul_,
    Tensor.div_,
    Tensor.__add__,
    Tensor.__radd__,
    Tensor.__iadd__,
    Tensor.__sub__,
    Tensor.__rsub__,
    Tensor.__isub__,
    Tensor.__mul__,
    Tensor.__rmul__,
    Tensor.__imul__,
    Tensor.__truediv__,
    Tensor.__rtruediv__,
    Tensor.__itruediv__,
}


class BatchBroadcast(Tensor):
    """A layer's ``(1, …)`` output that the sensor needs used as its ``(b, …)`` expansion (see
    the module docstring). ``_expanded`` is that expansion; ``_layer`` the layer's name."""

    _expanded: Tensor
    _layer: str

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        mine = [x for x in (*args, *kwargs.values()) if isinstance(x, BatchBroadcast)]
        with torch._C.DisableTorchFunctionSubclass():
            if func in _ARITHMETIC:
                b = mine[0]._expanded.shape[0]
                others = [
                    x
                    for x in (*args, *kwargs.values())
                    if isinstance(x, Tensor) and not isinstance(x, BatchBroadcast)
                ]
                if any(x.dim() >= mine[0].dim() and x.shape[0] == b for x in others):

                    def swap(x: Any) -> Any:
                        return x._expanded if isinstance(x, BatchBroadcast) else x

                    return func(*map(swap, args), **{k: swap(v) for k, v in kwargs.items()})
            out = func(*args, **kwargs)
        if not isinstance(out, Tensor) or any(out is x for x in mine):
            return out
        name = getattr(func, "__name__", repr(func))
        raise UnsupportedModuleError(
            f"module '{mine[0]._layer}' ran once for the whole batch on an input broadcast over "
            f"it (axis 0 of size 1), and its output is used by {name}, which the sensor cannot "
            "split by sample; only elementwise arithmetic with a batch tensor is. Give the "
            "layer an input with the batch axis (e.g. position ids expanded to (b, T))"
        )


def broadcast_output(name: str, output: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """``(what the model gets, the (b, …) expansion the sensor hooks)`` for a layer's ``(1, …)``
    output in a batch of ``b`` samples."""
    expanded = output.expand(b, *output.shape[1:])
    wrapped = output.as_subclass(BatchBroadcast)
    wrapped._expanded = expanded
    wrapped._layer = name
    return wrapped, expanded
