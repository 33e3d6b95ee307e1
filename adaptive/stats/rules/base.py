"""The per-layer rule interface: what a rule computes from a layer's input and output gradient.

For a layer with input ``a`` (saved by a forward hook) and output gradient ``δ`` (seen by a hook on
the output tensor), the per-sample gradient of every parameter is a function of ``a_i`` and ``δ_i``
alone (Goodfellow 2015, "Efficient per-example gradient computations", arXiv 1510.01799). Each rule
returns, per sample, quantities of those gradients without forming them where a cheaper
contraction exists:

- ``sq_norms``: ``Σ_p ‖∂ℓ/∂p‖²_i``, shape ``(b,)``;
- ``coordinate_sq``: ``Σ_i (∂ℓ/∂p)_i²`` per parameter (parameter-shaped);
- ``dot``: ``⟨(∂ℓ/∂p)_i, D_p⟩`` summed over the given parameters, shape ``(b,)``.

All quantities are in the units of the gradients autograd produces for the loss as written (the
caller rescales for mean-reduced losses and loss scaling) and are computed in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor, nn

__all__ = ["LayerRule", "UnsupportedModuleError", "Workspace"]

# Hands out a float32 buffer of the given shape (contents undefined); buffers with different
# ``slot`` numbers do not overlap. Slot 0 holds the per-sample gradients, others scratch operands.
Workspace = Callable[..., Tensor]


class UnsupportedModuleError(TypeError):
    """A module has no per-sample rule, or couples the samples of a batch (BatchNorm in training)."""


class LayerRule:
    """Per-sample quantities for one module type (see the module docstring for the meaning)."""

    def sq_norms(self, module: nn.Module, a: Tensor, d: Tensor, names: frozenset[str]) -> Tensor:
        raise NotImplementedError

    def coordinate_sq(
        self, module: nn.Module, a: Tensor, d: Tensor, names: frozenset[str]
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def dot(
        self, module: nn.Module, a: Tensor, d: Tensor, directions: Mapping[str, Tensor]
    ) -> Tensor:
        raise NotImplementedError

    def check(self, name: str, module: nn.Module) -> None:
        """Raise UnsupportedModuleError where this module instance cannot be handled."""

    def elements_per_sample(
        self, module: nn.Module, a: Tensor, d: Tensor, names: frozenset[str], workspace: bool
    ) -> int:
        """About how many float32 elements ``per_sample_params`` materialises per sample (the
        caller chunks the batch to bound them); ``workspace``: whether it gets an ``out``."""
        return sum(p.numel() for n, p in module.named_parameters(recurse=False) if n in names)

    def fusable(self, module: nn.Module, a: Tensor) -> bool:
        """True where, by the cost model, this call materialises per-sample weight gradients (or
        runs the compiled kernel) and hands their sum to autograd as the batch gradient."""
        return self.paths(module, a)[0] != "torch"

    def paths(
        self, module: nn.Module, a: Tensor, names: frozenset[str] = frozenset({"weight", "bias"})
    ) -> tuple[str, ...]:
        """The ways this call can be handled (:mod:`adaptive.stats.planner`), the cost model's
        choice first: ``"native"`` (compiled kernel), ``"materialise"`` (per-sample gradients
        written out), ``"torch"`` (autograd's gradient and ``sq_norms``)."""
        return ("torch",)

    def batch_grads(
        self, module: nn.Module, a: Tensor, d: Tensor, names: frozenset[str]
    ) -> dict[str, Tensor]:
        """Autograd's batch gradients ``Σ_i g_i`` of the parameters in ``names``, computed as
        autograd computes them (for timing the ``"torch"`` path against the fused ones)."""
        raise NotImplementedError

    def native_sums(
        self,
        module: nn.Module,
        a: Tensor,
        d: Tensor,
        names: frozenset[str],
        out: Workspace,
        coordinates: bool = False,
    ) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor] | None] | None:
        """``(Σ_i g_i per parameter, Σ_p ‖g_i‖², Σ_i g_i² per parameter or None)`` from the
        compiled kernel, without per-sample gradients in memory (the squares only with
        ``coordinates``); None where it does not apply (the caller then uses
        ``per_sample_params``)."""
        return None

    def per_sample_params(
        self,
        module: nn.Module,
        a: Tensor,
        d: Tensor,
        names: frozenset[str],
        out: Workspace | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample gradients ``name -> (b, *param.shape)`` (only for fusable calls); the weight's
        may be written into ``out(shape)`` (a reused buffer) and may be a permuted view."""
        raise NotImplementedError
