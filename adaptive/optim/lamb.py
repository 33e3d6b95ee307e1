"""LAMB: layer-wise adaptive moments (You et al. 2019, arXiv 1904.00962, Algorithm 2)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from . import lamb_triton
from ._common import (
    DEFAULT_CPU_BLOCK,
    as_step_tensor,
    check_betas,
    check_cpu_block,
    check_foreach,
    check_interval,
    check_lr,
    check_number,
    check_state,
    check_step,
    dense_grad,
    fp32_view,
    load_state_dict_restoring,
    restore_state_dtypes,
    settle_state,
    state_dtype,
    step_lr,
)

__all__ = ["Lamb"]

_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


class Lamb(Optimizer):
    r"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76
    minutes", arXiv 1904.00962, Algorithm 2).

    For every parameter tensor :math:`x` with gradient :math:`g`, at step :math:`t`:

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2

        \hat m = m_t / (1-\beta_1^t), \qquad \hat v = v_t / (1-\beta_2^t)

        r = \hat m / (\sqrt{\hat v} + \epsilon), \qquad u = r + \lambda x

        x \leftarrow x - \eta \, \frac{\phi(\lVert x \rVert)}{\lVert u \rVert} \, u

    with :math:`\phi` the identity and the ratio replaced by 1 where :math:`\lVert x\rVert = 0` or
    :math:`\lVert u\rVert = 0` (the rule of the authors' TensorFlow code, so zero-initialised
    tensors can learn). With every option at its default this is exactly the paper's algorithm
    for every tensor it is given: no gradient clipping, weight decay inside the trust ratio.

    The public implementations depart from the paper in different ways; the departures of apex,
    timm, DeepSpeed and jettify are explicit options here:

    - ``max_grad_norm``: divide all gradients by ``max(1, ‖g‖_global / max_grad_norm)``, the norm
      taken over every parameter of every group (apex and timm default to 1.0).
    - ``trust_clip=(lo, hi)``: clamp the ratio :math:`\phi(\lVert x\rVert)/\lVert u\rVert` to
      [lo, hi] (timm's LAMBC is ``(0, 1)``, DeepSpeed's ``(0.01, 10)``). The fallback ratio 1 of a
      zero norm is not clamped.
    - ``weight_norm_clip=(γ_l, γ_u)``: the paper's general
      :math:`\phi(z) = \min(\max(z, γ_l), γ_u)`.
    - ``bias_correction=False``: use :math:`m_t, v_t` in place of :math:`\hat m, \hat v` (paper v3,
      jettify's default).
    - ``decoupled_decay=True``: AdamW-style decay outside the ratio, as timm and
      pytorch-optimizer do it: :math:`x' = (1-\eta\lambda) x`, :math:`u = r`, and
      :math:`x \leftarrow x' - \eta\,\phi(\lVert x'\rVert)/\lVert r\rVert\, r`.
    - ``adapt_without_decay=False``: groups whose ``weight_decay`` is 0 take the plain step
      (ratio 1), as apex (without ``use_nvlamb``) and timm (without ``always_adapt``) do.
    - ``adapt=False`` (usually per group, see :func:`param_groups_for`): ratio 1 for that group.

    pytorch-optimizer's ``Lamb`` is not among them: by default (``adam_debias=False``) it divides
    the step by :math:`1-\beta_1^t` while leaving :math:`v` uncorrected, and it takes the ratio
    as :math:`\phi(\lVert x\rVert)/(\lVert u\rVert + \epsilon)`; no combination of these options
    does either (its decoupled decay and :math:`\phi` clamp to [0, 10] are
    ``decoupled_decay=True`` and ``weight_norm_clip=(0, 10)``).

    ``lr`` may be a one-element tensor (as in torch's SGD and Adam), which an LR scheduler updates
    in place; a CPU tensor gives exactly the numbers of the same float. The global clipping norm
    is taken in float64 when a gradient is float64. A state that does not fit its parameter
    (shape, dtype, device: a checkpoint of other parameters, or of these in another order)
    raises before any kernel runs.

    The step counts live on the parameter's device, so no step reads a value back to the host.
    Parameters in bf16/fp16 keep fp32 moments; the step is computed in fp32 and written back.

    Two implementations compute the same numbers: the reference (``foreach=False``), a readable
    loop over tensors that follows the formula above, and the default fast path
    (``foreach=None`` or ``True``): ``torch._foreach_*`` over all tensors of a group with the
    bias corrections folded into per-tensor scalars and the trust ratios taken with
    ``torch.where``. On CPU the fast path walks each tensor in pieces of ``cpu_block`` elements,
    updates both moments of a piece with torch's fused Adam kernel while the piece is in cache,
    and applies each large tensor's update right after its ratio is known, while it is still in
    cache (``cpu_block=0`` turns this off); it keeps one parameter-sized fp32 scratch buffer
    between steps, because freshly allocated temporaries cost a page fault per 4 KiB on CPU.
    Groups holding DTensor shards (FSDP2's ``fully_shard``) always take the reference path, which
    computes the trust ratios from whole-tensor norms (one collective per norm).

    Args:
        params: parameters or parameter groups (see :func:`param_groups_for`).
        lr: learning rate :math:`\eta` (>= 0), a float or a one-element tensor.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: :math:`\epsilon` (> 0), added to :math:`\sqrt{\hat v}`.
        weight_decay: :math:`\lambda` (>= 0).
        adapt: apply the trust ratio (group option).
        bias_correction: divide the moments by :math:`1-\beta^t` (group option).
        decoupled_decay: decay outside the trust ratio (group option, see above).
        adapt_without_decay: if False, skip the ratio in groups with ``weight_decay == 0``.
        weight_norm_clip: ``None`` (φ identity) or ``(γ_l, γ_u)`` (group option).
        trust_clip: ``None`` or ``(lo, hi)`` bounds on the ratio (group option).
        max_grad_norm: ``None`` (no clipping) or the global gradient-norm bound (> 0).
        foreach: ``None``/``True`` fast path, ``False`` reference path.
        cpu_block: elements per cache piece on CPU (0 = plain foreach over whole tensors).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = Lamb(param_groups_for(model, weight_decay=0.01), lr=1e-3)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        *,
        adapt: bool = True,
        bias_correction: bool = True,
        decoupled_decay: bool = False,
        adapt_without_decay: bool = True,
        weight_norm_clip: tuple[float, float] | None = None,
        trust_clip: tuple[float, float] | None = None,
        max_grad_norm: float | None = None,
        foreach: bool | None = None,
        cpu_block: int = DEFAULT_CPU_BLOCK,
    ) -> None:
        if max_grad_norm is not None:
            max_grad_norm = check_number("max_grad_norm", max_grad_norm, low=0.0, low_open=True)
        self.max_grad_norm = max_grad_norm
        self.foreach = check_foreach(foreach)
        self.cpu_block = check_cpu_block(cpu_block)
        self._scratch: dict[int, Tensor] = {}
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            adapt=adapt,
            bias_correction=bias_correction,
            decoupled_decay=decoupled_decay,
            adapt_without_decay=adapt_without_decay,
            weight_norm_clip=weight_norm_clip,
            trust_clip=trust_clip,
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
        group["betas"] = check_betas("betas", group["betas"])
        group["eps"] = check_number("eps", group["eps"], low=0.0, low_open=True)
        group["weight_decay"] = check_number("weight_decay", group["weight_decay"], low=0.0)
        for key in ("adapt", "bias_correction", "decoupled_decay", "adapt_without_decay"):
            if not isinstance(group[key], bool):
                raise TypeError(f"{key} must be a bool, got {group[key]!r}")
        group["weight_norm_clip"] = check_interval("weight_norm_clip", group["weight_norm_clip"])
        group["trust_clip"] = check_interval("trust_clip", group["trust_clip"])
        for p in group["params"]:
            if not p.is_floating_point():
                raise ValueError(f"Lamb needs floating-point parameters, got dtype {p.dtype}")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(
            max_grad_norm=self.max_grad_norm, foreach=self.foreach, cpu_block=self.cpu_block
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        settle_state(self)
        self._scratch = {}
        for group in self.param_groups:  # step counts pickled as plain numbers
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st and not isinstance(st["step"], Tensor):
                    st["step"] = as_step_tensor(st["step"], p.device)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; moments keep their dtype (fp32 for bf16/fp16 parameters).

        The dtypes are restored after the user's load pre-hooks and before their post-hooks; a
        ``step`` saved as a plain number is loaded as a tensor.
        """
        load_state_dict_restoring(
            self,
            state_dict,
            super().load_state_dict,
            lambda opt, saved: restore_state_dtypes(opt, saved, _STATE_KEYS),
        )

    def _clip_divisor(self, grads: list[Tensor] | None = None) -> Tensor | None:
        """``max(1, ‖g‖/max_grad_norm)`` over all gradients of all groups, as a device tensor.

        The norm is taken in float64 when any gradient is float64, in float32 otherwise.
        """
        if self.max_grad_norm is None:
            return None
        if grads is None:
            grads = [
                g
                for gi, group in enumerate(self.param_groups)
                for pi, p in enumerate(group["params"])
                if (g := dense_grad("Lamb", p, gi, pi)) is not None
            ]
        if not grads:
            return None
        device = grads[0].device
        wide = [g for g in grads if g.dtype == torch.float64]  # cannot be narrowed by the norm
        norms = list(torch._foreach_norm(wide, 2)) if wide else []
        rest = [g for g in grads if g.dtype != torch.float64]
        norms += list(torch._foreach_norm(rest, 2, dtype=torch.float32)) if rest else []
        dtype = torch.float64 if wide else torch.float32
        total = torch.linalg.vector_norm(torch.stack([n.to(device, dtype) for n in norms]))
        return torch.clamp(total / self.max_grad_norm, min=1.0)

    def _scratch_for(self, p: Tensor) -> Tensor:
        buf = self._scratch.get(id(p))
        dtype = state_dtype(p)
        if buf is None or buf.shape != p.shape or buf.dtype != dtype or buf.device != p.device:
            buf = torch.empty_like(p, dtype=dtype)
            self._scratch[id(p)] = buf
        return buf

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One LAMB step for every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Gather and check every group before any kernel runs: a state that does not fit its
        # parameter raises here, with nothing updated (the fused CPU kernel does not check).
        gathered = []
        for gi, group in enumerate(self.param_groups):
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for pi, p in enumerate(group["params"]):
                g = dense_grad("Lamb", p, gi, pi)
                if g is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype(p))
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype(p))
                else:
                    check_state("Lamb", gi, pi, p, state, ("exp_avg", "exp_avg_sq"))
                    check_step("Lamb", gi, pi, p, state.get("step"))
                params.append(p)
                grads.append(g)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if params:
                gathered.append((group, params, grads, exp_avgs, exp_avg_sqs, steps))
        clip = self._clip_divisor([g for item in gathered for g in item[2]])
        fast = self.foreach is not False
        for group, params, grads, exp_avgs, exp_avg_sqs, steps in gathered:
            hp = _hyper(group, clip)
            # DTensor shards (FSDP2, tensor parallelism): the fast path works on flat local memory
            # and local norms, so sharded groups take the reference path, whose norms are global
            # (one collective per norm).
            if fast and not any(isinstance(p, DTensor) for p in params):
                _lamb_fast(self, params, grads, exp_avgs, exp_avg_sqs, steps, hp)
            else:
                _lamb_reference(params, grads, exp_avgs, exp_avg_sqs, steps, hp)
        return loss


