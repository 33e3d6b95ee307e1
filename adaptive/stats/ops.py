"""Per-sample gradients of parameters that a module uses through tensor operations, not through a
layer: ``x + pos_embed``, ``x * gamma``, ``cls_token.expand(b, -1, -1)`` then ``torch.cat``,
``F.layer_norm(x, shape, self.weight, self.bias)`` in a norm subclass (timm ``LayerNorm2d``,
``LlamaRMSNorm`` and every model family's own copy). Such a module has no rule; instead of
replaying its whole forward per sample (:mod:`adaptive.stats.last_resort`, about one more forward
and backward of the module: for a ViT, whose ``cls_token`` and ``pos_embed`` belong to the model
itself, that is the whole model), the sensor watches the operations on the module's own
parameters while it runs (a :class:`~torch.overrides.TorchFunctionMode`) and gets each use's
per-sample gradient from autograd.

**Broadcast over the batch.** A pointwise operation ``y = f(x, t)`` whose output has the samples
on axis 0 while the parameter-derived operand ``t`` has none (its axis 0, aligned to the output's
dimensions, is 1 or absent) gives every sample the same ``t``. Running it on ``t̃ =
t.expand(y.shape)`` instead computes the same ``y``, and autograd's gradient at ``t̃`` is then the
per-position gradient ``∂ℓ/∂t̃``; sample ``i``'s gradient of ``t`` is that summed over the axes
``t`` was broadcast along, ``g_i = Σ_{broadcast axes ≠ 0} (∂ℓ/∂t̃)_i``, exactly, for any
pointwise ``f`` (add, mul, div, where, …). ``t.expand(b, …)`` itself is the same case.

**Normalisations.** ``F.layer_norm``/``F.rms_norm``/``F.group_norm`` with parameter weights:
``y = x̂ ⊙ w + β`` per sample, so ``g_w,i = Σ δ_i ⊙ x̂_i`` and ``g_β,i = Σ δ_i`` over the sample's
positions, with ``x̂`` recomputed from the saved input in backward.

**Derived operands.** An operation on parameters alone (``gamma.reshape(1, -1, 1, 1)``,
``pos_embed[:, :n]``, ``1 + weight``, a dtype cast) yields a tensor ``t = h(θ)`` without samples,
which is followed further; its per-sample gradients map back to the parameters through the
vector-Jacobian product of ``h`` for every sample at once (``autograd.grad(..., is_grads_batched=
True)``), exact because ``h`` does not depend on the sample.

Anything else touching the module's parameters (a matmul, a gather, an output that still carries
a parameter-derived tensor, a layer child that did not run) makes that call fall back to the
exact replay, and the sensor skips the watching for that module afterwards.

The axis-0 convention is the one of the rest of the sensor: a tensor whose axis 0 has the
micro-batch's size holds the samples there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from adaptive.stats.last_resort import Tap, _replay

__all__ = ["WATCH", "OpCall", "OpWatch", "op_seconds"]

_SECONDS = [0.0]  # host time in the backward handlers, for the benchmark's share


def op_seconds() -> float:
    """Host seconds spent turning op-level gradients into per-sample gradients so far."""
    return _SECONDS[0]


# pointwise operations with broadcasting: expanding an operand to the output's shape leaves the
# result unchanged (matched by name on torch.* and Tensor methods; the mode sees no others)
_POINTWISE = frozenset(
    {
        "add", "sub", "mul", "div", "true_divide", "multiply", "subtract", "divide", "rsub",
        "add_", "sub_", "mul_", "div_", "true_divide_",
        "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__",
        "__mul__", "__rmul__", "__imul__", "__truediv__", "__rtruediv__", "__itruediv__",
        "where", "maximum", "minimum", "lerp", "addcmul", "addcdiv", "pow", "__pow__", "__rpow__",
    }
)  # fmt: skip
_EXPAND = frozenset({"expand", "expand_as"})
_MATMUL = frozenset({"matmul", "__matmul__"})  # x @ w with a 2-D parameter-derived w
_NORMS = {F.layer_norm: "layer", F.rms_norm: "rms", F.group_norm: "group"}
# calls that read a tensor without using it in the computation (no gradient flows)
_INERT = frozenset({"requires_grad_", "register_hook", "detach", "detach_", "size", "dim"})


class OpCall:
    """One call of a watched module, for one sensor: its parameters, and whether the call must
    fall back to the replay.

    Attributes:
        name: the module's name.
        b: the micro-batch size.
        names: id(parameter) -> the parameter's full name (as the sensor knows it).
        deliver: ``deliver(call, full, g)`` receives one use's per-sample gradient
            ``(b, *param.shape)`` of parameter ``full`` in backward.
        failed: why the op-level path cannot give this call's gradients (None while it can).
        uses: full names, one entry per operation that used them (counted as uses).
        cancelled: set when the call fell back; its backward handlers then do nothing.
    """

    def __init__(
        self,
        name: str,
        b: int,
        params: dict[str, Tensor],
        deliver: Callable[[OpCall, str, Tensor], None],
    ) -> None:
        self.name = name
        self.b = b
        self.params = params
        self.names = {id(p): full for full, p in params.items()}
        self.deliver = deliver
        self.failed: str | None = None
        self.uses: list[str] = []
        self.cancelled = False


class _Entry:
    """A followed tensor: a parameter or a tensor derived from parameters only."""

    __slots__ = ("calls", "roots", "tensor")

    def __init__(self, tensor: Tensor, roots: dict[int, Tensor], calls: tuple[OpCall, ...]):
        self.tensor = tensor
        self.roots = roots  # id -> parameter it depends on
        self.calls = calls  # the module calls (one per sensor) that follow it


class OpWatch(TorchFunctionMode):
    """The mode that watches the operations on the parameters of the modules being called. One
    for the process, shared by every sensor (so that one expansion serves all of them: a second
    mode would see the first one's expanded operand, not the parameter); entered while at least
    one watched call runs."""

    def __init__(self) -> None:
        super().__init__()
        self.tracked: dict[int, _Entry] = {}
        self.calls: list[OpCall] = []

    # ------------------------------------------------------------------ calls
    def push(self, call: OpCall) -> None:
        if not self.calls:
            self.__enter__()
        self.calls.append(call)
        for p in call.params.values():
            e = self.tracked.get(id(p))
            if e is not None and e.tensor is p:
                e.calls = (*e.calls, call)
            else:
                self.tracked[id(p)] = _Entry(p, {id(p): p}, (call,))

    def track(self, tensor: Tensor, call: OpCall) -> None:
        """Follow ``tensor``, a function of ``call``'s parameters and constants alone (a layer's
        output for an input without samples), as a derived tensor."""
        self.tracked[id(tensor)] = _Entry(tensor, {id(p): p for p in call.params.values()}, (call,))

    def pop(self, call: OpCall) -> None:
        """The module returned: stop following its tensors."""
        if call not in self.calls:
            return
        self.calls.remove(call)
        for key in list(self.tracked):
            e = self.tracked[key]
            if call in e.calls:
                e.calls = tuple(c for c in e.calls if c is not call)
                if not e.calls:
                    del self.tracked[key]
        if not self.calls:
            self.tracked.clear()
            self.__exit__(None, None, None)

    def holds(self, x: Any) -> bool:
        """Whether ``x`` (a module output leaf) is a parameter-derived tensor being followed."""
        e = self.tracked.get(id(x)) if isinstance(x, Tensor) else None
        return e is not None and e.tensor is x

    # ------------------------------------------------------------------ the mode
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = kwargs or {}
        if not self.tracked:
            return func(*args, **kwargs)
        hits = self._hits(args, kwargs)
        if not hits:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        calls = {id(c): c for e in hits.values() for c in e.calls}
        if name in _INERT or not torch.is_grad_enabled() or all(c.failed for c in calls.values()):
            return func(*args, **kwargs)
        try:
            if len({c.b for c in calls.values()}) != 1:
                raise _Unsupported("the watching sensors disagree on the batch size")
            b = next(iter(calls.values())).b
            if b < 2:
                raise _Unsupported("a batch of one sample")
            if func is F.scaled_dot_product_attention:
                return self._attention(func, args, kwargs, hits, b)
            if func is F.linear or func is torch.addmm or name in _MATMUL:
                return self._product(func, args, kwargs, hits, b)
            if func is F.embedding:
                return self._lookup(func, args, kwargs, hits, b)
            norm = _NORMS.get(func)
            if norm is not None:
                return self._norm(norm, func, args, kwargs, hits, b)
            if name in _EXPAND:
                return self._expand(func, args, kwargs, hits, b)
            if name in _POINTWISE:
                return self._pointwise(func, args, kwargs, hits, b)
            return self._derive_or_fail(func, args, kwargs, hits, b, name)
        except _Unsupported as why:
            for c in calls.values():
                c.failed = c.failed or str(why)
            return func(*args, **kwargs)

    def _hits(self, args: tuple, kwargs: dict) -> dict[int, _Entry]:
        # on every operation while a call is watched: kept to plain loops and dict lookups
        found: dict[int, _Entry] = {}
        tracked = self.tracked
        for x in (args, kwargs.values()) if kwargs else (args,):
            for y in x:
                if isinstance(y, Tensor):
                    e = tracked.get(id(y))
                    if e is not None and e.tensor is y:
                        found[id(y)] = e
                elif isinstance(y, (list, tuple)):
                    for z in y:
                        e = tracked.get(id(z))
                        if e is not None and e.tensor is z:
                            found[id(z)] = e
        return found

    @staticmethod
    def _others(args: tuple, kwargs: dict, hits: dict) -> list[Tensor]:
        leaves = tree_flatten((args, kwargs))[0]
        return [x for x in leaves if isinstance(x, Tensor) and id(x) not in hits]

    # ------------------------------------------------------------------ derived tensors
    def _derive_or_fail(self, func, args, kwargs, hits, b: int, name: str) -> Any:
        """An operation on parameters and constants alone: its outputs are followed as derived
        tensors. Anything that mixes in samples or other differentiable tensors is refused."""
        for x in self._others(args, kwargs, hits):
            if x.requires_grad or (x.dim() > 0 and x.shape[0] == b):
                raise _Unsupported(
                    f"{name} combines a parameter with a tensor of shape {tuple(x.shape)}"
                )
        sets = {tuple(id(c) for c in e.calls) for e in hits.values()}
        if len(sets) > 1:  # checked before the call: a refusal runs the operation once, after
            raise _Unsupported(f"{name} combines parameters of different modules")
        out = func(*args, **kwargs)
        leaves = tree_flatten(out)[0]
        if not any(isinstance(x, Tensor) and x.requires_grad for x in leaves):
            return out  # not a differentiable use (a shape, a comparison, a detached copy)
        calls = next(iter(hits.values())).calls
        roots: dict[int, Tensor] = {}
        for e in hits.values():
            roots.update(e.roots)
        for x in leaves:
            if isinstance(x, Tensor) and x.requires_grad:
                self.tracked[id(x)] = _Entry(x, roots, calls)
        return out

    # ------------------------------------------------------------------ broadcast uses
    @staticmethod
    def _count(e: _Entry) -> None:
        for c in e.calls:
            for key in e.roots:
                c.uses.append(c.names[key])

    def _watch(self, e: _Entry, tb: Tensor, b: int) -> None:
        """``tb`` is ``e.tensor`` expanded to a shape with the samples on axis 0: its gradient,
        summed over the axes the tensor was broadcast along, is every sample's gradient of it."""
        t = e.tensor
        self._count(e)
        aligned = (1,) * (tb.dim() - t.dim()) + tuple(t.shape)
        axes = [k for k in range(1, tb.dim()) if aligned[k] == 1 and tb.shape[k] != 1]
        shape = (b, *t.shape)
        roots, calls = e.roots, e.calls

        def back(g: Tensor) -> None:
            if all(c.cancelled for c in calls):
                return
            start = time.perf_counter()
            g = g.detach()
            # a copy, never autograd's own gradient (the sensor may read it after backward),
            # summed in float32 whatever autocast ran the operation in
            per = (g.float().sum(axes, keepdim=True) if axes else g.float().clone()).reshape(shape)
            _to_roots(calls, roots, t, per.to(t.dtype))
            _SECONDS[0] += time.perf_counter() - start

        tb.register_hook(back)

    def _expand(self, func, args, kwargs, hits, b: int) -> Tensor:
        t = args[0]
        if id(t) not in hits or len(hits) != 1:
            raise _Unsupported("expand_as with a parameter as its target")
        out = func(*args, **kwargs)
        if out.dim() == 0 or out.shape[0] != b:
            self.tracked[id(out)] = _Entry(out, hits[id(t)].roots, hits[id(t)].calls)
            return out
        aligned = (1,) * (out.dim() - t.dim()) + tuple(t.shape)
        if aligned[0] != 1:  # the expansion ran already: mark the calls, do not run it again
            for c in hits[id(t)].calls:
                c.failed = c.failed or f"expand of a tensor with {aligned[0]} entries on axis 0"
            return out
        self._watch(hits[id(t)], out, b)
        return out

    def _pointwise(self, func, args, kwargs, hits, b: int) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, Tensor)]
        shape = torch.broadcast_shapes(*(x.shape for x in tensors))
        batched = any(
            id(x) not in hits and x.dim() == len(shape) and x.shape[0] == b for x in tensors
        )
        if not batched or len(shape) == 0 or shape[0] != b:
            return self._derive_or_fail(func, args, kwargs, hits, b, getattr(func, "__name__", ""))
        new = []
        for x in leaves:
            if isinstance(x, Tensor) and id(x) in hits:
                aligned = (1,) * (len(shape) - x.dim()) + tuple(x.shape)
                if aligned[0] != 1:
                    raise _Unsupported(
                        f"a parameter-derived operand of shape {tuple(x.shape)} meets {b} samples"
                    )
                xb = x.expand(shape)
                self._watch(hits[id(x)], xb, b)
                new.append(xb)
            else:
                new.append(x)
        a, k = tree_unflatten(new, spec)
        return func(*a, **k)

    def _attention(self, func, args, kwargs, hits, b: int) -> Tensor:
        """``scaled_dot_product_attention`` with a parameter-derived ``attn_mask`` (T5's relative
        position bias): the mask is added to every sample's scores, a broadcast use like a
        pointwise add; its expansion to ``(b, heads, L, S)`` gives the per-sample gradients."""
        names = ("query", "key", "value", "attn_mask")
        bound = dict(zip(names, args, strict=False))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        mask = bound.get("attn_mask")
        if mask is None or id(mask) not in hits or len(hits) != 1:
            raise _Unsupported("scaled_dot_product_attention on a parameter-derived tensor")
        q, k = bound["query"], bound["key"]
        if q.dim() < 3 or q.shape[0] != b:
            raise _Unsupported(f"attention query of shape {tuple(q.shape)} (batch {b})")
        shape = torch.broadcast_shapes(mask.shape, (*q.shape[:-1], k.shape[-2]))
        aligned = (1,) * (len(shape) - mask.dim()) + tuple(mask.shape)
        if aligned[0] != 1 or shape[0] != b:
            raise _Unsupported(f"attention mask of shape {tuple(mask.shape)} meets {b} samples")
        mb = mask.expand(shape)
        self._watch(hits[id(mask)], mb, b)
        if len(args) > 3:
            args = (*args[:3], mb, *args[4:])
        else:
            kwargs = {**kwargs, "attn_mask": mb}
        return func(*args, **kwargs)

    def _product(self, func, args, kwargs, hits, b: int) -> Tensor:
        """``F.linear(x, w, β)`` or ``torch.addmm(β, x, w)`` (transformers ``Conv1D``) with the
        module's own weight: ``g_w,i = Σ_t δ_it x_itᵀ`` over sample ``i``'s rows, materialised.
        The rows of ``x`` are the samples (axis 0 of size ``b``) or provably the samples
        flattened with another axis (flatten.py)."""
        from adaptive.stats.flatten import sample_major

        if getattr(func, "__name__", "") in _MATMUL:  # x @ w: Falcon's Linear (x @ weight.T)
            if len(args) != 2 or kwargs:
                raise _Unsupported("matmul with other arguments")
            x, w, beta, transposed = args[0], args[1], None, False
        elif func is torch.addmm:
            names = ("input", "mat1", "mat2")
            bound = dict(zip(names, args, strict=False))
            bound.update(kwargs)
            if bound.get("beta", 1) != 1 or bound.get("alpha", 1) != 1:
                raise _Unsupported("addmm with beta or alpha")
            x, w, beta, transposed = bound["mat1"], bound["mat2"], bound["input"], False
        else:
            names = ("input", "weight", "bias")
            bound = dict(zip(names, args, strict=False))
            bound.update(kwargs)
            x, w, beta, transposed = bound["input"], bound["weight"], bound.get("bias"), True
        if id(x) in hits:
            raise _Unsupported("a product whose input is a parameter")
        if x.dim() < 2 or w.dim() != 2:
            raise _Unsupported(f"a product of shapes {tuple(x.shape)} and {tuple(w.shape)}")
        k = 1 if x.shape[0] == b and x.dim() == 2 else None
        if x.dim() > 2 and x.shape[0] == b:
            k = math.prod(x.shape[1:-1])
        elif k is None:
            k = sample_major(x, b)
        if k is None:
            raise _Unsupported(f"a product with {x.shape[0]} rows that are not {b} samples")
        given = {"weight": w, "bias": beta}
        if any(v is not None and id(v) not in hits and v.requires_grad for v in given.values()):
            raise _Unsupported("a product with a weight of another module")
        watched = {
            key: (v, hits[id(v)].roots, hits[id(v)].calls)
            for key, v in given.items()
            if v is not None and id(v) in hits
        }
        out = func(*args, **kwargs)
        for v, _, _ in watched.values():
            self._count(hits[id(v)])
        xs = x.detach().reshape(b, k, x.shape[-1]).float()

        def back(d: Tensor) -> None:
            live = {key: wv for key, wv in watched.items() if not all(c.cancelled for c in wv[2])}
            if not live:
                return
            start = time.perf_counter()
            d = d.detach().reshape(b, k, d.shape[-1]).float()
            for key, (v, roots, calls) in live.items():
                if key == "bias":
                    per = d.sum(1).reshape(b, *v.shape)
                elif transposed:  # F.linear: w is (out, in)
                    per = torch.einsum("bko,bki->boi", d, xs)
                else:  # addmm: w is (in, out)
                    per = torch.einsum("bki,bko->bio", xs, d)
                _to_roots(calls, roots, v, per.to(v.dtype))
            _SECONDS[0] += time.perf_counter() - start

        return _on_grad(out, back)

    def _lookup(self, func, args, kwargs, hits, b: int) -> Tensor:
        """``F.embedding(ids, weight)`` with the module's own table and ids with the samples on
        axis 0 (OPT's learned positions, an Embedding subclass that offsets its ids): sample
        ``i``'s gradient scatters its rows' output gradients into the table's rows."""
        names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq")
        bound = dict(zip(names, args, strict=False))
        bound.update(kwargs)
        ids, w = bound["input"], bound["weight"]
        if bound.get("max_norm") is not None or bound.get("scale_grad_by_freq"):
            raise _Unsupported("embedding with max_norm or scale_grad_by_freq")
        if id(ids) in hits or id(w) not in hits or ids.dim() < 1:
            raise _Unsupported(f"embedding with ids of shape {tuple(ids.shape)}")
        if ids.shape[0] != b:  # no samples in the ids (BART's (1, T) positions): a function of
            return self._derive_or_fail(func, args, kwargs, hits, b, "embedding")  # the table
        entry = hits[id(w)]
        watched = (w, entry.roots, entry.calls)
        out = func(*args, **kwargs)
        self._count(entry)
        rows = ids.detach().reshape(b, -1)
        pad = bound.get("padding_idx")

        def back(d: Tensor) -> None:
            v, roots, calls = watched
            if all(c.cancelled for c in calls):
                return
            start = time.perf_counter()
            d = d.detach().reshape(b, rows.shape[1], v.shape[1]).float()
            per = d.new_zeros(b, *v.shape)
            per.scatter_add_(1, rows.unsqueeze(-1).expand(-1, -1, v.shape[1]), d)
            if pad is not None:
                per[:, pad] = 0  # the padding row gets no gradient
            _to_roots(calls, roots, v, per.to(v.dtype))
            _SECONDS[0] += time.perf_counter() - start

        return _on_grad(out, back)

    # ------------------------------------------------------------------ normalisations
    def _norm(self, kind: str, func, args, kwargs, hits, b: int) -> Tensor:
        names = {
            "layer": ("input", "normalized_shape", "weight", "bias", "eps"),
            "rms": ("input", "normalized_shape", "weight", "eps"),
            "group": ("input", "num_groups", "weight", "bias", "eps"),
        }[kind]
        bound = dict(zip(names, args, strict=False))
        bound.update(kwargs)
        x = bound["input"]
        if id(x) in hits:
            raise _Unsupported(f"{kind}_norm of a parameter")
        if x.dim() < 2 or x.shape[0] != b:
            raise _Unsupported(f"{kind}_norm input of shape {tuple(x.shape)} (batch {b})")
        given = {k: bound.get(k) for k in ("weight", "bias") if bound.get(k) is not None}
        if any(id(v) not in hits for v in given.values() if v.requires_grad):
            raise _Unsupported(f"{kind}_norm with a weight of another module")
        # (tensor, roots, calls) as they are now: pop() rebinds an entry's calls later
        watched = {
            k: (v, hits[id(v)].roots, hits[id(v)].calls) for k, v in given.items() if id(v) in hits
        }
        out = func(*args, **kwargs)
        for v, _, _ in watched.values():
            self._count(hits[id(v)])
        xs = x.detach().float()
        version = xs._version
        extra = bound.get("normalized_shape", bound.get("num_groups"))
        eps = bound.get("eps")

        def back(d: Tensor) -> None:
            live = {k: w for k, w in watched.items() if not all(c.cancelled for c in w[2])}
            if not live:
                return
            start = time.perf_counter()
            if xs._version != version:
                raise RuntimeError(
                    f"the input of a {kind}_norm was modified in place after it ran; the "
                    "per-sample gradients of its weight need it as it was"
                )
            with torch.no_grad():
                d = d.detach().float()
                if kind == "layer":
                    xh = F.layer_norm(xs, extra, None, None, 1e-5 if eps is None else eps)
                elif kind == "rms":
                    xh = F.rms_norm(xs, extra, None, eps)
                else:
                    xh = F.group_norm(xs, extra, None, None, 1e-5 if eps is None else eps)
            for key, (v, roots, calls) in live.items():
                prod = d * xh if key == "weight" else d
                if kind == "group":  # per channel (axis 1): summed over the positions
                    per = prod.reshape(b, prod.shape[1], -1).sum(2)
                else:  # the normalised trailing axes are the weight's
                    per = prod.reshape(b, -1, *v.shape).sum(1)
                _to_roots(calls, roots, v, per.to(v.dtype))
            _SECONDS[0] += time.perf_counter() - start

        return _on_grad(out, back)


