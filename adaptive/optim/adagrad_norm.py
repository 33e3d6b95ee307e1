"""AdaGrad-Norm: one scalar step size for all parameters (Ward, Wu, Bottou; arXiv 1806.01811)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from ._common import check_foreach, check_number, dense_grad, fp32_view

__all__ = ["AdaGradNorm"]

_GLOBAL = "global"  # key of the optimizer-wide state in ``self.state``


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

    The accumulator :math:`b^2` is a device tensor in ``optimizer.state["global"]["b_squared"]``
    (saved and restored by ``state_dict``); no step reads it back to the host. Under DDP the
    gradients are already averaged, so every rank computes the same :math:`b`. With sharded
    parameters (DTensors: FSDP2's ``fully_shard``, tensor parallelism) each rank's shards give a
    partial :math:`\lVert g_t\rVert^2`, summed over the sharded mesh dimensions with one
    all-reduce per mesh; the update, being elementwise, runs on the local shards.

    Args:
        params: parameters or parameter groups.
        lr: :math:`\eta` (>= 0).
        b0: initial :math:`b_0` (> 0).
        foreach: ``None``/``True`` foreach fast path, ``False`` per-tensor reference.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
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
        group["lr"] = check_number("lr", group["lr"], low=0.0)
        for p in group["params"]:
            if not p.is_floating_point():
                raise ValueError(
                    f"AdaGradNorm needs floating-point parameters, got dtype {p.dtype}"
                )

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(b0=self.b0, foreach=self.foreach)
        return state

    @property
    def b_squared(self) -> Tensor | None:
        """The accumulator :math:`b_t^2` (None before the first step)."""
        st = self.state.get(_GLOBAL)
        return None if st is None else st["b_squared"]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        st = self.state.get(_GLOBAL)
        if st is not None:
            device = next(p.device for g in self.param_groups for p in g["params"])
            st["b_squared"] = st["b_squared"].to(device=device, dtype=torch.float32, copy=True)

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
        device = all_grads[0].device
        if _GLOBAL not in self.state:
            self.state[_GLOBAL] = {
                "b_squared": torch.full((), self.b0**2, dtype=torch.float32, device=device)
            }
        b_sq = self.state[_GLOBAL]["b_squared"]
        add_norm = True
        if any(isinstance(g, DTensor) for g in all_grads):
            b_sq.add_(_sharded_sq_norm(all_grads).to(b_sq.device))
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


def _sharded_sq_norm(grads: list[Tensor]) -> Tensor:
    """``Σ ‖g‖²`` over whole tensors, some of them DTensors, identical on every rank (float32).

    A DTensor's local squared sum is summed over the mesh dimensions it is sharded on (one
    all-reduce per mesh dimension for all such tensors together) and not over replicated ones;
    a tensor with a ``Partial`` placement is materialised with ``full_tensor()`` first.
    """
    total = torch.zeros((), dtype=torch.float32, device=_local(grads[0]).device)
    pending: dict[tuple[Any, tuple[int, ...]], Tensor] = {}
    for g in grads:
        if not isinstance(g, DTensor):
            total = total + g.float().square().sum()
            continue
        if any(p.is_partial() for p in g.placements):
            total = total + g.full_tensor().float().square().sum()
            continue
        dims = tuple(d for d, p in enumerate(g.placements) if p.is_shard())
        key = (g.device_mesh, dims)
        part = g.to_local().float().square().sum()
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
    """Readable reference: sum the squared norms, then x -= lr * g / b tensor by tensor."""
    for _, gs in per_group:
        for g in gs if add_norm else ():
            b_sq.add_(torch.sum(g.float() * g.float()).to(b_sq.device))
    b = b_sq.sqrt()
    for (ps, gs), group in zip(per_group, groups, strict=True):
        for p, g in zip(ps, gs, strict=True):
            x = p.float()
            p.copy_(x - group["lr"] * g.float() / b.to(p.device))


def _adagrad_norm_fast(
    per_group: list[tuple[list[Tensor], list[Tensor]]],
    groups: list[dict[str, Any]],
    b_sq: Tensor,
    add_norm: bool = True,
) -> None:
    """Foreach: one ``_foreach_norm`` over all gradients, one fused update per group."""
    if add_norm:
        all_grads = [g for _, gs in per_group for g in gs]
        norms = torch._foreach_norm(all_grads, 2, dtype=torch.float32)
        b_sq.add_(torch.stack([n.to(b_sq.device) for n in norms]).square().sum())
    inv_b = b_sq.rsqrt()
    for (ps, gs), group in zip(per_group, groups, strict=True):
        if not ps:
            continue
        buckets: dict[tuple[Any, Any], list[int]] = {}
        for i, p in enumerate(ps):
            buckets.setdefault((p.device, p.dtype), []).append(i)
        for (device, dtype), idx in buckets.items():
            coef = inv_b.to(device) * -group["lr"]
            xs = [ps[i] for i in idx]
            x32 = [fp32_view(x) for x in xs]
            g32 = [fp32_view(gs[i]) for i in idx]
            torch._foreach_addcmul_(x32, g32, [coef] * len(idx))
            if dtype not in (torch.float32, torch.float64):
                torch._foreach_copy_(xs, x32)