def _hyper(group: dict[str, Any], clip: Tensor | None) -> dict[str, Any]:
    wd = group["weight_decay"]
    return dict(
        lr=step_lr(group["lr"]),
        beta1=group["betas"][0],
        beta2=group["betas"][1],
        eps=group["eps"],
        weight_decay=wd,
        adapt=group["adapt"] and (group["adapt_without_decay"] or wd != 0.0),
        bias_correction=group["bias_correction"],
        decoupled=group["decoupled_decay"],
        weight_norm_clip=group["weight_norm_clip"],
        trust_clip=group["trust_clip"],
        clip=clip,
    )


def _trust_ratio(w_norm: Tensor, u_norm: Tensor, weight_norm_clip: Any, trust_clip: Any) -> Tensor:
    """phi(‖x‖)/‖u‖ (clamped if asked), 1 where either norm is 0; elementwise on norm tensors."""
    phi = w_norm if weight_norm_clip is None else w_norm.clamp(*weight_norm_clip)
    ratio = phi / u_norm
    if trust_clip is not None:
        ratio = ratio.clamp(*trust_clip)
    return torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))


def _lamb_reference(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    hp: dict[str, Any],
) -> None:
    """Readable per-tensor LAMB, written as the formula in the class docstring."""
    lr, beta1, beta2, wd = hp["lr"], hp["beta1"], hp["beta2"], hp["weight_decay"]
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        step.add_(1)
        x = p.to(m.dtype)
        g = g.to(m.dtype)
        if hp["clip"] is not None:
            g = g / hp["clip"].to(g.device)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).add_(g * g, alpha=1 - beta2)
        if hp["bias_correction"]:
            t = step.to(m.dtype)
            m_hat = m / (1 - beta1**t)
            v_hat = v / (1 - beta2**t)
        else:
            m_hat, v_hat = m, v
        r = m_hat / (v_hat.sqrt() + hp["eps"])
        if hp["decoupled"]:
            x = (1 - lr * wd) * x  # decay first, the ratio sees the decayed weights
            u = r
        else:
            u = r + wd * x
        if hp["adapt"]:
            ratio = _trust_ratio(
                torch.linalg.vector_norm(x),
                torch.linalg.vector_norm(u),
                hp["weight_norm_clip"],
                hp["trust_clip"],
            )
        else:
            ratio = 1.0
        p.copy_(x - lr * ratio * u)


