"""Exact per-sample gradients of a module's own parameters by ``torch.func``, for modules no rule
knows (the way Opacus handles layers without a grad-sampler: ``functorch`` over the layer).

A module ``R`` computes ``y = f(x; θ_R, θ_c)`` from its inputs ``x`` (positional and keyword), its
own parameters ``θ_R`` and everything else it reads (children's parameters, buffers). With the
inputs saved by a forward hook and the output gradient ``δ = ∂ℓ/∂y`` seen in backward, sample
``i``'s gradient of ``θ_R`` is the vector-Jacobian product

    ``g_i = (∂f(x_i; θ_R, θ_c)/∂θ_R)ᵀ δ_i``,

which :func:`per_sample_grads` evaluates for every sample at once by ``vmap`` over the batch axis
of ``x`` and ``δ`` of ``functional_call`` + ``vjp`` (only ``θ_R`` is differentiated; ``θ_c`` and
the buffers are constants). It is exact for any computation that treats the samples of the
batch independently; it costs about one more forward and backward of the module per step
(batched by ``vmap``, or sample by sample where an operation has no batching rule, such as the
fused kernels of recurrent layers), and ``b × |θ_R|`` memory for the per-sample gradients.

Inputs whose axis 0 is 1 while the batch has more samples are read as broadcast over the batch
(every sample sees the same tensor); any other axis 0 is refused. Random operations inside the
module (dropout in training mode) cannot be replayed and are refused, naming the module.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from adaptive.stats.rules import UnsupportedModuleError

__all__ = [
    "ModuleCall",
    "Tap",
    "per_sample_grads",
    "replay_seconds",
    "replaying",
    "tap_outputs",
]

_DEPTH = [0]  # replays in progress (process-wide: every sensor's hooks stand aside during one)
_SECONDS = [0.0]  # host time spent in per_sample_grads, for the benchmark's share of it


def replay_seconds() -> float:
    """Host seconds spent replaying modules since the process started (the time of the calls
    on CPU; on CUDA only the launch time, the kernels run asynchronously)."""
    return _SECONDS[0]


_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


def replaying() -> bool:
    """True while a module is being re-run for per-sample gradients (hooks must do nothing)."""
    return _DEPTH[0] > 0


@contextlib.contextmanager
def _replay() -> Iterator[None]:
    _DEPTH[0] += 1
    try:
        yield
    finally:
        _DEPTH[0] -= 1


class Tap(torch.autograd.Function):
    """Identity on a module's floating tensor outputs whose backward hands all their gradients
    (None for outputs that got none, such as an LSTM's unused final state) to a handler at once.
    The outputs are detached aliases (not views), so in-place operations after the module stay
    legal."""

    @staticmethod
    def forward(ctx: Any, handler: Callable[[tuple[Tensor, ...]], None], *outs: Tensor) -> Any:
        ctx.handler = handler
        ctx.set_materialize_grads(False)
        return tuple(o.detach() for o in outs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        ctx.handler(grads)
        return (None, *grads)


@dataclass
class ModuleCall:
    """One call of a module, saved for its replay.

    Attributes:
        module: the module that ran.
        params: the parameters to differentiate, by name relative to ``module``, detached.
        args, kwargs: the call's inputs, tensors detached.
        versions: the inputs' version counters at the call (an in-place change after it is refused).
        out_index: positions, among the output's pytree leaves, of the tapped outputs.
        autocast: the autocast dtype the call ran under, or None.
    """

    module: nn.Module
    params: dict[str, Tensor]
    args: tuple
    kwargs: dict
    versions: list[tuple[Tensor, int]]
    out_index: list[int]
    autocast: torch.dtype | None


def _detached(tree: Any) -> Any:
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([x.detach() if isinstance(x, Tensor) else x for x in leaves], spec)


def tap_outputs(
    name: str,
    module: nn.Module,
    params: dict[str, Tensor],
    args: tuple,
    kwargs: dict,
    output: Any,
    handler: Callable[[ModuleCall, tuple[Tensor, ...]], None],
) -> Any:
    """The module's output with its differentiable tensors routed through :class:`Tap`, whose
    backward calls ``handler(call, output_grads)``; the output unchanged when none is
    differentiable. Raises :class:`UnsupportedModuleError` for outputs of types the sensor
    cannot see into."""
    leaves, spec = tree_flatten(output)
    index = [
        j
        for j, x in enumerate(leaves)
        if isinstance(x, Tensor) and x.requires_grad and x.is_floating_point()
    ]
    for x in leaves:
        if not isinstance(x, (Tensor, *_PLAIN)):
            raise UnsupportedModuleError(
                f"module '{name}' ({type(module).__name__}) returns a {type(x).__name__}, which "
                "the sensor cannot look into for the gradients its per-sample replay needs; "
                "return tensors (or tuples, lists, dicts of them), or register_rule() for it"
            )
    if not index:
        return output
    args, kwargs = _detached(args), _detached(kwargs)
    in_leaves = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, Tensor)]
    call = ModuleCall(
        module=module,
        params={k: v.detach() for k, v in params.items()},
        args=args,
        kwargs=kwargs,
        versions=[(x, x._version) for x in in_leaves],
        out_index=index,
        autocast=(
            torch.get_autocast_dtype(leaves[index[0]].device.type)
            if torch.is_autocast_enabled(leaves[index[0]].device.type)
            else None
        ),
    )
    tapped = Tap.apply(lambda grads: handler(call, grads), *[leaves[j] for j in index])
    for j, t in zip(index, tapped, strict=True):
        leaves[j] = t
    return tree_unflatten(leaves, spec)


def _rng_states(device: str) -> list[Tensor]:
    """The random generators' states (host-side bookkeeping, no device synchronisation)."""
    states = [torch.random.get_rng_state()]
    if device == "cuda":
        states.append(torch.cuda.get_rng_state())
    return states


def per_sample_grads(
    name: str, call: ModuleCall, grads: tuple[Tensor | None, ...], b: int
) -> dict[str, Tensor]:
    """``name -> (b, *param.shape)`` per-sample gradients of ``call.params`` (see the module
    docstring), in the parameters' dtype; outputs whose gradient is None carry none."""
    start = time.perf_counter()
    try:
        return _per_sample_grads(name, call, grads, b)
    finally:
        _SECONDS[0] += time.perf_counter() - start


def _per_sample_grads(
    name: str, call: ModuleCall, grads: tuple[Tensor | None, ...], b: int
) -> dict[str, Tensor]:
    used = [j for j, g in enumerate(grads) if g is not None]
    out_index = [call.out_index[j] for j in used]
    grads = tuple(grads[j] for j in used)
    for x, version in call.versions:
        if x._version != version:
            raise RuntimeError(
                f"module '{name}': an input was modified in place after its forward; the "
                "per-sample replay needs the inputs as they were. Avoid the in-place operation"
            )
    leaves, spec = tree_flatten((call.args, call.kwargs))
    batched: list[int] = []
    for pos, x in enumerate(leaves):
        if not isinstance(x, Tensor) or x.dim() == 0:
            continue
        if x.shape[0] == b:
            batched.append(pos)
        elif x.shape[0] != 1:
            raise UnsupportedModuleError(
                f"module '{name}' ({type(call.module).__name__}) has an input of shape "
                f"{tuple(x.shape)} while the batch has {b} samples: the sensor reads axis 0 as "
                "the sample axis (or 1 for a tensor broadcast over the batch)"
            )
    for g in grads:
        if g.dim() == 0 or g.shape[0] != b:
            raise UnsupportedModuleError(
                f"module '{name}' ({type(call.module).__name__}) has an output of shape "
                f"{tuple(g.shape)} while the batch has {b} samples: the sensor reads axis 0 as "
                "the sample axis"
            )
    module = call.module

    def one(xs: list[Tensor], gs: tuple[Tensor, ...]) -> dict[str, Tensor]:
        full = list(leaves)
        for pos, x in zip(batched, xs, strict=True):
            full[pos] = x.unsqueeze(0)
        args, kwargs = tree_unflatten(full, spec)

        def f(params: dict[str, Tensor]) -> tuple[Tensor, ...]:
            out = tree_flatten(functional_call(module, params, tuple(args), kwargs))[0]
            return tuple(out[j] for j in out_index)

        _, pull = vjp(f, call.params)
        return pull(tuple(g.unsqueeze(0) for g in gs))[0]

    device = grads[0].device.type
    cast = (
        torch.autocast(device_type=device, dtype=call.autocast)
        if call.autocast is not None
        else contextlib.nullcontext()
    )
    xs = [leaves[p] for p in batched]
    random = UnsupportedModuleError(
        f"module '{name}' ({type(module).__name__}) draws random numbers in its forward "
        "(dropout in training mode?): its per-sample replay cannot reproduce them. Set the "
        "dropout probability to 0, or register_rule() for the module"
    )
    try:
        with _replay(), cast, torch.enable_grad():
            out = vmap(one, randomness="error")(xs, grads)
    except RuntimeError as err:
        if "random" in str(err):
            raise random from err
        # no batching rule (recurrent layers' fused kernels): one sample at a time, still exact;
        # a random draw would change the generator's state, which is refused
        state = _rng_states(device)
        with _replay(), cast, torch.enable_grad():
            each = [one([x[i] for x in xs], tuple(g[i] for g in grads)) for i in range(b)]
        if not all(torch.equal(u, v) for u, v in zip(state, _rng_states(device), strict=True)):
            raise random from err
        out = {k: torch.stack([e[k] for e in each]) for k in each[0]}
    return {k: (v if v is not None else torch.zeros_like(call.params[k])) for k, v in out.items()}
