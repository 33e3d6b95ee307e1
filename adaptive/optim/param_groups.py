"""Parameter groups in the BERT/ResNet convention: no decay, no adaptation for biases and norms."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from ._common import check_number

__all__ = ["param_groups_for"]

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def param_groups_for(
    model: nn.Module,
    weight_decay: float = 0.01,
    *,
    exclude: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a decayed, adapted group and a plain group.

    A parameter goes to the plain group (``weight_decay=0.0, adapt=False``) if it is a bias or
    any other tensor with ``ndim <= 1``, belongs to a normalisation layer (BatchNorm, LayerNorm,
    GroupNorm, InstanceNorm, RMSNorm, LocalResponseNorm), or its qualified name matches one of
    the ``exclude`` regular expressions (``re.search``), like the ``exclude_from_weight_decay``
    lists of the LAMB authors' TensorFlow code. Everything else goes to the group with
    ``weight_decay`` and ``adapt=True``. Frozen parameters (``requires_grad=False``) are left
    out, and so is a group that would be empty. Shared parameters appear once.

    The groups carry only ``params``, ``weight_decay`` and ``adapt``; every other hyperparameter
    comes from the optimizer's defaults. ``Lamb`` and ``Lars`` read ``adapt``.

    Example:
        >>> opt = Lamb(param_groups_for(model, weight_decay=0.01), lr=2e-3)
    """
    weight_decay = check_number("weight_decay", weight_decay, low=0.0)
    if isinstance(exclude, str):
        raise TypeError(
            f"exclude must be a sequence of regular expressions, got the string {exclude!r}"
        )
    patterns = [re.compile(p) for p in exclude]
    plain_ids = set()
    for module in model.modules():
        if isinstance(module, _NORM_TYPES):
            plain_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, plain, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim <= 1 or id(p) in plain_ids or any(pat.search(name) for pat in patterns):
            plain.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "adapt": True})
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0, "adapt": False})
    return groups
