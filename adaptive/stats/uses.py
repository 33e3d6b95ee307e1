"""Where the sensor's exactness needs more than one layer call at a time: parameters with several
uses in one forward, modules without a rule, and several sensors on one model.

- **Several uses.** Sample ``i``'s gradient of a parameter used ``k`` times (tied input and output
  embeddings, a layer applied twice, weights shared between layers) is the sum over the uses,
  ``g_i = Σ_u g_iu``, and ``‖g_i‖² = Σ_u ‖g_iu‖² + Σ_{u≠v} ⟨g_iu, g_iv⟩``: the cross terms need
  the per-sample gradients of every use. The forward hooks count each parameter's uses; in
  backward, the calls of a parameter used more than once write their per-sample gradients into
  one ``(b, *param.shape)`` buffer, which the parameter's own gradient hook (it fires once, after
  every use has contributed) turns into the statistics.
- **No rule.** A module whose computation no rule knows has its parameters followed through
  the operations they enter while it runs (:mod:`adaptive.stats.ops`: broadcast pointwise
  operations, expansions, normalisations; exact, at the cost of a reduction per use). Where an
  operation cannot be followed, the call falls back to :mod:`adaptive.stats.last_resort` (exact,
  at about one more forward and backward of that module; a warning names it once), and the module
  is replayed from then on. Parameters of child modules that its forward uses without calling
  the child (``nn.MultiheadAttention`` passes ``out_proj.weight`` to a functional call) are
  differentiated with it.
- **Every gradient accounted for.** Each parameter's gradient hook checks that some hooked call
  used the parameter in this capture; a gradient that arrives otherwise (the parameter used
  outside any module's forward) is refused by name instead of being left out of the norms.
- **Several sensors.** A sensor that finds a layer's parameters switched off by another sensor's
  fused path (the other one hands autograd that layer's gradient) hooks the layer like an
  unfused one, after the other has switched them back on; either sees exact numbers, whatever the
  order in which they were attached.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from adaptive.stats.hooks import _add, _batch_sum, _float32
from adaptive.stats.last_resort import ModuleCall, per_sample_grads, replaying, tap_outputs
from adaptive.stats.ops import WATCH, OpCall
from adaptive.stats.registry import per_sample_params
from adaptive.stats.rules import UnsupportedModuleError

if TYPE_CHECKING:
    from adaptive.stats.statistics import _MicroBatch, _Site

# ids of parameters whose requires_grad a sensor's fused path has switched off right now
TOGGLED: set[int] = set()
# op-level per-sample gradients of at most this many numbers per sample are accounted together
_SMALL = 1 << 12


def _rest(g: Tensor) -> tuple[int, ...]:
    return tuple(range(1, g.dim()))


class UseTracking:
    """Mixed into :class:`~adaptive.stats.statistics.GradientStatistics` (see the module docstring)."""

    # ------------------------------------------------------------------ set-up
    def _plan_replays(self) -> None:
        """For each module without a rule: the parameters its replay differentiates (its own,
        plus those of descendant layers, adopted when such a layer does not run during its
        call), by name relative to it."""
        self._replays: dict[str, list[tuple[str, _Site]]] = {}
        self._own: dict[str, dict[str, tuple[str, Tensor]]] = {}
        names = {s.module: s for s in self._sites}
        for site in self._sites:
            if site.rule is not None:
                continue
            below = []
            for rel, m in site.module.named_modules():
                if rel and m in names:
                    below.append((rel, names[m]))
            self._replays[site.name] = below
            # its own parameters, less those a layer with a rule inside it holds too (ALBERT's
            # head bias is its decoder's bias): the layer's rule accounts for them, and the
            # replay or the watch would count the layer's use a second time
            ruled = {id(p) for _, s in below if s.rule is not None for _, p in s.params.values()}
            self._own[site.name] = {
                loc: fp for loc, fp in site.params.items() if id(fp[1]) not in ruled
            }
        self._replay_warned: set[str] = set()

    def _hook_leaves(self) -> None:
        seen: set[int] = set()
        for site in self._sites:
            for full, p in site.params.values():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                self._handles.append(p.register_hook(partial(self._on_leaf_grad, full)))

    # ------------------------------------------------------------------ uses
    @staticmethod
    def _refuse_recompute(name: str) -> None:
        """A forward inside backward is a recomputation (activation checkpointing): its uses
        would be counted after some of the per-sample gradients were already reduced."""
        if torch._C._current_graph_task_id() != -1:
            raise UnsupportedModuleError(
                f"module '{name}' ran its forward during backward (activation checkpointing "
                "recomputes it): the sensor counts each parameter's uses in the forward, before "
                "any gradient. Capture without checkpointing, or pass fallback='groups'"
            )

    def _use(self, mb: _MicroBatch, fulls: Any) -> None:
        for full in fulls:
            mb.uses[full] = mb.uses.get(full, 0) + 1

    @staticmethod
    def _multi(mb: _MicroBatch, full: str) -> bool:
        return mb.uses.get(full, 0) > 1

    def _contribute(self, mb: _MicroBatch, full: str, g: Tensor) -> None:
        """One use's per-sample gradients ``(b, *shape)`` of parameter ``full``."""
        if self._multi(mb, full):
            g = g.float()
            prev = mb.shared.get(full)
            mb.shared[full] = g.clone() if prev is None else prev.add_(g)
        else:
            self._account(mb, full, g)

    def _account(self, mb: _MicroBatch, full: str, g: Tensor) -> None:
        """Every statistic of one parameter from its per-sample gradients ``(b, *shape)``."""
        with _float32(g.device.type):
            g = g.float()
            total = _batch_sum(g)
            mb.sq = _add(mb.sq, torch.linalg.vector_norm(g, dim=_rest(g)).square())
            self._add_grad(mb, full, total)
            if self.per_coordinate:
                self._add_coordinates(mb, full, g.square().sum(0))
            t = None if self._target is None else self._target.get(full)
            if t is not None:
                mb.target_dots = _add(mb.target_dots, (g * t).sum(_rest(g)))
            elif self._target is not None and mb.target_dots is None:
                mb.target_dots = torch.zeros(g.shape[0], device=g.device)
            if self.inner_products:
                mb.inner = _add(mb.inner, (g * total).sum(_rest(g)))

    def _on_leaf_grad(self, full: str, grad: Tensor) -> None:
        mb = self._current
        if mb is None or replaying():
            return
        if mb.uses.get(full, 0) == 0:
            raise UnsupportedModuleError(
                f"parameter '{full}' received a gradient, but no module that holds it ran "
                "inside this capture(): it is used outside its module's forward (by another "
                "module's functional call, or by an operation outside the model), where the "
                "sensor cannot see its per-sample gradients. Use it through its module, or "
                "pass fallback='groups'"
            )
        buf = mb.shared.pop(full, None)
        if buf is not None:
            self._account(mb, full, buf)
        total = mb.op_totals.pop(full, None)
        if buf is not None and not self._audited:
            total = buf.sum(0)
        if total is not None:  # judged at detach, against the largest gradient of the model
            g = grad.float()
            mb.sum_checks.append((full, (total - g).norm(), g.norm()))

    def _check_sums(self, mb: _MicroBatch) -> None:
        """First capture: the per-sample gradients the sensor summed for a parameter (its uses
        through ops.py, or every use of a parameter used several times) must add up to
        autograd's gradient, up to rounding (relative to the parameter's gradient, and to the
        model's largest, for gradients that vanish in exact arithmetic such as a key bias)."""
        if not mb.sum_checks:
            return
        names = [c[0] for c in mb.sum_checks]
        diff = torch.stack([c[1] for c in mb.sum_checks])
        norm = torch.stack([c[2] for c in mb.sum_checks])
        mb.sum_checks.clear()
        # autograd's own gradient carries the rounding of a reduced-precision autocast forward
        rtol = 3e-2 if mb.autocast else 1e-3
        bad = diff > rtol * norm + 1e-5 * norm.max()
        if bool(bad.any()):  # once, at the first capture
            j = int(bad.nonzero()[0, 0])
            err = float(diff[j] / norm[j].clamp_min(1e-30))
            raise UnsupportedModuleError(
                f"parameter '{names[j]}': its per-sample gradients (summed over the uses the "
                f"sensor saw) add up to a gradient {err:.1e} off autograd's: it has a use the "
                "sensor did not see (after the model's forward returned?). Use it inside the "
                "model's forward, register_rule() for its module, or pass fallback='groups'"
            )

    # ------------------------------------------------------------------ rule layers
    def _shared_output_grad(self, site: _Site, a: Tensor, d: Tensor) -> frozenset[str]:
        """Per-sample gradients of the site's parameters used more than once (into the shared
        buffers); returns the local names left to the rule's norm-only path."""
        mb = self._current
        multi = frozenset(loc for loc, (f, _) in site.params.items() if self._multi(mb, f))
        if multi:
            with _float32(d.device.type):
                per = per_sample_params(site.rule, site.module, a, d, multi)
            for loc, g in per.items():
                self._contribute(mb, site.params[loc][0], g)
        return frozenset(site.params) - multi

    def _fused_or_shared(
        self, site: _Site, a: Tensor, locals_: list[str], *rest: Any
    ) -> tuple[Tensor, ...]:
        """A fused layer's backward (``rest``: what ``_on_fused_grad`` takes after the local
        names, the output gradient last): the fused path, unless the layer ran more than once
        (its parameters then need per-sample gradients for the sum of the uses)."""
        mb = self._current
        grad = rest[-1]
        if mb is None or not any(self._multi(mb, site.params[k][0]) for k in locals_):
            return self._on_fused_grad(site, a, locals_, *rest)
        d = grad.detach()
        self._start(mb, d.shape[0], site.name)
        with _float32(d.device.type):
            per = per_sample_params(site.rule, site.module, a, d, frozenset(locals_))
            sums = {k: _batch_sum(per[k].float()) for k in locals_}
        for k in locals_:
            self._contribute(mb, site.params[k][0], per[k])
        return tuple(sums[k].to(site.params[k][1].dtype) for k in locals_)

    # ------------------------------------------------------------------ modules without a rule
    def _on_replay_pre(self, site: _Site, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mb = self._current
        if mb is None or replaying() or not torch.is_grad_enabled():
            return
        below = self._replays[site.name]
        call = None
        own = self._own[site.name]
        if own and site.name not in self._op_refused and mb.size is not None and mb.size > 1:
            # watch the operations on its parameters (ops.py); the replay if that fails
            params = {full: p for full, p in own.values()}
            call = OpCall(site.name, mb.size, params, self._on_op_grad)
            WATCH.push(call)
            mb.op_calls.append(call)
        mb.replay_stack.append(({s.name: mb.calls.get(s.name, 0) for _, s in below}, call))

    def _on_replay_forward(
        self, site: _Site, module: nn.Module, args: tuple, kwargs: dict, output: Any
    ) -> Any:
        mb = self._current
        if mb is None or replaying() or not torch.is_grad_enabled() or not mb.replay_stack:
            return None
        before, call = mb.replay_stack.pop()
        if call is not None:
            done = self._op_level(site, call, before, output)  # reads what WATCH still follows
            if call not in mb.lingering:
                WATCH.pop(call)
                mb.op_calls.remove(call)
            if done:
                return None
        self._refuse_recompute(site.name)
        params = {loc: p for loc, (_, p) in self._own[site.name].items()}
        fulls = {loc: f for loc, (f, _) in self._own[site.name].items()}
        for rel, s in self._replays[site.name]:
            if mb.calls.get(s.name, 0) == before[s.name]:  # did not run: its parameters may
                for loc, (f, p) in s.params.items():  # be used by this module's own code
                    params[f"{rel}.{loc}"] = p
                    fulls[f"{rel}.{loc}"] = f
        mb.calls[site.name] = mb.calls.get(site.name, 0) + 1
        if not params:  # all it holds is accounted by the layers inside it
            return None
        self._use(mb, fulls.values())
        handler = partial(self._on_replay_grad, site, fulls)
        return tap_outputs(site.name, module, params, args, kwargs, output, handler)

    def _op_level(self, site: _Site, call: OpCall, before: dict[str, int], output: Any) -> bool:
        """Whether the operations watched during this call give its parameters' per-sample
        gradients (then they count as used, once per operation); else the call is cancelled and
        the module is replayed (and not watched again if an operation was the reason)."""
        mb = self._current
        why = call.failed
        if why is None and any(
            mb.calls.get(s.name, 0) == before[s.name] for _, s in self._replays[site.name]
        ):
            why = "a layer inside it did not run (its parameters may be used by the module's code)"
        if why is None:
            self._refuse_recompute(site.name)
            mb.calls[site.name] = mb.calls.get(site.name, 0) + 1
            if any(WATCH.holds(x) for x in tree_leaves(output)):
                # it returns a function of its parameters (a position table's slice): follow
                # that until the outermost forward returns
                mb.lingering.append(call)
                return True
            self._use(mb, call.uses)
            return True
        call.cancelled = True
        self._op_refused[site.name] = why
        self._warn_replay(site, why)
        return False

    def _warn_replay(self, site: _Site, why: str) -> None:
        if site.name in self._replay_warned:
            return
        self._replay_warned.add(site.name)
        warnings.warn(
            f"GradientStatistics: no per-sample rule for '{site.name}' "
            f"({type(site.module).__name__}), and the operations on its parameters cannot be "
            f"followed ({why}): they get exact per-sample gradients by torch.func (vmap of the "
            "module's forward over the batch), about one more forward and backward of the "
            "module per step. adaptive.stats.register_rule() adds a cheaper rule",
            stacklevel=2,
        )

    def _on_outer_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        """The outermost forward returned: close the calls whose outputs ops.py followed."""
        mb = self._current
        if mb is None or not mb.lingering:
            return
        calls, mb.lingering = mb.lingering, []
        for call in calls:
            if call in mb.op_calls:
                mb.op_calls.remove(call)
        held = any(WATCH.holds(x) for x in tree_leaves(output))
        for call in calls:
            WATCH.pop(call)
        for call in calls:
            why = call.failed or (
                "the model returns a tensor computed from them alone" if held else None
            )
            if why is not None:
                call.cancelled = True
                raise UnsupportedModuleError(
                    f"module '{call.name}' computes its output from its parameters alone (no "
                    f"sample axis in its input), and the operations that bring it to the samples "
                    f"cannot be followed ({why}): its per-sample gradients are not known. "
                    "register_rule() for it, or pass fallback='groups'"
                )
            self._use(mb, call.uses)

    def _on_op_grad(self, call: OpCall, full: str, g: Tensor) -> None:
        mb = self._current
        if mb is None:
            return
        self._start(mb, g.shape[0], call.name)
        g = g.detach()
        multi = self._multi(mb, full)
        if not self._audited and not multi:
            # the first capture checks Σ_i g_i against autograd's gradient (a parameter used
            # several times is checked on the sum of its uses, in _on_leaf_grad)
            total = g.float().sum(0)
            prev = mb.op_totals.get(full)
            mb.op_totals[full] = total if prev is None else prev + total
        if not multi and g[0].numel() <= _SMALL:
            mb.small.append((full, g))  # accounted with the other small ones at detach
            return
        self._contribute(mb, full, g)

    def _flush_small(self, mb: _MicroBatch) -> None:
        """Every statistic of the small op-level parameters (norm weights, biases, layer
        scales: dozens per step, each a few thousand numbers) at once, from their per-sample
        gradients side by side, ``G = [g_1 | g_2 | …]`` of shape ``(b, P)``: the same sums as
        :meth:`_account` per parameter, in a handful of operations instead of a dozen each."""
        items, mb.small = mb.small, []
        if not items:
            return
        with _float32(items[0][1].device.type):
            flat = torch.cat([g.reshape(g.shape[0], -1).float() for _, g in items], 1)
            total = flat.sum(0)
            mb.sq = _add(mb.sq, flat.square().sum(1))
            if self.inner_products:
                mb.inner = _add(mb.inner, flat @ total)
            if self._target is not None:
                t = torch.cat(
                    [
                        self._target[f].reshape(-1).float()
                        if f in self._target
                        else flat.new_zeros(g[0].numel())
                        for f, g in items
                    ]
                )
                mb.target_dots = _add(mb.target_dots, flat @ t)
            coords = flat.square().sum(0) if self.per_coordinate else None
            start = 0
            for full, g in items:
                end = start + g[0].numel()
                self._add_grad(mb, full, total[start:end].reshape(g.shape[1:]))
                if coords is not None:
                    self._add_coordinates(mb, full, coords[start:end].reshape(g.shape[1:]))
                start = end

    def _on_replay_grad(
        self,
        site: _Site,
        fulls: dict[str, str],
        call: ModuleCall,
        grads: tuple[Tensor | None, ...],
    ) -> None:
        mb = self._current
        if mb is None:
            return
        given = tuple(None if g is None else g.detach() for g in grads)
        first = next((g for g in given if g is not None), None)
        if first is None:
            return
        self._start(mb, first.shape[0], site.name)
        per = per_sample_grads(site.name, call, given, mb.size)
        for rel, g in per.items():
            self._contribute(mb, fulls[rel], g)
