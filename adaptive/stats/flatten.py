"""Layers that see the samples flattened with another axis: ``(b·k, d)`` rows, as OPT's decoder
layers do (``hidden.reshape(-1, width)`` before the feed-forward block).

Shape alone cannot tell ``(b, k)`` flattened sample-major from ``(k, b)``; the autograd graph
can. :func:`sample_major` walks back from the layer's input through operations that keep rows
apart (pointwise activations, dropout, casts, LayerNorm, a Linear's product, binary pointwise
operations whose row operands all qualify) to the view or reshape that made the rows, and
accepts it only if that view merged leading axes starting with the ``b`` samples. The layer is
then treated as seeing ``(b, k, d)``: its input and output gradient are reshaped, and its rule
runs on the sequence form, exactly. Anything the walk cannot prove is left to the sensor's
refusal (a layer seeing another number of samples on axis 0).

The sample axis is read by the sensor's convention: an axis 0 of size ``b`` holds the samples.
"""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["sample_major"]

_VIEWS = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})
# one row in, the same row out (first input edge)
_ROWWISE = frozenset(
    {
        "ReluBackward0", "GeluBackward0", "SiluBackward0", "TanhBackward0", "SigmoidBackward0",
        "EluBackward0", "LeakyReluBackward0", "HardtanhBackward0", "NativeDropoutBackward0",
        "CloneBackward0", "ToCopyBackward0", "NegBackward0", "MulBackward1", "DivBackward1",
        "AddBackward1", "SubBackward1", "NativeLayerNormBackward0", "MmBackward0",
    }
)  # fmt: skip
_POINTWISE = frozenset({"AddBackward0", "SubBackward0", "MulBackward0", "DivBackward0"})
_PARAM = "AccumulateGrad"


def sample_major(x: Tensor, b: int, depth: int = 32) -> int | None:
    """``k`` if the rows of ``x`` (``b·k`` of them) are provably ``b`` samples of ``k`` rows each,
    sample-major; else None."""
    rows = x.shape[0] if x.dim() > 0 else 0
    if b < 1 or rows <= b or rows % b:
        return None
    return rows // b if _rows_from(x.grad_fn, b, rows, depth) else None


def _rows_from(node, b: int, rows: int, depth: int) -> bool:
    if node is None or depth <= 0:
        return False
    name = type(node).__name__
    nxt = [f for f, _ in node.next_functions if f is not None]
    if name in _VIEWS:
        sizes = tuple(node._saved_self_sym_sizes)
        if len(sizes) >= 2 and sizes[0] == b:
            for j in range(2, len(sizes) + 1):  # merged leading axes: (b, k, ...) -> (b·k, ...)
                if math.prod(sizes[:j]) == rows:
                    return True
        if sizes and sizes[0] == rows:  # the rows were there before this view
            return bool(nxt) and _rows_from(nxt[0], b, rows, depth - 1)
        return False
    if name == "AddmmBackward0":  # bias + rows @ weight: the rows are the second input
        edges = node.next_functions
        return edges[1][0] is not None and _rows_from(edges[1][0], b, rows, depth - 1)
    if name in _ROWWISE:
        return bool(nxt) and _rows_from(nxt[0], b, rows, depth - 1)
    if name in _POINTWISE:  # every operand that is not a parameter must carry the same rows
        ops = [f for f in nxt if type(f).__name__ != _PARAM]
        return bool(ops) and all(_rows_from(f, b, rows, depth - 1) for f in ops)
    return False
