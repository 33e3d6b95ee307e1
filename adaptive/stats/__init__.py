"""Per-step gradient statistics on the device: the sensor the adaptive methods read.

:class:`GradientStatistics` hooks a model for one (or several accumulated) forward/backward passes
and returns a :class:`StatisticsResult` of float32 device tensors: per-sample squared gradient
norms, ``‖ḡ‖²``, the summed variance, the simple noise scale, inner-product and orthogonality
variances, and on request per-coordinate second moments and per-group sums. On CPU, Linear
layers on sequences and convolutions may go through a compiled kernel (:mod:`adaptive.stats.native`,
one build per instruction set) that yields their norms and batch gradient in one pass; which
path each layer shape takes is measured, not assumed (:mod:`adaptive.stats.planner`).
"""

from adaptive.stats.fallback import TwoBatchNoiseScale, group_variance, two_batch_estimates
from adaptive.stats.planner import PATHS, PathPlanner, PlanEntry
from adaptive.stats.reference import per_sample_gradients, reference_statistics
from adaptive.stats.registry import find_rule, register_rule, unregister_rule
from adaptive.stats.rules import SUPPORTED_MODULES, LayerRule, UnsupportedModuleError
from adaptive.stats.statistics import FALLBACKS, GradientStatistics, StatisticsResult, side_pass

__all__ = [
    "FALLBACKS",
    "PATHS",
    "SUPPORTED_MODULES",
    "GradientStatistics",
    "LayerRule",
    "PathPlanner",
    "PlanEntry",
    "StatisticsResult",
    "TwoBatchNoiseScale",
    "UnsupportedModuleError",
    "find_rule",
    "group_variance",
    "per_sample_gradients",
    "reference_statistics",
    "register_rule",
    "side_pass",
    "two_batch_estimates",
    "unregister_rule",
]