def _split_by_device_dtype(params: list[Tensor]) -> dict[tuple[Any, Any], list[int]]:
    buckets: dict[tuple[Any, Any], list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.device, p.dtype), []).append(i)
    return buckets


def _lamb_fast(
    opt: Lamb,
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    hp: dict[str, Any],
) -> None:
    """Fast LAMB for one group: the same numbers as :func:`_lamb_reference`, fewer memory passes.

    On CPU (``cpu_block > 0``) see :func:`_moments_and_update_blocked`. Elsewhere the bias
    corrections are folded into two per-tensor scalars computed on the device from the step
    counts: with ``k = √bc2/bc1`` and ``e = ε·√bc2``, ``m̂/(√v̂+ε) = k·m/(√v+e)``. The foreach
    kernels build ``w = u/k = m/(√v+e) + (λ/k)·x``; the step ``ratio·u`` is then ``ratio·k·w``
    with ``‖u‖ = k‖w‖``, so ``k`` costs no pass over the tensors.
    """
    lr, beta1, beta2, wd = hp["lr"], hp["beta1"], hp["beta2"], hp["weight_decay"]
    wd_in = 0.0 if hp["decoupled"] else wd  # decay inside the update u
    # decoupled decay x' = shrink * x (a tensor with a device or compiled tensor lr)
    shrink = 1.0 - lr * wd if hp["decoupled"] and wd != 0.0 else None
    for (device, dtype), idx in _split_by_device_dtype(params).items():
        xs = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        ms = [exp_avgs[i] for i in idx]
        vs = [exp_avg_sqs[i] for i in idx]
        st = [steps[i] for i in idx]
        torch._foreach_add_(st, 1.0)
        clip = None if hp["clip"] is None else hp["clip"].to(device, state_dtype(xs[0]))
        low = dtype not in (torch.float32, torch.float64)
        if device.type == "cpu" and opt.cpu_block > 0:
            _lamb_cpu_blocked(opt, xs, gs, ms, vs, st, clip, hp, wd_in, shrink, low)
            continue
        # CUDA: two multi-tensor Triton passes (their lr is a kernel argument: a device tensor
        # lr would need a host sync, so it stays on the foreach path below)
        if not isinstance(lr, Tensor) and lamb_triton.takes(xs, gs, ms, vs):
            lamb_triton.lamb_step(xs, gs, ms, vs, st, {**hp, "clip": clip})
            continue
        if hp["bias_correction"]:
            s = torch.stack(st).to(ms[0].dtype)  # fp64 params get fp64 corrections
            bc1 = 1 - torch.pow(beta1, s)
            sqrt_bc2 = (1 - torch.pow(beta2, s)).sqrt()
            k: Tensor | None = sqrt_bc2 / bc1
            eps_s: list[Any] = list((hp["eps"] * sqrt_bc2).unbind())
            wd_s: list[Any] = list((wd_in * bc1 / sqrt_bc2).unbind())
        else:
            k = None
            eps_s = [hp["eps"]] * len(idx)
            wd_s = [wd_in] * len(idx)
        x32 = [fp32_view(x) for x in xs]
        g32 = [fp32_view(g) for g in gs]
        if clip is not None:
            g32 = torch._foreach_div(g32, clip)
        torch._foreach_lerp_(ms, g32, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, g32, g32, value=1 - beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_add_(denom, eps_s)
        ws = torch._foreach_div(ms, denom)
        del denom
        if wd_in != 0.0:
            if k is None:
                torch._foreach_add_(ws, x32, alpha=wd_in)
            else:
                torch._foreach_addcmul_(ws, x32, wd_s)
        x_norms = w_norms = None
        if hp["adapt"]:
            x_norms = torch.stack(torch._foreach_norm(x32))
            w_norms = torch.stack(torch._foreach_norm(ws))
        _apply_update(xs, x32, ws, k, x_norms, w_norms, hp, shrink, low)


# With no bias correction the fused kernel is given an infinite step: 1 - β**inf = 1 exactly.
_NO_BIAS_CORRECTION = torch.tensor(math.inf)


def _lamb_cpu_blocked(
    opt: Lamb,
    xs: list[Tensor],
    gs: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor],
    steps: list[Tensor],
    clip: Tensor | None,
    hp: dict[str, Any],
    wd_in: float,
    shrink: float | Tensor | None,
    low: bool,
) -> None:
    """CPU: LAMB tensor by tensor, so that a tensor's update is applied while it is in cache.

    Tensors of at least ``_APPLY_NOW`` elements are updated as soon as their ratio is known;
    the small contiguous ones (biases, norm weights, small convolutions) take one multi-tensor
    call per op (:func:`_moments_and_update_small`) and one foreach update, since for them the
    per-op overhead outweighs the memory traffic.
    """
    later: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]] = ([], [], [], [])
    small = [
        i
        for i, t in enumerate(zip(xs, gs, ms, vs, strict=True))
        if t[0].numel() < _APPLY_NOW and all(u.is_contiguous() for u in t)
    ]
    if small:
        pick = [[seq[i] for i in small] for seq in (xs, gs, ms, vs, steps)]
        ws, x_norms, w_norms = _moments_and_update_small(opt, *pick, clip, hp, wd_in, low)
        later[0].extend(pick[0])
        later[1].extend(ws)
        if x_norms is not None and w_norms is not None:
            later[2].extend(x_norms.unbind())
            later[3].extend(w_norms.unbind())
    rest = sorted(set(range(len(xs))) - set(small))
    for i in rest:
        x = xs[i]
        w, x_norm, w_norm = _moments_and_update_blocked(
            opt, x, gs[i], ms[i], vs[i], steps[i], clip, hp, wd_in, low
        )
        if x.numel() >= _APPLY_NOW:
            norms = (None, None) if x_norm is None else (x_norm[None], w_norm[None])
            dense = x.is_contiguous() and w.is_contiguous()
            block = opt.cpu_block if dense else 0
            _apply_update([x], None, [w], None, *norms, hp, shrink, low, block)
            continue
        for dst, item in zip(later, (x, w, x_norm, w_norm), strict=True):
            dst.append(item)
    if later[0]:
        x_norms = None if not hp["adapt"] else torch.stack(later[2])
        w_norms = None if not hp["adapt"] else torch.stack(later[3])
        _apply_update(later[0], None, later[1], None, x_norms, w_norms, hp, shrink, low)