def _on_grad(out: Tensor, back: Callable[[Tensor], None]) -> Tensor:
    """``out``, whose gradient goes to ``back`` in backward. A view modified in place later
    would lose its hooks (see hooks._grad_hook): a view is handed out as an alias."""
    if not out._is_view():
        out.register_hook(back)
        return out
    return Tap.apply(lambda grads: grads[0] is not None and back(grads[0]), out)[0]


def _to_roots(calls: tuple[OpCall, ...], roots: dict[int, Tensor], t: Tensor, per: Tensor) -> None:
    """Hand the per-sample gradients ``per`` of ``t`` to the calls, as per-sample gradients of
    the parameters ``t`` derives from (``t`` itself when it is one)."""
    if len(roots) == 1 and next(iter(roots.values())) is t:
        grads = {id(t): per}
    else:
        params = list(roots.values())
        with _replay(), torch.enable_grad():
            got = torch.autograd.grad(
                t, params, per, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
        grads = {
            id(p): g if g is not None else per.new_zeros(per.shape[0], *p.shape)
            for p, g in zip(params, got, strict=True)
        }
    for c in calls:
        if not c.cancelled:
            for key, g in grads.items():
                c.deliver(c, c.names[key], g)


WATCH = OpWatch()


class _Unsupported(Exception):
    """An operation the op-level path cannot follow exactly (the call falls back to replay)."""
