"""The per-step gradient statistics sensor: :class:`GradientStatistics` and :class:`StatisticsResult`.

Notation: ``g_i`` is the gradient of sample ``i``'s own (unreduced) loss, ``b`` the number of
samples in the (global, accumulated) batch, ``ḡ = (1/b) Σ_i g_i``. The quantities are

- ``variance V = (Σ_i ‖g_i‖² − b‖ḡ‖²)/(b − 1)``: the unbiased per-coordinate variance summed over
  coordinates, ``‖Var‖₁`` (Byrd et al. 2012 norm test; AdAdaGrad, Lau et al. 2024, arXiv 2402.11215);
- ``noise_scale = V/‖ḡ‖²``: the simple noise scale ``B_simple = tr Σ/‖G‖²`` (McCandlish et al. 2018,
  arXiv 1812.06162) with the plug-in estimates;
- ``inner_product_variance = Var_i ⟨g_i, ḡ⟩`` (Bollapragada et al. 2018, inner-product test), with the
  inner product summed over all layers for each sample before the variance is taken;
- ``orthogonality_variance = Σ_j Var_i (g_i − (⟨g_i,ḡ⟩/‖ḡ‖²) ḡ)_j = (Σ_i ‖g_i‖² − Σ_i ⟨g_i,ḡ⟩²/‖ḡ‖²)/(b−1)``.

Per-sample quantities come from per-layer hooks (see :mod:`adaptive.stats.rules`), never from
per-sample gradients; all work stays on the device (no ``.item()`` while capturing).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_leaves

from adaptive.stats.audit import UseAudit
from adaptive.stats.broadcast import BatchBroadcast, broadcast_output
from adaptive.stats.flatten import sample_major
from adaptive.stats.hooks import _add, _batch_sum, _float32, _FusedWeightGrads, _grad_hook
from adaptive.stats.last_resort import replaying
from adaptive.stats.ops import WATCH, OpCall
from adaptive.stats.planner import PathPlanner, PlanEntry
from adaptive.stats.registry import find_rule
from adaptive.stats.rules import LayerRule, UnsupportedModuleError
from adaptive.stats.uses import TOGGLED, UseTracking

__all__ = ["FALLBACKS", "GradientStatistics", "StatisticsResult"]

FALLBACKS: tuple[str, ...] = ("groups",)
_BatchNorm = nn.modules.batchnorm._BatchNorm


@dataclass
class StatisticsResult:
    """Statistics of the per-sample gradients of one (accumulated, global) batch.

    Every tensor is a float32 tensor on the model's device; scalars are 0-d. Fields that were not
    requested (or that the chosen estimator cannot give) are None.

    Attributes:
        batch_size: b, the number of samples over all micro-batches and ranks (under DDP computed as
            local samples × world size, which assumes equal local batches; the statistics
            themselves use the exact global count).
        per_sample_sq_norms: ``‖g_i‖²`` of this rank's samples, in capture order, shape (b_local,).
        sum_sq_norms: ``Σ_i ‖g_i‖²`` over the global batch.
        grad_sq_norm: ``‖ḡ‖²``.
        variance: ``(Σ_i ‖g_i‖² − b‖ḡ‖²)/(b−1)``.
        noise_scale: ``variance / grad_sq_norm``.
        inner_product_variance: ``Var_i ⟨g_i, ḡ⟩`` (see :class:`GradientStatistics` for exactness).
        orthogonality_variance: summed variance of the part of ``g_i`` orthogonal to ``ḡ``.
        coordinate_sq_sums: ``Σ_i g_ij²`` per parameter name (``per_coordinate=True``).
        mean_grads: ``ḡ`` per parameter name (``per_coordinate=True``).
        group_counts: samples per group id, shape (G,) (``num_groups`` set).
        group_sum_sq_norms: ``Σ_{i∈group} ‖g_i‖²``, shape (G,).
        group_grad_dots: ``Σ_{i∈group} ⟨g_i, d⟩`` for the target ``d`` of
            :meth:`GradientStatistics.set_target`, shape (G,).
        num_micro_batches: captures combined on each rank (accumulation steps).
        world_size: data-parallel ranks combined.
        method: ``"per_sample"`` (exact hooks) or ``"groups"`` (fallback estimator).
    """

    batch_size: int
    per_sample_sq_norms: Tensor | None
    sum_sq_norms: Tensor | None
    grad_sq_norm: Tensor
    variance: Tensor
    noise_scale: Tensor
    inner_product_variance: Tensor | None = None
    orthogonality_variance: Tensor | None = None
    coordinate_sq_sums: dict[str, Tensor] | None = None
    mean_grads: dict[str, Tensor] | None = None
    group_counts: Tensor | None = None
    group_sum_sq_norms: Tensor | None = None
    group_grad_dots: Tensor | None = None
    num_micro_batches: int = 1
    world_size: int = 1
    method: str = "per_sample"


def _refuse_fsdp1(model: nn.Module) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    for name, module in model.named_modules():
        if isinstance(module, FullyShardedDataParallel):
            raise UnsupportedModuleError(
                f"module '{name or '<root>'}' is wrapped in FullyShardedDataParallel (FSDP1), "
                "whose flat parameters mix slices of several layers: per-parameter gradient "
                "statistics are not defined on them. Shard with "
                "torch.distributed.fsdp.fully_shard (FSDP2) or use DDP"
            )


class _MicroBatch:
    """What one capture() block collected (raw units: gradients of the loss as written)."""

    def __init__(self, group_ids: Tensor | None) -> None:
        self.group_ids = group_ids
        self.size: int | None = None
        self.sq: Tensor | None = None  # (m,) Σ_layers ‖raw g_i‖²
        self.inner: Tensor | None = None  # (m,) ⟨raw g_i, raw Σ_j g_j⟩
        self.sum_sq: Tensor | None = None  # ‖raw Σ_j g_j‖² of this micro-batch
        self.target_dots: Tensor | None = None  # (m,) ⟨raw g_i, d⟩
        self.inv_scale: Tensor | None = None  # 1/loss scale (GradScaler), 0-d
        self.seen: set[str] = set()
        self.toggled: dict[str, list[tuple[str, nn.Parameter]]] = {}
        self.pending: dict[str, list[Any]] = {}  # module name -> [a, δ, params left]
        self.params_hooked: set[str] = set()  # layers that may fuse but did not
        self.deferred: set[str] = set()  # layers another sensor fused: hooked after its forward
        self.uses: dict[str, int] = {}  # parameter -> calls that used it (see uses.py)
        self.calls: dict[str, int] = {}  # module -> calls in this capture
        self.shared: dict[str, Tensor] = {}  # parameter used several times -> (b, *shape) sum
        # modules without a rule being called: the calls of their layers before, and the
        # watch of the operations on their parameters (ops.py), if any
        self.replay_stack: list[tuple[dict[str, int], Any]] = []
        self.op_calls: list[Any] = []  # watched calls not yet returned
        # calls whose outputs are followed until the outermost forward returns (ops.py)
        self.lingering: list[Any] = []
        self.op_params: set[str] = set()  # ruled layers' parameters followed by ops.py
        self.op_totals: dict[str, Tensor] = {}  # first capture: Σ_i g_i delivered by ops.py
        self.sum_checks: list[tuple[str, Tensor, Tensor]] = []  # (name, ‖Σ_i g_i − g‖, ‖g‖)
        self.small: list[tuple[str, Tensor]] = []  # op-level (b, *shape) gradients to account
        self.autocast = False  # the forward ran under autocast (reduced precision)
        # fused layers: name -> (planner key to record a measurement under, or None; the paths
        # to run: the candidates to time, or the one chosen)
        self.plans: dict[str, tuple[tuple | None, tuple[str, ...]]] = {}


@dataclass
class _Site:
    name: str
    module: nn.Module
    rule: LayerRule | None
    params: dict[str, tuple[str, nn.Parameter]]  # local name -> (full name, param)
    shared: bool = False  # holds a parameter another module holds too (tied weights)

    @property
    def float64(self) -> bool:
        return any(p.dtype == torch.float64 for _, p in self.params.values())

    @property
    def may_fuse(self) -> bool:
        """Whether the rule can ever supply this layer's gradients (it offers ``paths``)."""
        return self.rule is not None and type(self.rule).paths is not LayerRule.paths


