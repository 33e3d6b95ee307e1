"""The first capture checks where the parameters of the layers with a rule are used.

A layer's rule computes the per-sample gradient of its parameters from that layer's own input
and output gradient. A parameter that also enters the computation somewhere else (the model's
forward multiplying by ``self.embed.weight.T`` for a tied output head, a loss that reads a weight)
has a per-sample gradient with a second term the rule cannot see, while the parameter's
gradient, which autograd sums over every use, looks complete: the norms would be silently
wrong. The gradient hooks catch a parameter used *only* outside its module (uses.py); this
catches one used *also* outside it.

During the first capture a :class:`~torch.overrides.TorchFunctionMode` looks at every operation
of the forward (and of the user's code around it, up to ``backward``): an operation that takes
such a parameter and gives a differentiable result while neither the parameter's module nor a
module that replays it (see :mod:`adaptive.stats.uses`) is running is refused there, naming the
parameter and the operation. Later captures skip the check (its cost is one Python call per
operation); a model whose uses change from step to step is not caught after the first.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from adaptive.stats.rules import UnsupportedModuleError

__all__ = ["UseAudit"]

# reads of a tensor that are not uses in the computation
_INERT = frozenset(
    {"requires_grad_", "register_hook", "detach", "detach_", "size", "dim", "__get__"}
)


class UseAudit(TorchFunctionMode):
    """Refuses a use of a ruled layer's parameter outside the modules allowed to use it.

    Args:
        allowed: id(parameter) -> (its full name, the modules allowed to use it).
    """

    def __init__(self, allowed: dict[int, tuple[Tensor, str, list[nn.Module]]]) -> None:
        super().__init__()
        self.allowed = allowed
        self.enabled = True
        self.active: Counter[int] = Counter()
        self.handles: list[Any] = []
        for module in {id(m): m for _, _, ms in allowed.values() for m in ms}.values():
            self.handles.append(module.register_forward_pre_hook(self._enter))
            self.handles.append(module.register_forward_hook(self._leave, always_call=True))

    def _enter(self, module: nn.Module, args: tuple) -> None:
        self.active[id(module)] += 1

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.active[id(module)] -= 1

    def close(self) -> None:
        """Stop checking; leave the mode stack (sensors may detach in any order: the top audit
        goes, and the one left behind, if it is this one, only passes calls through)."""
        self.enabled = False
        for h in self.handles:
            h.remove()
        self.handles.clear()
        stack = torch.overrides._get_current_function_mode_stack()
        if stack and isinstance(stack[-1], UseAudit):
            stack[-1].__exit__(None, None, None)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (
            not self.enabled
            or getattr(func, "__name__", "") in _INERT
            or not torch.is_grad_enabled()
            or torch._C._current_graph_task_id() != -1  # the sensor's own work in backward
        ):
            return out
        for x in (*args, *kwargs.values()):
            for y in x if isinstance(x, (list, tuple)) else (x,):
                entry = self.allowed.get(id(y)) if isinstance(y, Tensor) else None
                if entry is None or entry[0] is not y:
                    continue
                if any(self.active[id(m)] > 0 for m in entry[2]):
                    continue
                if not any(isinstance(o, Tensor) and o.requires_grad for o in tree_flatten(out)[0]):
                    continue
                name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
                raise UnsupportedModuleError(
                    f"parameter '{entry[1]}' is used by {name} outside its module "
                    f"({type(entry[2][0]).__name__}): the sensor sees a parameter's uses inside "
                    "its module, and the per-sample gradient would miss this one. Use the "
                    "parameter only through its module (for tied weights, assign the same "
                    "Parameter to both modules: head.weight = embed.weight), or pass "
                    "fallback='groups'"
                )
        return out
