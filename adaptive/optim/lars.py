"""LARS: layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017, arXiv 1708.03888)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._common import (
    check_foreach,
    check_lr,
    check_number,
    check_state,
    dense_grad,
    fp32_view,
    load_state_dict_restoring,
    restore_state_dtypes,
    settle_state,
    state_dtype,
    step_lr,
)

__all__ = ["Lars"]

_TRUST_NORMS = ("paper", "combined")


class Lars(Optimizer):
    r"""LARS (You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks",
    arXiv 1708.03888, Algorithm 1) with heavy-ball momentum.

    For every parameter tensor :math:`x` with gradient :math:`g`:

    .. math::
        d = g + \lambda x, \qquad
        \rho = \frac{\eta_{\text{trust}} \lVert x \rVert}
                    {\lVert g \rVert + \lambda \lVert x \rVert + \epsilon}

        b \leftarrow \mu b + \rho\, d, \qquad x \leftarrow x - \gamma\, b
        \quad(\text{Nesterov: } x \leftarrow x - \gamma (\rho d + \mu b))

    with :math:`\rho = 1` where :math:`\lVert x\rVert = 0` or the gradient norm is 0.
    ``trust_norm="paper"`` is the denominator of the paper's Algorithm 1 shown above (also
    pytorch-optimizer's ``LARS``, which has :math:`\epsilon = 0`); ``trust_norm="combined"``
    uses the norm of the direction that is scaled, :math:`\lVert g + \lambda x\rVert +
    \epsilon`, instead. Tensors with ``ndim <= 1`` (biases, normalisation weights) get
    neither the ratio nor weight decay while ``exclude_1d`` is True (the usual SimCLR/BYOL
    setting); a group with ``adapt=False`` gets no ratio either.

    Departure from the paper, on purpose: the global learning rate :math:`\gamma` multiplies the
    momentum buffer when the step is applied, as in ``torch.optim.SGD``, instead of entering the
    buffer (the paper's :math:`b \leftarrow \mu b + \gamma\rho d`). The two agree for a constant
    learning rate.

    ``foreach=False`` runs a readable per-tensor reference; the default runs
    ``torch._foreach_*`` over the group with the ratios taken by ``torch.where`` on the device.

    Args:
        params: parameters or parameter groups.
        lr: global learning rate :math:`\gamma` (>= 0), a float or a one-element tensor.
        momentum: :math:`\mu` in [0, 1).
        weight_decay: :math:`\lambda` (>= 0).
        trust_coefficient: :math:`\eta_{\text{trust}}` (> 0), 1e-3 in the paper.
        eps: added to the ratio's denominator (>= 0).
        nesterov: Nesterov momentum.
        exclude_1d: no ratio and no decay for tensors with ``ndim <= 1``.
        adapt: apply the ratio (group option).
        trust_norm: ``"paper"`` or ``"combined"`` (see above).
        foreach: ``None``/``True`` fast path, ``False`` reference path.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
        eps: float = 0.0,
        *,
        nesterov: bool = False,
        exclude_1d: bool = True,
        adapt: bool = True,
        trust_norm: str = "paper",
        foreach: bool | None = None,
    ) -> None:
        self.foreach = check_foreach(foreach)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            nesterov=nesterov,
            exclude_1d=exclude_1d,
            adapt=adapt,
            trust_norm=trust_norm,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except BaseException:
            self.param_groups.pop()  # a rejected group must not stay (nor block a corrected retry)
            raise

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        group["lr"] = check_lr(group["lr"])
        group["momentum"] = check_number("momentum", group["momentum"], low=0.0, high=1.0)
        group["weight_decay"] = check_number("weight_decay", group["weight_decay"], low=0.0)
        group["trust_coefficient"] = check_number(
            "trust_coefficient", group["trust_coefficient"], low=0.0, low_open=True
        )
        group["eps"] = check_number("eps", group["eps"], low=0.0)
        for key in ("nesterov", "exclude_1d", "adapt"):
            if not isinstance(group[key], bool):
                raise TypeError(f"{key} must be a bool, got {group[key]!r}")
        if group["trust_norm"] not in _TRUST_NORMS:
            raise ValueError(
                f"trust_norm must be one of {_TRUST_NORMS}, got {group['trust_norm']!r}"
            )
        if group["nesterov"] and group["momentum"] == 0.0:
            raise ValueError("nesterov=True needs momentum > 0, got momentum=0.0")
        for p in group["params"]:
            if not p.is_floating_point():
                raise ValueError(f"Lars needs floating-point parameters, got dtype {p.dtype}")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["foreach"] = self.foreach
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        settle_state(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; momentum buffers keep their dtype (fp32 for bf16/fp16 parameters).

        The dtypes are restored after the user's load pre-hooks and before their post-hooks.
        """
        load_state_dict_restoring(
            self,
            state_dict,
            super().load_state_dict,
            lambda opt, saved: restore_state_dtypes(opt, saved, ("momentum_buffer",)),
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One LARS step for every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Gather and check every group before any update, so a bad state changes nothing.
        gathered = []
        for gi, group in enumerate(self.param_groups):
            params, grads, bufs, adapted = [], [], [], []
            for pi, p in enumerate(group["params"]):
                g = dense_grad("Lars", p, gi, pi)
                if g is None:
                    continue
                buf = None
                if group["momentum"] != 0.0:  # no momentum, no state (no empty entries either)
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p, dtype=state_dtype(p))
                    else:
                        check_state("Lars", gi, pi, p, state, ("momentum_buffer",))
                    buf = state["momentum_buffer"]
                params.append(p)
                grads.append(g)
                bufs.append(buf)
                adapted.append(group["adapt"] and not (group["exclude_1d"] and p.ndim <= 1))
            if params:
                gathered.append((group, params, grads, bufs, adapted))
        for group, params, grads, bufs, adapted in gathered:
            group = {**group, "lr": step_lr(group["lr"])}
            if self.foreach is False:
                _lars_reference(params, grads, bufs, adapted, group)
            else:
                _lars_fast(params, grads, bufs, adapted, group)
        return loss


def _ratio(x_norm: Tensor, g_norm: Tensor, d_norm: Tensor, group: dict[str, Any]) -> Tensor:
    wd, tc, eps = group["weight_decay"], group["trust_coefficient"], group["eps"]
    if group["trust_norm"] == "paper":
        denom = g_norm + wd * x_norm + eps
    else:
        denom = d_norm + eps
    ratio = tc * x_norm / denom
    return torch.where((x_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))


def _lars_reference(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor | None],
    adapted: list[bool],
    group: dict[str, Any],
) -> None:
    """Readable per-tensor LARS, as in the class docstring."""
    lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
    for p, g, buf, adapt in zip(params, grads, bufs, adapted, strict=True):
        x = p.to(state_dtype(p))
        g = g.to(x.dtype)
        d = g + wd * x if adapt else g
        if adapt:
            ratio = _ratio(
                torch.linalg.vector_norm(x),
                torch.linalg.vector_norm(g),
                torch.linalg.vector_norm(d),
                group,
            )
            d = ratio * d
        if buf is not None:
            buf.mul_(mu).add_(d)
            step = d + mu * buf if group["nesterov"] else buf
        else:
            step = d
        p.copy_(x - lr * step)


def _lars_fast(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor | None],
    adapted: list[bool],
    group: dict[str, Any],
) -> None:
    """Foreach LARS over the group, split by (device, dtype, adapted)."""
    lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
    buckets: dict[tuple[Any, Any, bool], list[int]] = {}
    for i, (p, a) in enumerate(zip(params, adapted, strict=True)):
        buckets.setdefault((p.device, p.dtype, a), []).append(i)
    for (_, dtype, adapt), idx in buckets.items():
        low = dtype not in (torch.float32, torch.float64)
        xs = [params[i] for i in idx]
        x32 = [fp32_view(params[i]) for i in idx]
        g32 = [fp32_view(grads[i]) for i in idx]
        if adapt:
            ds = (
                torch._foreach_add(g32, x32, alpha=wd)
                if wd != 0.0
                else torch._foreach_mul(g32, 1.0)
            )
            x_norms = torch.stack(torch._foreach_norm(x32))
            g_norms = torch.stack(torch._foreach_norm(g32))
            d_norms = (
                torch.stack(torch._foreach_norm(ds)) if group["trust_norm"] == "combined" else None
            )
            ratios = _ratio(x_norms, g_norms, d_norms if d_norms is not None else g_norms, group)
            torch._foreach_mul_(ds, list(ratios.unbind()))
        else:
            ds = g32
        if mu != 0.0:
            bs = [bufs[i] for i in idx]
            torch._foreach_mul_(bs, mu)
            torch._foreach_add_(bs, ds)
            if group["nesterov"]:
                steps = torch._foreach_add(ds, bs, alpha=mu)
            else:
                steps = bs
        else:
            steps = ds
        if isinstance(lr, Tensor):  # a device or compiled tensor lr: no float for alpha
            torch._foreach_addcmul_(x32, steps, [(-lr).to(xs[0].device)] * len(xs))
        else:
            torch._foreach_add_(x32, steps, alpha=-lr)
        if low:
            torch._foreach_copy_(xs, x32)