def _moments_and_update_small(
    opt: Lamb,
    xs: list[Tensor],
    gs: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor],
    steps: list[Tensor],
    clip: Tensor | None,
    hp: dict[str, Any],
    wd_in: float,
    low: bool,
) -> tuple[list[Tensor], Tensor | None, Tensor | None]:
    """CPU, small contiguous tensors: :func:`_moments_and_update_blocked` as multi-tensor calls.

    Same numbers: scratch ``u = λx``, then the fused Adam kernel adds ``m̂/(√v̂+ε)`` (lr -1).
    """
    ws = [opt._scratch_for(x) for x in xs]
    x32 = [x.float() for x in xs] if low else xs
    g32 = [g.float() for g in gs] if low else gs
    if clip is not None:
        g32 = torch._foreach_div(g32, clip)
    if wd_in != 0.0:
        torch._foreach_copy_(ws, x32)
        torch._foreach_mul_(ws, wd_in)
    else:
        torch._foreach_zero_(ws)
    if not hp["bias_correction"]:
        steps = [_NO_BIAS_CORRECTION] * len(xs)
    torch._fused_adam_(
        ws,
        g32,
        ms,
        vs,
        [],
        steps,
        lr=-1.0,
        beta1=hp["beta1"],
        beta2=hp["beta2"],
        weight_decay=0.0,
        eps=hp["eps"],
        amsgrad=False,
        maximize=False,
    )
    if not hp["adapt"]:
        return ws, None, None
    return ws, torch.stack(torch._foreach_norm(x32)), torch.stack(torch._foreach_norm(ws))


