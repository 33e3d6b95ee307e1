"""Lightning plug-ins for the adaptive toolkit: thin adapters over the framework-free core.

Import them as ``adaptive.callbacks`` (``from adaptive.callbacks import AdaptiveBatchSize``). The
source folder is ``callbacks/`` at the top of the repository; the package installs it under the
project's namespace (``[tool.setuptools.package-dir]``), so nothing named ``callbacks`` is put
at the top level of site-packages, where it would clash with a project's own ``callbacks``
module or the PyPI package of that name.

Deprecated: in a source checkout (the repository root on ``sys.path``) ``import callbacks`` still
works for this release, with a ``DeprecationWarning``; it is an alias, so ``callbacks.X`` and
``adaptive.callbacks.X`` are the same objects. It will be removed in the next release.
"""

from __future__ import annotations

if __name__ != "adaptive.callbacks":  # the old top-level name, from a source checkout
    import importlib
    import importlib.abc
    import importlib.util
    import sys
    import warnings

    warnings.warn(
        "`import callbacks` is deprecated and will be removed in the next release: import "
        "`adaptive.callbacks` instead (e.g. `from adaptive.callbacks import AdaptiveBatchSize`)",
        DeprecationWarning,
        stacklevel=2,
    )

    class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        """``callbacks.X`` → the module ``adaptive.callbacks.X`` itself (one copy of each class)."""

        prefix = __name__ + "."

        def find_spec(self, fullname, path=None, target=None):  # type: ignore[override]
            if fullname.startswith(self.prefix):
                return importlib.util.spec_from_loader(fullname, self)
            return None

        def create_module(self, spec):  # type: ignore[override]
            return importlib.import_module("adaptive.callbacks." + spec.name[len(self.prefix) :])

        def exec_module(self, module) -> None:  # type: ignore[override]
            pass  # already executed under its real name

    if not any(type(f).__name__ == "_Alias" for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
    sys.modules[__name__] = importlib.import_module("adaptive.callbacks")
else:
    from adaptive.callbacks.adaptive_batch_size import AdaptiveBatchSize
    from adaptive.callbacks.dynamic_mixture import DynamicMixture
    from adaptive.callbacks.gradient_statistics import GradientStatisticsLogger
    from adaptive.callbacks.online_batch_selection import OnlineBatchSelection
    from adaptive.callbacks.sample_clock import SampleClock

    __all__ = [
        "AdaptiveBatchSize",
        "DynamicMixture",
        "GradientStatisticsLogger",
        "OnlineBatchSelection",
        "SampleClock",
    ]
