"""AdaGrad-Norm: one scalar step size for all parameters (Ward, Wu, Bottou; arXiv 1806.01811)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from ._common import (
    StateMismatchError,
    check_foreach,
    check_lr,
    check_number,
    dense_grad,
    fp32_view,
    load_state_dict_restoring,
    settle_state,
    state_dtype,
    step_lr,
)

__all__ = ["AdaGradNorm"]

_KEY = "b_squared"  # the accumulator: one tensor, referred to by every stepped parameter's state
_LEGACY = "global"  # where checkpoints before that kept it: ``state["global"]["b_squared"]``


class AdaGradNorm(Optimizer):
    r"""AdaGrad-Norm (Ward, Wu, Bottou, "AdaGrad stepsizes: sharp convergence over nonconvex
    landscapes", JMLR 21 (2020), arXiv 1806.01811).

    One scalar accumulator for *all* parameters of the optimizer, whatever their group:

    .. math::
        b_{t}^2 = b_{t-1}^2 + \lVert g_t \rVert^2, \qquad x_{t+1} = x_t - \eta\, g_t / b_{t}

    where :math:`\lVert g_t\rVert` is the norm over every gradient of every group and
    :math:`b_0 > 0` is ``b0``. A group's ``lr`` is its :math:`\eta`. The coordinate-wise variant
    is ``torch.optim.Adagrad``. This is the step that AdAdaGrad-Norm (Lau, Liu, Kolar 2024,
    arXiv 2402.11215) pairs with its adaptive batch size.

    The accumulator :math:`b^2` (:attr:`b_squared`) is one device tensor, and the state of every
    parameter that has been stepped refers to it (``optimizer.state[p]["b_squared"]``, the same
    tensor object for every ``p``): optimizer-wide state kept under the parameters, as
    ``torch.optim.LBFGS`` keeps its own, so ``state_dict``, ``torch.distributed.checkpoint``
    (whose strict load wants state for every parameter) and FSDP2 see only parameter-keyed,
    non-empty state. Loading relinks the entries to one tensor; checkpoints that have it under the
    older ``state["global"]`` key still load. It is float64 when a parameter is float64 and
    float32 otherwise; no step reads it back to the host. Parameters are stepped in
    their own dtype (fp32 for bf16/fp16 parameters, written back). Under DDP the
    gradients are already averaged, so every rank computes the same :math:`b`. With sharded
    parameters (DTensors: FSDP2's ``fully_shard``, tensor parallelism) each rank's shards give a
    partial :math:`\lVert g_t\rVert^2`, summed over the sharded mesh dimensions with one
    all-reduce per mesh; the update, being elementwise, runs on the local shards.

    Args:
        params: parameters or parameter groups.
        lr: :math:`\eta` (>= 0): a float or a one-element tensor (see :class:`Lamb`).
        b0: initial :math:`b_0` (> 0).
        foreach: ``None``/``True`` foreach fast path, ``False`` per-tensor reference.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1.0,
        b0: float = 1e-2,
        *,
        foreach: bool | None = None,
    ) -> None:
        self.b0 = check_number("b0", b0, low=0.0, low_open=True)
        self.foreach = check_foreach(foreach)
        super().__init__(params, dict(lr=lr))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            group["lr"] = check_lr(group["lr"])
            for p in group["params"]:
                if not p.is_floating_point():
                    raise ValueError(
                        f"AdaGradNorm needs floating-point parameters, got dtype {p.dtype}"
                    )
        except BaseException:
            self.param_groups.pop()  # a rejected group must not stay (nor block a corrected retry)
            raise

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(b0=self.b0, foreach=self.foreach)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        settle_state(self)
        legacy = self.state.pop(_LEGACY, None)  # pickled before the accumulator moved
        first = next((p for g in self.param_groups for p in g["params"]), None)
        if legacy is not None and first is not None and _KEY in legacy:
            self.state.setdefault(first, {})[_KEY] = legacy[_KEY]

    @property
    def b_squared(self) -> Tensor | None:
        """The accumulator :math:`b_t^2` (None before the first step)."""
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st and _KEY in st:
                    return st[_KEY]
        return None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, also one with the accumulator under the older ``"global"`` key.

        The accumulator keeps its dtype (torch would cast it to the first parameter's) and moves
        to the first parameter's device, after the user's pre-hooks, before their post-hooks.
        """
        load_state_dict_restoring(
            self, state_dict, super().load_state_dict, _restore_b_squared, _convert_legacy
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Add this step's squared gradient norm to :math:`b^2`, then step every parameter."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        per_group: list[tuple[list[Tensor], list[Tensor]]] = []
        for gi, group in enumerate(self.param_groups):
            ps, gs = [], []
            for pi, p in enumerate(group["params"]):
                g = dense_grad("AdaGradNorm", p, gi, pi)
                if g is not None:
                    ps.append(p)
                    gs.append(g)
            per_group.append((ps, gs))
        all_grads = [g for _, gs in per_group for g in gs]
        if not all_grads:
            return loss
        dtype = (
            torch.float64
            if any(p.dtype == torch.float64 for ps, _ in per_group for p in ps)
            else torch.float32
        )
        b_sq = self.b_squared
        if b_sq is None:
            first = next(p for ps, _ in per_group for p in ps)
            b_sq = torch.full((), self.b0**2, dtype=dtype, device=_local(first).device)
        elif not isinstance(b_sq, Tensor) or b_sq.numel() != 1:
            raise StateMismatchError(
                f"AdaGradNorm: the accumulator {_KEY!r} must be a one-element tensor, got "
                f"{tuple(b_sq.shape) if isinstance(b_sq, Tensor) else type(b_sq).__name__}"
            )
        elif b_sq.dtype != dtype and dtype == torch.float64:  # a float64 group joined later
            b_sq = b_sq.to(dtype)
        # every stepped parameter's state refers to the one accumulator (identity checks only)
        for ps, _ in per_group:
            for p in ps:
                st = self.state[p]
                if st.get(_KEY) is not b_sq:
                    st[_KEY] = b_sq
        _link(self, b_sq)
        add_norm = True
        if any(isinstance(g, DTensor) for g in all_grads):
            b_sq.add_(_sharded_sq_norm(all_grads, b_sq.dtype).to(b_sq.device))
            per_group = [([_local(p) for p in ps], [_local(g) for g in gs]) for ps, gs in per_group]
            add_norm = False
        if self.foreach is False:
            _adagrad_norm_reference(per_group, self.param_groups, b_sq, add_norm)
        else:
            _adagrad_norm_fast(per_group, self.param_groups, b_sq, add_norm)
        return loss


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (shares its storage), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _link(opt: Optimizer, b_sq: Tensor) -> None:
    """Point every parameter state that holds an accumulator at ``b_sq``."""
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st and _KEY in st and st[_KEY] is not b_sq:
                st[_KEY] = b_sq


def _convert_legacy(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Move ``state["global"]["b_squared"]`` (older checkpoints) to the first parameter's id."""
    if _LEGACY not in state_dict["state"]:
        return state_dict
    state = dict(state_dict["state"])
    legacy = state.pop(_LEGACY)
    first = next((pid for g in state_dict["param_groups"] for pid in g["params"]), None)
    if first is not None and _KEY in legacy:
        state[first] = {**state.get(first, {}), _KEY: legacy[_KEY]}
    return {**state_dict, "state": state}


def _restore_b_squared(opt: Optimizer, saved: dict[str, Any]) -> None:
    """Put back the saved accumulator, uncast (float64 stays, else float32), as one tensor that
    every parameter state holding it refers to (torch's loader casts each parameter's copy to that
    parameter's dtype, bf16 say, and makes them separate tensors)."""
    value, device = None, None
    for group, saved_group in zip(opt.param_groups, saved["param_groups"], strict=True):
        for p, pid in zip(group["params"], saved_group["params"], strict=True):
            v = saved["state"].get(pid, {}).get(_KEY)
            if isinstance(v, Tensor):
                value, device = v, _local(p).device
                break
        if value is not None:
            break
    if value is None:
        return
    dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    _link(opt, value.to(device=device, dtype=dtype, copy=True))


def _sharded_sq_norm(grads: list[Tensor], dtype: torch.dtype) -> Tensor:
    """``Σ ‖g‖²`` over whole tensors, some of them DTensors, identical on every rank.

    Each squared norm is taken in the gradient's state dtype (float64 for float64, else
    float32) and summed in ``dtype``.

    A DTensor's local squared sum is summed over the mesh dimensions it is sharded on (one
    all-reduce per mesh dimension for all such tensors together) and not over replicated ones;
    a tensor with a ``Partial`` placement is materialised with ``full_tensor()`` first.
    """
    total = torch.zeros((), dtype=dtype, device=_local(grads[0]).device)
    pending: dict[tuple[Any, tuple[int, ...]], Tensor] = {}
    for g in grads:
        sd = state_dtype(g)
        if not isinstance(g, DTensor):
            total = total + g.to(sd).square().sum().to(dtype)
            continue
        if any(p.is_partial() for p in g.placements):
            total = total + g.full_tensor().to(sd).square().sum().to(dtype)
            continue
        dims = tuple(d for d, p in enumerate(g.placements) if p.is_shard())
        key = (g.device_mesh, dims)
        part = g.to_local().to(sd).square().sum().to(dtype)
        pending[key] = part if key not in pending else pending[key] + part
    for (mesh, dims), part in pending.items():
        for d in dims:
            dist.all_reduce(part, group=mesh.get_group(d))
        total = total + part
    return total


def _adagrad_norm_reference(
    per_group: list[tuple[list[Tensor], list[Tensor]]],
    groups: list[dict[str, Any]],
    b_sq: Tensor,
    add_norm: bool = True,
) -> None:
    """Readable reference: sum the squared norms, then x -= lr * g / b tensor by tensor, in the
    parameter's state dtype (float64 for float64, else float32)."""
    for _, gs in per_group:
        for g in gs if add_norm else ():
            g = g.to(state_dtype(g))
            b_sq.add_(torch.sum(g * g).to(b_sq.device, b_sq.dtype))
    b = b_sq.sqrt()
    for (ps, gs), group in zip(per_group, groups, strict=True):
        lr = step_lr(group["lr"])
        for p, g in zip(ps, gs, strict=True):
            x = p.to(state_dtype(p))
            p.copy_(x - lr * g.to(x.dtype) / b.to(p.device, x.dtype))


def _adagrad_norm_fast(
    per_group: list[tuple[list[Tensor], list[Tensor]]],
    groups: list[dict[str, Any]],
    b_sq: Tensor,
    add_norm: bool = True,
) -> None:
    """Foreach: one ``_foreach_norm`` over all gradients, one fused update per group."""
    if add_norm:
        all_grads = [g for _, gs in per_group for g in gs]
        wide = [g for g in all_grads if g.dtype == torch.float64]  # not narrowed by the norm
        rest = [g for g in all_grads if g.dtype != torch.float64]
        norms = list(torch._foreach_norm(wide, 2)) if wide else []
        norms += list(torch._foreach_norm(rest, 2, dtype=torch.float32)) if rest else []
        sq = torch.stack([n.to(b_sq.device, b_sq.dtype) for n in norms]).square().sum()
        b_sq.add_(sq)
    inv_b = b_sq.rsqrt()
    for (ps, gs), group in zip(per_group, groups, strict=True):
        if not ps:
            continue
        lr = step_lr(group["lr"])
        buckets: dict[tuple[Any, Any], list[int]] = {}
        for i, p in enumerate(ps):
            buckets.setdefault((p.device, p.dtype), []).append(i)
        for (device, dtype), idx in buckets.items():
            coef = (inv_b.to(device) * -lr).to(state_dtype(ps[idx[0]]))
            xs = [ps[i] for i in idx]
            x32 = [fp32_view(x) for x in xs]
            g32 = [fp32_view(gs[i]) for i in idx]
            torch._foreach_addcmul_(x32, g32, [coef] * len(idx))
            if dtype not in (torch.float32, torch.float64):
                torch._foreach_copy_(xs, x32)