# Tensors at least this large get their update applied right after their moments (see above).
_APPLY_NOW = 1 << 16
# With no bias correction the fused kernel is given an infinite step: 1 - β**inf = 1 exactly.
_NO_BIAS_CORRECTION = torch.tensor(math.inf)


def _moments_and_update_blocked(
    opt: Lamb,
    x: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    step: Tensor,
    clip: Tensor | None,
    hp: dict[str, Any],
    wd_in: float,
    low: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """CPU: update the moments of one tensor and write ``u = m̂/(√v̂+ε) + λx`` into scratch.

    The tensor is walked in pieces of ``cpu_block`` elements, each processed while it is in
    cache: the scratch piece is set to ``λx``, then torch's fused Adam kernel
    (``torch._fused_adam_``, one vectorised pass that updates both moments with bias
    correction) adds ``m̂/(√v̂+ε)`` to it when given the learning rate -1, and the norms of the
    piece of ``x`` and ``u`` are taken. The gradient is divided by the clipping divisor into a
    copy, so ``p.grad`` is left as it was. Returns the scratch ``u`` and ``‖x‖``, ``‖u‖`` (None
    when the group does not adapt).
    """
    beta1, beta2, block = hp["beta1"], hp["beta2"], opt.cpu_block
    if not hp["bias_correction"]:
        step = _NO_BIAS_CORRECTION
    w = opt._scratch_for(x)
    tensors = (x, g, m, v, w)
    if all(t.is_contiguous() for t in tensors) and x.numel() > block:
        flat = [t.view(-1) for t in tensors]
        pieces = [[t[a : a + block] for t in flat] for a in range(0, x.numel(), block)]
    else:
        pieces = [list(tensors)]
    x_sq: list[Tensor] = []
    w_sq: list[Tensor] = []
    for xp, gp, mp, vp, wp in pieces:
        if low:
            xp, gp = xp.float(), gp.float()
        if clip is not None:
            gp = gp / clip
        if wd_in != 0.0:
            torch.mul(xp, wd_in, out=wp)
        else:
            wp.zero_()
        if all(t.is_contiguous() for t in (gp, mp, vp, wp)):
            torch._fused_adam_(
                [wp],
                [gp],
                [mp],
                [vp],
                [],
                [step],
                lr=-1.0,
                beta1=beta1,
                beta2=beta2,
                weight_decay=0.0,
                eps=hp["eps"],
                amsgrad=False,
                maximize=False,
            )
        else:  # the fused kernel walks memory in order: strided tensors take the plain ops
            mp.lerp_(gp, 1 - beta1)
            vp.mul_(beta2).addcmul_(gp, gp, value=1 - beta2)
            t = step.to(mp.dtype)  # fp64 parameters get fp64 corrections
            bc1, bc2 = 1 - torch.pow(beta1, t), 1 - torch.pow(beta2, t)
            wp.addcdiv_(mp / bc1, (vp / bc2).sqrt_().add_(hp["eps"]))
        if hp["adapt"]:
            x_sq.append(_sq_norm(xp))
            w_sq.append(_sq_norm(wp))
    if not hp["adapt"]:
        return w, None, None
    if len(x_sq) == 1:
        return w, x_sq[0].sqrt(), w_sq[0].sqrt()
    return w, torch.stack(x_sq).sum().sqrt(), torch.stack(w_sq).sum().sqrt()


def _sq_norm(t: Tensor) -> Tensor:
    """``‖t‖²``: a BLAS dot product for contiguous pieces (twice as fast as ``vector_norm`` on CPU)."""
    if t.is_contiguous():
        flat = t.view(-1)
        return torch.dot(flat, flat)
    return torch.linalg.vector_norm(t).square()


def _apply_update(
    xs: list[Tensor],
    x32: list[Tensor] | None,
    ws: list[Tensor],
    k: Tensor | None,
    x_norms: Tensor | None,
    w_norms: Tensor | None,
    hp: dict[str, Any],
    shrink: float | Tensor | None,
    low: bool,
    block: int = 0,
) -> None:
    """x <- shrink * x - lr * ratio * k * w (u = k * w), in fp32, written back to low precision.

    ``shrink`` None means no decoupled decay (1). With ``block > 0`` and one contiguous
    fp32/fp64 tensor, the update walks the tensor in pieces from the end: the pieces the moment
    pass touched last are the ones still in cache.
    """
    lr = hp["lr"]
    coefs: list[Tensor] | None = None
    if x_norms is not None and w_norms is not None:
        u_norms = w_norms if k is None else w_norms * k
        x_norms = x_norms if shrink is None else x_norms * abs(shrink)
        ratio = _trust_ratio(x_norms, u_norms, hp["weight_norm_clip"], hp["trust_clip"])
        coefs = list((ratio * -lr if k is None else ratio * k * -lr).unbind())
    elif k is not None:
        coefs = list((k * -lr).unbind())
    elif isinstance(lr, Tensor):  # no float to pass as alpha
        coefs = [(-lr).to(xs[0].device)] * len(xs)
    if block > 0 and not low and len(xs) == 1 and xs[0].numel() > block:
        fx, fw = xs[0].view(-1), ws[0].view(-1)  # both contiguous (checked by the caller)
        for a in reversed(range(0, fx.numel(), block)):
            xp, wp = fx[a : a + block], fw[a : a + block]
            if shrink is not None:
                xp.mul_(shrink)
            if coefs is not None:
                xp.addcmul_(wp, coefs[0])
            else:
                xp.add_(wp, alpha=-lr)
        return
    targets = ([x.float() for x in xs] if x32 is None else x32) if low else xs
    if shrink is not None:
        if isinstance(shrink, Tensor):
            shrink = shrink.to(xs[0].device)
        torch._foreach_mul_(targets, shrink)
    if coefs is not None:
        torch._foreach_addcmul_(targets, ws, coefs)
    else:
        torch._foreach_add_(targets, ws, alpha=-lr)
    if low:
        torch._foreach_copy_(xs, targets)
