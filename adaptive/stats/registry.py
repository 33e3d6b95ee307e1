"""Which per-sample rule handles a module: the built-in rules and the ones users register.

A rule is written for a module type's computation. A subclass inherits it only where the
subclass computes the same thing: it must not override ``forward`` (nor any other method the rule
relies on, such as ``_conv_forward`` for convolutions), and its own trainable parameters must all
be ones the rule knows. timm's ``BatchNormAct2d`` (BatchNorm whose ``forward`` adds the
activation), ``LayerNorm2d`` (a LayerNorm over channels) or an Embedding that scales its output
(Gemma, OPT) therefore get no rule, and go to the exact per-sample replay of
:mod:`adaptive.stats.last_resort` instead of a rule that would give wrong numbers.

Example: a layer ``y = x · w`` (per-feature scale ``w``, any leading axes) gets a rule from the
per-sample gradient ``∂ℓ/∂w = Σ_t δ_t x_t`` summed over the positions of one sample::

    from adaptive.stats import LayerRule, register_rule

    class ScaleRule(LayerRule):
        param_names = frozenset({"w"})

        def per_sample(self, module, a, d):  # (b, features)
            x, dd = a.float(), d.float()
            return (x * dd).reshape(x.shape[0], -1, x.shape[-1]).sum(1)

        def sq_norms(self, module, a, d, names):
            return self.per_sample(module, a, d).square().sum(1)

        def coordinate_sq(self, module, a, d, names):
            return {"w": self.per_sample(module, a, d).square().sum(0)}

        def dot(self, module, a, d, directions):
            return self.per_sample(module, a, d) @ directions["w"].float()

        def per_sample_params(self, module, a, d, names, out=None):
            return {"w": self.per_sample(module, a, d)}

    register_rule(Scale, ScaleRule())

``a`` is the module's first positional input and ``d`` the gradient of its output (one tensor),
both with the samples on axis 0. ``per_sample_params`` is needed only where the module's
parameters are used more than once in a forward (tied weights, a layer applied twice).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from adaptive.stats.rules import _RULES, EmbeddingRule, LayerRule, UnsupportedModuleError
from adaptive.stats.rules.norms import _AffineNormRule

__all__ = ["find_rule", "per_sample_params", "register_rule", "unregister_rule"]


@dataclass(frozen=True)
class _Entry:
    cls: type[nn.Module]
    rule: LayerRule
    methods: tuple[str, ...]  # methods of ``cls`` the rule relies on (a subclass may not override)
    params: frozenset[str] | None  # parameter names the rule handles; None: whatever it is given


_CONV = (nn.Conv1d, nn.Conv2d)
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)


def _builtin(cls: type[nn.Module], rule: LayerRule) -> _Entry:
    methods = ("forward", "_conv_forward") if issubclass(cls, _CONV) else ("forward",)
    known = {"weight"} if issubclass(cls, nn.Embedding) else {"weight", "bias"}
    return _Entry(cls, rule, methods, frozenset(known))


_BUILTIN: tuple[_Entry, ...] = tuple(_builtin(cls, rule) for cls, rule in _RULES)
_USER: list[_Entry] = []


def register_rule(
    module_type: type[nn.Module],
    rule: LayerRule,
    *,
    methods: tuple[str, ...] = ("forward",),
) -> None:
    """Use ``rule`` for modules of ``module_type`` (and its subclasses that override none of
    ``methods`` and have no trainable parameter outside ``rule.param_names``, when the rule sets
    that attribute). Registered rules are consulted before the built-in ones, the latest first;
    registering a type again replaces its rule.

    Args:
        module_type: a ``torch.nn.Module`` subclass.
        rule: a :class:`~adaptive.stats.rules.LayerRule` (see this module's docstring for an
            example and :mod:`adaptive.stats.rules.base` for what each method returns).
        methods: methods of ``module_type`` whose computation the rule assumes.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not isinstance(rule, LayerRule):
        raise TypeError(f"rule must be a LayerRule instance, got {type(rule).__name__}")
    for m in methods:
        if not callable(getattr(module_type, m, None)):
            raise ValueError(f"{module_type.__name__} has no method {m!r}")
    unregister_rule(module_type)
    names = getattr(rule, "param_names", None)
    _USER.insert(0, _Entry(module_type, rule, tuple(methods), names))


def unregister_rule(module_type: type[nn.Module]) -> None:
    """Forget a rule registered for exactly ``module_type`` (no-op if none is)."""
    _USER[:] = [e for e in _USER if e.cls is not module_type]


def _inherits(module: nn.Module, entry: _Entry) -> bool:
    t = type(module)
    if any(getattr(t, m, None) is not getattr(entry.cls, m, None) for m in entry.methods):
        return False
    if entry.params is None:
        return True
    own = {n for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    return own <= entry.params


def find_rule(module: nn.Module) -> LayerRule | None:
    """The rule for ``module``: the first registered (then built-in) type it is an instance of,
    if it computes what that type computes (see the module docstring); else None."""
    for entry in (*_USER, *_BUILTIN):
        if isinstance(module, entry.cls):
            return entry.rule if _inherits(module, entry) else None
    return None


def per_sample_params(
    rule: LayerRule, module: nn.Module, a: Tensor, d: Tensor, names: frozenset[str]
) -> dict[str, Tensor]:
    """Per-sample gradients ``name -> (b, *param.shape)`` of the parameters in ``names`` from a
    layer's input and output gradient, for any rule (used where a parameter serves several
    uses in one forward and the norms need the sum of the uses)."""
    if isinstance(rule, _AffineNormRule):
        return rule.per_sample(module, a, d, names)
    if isinstance(rule, EmbeddingRule):
        ids, dd = rule._prepare(module, a, d)
        b = dd.shape[0]
        out = torch.zeros(b, *module.weight.shape, device=dd.device, dtype=torch.float32)
        rows = ids + torch.arange(b, device=ids.device).unsqueeze(1) * module.weight.shape[0]
        out.view(-1, dd.shape[-1]).index_add_(0, rows.reshape(-1), dd.reshape(-1, dd.shape[-1]))
        return {"weight": out}
    try:
        return rule.per_sample_params(module, a, d, names)
    except NotImplementedError:
        raise UnsupportedModuleError(
            f"{type(rule).__name__} has no per_sample_params: its module's parameters are used "
            "more than once in a forward, and the sum of the uses needs per-sample gradients"
        ) from None