_SIDE_PASSES = 0


@contextlib.contextmanager
def side_pass() -> Iterator[None]:
    """Forward and backward passes inside the block are not captured by any attached
    :class:`GradientStatistics`: for a component's own pass while another's sensor is attached
    (a target gradient on validation data, a scoring pass with gradients), which would
    otherwise be counted as samples of the training batch. The callbacks' own side passes use
    it, so their order in a Trainer does not change what any sensor sees."""
    global _SIDE_PASSES
    _SIDE_PASSES += 1
    try:
        yield
    finally:
        _SIDE_PASSES -= 1


class GradientStatistics(UseTracking):
    """Per-step statistics of per-sample gradients, computed by hooks on the device.

    Args:
        model: the module being trained (a ``DistributedDataParallel`` wrapper is unwrapped). Every
            module with trainable parameters must be one of Linear, Conv1d, Conv2d, Embedding,
            LayerNorm, GroupNorm, RMSNorm or BatchNorm in eval mode, unless ``fallback`` is set.
            Axis 0 of every layer's input is the sample axis.
        loss_reduction: ``"mean"`` if each micro-batch loss is the mean of the per-sample losses
            (the raw per-sample gradients are then rescaled by the micro-batch size, and by the
            number of captures combined, following the accumulation convention below); ``"sum"``
            if it is their sum.
        per_coordinate: also return ``coordinate_sq_sums`` and ``mean_grads``.
        num_groups: G; when set, ``capture(group_ids=...)`` takes a (b,) int64 group id per sample
            and the result has ``group_counts``, ``group_sum_sq_norms`` and ``group_grad_dots``.
        fallback: ``None`` (raise on unsupported modules) or ``"groups"``: when the model has an
            unsupported module or a BatchNorm in training mode, estimate the variance from the
            group means of micro-batches and ranks instead (see :mod:`adaptive.stats.fallback`).
        inner_products: compute ``inner_product_variance`` and ``orthogonality_variance`` (one extra
            contraction per layer, with the layer's own batch gradient); ``False`` leaves them None
            and costs only the norm statistics.
        grad_scaler: a ``torch.amp.GradScaler`` whose scale multiplies the loss; its scale is read
            as a device tensor while capturing and divided out.
        fuse_weight_grads: where a Linear (with sequence axes) or Conv call is cheaper to handle by
            materialising its per-sample weight gradients, let the sensor also supply the layer's
            batch gradient as their sum, so autograd does not compute it a second time (the
            layer's parameters have ``requires_grad`` switched off during its forward call
            only). ``False`` leaves every gradient to autograd. On CPU with the compiled kernel
            (:mod:`adaptive.stats.native`), every sequence Linear and ``groups == 1``
            convolution fuses, and the kernel returns the norms, the batch gradient and (with
            ``per_coordinate``) the per-coordinate squares without storing per-sample gradients;
            the inner products and target dots then pair each sample with the direction by one
            contraction of the layer's input and output gradient. Per-sample gradients are
            built for at most 2^24 elements at a time (a larger batch goes in chunks of
            samples), on CPU in one buffer kept between steps.
        paths: layer name -> ``"native"``, ``"materialise"`` or ``"torch"``, overriding how that
            Linear/Conv layer is handled (:mod:`adaptive.stats.planner`); one name alone is
            used for every layer it can take (``paths="native"``). By default, on CPU,
            the first call of each shape times every path that can take it and keeps the
            fastest (cached for the process); on other devices
            :func:`adaptive.stats.rules.grouped.materialising_pays` decides. :meth:`plan` lists the
            choices.

    Accumulation. Several ``capture()`` blocks before one :meth:`result` are micro-batches of one
    batch, each micro-batch's mean loss divided by the number ``A`` of micro-batches (Lightning's
    convention), so ``.grad`` holds the mean over all ``b`` samples. Exact for the whole batch in
    that case (and across DDP ranks): ``per_sample_sq_norms``, ``sum_sq_norms``, ``grad_sq_norm``,
    ``variance``, ``noise_scale``, ``coordinate_sq_sums``, ``mean_grads`` and the group sums.
    ``inner_product_variance`` and ``orthogonality_variance`` need ``ḡ`` while a sample's hooks run;
    only the micro-batch's own mean ``ḡ_k`` (on this rank) is known then. They are therefore
    pooled within-micro-batch estimates taken along the unit direction ``u_k = ḡ_k/‖ḡ_k‖``:
    ``inner_product_variance = ‖ḡ‖² Σ_k Σ_{i∈k} (⟨g_i,u_k⟩ − mean_k)² / (b − K)`` and
    ``orthogonality_variance = Σ_k Σ_{i∈k} (‖g_i‖² − ⟨g_i,u_k⟩²) / (b − K)`` over all ``K``
    micro-batches of all ranks; with one micro-batch on one rank they are exact.

    Distributed. When ``torch.distributed`` is initialised, :meth:`result` sums the accumulators
    of all ranks with one ``all_reduce`` (it carries the per-parameter gradient sums, needed for
    the exact ``‖ḡ‖²`` of the global batch), so every rank returns the same global statistics.
    Call it on every rank. Under FSDP2 (``torch.distributed.fsdp.fully_shard``, parameters stored
    as DTensor shards) the gradient hooks go on the whole parameters FSDP gathers for each
    module's forward, before its reduce-scatter, so the results equal DDP's (``fuse_weight_grads``
    is then off: it would hand autograd gradients for the shards). FSDP1
    (``FullyShardedDataParallel``, flat parameters that mix layers) is refused.

    Example::

        stats = GradientStatistics(model)
        with stats.capture():
            F.cross_entropy(model(x), y).backward()
        s = stats.result()
        s.noise_scale  # 0-d float32 tensor on the model's device
    """

    def __init__(
        self,
        model: nn.Module,
        loss_reduction: Literal["mean", "sum"] = "mean",
        *,
        per_coordinate: bool = False,
        num_groups: int | None = None,
        fallback: str | None = None,
        inner_products: bool = True,
        grad_scaler: Any | None = None,
        fuse_weight_grads: bool = True,
        paths: Mapping[str, str] | str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if num_groups is not None and (
            isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1
        ):
            raise ValueError(f"num_groups must be a positive int or None, got {num_groups!r}")
        if fallback is not None and fallback not in FALLBACKS:
            raise ValueError(f"fallback must be None or one of {FALLBACKS}, got {fallback!r}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        _refuse_fsdp1(model)
        self.model = model
        # FSDP2 (fully_shard, possibly applied after this constructor): parameters are DTensor
        # shards outside a module's forward; read at every attach()
        self._sharded = False
        self.loss_reduction = loss_reduction
        self.per_coordinate = bool(per_coordinate)
        self.num_groups = num_groups
        self.fallback = fallback
        self.inner_products = bool(inner_products)
        self.grad_scaler = grad_scaler
        self.fuse_weight_grads = bool(fuse_weight_grads)
        self._target: dict[str, Tensor] | None = None
        self._handles: list[Any] = []
        self._attached: _MicroBatch | None = None
        self._mode = "per_sample"
        self._buffers: dict[int, Tensor] = {}
        self._module_list = list(model.modules())  # walked at every attach: listed once
        self._sites = self._discover()
        self._planner = PathPlanner(paths)
        self._paths_memo: dict[tuple, tuple[str, ...]] = {}
        unknown = sorted(set(self._planner.overrides) - {s.name for s in self._sites if s.may_fuse})
        if unknown:
            valid = [s.name for s in self._sites if s.may_fuse]
            raise ValueError(
                f"paths names {unknown}, which are not Linear/Conv layers of the model; "
                f"valid: {valid}"
            )
        self._batchnorms = [
            (name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)
        ]
        self._plan_replays()
        # modules whose operations the op-level path could not follow -> why (replayed instead)
        self._op_refused: dict[str, str] = {}
        self._audit: UseAudit | None = None  # the first capture's check of the uses (audit.py)
        self._audited = False
        self.reset()

    # ------------------------------------------------------------------ set-up
    def _discover(self) -> list[_Site]:
        sites: list[_Site] = []
        owner: dict[int, tuple[str, _Site]] = {}
        for mname, module in self.model.named_modules():
            params = {
                pname: (f"{mname}.{pname}" if mname else pname, p)
                for pname, p in module.named_parameters(recurse=False)
                if p.requires_grad
            }
            if not params:
                continue
            site = _Site(mname or "<root>", module, find_rule(module), params)
            for local, (full, p) in params.items():
                if id(p) in owner:  # tied weights: one name (named_parameters' first), summed uses
                    first, other = owner[id(p)]
                    params[local] = (first, p)
                    site.shared = other.shared = True
                else:
                    owner[id(p)] = (full, site)
            sites.append(site)
        return sites

    def _unsupported(self) -> str | None:
        """A message for the first module the exact hooks cannot handle, or None."""
        coupled = [
            f"'{mname or '<root>'}' ({type(module).__name__})"
            for mname, module in self._batchnorms
            if module.training or module.running_mean is None
        ]
        if coupled:
            more = f" and {len(coupled) - 8} more" if len(coupled) > 8 else ""
            return (
                f"BatchNorm modules {', '.join(coupled[:8])}{more} normalise with batch statistics "
                "(training mode or track_running_stats=False), which couples the samples of a "
                "batch: per-sample gradients are not defined. Choose one: put them in eval mode "
                "(model.eval() or module.eval(): running statistics act per sample); replace "
                "them with GroupNorm or LayerNorm; or pass fallback='groups' (the variance from "
                "the gradient means of micro-batches and ranks, which keeps BatchNorm's batch "
                "coupling inside each group; needs at least two micro-batches or ranks)"
            )
        for site in self._sites:
            if site.rule is None:  # exact per-sample replay (see uses.py)
                continue
            try:
                site.rule.check(site.name, site.module)
            except UnsupportedModuleError as err:
                return str(err)
        return None

    @property
    def device(self) -> torch.device:
        for site in self._sites:  # the module's current parameter (FSDP2 may have replaced it)
            for local, (_, p) in site.params.items():
                return site.module._parameters.get(local, p).device
        return torch.device("cpu")

    # ------------------------------------------------------------------ public API
    def set_target(self, target: Mapping[str, Tensor] | None) -> None:
        """Set the direction ``d`` (parameter name -> tensor) for ``group_grad_dots``; None clears.

        Parameters absent from ``target`` count as zero.
        """
        if target is None:
            self._target = None
            return
        names = {full: p for site in self._sites for full, p in site.params.values()}
        out: dict[str, Tensor] = {}
        for k, v in target.items():
            if k not in names:
                raise ValueError(f"set_target: unknown parameter name {k!r}")
            if tuple(v.shape) != tuple(names[k].shape):
                raise ValueError(
                    f"set_target: {k!r} has shape {tuple(v.shape)}, parameter has "
                    f"{tuple(names[k].shape)}"
                )
            out[k] = v.detach().to(device=self.device, dtype=torch.float32)
        self._target = out

    def reset(self) -> None:
        """Forget everything captured since the last :meth:`result`."""
        self._records: list[_MicroBatch] = []
        self._grad_sums: dict[str, Tensor] = {}
        self._coord: dict[str, Tensor] = {}

    # what a finished capture keeps for result() (the rest of _MicroBatch lives during capture)
    _RECORD_FIELDS = ("group_ids", "size", "sq", "inner", "sum_sq", "target_dots", "inv_scale")

    def state_dict(self) -> dict[str, Any]:
        """What was captured since the last :meth:`result` (and the target direction), so that a
        run checkpointed between captures of one batch resumes with the same result. Tensors,
        ints and None only: it loads with ``torch.load(..., weights_only=True)``."""
        if self._attached is not None:
            raise RuntimeError("state_dict() called while attached; call detach() first")
        return {
            "records": [{f: getattr(mb, f) for f in self._RECORD_FIELDS} for mb in self._records],
            "grad_sums": dict(self._grad_sums),
            "coord": dict(self._coord),
            "target": None if self._target is None else dict(self._target),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (tensors moved to the model's device)."""
        if self._attached is not None:
            raise RuntimeError("load_state_dict() called while attached; call detach() first")
        dev = self.device

        def to(x: Any) -> Any:
            return x.to(dev) if isinstance(x, Tensor) else x

        self.reset()
        for rec in state["records"]:
            mb = _MicroBatch(to(rec["group_ids"]))
            for f in self._RECORD_FIELDS[1:]:
                setattr(mb, f, to(rec[f]))
            self._records.append(mb)
        self._grad_sums = {k: to(v) for k, v in state["grad_sums"].items()}
        self._coord = {k: to(v) for k, v in state["coord"].items()}
        target = state["target"]
        self._target = None if target is None else {k: to(v) for k, v in target.items()}

    @property
    def _current(self) -> _MicroBatch | None:
        """The micro-batch being captured; None outside ``attach``/``detach`` and during a
        :func:`side_pass` (another component's own forward/backward, which is not a sample of
        the batch)."""
        return None if _SIDE_PASSES else self._attached

    @_current.setter
    def _current(self, mb: _MicroBatch | None) -> None:
        self._attached = mb

    def plan(self) -> list[PlanEntry]:
        """How each Linear/Conv layer was handled at its latest capture: the path (compiled
        kernel, materialised per-sample gradients, or autograd with the Gram form), why
        (measured, cost model, override, only path) and the timings measured, if any (see
        :mod:`adaptive.stats.planner`). Empty before the first capture."""
        return self._planner.plan()

    @contextlib.contextmanager
    def capture(self, group_ids: Tensor | None = None) -> Iterator[GradientStatistics]:
        """Hooks live only inside the block: run one micro-batch's forward and backward in it."""
        self.attach(group_ids=group_ids)
        try:
            yield self
        finally:
            self.detach()

    def attach(self, group_ids: Tensor | None = None) -> None:
        """Start capturing one micro-batch (the non-context form of :meth:`capture`)."""
        if self._attached is not None:
            raise RuntimeError("GradientStatistics is already attached; call detach() first")
        if self.num_groups is None and group_ids is not None:
            raise ValueError("group_ids given but num_groups is None; set num_groups=G")
        if self.num_groups is not None:
            if group_ids is None:
                raise ValueError("num_groups is set: pass group_ids, a (b,) int64 tensor")
            if not isinstance(group_ids, Tensor) or group_ids.dim() != 1:
                raise ValueError(
                    f"group_ids must be a 1-D int64 tensor, got {type(group_ids).__name__} "
                    f"of shape {tuple(getattr(group_ids, 'shape', ()))}"
                )
            if group_ids.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
            group_ids = group_ids.to(self.device, torch.int64)
        problem = self._unsupported()
        self._mode = "per_sample"
        if problem is not None:
            if self.fallback is None:
                raise UnsupportedModuleError(problem)
            self._mode = "groups"
        self._current = _MicroBatch(group_ids)
        # FSDP2: autograd sees the whole parameters FSDP puts on each module for its forward;
        # hook those (fusing would hand gradients to the shards instead, so it is off)
        self._sharded = any(
            isinstance(p, DTensor) for m in self._module_list for p in m._parameters.values()
        )
        # the micro-batch size is axis 0 of the first tensor input of the first module called
        # (the outermost: the model, or the part of it a LightningModule's training_step calls,
        # positionally or by keyword); these hooks go as soon as one has fired
        self._size_handles = [
            m.register_forward_pre_hook(self._on_model_input, with_kwargs=True)
            for m in self._module_list
        ]
        self._handles.extend(self._size_handles)
        if self._mode == "per_sample" and not self._sharded:
            self._hook_leaves()  # every gradient accounted for; shared parameters summed
        for site in self._sites:
            if self._mode == "per_sample" and site.rule is None:
                if self._sharded:
                    raise UnsupportedModuleError(
                        f"module '{site.name}' ({type(site.module).__name__}) has no per-sample "
                        "rule, and its replay is not supported on sharded (FSDP2) parameters; "
                        "register_rule() for it, or use DDP"
                    )
                # no rule: exact per-sample gradients by replaying the module (uses.py)
                self._handles.append(
                    site.module.register_forward_pre_hook(
                        partial(self._on_replay_pre, site), with_kwargs=True
                    )
                )
                self._handles.append(
                    site.module.register_forward_hook(
                        partial(self._on_replay_forward, site), with_kwargs=True
                    )
                )
                continue
            # a layer that may fuse gets its parameter hooks from its pre-forward hook, and only
            # if it does not fuse: a fused layer's gradients come from the sensor itself
            lazy = (
                self._mode == "per_sample"
                and self.fuse_weight_grads
                and not self._sharded
                and site.may_fuse
                and not site.shared  # tied weights: every use's per-sample gradients are kept
            )
            if self._mode == "per_sample":
                if lazy:
                    self._handles.append(
                        site.module.register_forward_pre_hook(partial(self._on_pre_forward, site))
                    )
                self._handles.append(
                    site.module.register_forward_hook(partial(self._on_forward, site))
                )
            if self._sharded:
                self._handles.append(
                    site.module.register_forward_pre_hook(partial(self._hook_unsharded, site))
                )
                continue
            if not lazy:
                self._hook_params(site)
        if self._mode == "per_sample" and not self._sharded and not self._audited:
            self._audit = UseAudit(self._allowed_users())
            self._audit.__enter__()

    def _allowed_users(self) -> dict[int, tuple[Tensor, str, list[nn.Module]]]:
        """id(parameter) -> (it, its name, the modules that may use it: those holding it, and
        the modules without a rule above them, whose replay differentiates it)."""
        allowed: dict[int, tuple[Tensor, str, list[nn.Module]]] = {}
        above: dict[str, list[nn.Module]] = {}
        for site in self._sites:
            for _, below in self._replays.get(site.name, []):
                above.setdefault(below.name, []).append(site.module)
        for site in self._sites:
            for full, p in site.params.values():
                entry = allowed.setdefault(id(p), (p, full, []))
                entry[2].extend([site.module, *above.get(site.name, [])])
        return allowed

    def detach(self) -> None:
        """Stop capturing; the micro-batch counts if a backward pass reached the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._attached is not None:
            self._flush_small(self._attached)  # while the micro-batch is still the current one
        mb, self._attached = self._attached, None
        if mb is not None:  # a forward that raised leaves watched calls open: close them
            for call in mb.op_calls:
                call.cancelled = True
                WATCH.pop(call)
            mb.op_calls.clear()
        if self._audit is not None:
            self._audit.close()
            self._audit = None
            self._audited = mb is not None and mb.size is not None
            if mb is not None:
                self._check_sums(mb)
        if mb is not None:  # a forward that raised leaves parameters switched off: restore
            for params in mb.toggled.values():
                for _, p in params:
                    p.requires_grad_(True)
                    TOGGLED.discard(id(p))
            mb.toggled.clear()
        # it counts if its backward reached the hooks (a forward that raised leaves nothing)
        if mb is not None and mb.size is not None and (mb.sq is not None or mb.sum_sq is not None):
            if mb.group_ids is not None and mb.group_ids.shape[0] != mb.size:
                raise ValueError(
                    f"group_ids has {mb.group_ids.shape[0]} entries but the micro-batch has "
                    f"{mb.size} samples"
                )
            mb.pending.clear()
            self._records.append(mb)

    # ------------------------------------------------------------------ hooks
    def _hook_unsharded(self, site: _Site, module: nn.Module, args: tuple) -> None:
        """FSDP2: hook the whole parameters FSDP has just put on ``module`` for this forward."""
        if self._current is None or not torch.is_grad_enabled():
            return
        for local, (full, _) in site.params.items():
            p = module._parameters.get(local)
            if p is not None and not isinstance(p, DTensor) and not p.requires_grad:
                continue  # frozen since the sensor was built
            if p is None or isinstance(p, DTensor):
                raise UnsupportedModuleError(
                    f"parameter '{full}' is still sharded (DTensor) while '{site.name}' runs: "
                    "the statistics need the whole gradient of each parameter; shard with "
                    "torch.distributed.fsdp.fully_shard (FSDP2), which unshards for the forward"
                )
            self._handles.append(p.register_hook(partial(self._on_param_grad, site, local, full)))

    def _scale_factor(self) -> float:
        """Raw micro-batch sums are weighted by m_k (mean) so that K·Σ_k m_k·raw_k = Σ_i g_i."""
        mb = self._current
        assert mb is not None and mb.size is not None
        return float(mb.size) if self.loss_reduction == "mean" else 1.0

    def _start(self, mb: _MicroBatch, size: int, name: str) -> None:
        if mb.size is None:
            mb.size = size
            scaler = self.grad_scaler
            if scaler is not None and getattr(scaler, "_enabled", True):
                scale = getattr(scaler, "_scale", None)
                if isinstance(scale, Tensor):
                    mb.inv_scale = scale.detach().float().reciprocal().reshape(())
                else:
                    mb.inv_scale = torch.tensor(1.0 / float(scaler.get_scale()), device=self.device)
        elif mb.size != size:
            raise ValueError(
                f"module '{name}' sees {size} samples on axis 0 but another layer saw {mb.size}; "
                "GradientStatistics needs the sample axis first in every layer"
            )

    def _on_model_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mb = self._current
        if mb is None or mb.size is not None or not torch.is_grad_enabled():
            return
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, Tensor) and leaf.dim() > 0:
                self._start(mb, leaf.shape[0], "<root>")
                mb.autocast = torch.is_autocast_enabled(leaf.device.type)
                for h in self._size_handles:
                    h.remove()
                # the outermost call's end closes what ops.py still follows
                self._handles.append(
                    module.register_forward_hook(self._on_outer_forward, always_call=True)
                )
                return

    def _on_forward(self, site: _Site, module: nn.Module, args: tuple, output: Any) -> Any:
        mb = self._current
        if mb is None or not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return None
        if replaying() or (not output.requires_grad and site.name not in mb.toggled):
            return None
        self._refuse_recompute(site.name)
        # a second call is a second use of the parameters: their per-sample gradients are then
        # summed over the uses (uses.py)
        mb.seen.add(site.name)
        mb.calls[site.name] = mb.calls.get(site.name, 0) + 1
        a = args[0].detach() if args else None
        if a is None:
            raise RuntimeError(f"module '{site.name}' was called without a positional input")
        if self._no_samples(mb, args[0]):  # a function of its parameters: follow the output
            self._linger(site, output)
            return None
        self._use(mb, (f for f, _ in site.params.values()))
        if site.name in mb.deferred:  # another sensor fused it and has switched it back on
            mb.deferred.discard(site.name)
            if site.name not in mb.params_hooked:
                mb.params_hooked.add(site.name)
                self._hook_params(site)
        handler = partial(self._on_output_grad, site, a)
        k = None if mb.size is None or a.shape[0] == mb.size else sample_major(args[0], mb.size)
        if k is not None:  # (b·k, …) rows, proven sample-major: the rule sees (b, k, …)
            b = mb.size
            a = a.reshape(b, k, *a.shape[1:])
            handler = partial(self._on_flat_output_grad, site, a)
        elif mb.size is not None and a.dim() > 0 and a.shape[0] not in (mb.size, 1):
            raise UnsupportedModuleError(
                f"module '{site.name}' ({type(module).__name__}) sees {a.shape[0]} rows on axis "
                f"0 while the batch has {mb.size} samples, and the autograd graph does not show "
                "them to be the samples flattened sample-major with another axis (flatten.py): "
                "the sensor reads axis 0 as the sample axis. Keep the samples first "
                "(x.reshape(b, -1, d)), or pass fallback='groups'"
            )
        if isinstance(output, BatchBroadcast):  # another sensor expanded it already
            a = a.expand(output._expanded.shape[0], *a.shape[1:])
            output._expanded.register_hook(partial(self._on_output_grad, site, a))
            return None
        if self._broadcast(mb, a):  # one call for the whole batch: per-sample δ from expansion
            wrapped, expanded = broadcast_output(site.name, output, mb.size)
            expanded.register_hook(
                partial(self._on_output_grad, site, a.expand(mb.size, *a.shape[1:]))
            )
            return wrapped
        toggled = mb.toggled.pop(site.name, None)
        if toggled is not None:
            for _, p in toggled:
                p.requires_grad_(True)
                TOGGLED.discard(id(p))
            plan = mb.plans.pop(site.name)
            handler = partial(self._fused_or_shared, site, a, [local for local, _ in toggled], plan)
            return _FusedWeightGrads.apply(output, handler, *[p for _, p in toggled])
        return _grad_hook(output, handler)

    def _on_flat_output_grad(self, site: _Site, a: Tensor, grad: Tensor) -> None:
        self._on_output_grad(site, a, grad.reshape(*a.shape[:2], *grad.shape[1:]))

    @staticmethod
    def _no_samples(mb: _MicroBatch, x: Tensor) -> bool:
        """Whether a layer input is a constant without the sample axis (T5's (q, k) relative
        position ids): the layer's output is then a function of its parameters alone."""
        return (
            mb.size is not None
            and mb.size > 1
            and x.dim() > 0
            and x.shape[0] not in (mb.size, 1)
            and not x.requires_grad
        )

    def _linger(self, site: _Site, output: Tensor) -> None:
        """Follow a ruled layer's output through the operations that bring it to the samples
        (ops.py), until the outermost forward returns."""
        mb = self._current
        params = {full: p for full, p in site.params.values()}
        call = OpCall(site.name, mb.size, params, self._on_op_grad)
        WATCH.push(call)
        WATCH.track(output, call)
        mb.op_calls.append(call)
        mb.lingering.append(call)
        mb.op_params.update(params)

    @staticmethod
    def _flattened(mb: _MicroBatch, a: Tensor) -> bool:
        """Whether a layer input holds more rows than samples (flattened: see flatten.py); such a
        layer takes autograd's path, whose output hook reshapes."""
        return mb.size is not None and a.dim() > 0 and a.shape[0] != mb.size

    @staticmethod
    def _broadcast(mb: _MicroBatch, a: Tensor) -> bool:
        """Whether a layer input is broadcast over the model's batch (axis 0 of size 1)."""
        return mb.size is not None and mb.size > 1 and a.dim() > 0 and a.shape[0] == 1

    def _hook_params(self, site: _Site) -> None:
        for local, (full, p) in site.params.items():
            self._handles.append(p.register_hook(partial(self._on_param_grad, site, local, full)))

    def _on_pre_forward(self, site: _Site, module: nn.Module, args: tuple) -> None:
        mb = self._current
        if mb is None or not torch.is_grad_enabled() or site.name in mb.seen or replaying():
            return
        if any(id(p) in TOGGLED for _, p in site.params.values()):
            mb.deferred.add(site.name)  # another sensor fuses this call: hook it after
            return
        if (
            args
            and isinstance(args[0], Tensor)
            and (self._broadcast(mb, args[0]) or self._flattened(mb, args[0]))
        ):
            if site.name not in mb.params_hooked:  # unfused: see _on_forward
                mb.params_hooked.add(site.name)
                self._hook_params(site)
            return
        path = "torch"
        toggled = [(local, p) for local, (_, p) in site.params.items() if p.requires_grad]
        if (
            args
            and isinstance(args[0], Tensor)
            and site.rule is not None
            and not site.float64  # the sensor works in float32: leave double gradients to autograd
        ):
            names = frozenset(local for local, _ in toggled)
            a = args[0]
            memo = (
                site.name,
                a.shape,
                a.dtype,
                a.device.type,
                names,
                os.environ.get("ADAPTIVE_NATIVE"),
            )
            candidates = self._paths_memo.get(memo)
            if candidates is None:  # the rule's answer depends only on what the memo key holds
                candidates = self._paths_memo[memo] = site.rule.paths(module, a, names)
            options = (self.per_coordinate, self.inner_products, self._target is not None)
            path, key = self._planner.choose(site.name, module, args[0], candidates, options)
            if path == "measure":
                mb.plans[site.name] = (key, candidates)
        if path == "torch":
            if site.name not in mb.params_hooked:  # autograd computes these gradients
                mb.params_hooked.add(site.name)
                self._hook_params(site)
            return
        mb.plans.setdefault(site.name, (None, (path,)))
        for _, p in toggled:
            p.requires_grad_(False)
            TOGGLED.add(id(p))
        mb.toggled[site.name] = toggled

    # Per-sample gradients are materialised for at most this many elements at once (64 MiB of
    # float32); a larger batch goes through in chunks of samples.
    _CHUNK_ELEMENTS = 1 << 24

    def _workspace(self, shape: tuple[int, ...], slot: int = 0) -> Tensor:
        """A float32 CPU buffer of ``shape`` for per-sample gradients (slot 0) or scratch operands
        (other slots), reused from step to step.

        Freshly allocated large tensors are fresh pages, and on CPU each page costs a fault on
        first touch (several milliseconds per step on the benchmark's VM); CUDA's caching allocator
        reuses its memory already, so this is only used on CPU. One set of buffers serves every
        layer: backward hands the sensor one layer at a time.
        """
        n = math.prod(shape)
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < n:
            buf = self._buffers[slot] = torch.empty(n, dtype=torch.float32)
        return buf[:n].view(shape)

    def _on_fused_grad(
        self,
        site: _Site,
        a: Tensor,
        locals_: list[str],
        plan: tuple[tuple | None, tuple[str, ...]],
        grad: Tensor,
    ) -> tuple[Tensor, ...]:
        rule = site.rule
        assert rule is not None
        d = grad.detach()
        mb = self._current
        names = frozenset(locals_)
        out = self._workspace if d.device.type == "cpu" else None
        if mb is not None:
            self._start(mb, d.shape[0], site.name)
        key, paths = plan
        if key is not None and mb is not None:  # first call of this shape: time every path
            # materialising in several chunks never wins: not worth a trial (it counts as slow)
            per = site.rule.elements_per_sample(site.module, a, d, names, out is not None)
            chunked = per * d.shape[0] > self._CHUNK_ELEMENTS
            runs = {
                p: None
                if p == "materialise" and chunked
                else partial(self._fused_values, p, site, a, d, names, out, True)
                for p in paths
            }
            _, values = self._planner.measure(site.name, site.module, a, key, runs)
        else:
            path = next((p for p in paths if p != "torch"), paths[0])
            values = self._fused_values(path, site, a, d, names, out, mb is not None)
        sums, sq, coords, dots, inner = values
        if mb is not None:
            mb.sq = _add(mb.sq, sq)
            for k in locals_:
                self._add_grad(mb, site.params[k][0], sums[k])
                if coords is not None:
                    self._add_coordinates(mb, site.params[k][0], coords[k])
            if dots is not None:
                mb.target_dots = _add(mb.target_dots, dots)
            if inner is not None:
                mb.inner = _add(mb.inner, inner)
        return tuple(sums[k].to(site.params[k][1].dtype) for k in locals_)

    def _fused_values(
        self,
        path: str,
        site: _Site,
        a: Tensor,
        d: Tensor,
        names: frozenset[str],
        out: Any,
        stats: bool,
    ) -> tuple[dict[str, Tensor], Tensor | None, dict[str, Tensor] | None, Any, Any]:
        """One fused layer's ``(Σ_i g_i per parameter, ‖g_i‖², Σ_i g_i² per parameter or None,
        ⟨g_i, target⟩ or None, ⟨g_i, Σ_j g_j⟩ or None)`` by ``path`` (see
        :mod:`adaptive.stats.planner`; every path gives the same values); only the sums where
        not ``stats`` (a backward after ``detach()``)."""
        rule = site.rule
        assert rule is not None
        module = site.module
        coords = dots = inner = None
        if path in ("native", "torch"):
            if path == "native":
                native_values = rule.native_sums(module, a, d, names, out, self.per_coordinate)
                assert native_values is not None
                sums, sq, coords = native_values
            else:
                with _float32(d.device.type):
                    sums = rule.batch_grads(module, a, d, names)
                    sq = rule.sq_norms(module, a, d, names) if stats else None
                    if stats and self.per_coordinate:
                        coords = rule.coordinate_sq(module, a, d, names)
            if not stats:
                return sums, None, None, None, None
            with _float32(d.device.type):
                # pairings with a fixed direction: ⟨g_i, D⟩ without per-sample gradients
                if self._target is not None:
                    dirs = {
                        k: self._target[site.params[k][0]]
                        for k in names
                        if site.params[k][0] in self._target
                    }
                    if dirs:
                        dots = rule.dot(module, a, d, dirs)
                if self.inner_products:
                    inner = rule.dot(module, a, d, sums)
            return sums, sq, coords, dots, inner
        b = d.shape[0]
        per_sample = rule.elements_per_sample(module, a, d, names, out is not None)
        chunk = max(1, self._CHUNK_ELEMENTS // max(1, per_sample))
        chunk = -(-b // -(-b // chunk))  # equal chunks: one kernel shape, not a ragged last one

        def chunks() -> Iterator[dict[str, Tensor]]:
            for s in range(0, b, chunk):
                yield rule.per_sample_params(module, a[s : s + chunk], d[s : s + chunk], names, out)

        # per-sample tensors may be permuted views: reduce over dims, never reshape
        # (a reshape would copy with a bad stride pattern).
        def rest(g: Tensor) -> tuple[int, ...]:
            return tuple(range(1, g.dim()))

        with _float32(d.device.type):
            sums: dict[str, Tensor] = {}
            sq_parts: list[Tensor] = []
            dot_parts: list[Tensor] = []
            per: dict[str, Tensor] = {}
            for per in chunks():
                for k, g in per.items():
                    sums[k] = _add(sums.get(k), _batch_sum(g))
                if not stats:
                    continue
                # the norm reduces without a squared copy of the per-sample gradients
                sq_parts.append(
                    sum(torch.linalg.vector_norm(g, dim=rest(g)).square() for g in per.values())
                )
                if self._target is not None:
                    dot = None
                    for k, g in per.items():
                        t = self._target.get(site.params[k][0])
                        if t is not None:
                            dot = _add(dot, (g * t).sum(rest(g)))
                    if dot is not None:
                        dot_parts.append(dot)
                if self.per_coordinate:
                    for k, g in per.items():
                        coords = coords or {}
                        coords[k] = _add(coords.get(k), g.square().sum(0))
            if not stats:
                return sums, None, None, None, None
            sq = torch.cat(sq_parts) if len(sq_parts) > 1 else sq_parts[0]
            if dot_parts:
                dots = torch.cat(dot_parts) if len(dot_parts) > 1 else dot_parts[0]
            if self.inner_products:
                # ⟨g_i, Σ_j g_j⟩ needs the whole sum first: one chunk is still at hand,
                # several are rebuilt
                parts = []
                for p in [per] if chunk >= b else chunks():
                    parts.append(sum((g * sums[k]).sum(rest(g)) for k, g in p.items()))
                inner = torch.cat(parts) if len(parts) > 1 else parts[0]
        return sums, sq, coords, dots, inner

    def _on_output_grad(self, site: _Site, a: Tensor, grad: Tensor) -> None:
        mb = self._current
        if mb is None:  # backward ran after detach(): nothing to record
            return
        rule = site.rule
        assert rule is not None
        module = site.module
        self._start(mb, grad.shape[0], site.name)
        d = grad.detach()
        names = self._shared_output_grad(site, a, d)  # parameters used once
        if not names:
            return
        with _float32(d.device.type):
            mb.sq = _add(mb.sq, rule.sq_norms(module, a, d, names))
            if self._target is not None:
                dirs = {
                    loc: self._target[f]
                    for loc, (f, _) in site.params.items()
                    if f in self._target and loc in names
                }
                if dirs:
                    mb.target_dots = _add(mb.target_dots, rule.dot(module, a, d, dirs))
            if self.per_coordinate:
                for loc, c in rule.coordinate_sq(module, a, d, names).items():
                    self._add_coordinates(mb, site.params[loc][0], c)
        if self.inner_products:
            mb.pending[site.name] = [a, d, len(names)]

    def _on_param_grad(self, site: _Site, local: str, full: str, grad: Tensor) -> None:
        mb = self._current
        if mb is None or full in mb.op_params:  # followed by ops.py, accounted there
            return
        if mb.size is None:
            raise RuntimeError(
                "GradientStatistics: a parameter gradient arrived before the micro-batch size was "
                "known (no hooked layer and no tensor input to the model's forward)"
            )
        if self._multi(mb, full):  # summed over its uses by the leaf hook (uses.py)
            return
        g = grad.detach()
        with _float32(g.device.type):
            g32 = g.float()
            self._add_grad(mb, full, g32)
            pend = mb.pending.get(site.name)
            if pend is not None:
                a, d, left = pend
                assert site.rule is not None
                mb.inner = _add(mb.inner, site.rule.dot(site.module, a, d, {local: g32}))
                if left <= 1:
                    del mb.pending[site.name]
                else:
                    pend[2] = left - 1

    def _add_grad(self, mb: _MicroBatch, full: str, g32: Tensor) -> None:
        """Add one parameter's raw micro-batch gradient (float32) to the accumulators."""
        w = self._scale_factor()
        contrib = g32 * w if mb.inv_scale is None else g32 * (mb.inv_scale * w)
        prev = self._grad_sums.get(full)
        self._grad_sums[full] = contrib if prev is None else prev + contrib
        if self._mode == "groups" or self.inner_products:
            mb.sum_sq = _add(mb.sum_sq, g32.square().sum())

    def _add_coordinates(self, mb: _MicroBatch, full: str, raw_sq: Tensor) -> None:
        """Add ``Σ_i (raw g_i)²`` of one parameter (float32) to the per-coordinate sums."""
        w = self._scale_factor() ** 2
        c = raw_sq * (w if mb.inv_scale is None else w * mb.inv_scale.square())
        prev = self._coord.get(full)
        self._coord[full] = c if prev is None else prev + c

    # ------------------------------------------------------------------ result
    def result(self, *, loss_divisor: float | None = None) -> StatisticsResult:
        """Statistics of everything captured since the last result()/reset(); then reset.

        Args:
            loss_divisor: the number each micro-batch's loss was divided by. Default: the number
                of captures for ``loss_reduction="mean"`` (the accumulation convention), 1 for
                ``"sum"``. Lightning divides by ``accumulate_grad_batches`` even in a shorter
                last window of an epoch: pass that number.
        """
        from adaptive.stats.fallback import group_variance

        if self._attached is not None:
            raise RuntimeError("result() called while attached; call detach() first")
        records = self._records
        if not records:
            raise RuntimeError(
                "result(): nothing was captured; run forward and backward inside capture()"
            )
        device = self.device
        f32 = torch.float32
        k_local = len(records)
        if loss_divisor is None:
            mult = float(k_local) if self.loss_reduction == "mean" else 1.0
        elif (
            isinstance(loss_divisor, bool)
            or not isinstance(loss_divisor, (int, float))
            or not (loss_divisor > 0)
        ):
            raise ValueError(f"loss_divisor must be a positive number, got {loss_divisor!r}")
        else:
            mult = float(loss_divisor)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        per_sample = self._mode == "per_sample"

        def c(mb: _MicroBatch) -> float:  # g_i = c_k · raw_i
            return (mb.size if self.loss_reduction == "mean" else 1.0) * mult

        def inv(mb: _MicroBatch) -> Tensor | float:
            return 1.0 if mb.inv_scale is None else mb.inv_scale

        # ---- local accumulators (all additive across ranks)
        names = sorted(self._grad_sums)
        grad_sums = [self._grad_sums[n].reshape(-1) for n in names]
        if mult != 1.0 and world > 1:  # one process folds mult into the scalars below
            grad_sums = [t * mult for t in grad_sums]
        count = torch.tensor(float(sum(mb.size for mb in records)), device=device, dtype=f32)
        n_groups_k = torch.tensor(float(k_local), device=device, dtype=f32)
        scalars: list[Tensor] = [count, n_groups_k]
        sq_list: list[Tensor] = []
        if per_sample:
            sq_list = [mb.sq * (c(mb) ** 2) * (inv(mb) ** 2) for mb in records]  # type: ignore[operator]
            per_sample_sq = torch.cat(sq_list).to(f32)
            scalars.append(per_sample_sq.sum())
            if self.inner_products:
                within = torch.zeros((), device=device, dtype=f32)
                proj_sq = torch.zeros((), device=device, dtype=f32)
                for mb in records:
                    assert mb.inner is not None and mb.sum_sq is not None
                    y = mb.inner * (c(mb) * inv(mb)) * torch.rsqrt(mb.sum_sq.clamp_min(1e-30))
                    within = within + (y.square().sum() - y.sum().square() / mb.size)
                    proj_sq = proj_sq + y.square().sum()
                scalars += [within, proj_sq]
        else:
            q = torch.zeros((), device=device, dtype=f32)
            for mb in records:
                assert mb.sum_sq is not None
                q = q + mb.sum_sq * (c(mb) ** 2 / mb.size) * (inv(mb) ** 2)
            scalars.append(q)
        vectors: list[Tensor] = []
        if self.num_groups is not None:
            gn = self.num_groups
            ids = torch.cat([mb.group_ids for mb in records])  # type: ignore[misc]
            counts = torch.zeros(gn, device=device, dtype=f32).index_add_(
                0, ids, torch.ones(ids.shape[0], device=device, dtype=f32)
            )
            vectors.append(counts)
            if per_sample:
                vectors.append(
                    torch.zeros(gn, device=device, dtype=f32).index_add_(0, ids, per_sample_sq)
                )
                if self._target is not None:
                    dots = torch.cat(
                        [
                            (
                                mb.target_dots
                                if mb.target_dots is not None
                                else torch.zeros(mb.size, device=device)
                            )
                            * (c(mb) * inv(mb))
                            for mb in records
                        ]
                    ).to(f32)
                    vectors.append(
                        torch.zeros(gn, device=device, dtype=f32).index_add_(0, ids, dots)
                    )
        coord_names = sorted(self._coord) if self.per_coordinate and per_sample else []
        coords = [self._coord[n].reshape(-1) * (mult**2) for n in coord_names]

        if world > 1:
            # every accumulator crosses the ranks in one all_reduce
            flat_parts = [s.reshape(1) for s in scalars] + vectors + grad_sums + coords
            sizes = [t.numel() for t in flat_parts]
            flat = torch.cat([t.to(f32) for t in flat_parts])
            dist.all_reduce(flat)
            parts = list(torch.split(flat, sizes))
            n_sc, n_vec = len(scalars), len(vectors)
            sc = [p.reshape(()) for p in parts[:n_sc]]
            vec = parts[n_sc : n_sc + n_vec]
            gs = parts[n_sc + n_vec : n_sc + n_vec + len(grad_sums)]
            cs = parts[n_sc + n_vec + len(grad_sums) :]
            # one reduction over the gradient sums' stretch of the all-reduced buffer
            start = sum(sizes[: n_sc + n_vec])
            stretch = flat[start : start + sum(sizes[n_sc + n_vec :][: len(gs)])]
            grad_sq = torch.linalg.vector_norm(stretch).square()
        else:
            # one process: no buffer to build (copying every gradient sum into one costs more
            # than the reduction); mult scales the sums, so it scales ‖Σ‖² by mult²
            sc = [t.to(f32) for t in scalars]
            vec = [t.to(f32) for t in vectors]
            cs = [t.to(f32) for t in coords]
            gs = grad_sums if mult == 1.0 else [t * mult for t in grad_sums]
            if grad_sums:
                grad_sq = torch.stack(torch._foreach_norm(grad_sums)).square().sum()
                grad_sq = grad_sq.to(f32) * (mult * mult)
            else:
                grad_sq = torch.zeros((), device=device, dtype=f32)
        b = sc[0]
        k_total = sc[1]
        grad_sq = grad_sq / b.square()

        res: dict[str, Any] = {}
        if per_sample:
            ss = sc[2]
            variance = (ss - b * grad_sq) / (b - 1)
            res.update(per_sample_sq_norms=per_sample_sq, sum_sq_norms=ss)
            if self.inner_products:
                dof = b - k_total
                res["inner_product_variance"] = grad_sq * sc[3] / dof
                res["orthogonality_variance"] = (ss - sc[4]) / dof
        else:
            variance = group_variance(sc[2], grad_sq, b, k_total)
            res.update(per_sample_sq_norms=None, sum_sq_norms=None)
        if self.num_groups is not None:
            res["group_counts"] = vec[0]
            if per_sample:
                res["group_sum_sq_norms"] = vec[1]
                if self._target is not None:
                    res["group_grad_dots"] = vec[2]
        if self.per_coordinate:
            res["mean_grads"] = {
                n: (t / b).reshape(self._grad_sums[n].shape) for n, t in zip(names, gs, strict=True)
            }
            if per_sample:
                res["coordinate_sq_sums"] = {
                    n: t.reshape(self._coord[n].shape) for n, t in zip(coord_names, cs, strict=True)
                }
        local_b = sum(mb.size for mb in records)
        out = StatisticsResult(
            batch_size=int(local_b * world),
            grad_sq_norm=grad_sq,
            variance=variance,
            noise_scale=variance / grad_sq,
            num_micro_batches=k_local,
            world_size=world,
            method=self._mode,
            **res,
        )
        self.reset()
        return out
