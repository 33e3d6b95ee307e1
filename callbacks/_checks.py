"""Set-up checks the callbacks share (not a callback: no Lightning hooks here)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adaptive.stats import GradientStatistics, UnsupportedModuleError

__all__ = ["check_model_supported", "check_seed", "single_train_loader_source"]


def check_seed(owner: str, seed: object) -> int:
    """``seed`` as an int >= 0, or a ``ValueError`` naming ``owner``'s argument."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{owner}(seed={seed!r}): seed must be an int >= 0")
    return seed


def check_model_supported(owner: str, stats: GradientStatistics) -> None:
    """Dry check of the sensor's plan at ``setup``: raise now what the first capture would.

    A module without a per-sample rule, BatchNorm normalising with batch statistics, a layer
    whose own rule refuses it: each raises :class:`UnsupportedModuleError` here, before any batch,
    unless the sensor was built with ``fallback="groups"``. (The sensor re-checks at every
    ``attach``, since a module may change mode later.)
    """
    if stats.fallback is not None:
        return
    # the sensor's own check, the one attach() runs (it has no public name yet)
    problem = stats._unsupported()
    if problem:
        raise UnsupportedModuleError(
            f"{owner}: {problem}. (Checked at setup; the model is checked in the mode it is in "
            "now, and BatchNorm layers are in training mode during fit unless you change that.)"
        )


def single_train_loader_source(owner: str, instance: Any) -> None:
    """Refuse several train loaders (a dict, list or CombinedLoader) with a clear message."""
    if isinstance(instance, (Mapping, list, tuple)) or type(instance).__name__ == "CombinedLoader":
        kind = type(instance).__name__
        raise ValueError(
            f"{owner} needs a single train DataLoader to install its batch sampler in, got a "
            f"{kind} of train loaders; train on one DataLoader (e.g. a ConcatDataset, or a "
            "MixtureDataset with DynamicMixture)"
        )
