"""Per-step gradient statistics on the device: the sensor the adaptive methods read.

:class:`GradientStatistics` hooks a model for one (or several accumulated) forward/backward passes
and returns a :class:`StatisticsResult` of float32 device tensors: per-sample squared gradient
norms, ``‖ḡ‖²``, the summed variance, the simple noise scale, inner-product and orthogonality
variances, and on request per-coordinate second moments and per-group sums. On CPU, Linear
layers on sequences and convolutions go through a compiled kernel (:mod:`adaptive.stats.native`)
that yields their norms and batch gradient in one pass, at about the cost of autograd's own
weight gradient.
"""

from adaptive.stats.fallback import TwoBatchNoiseScale, group_variance, two_batch_estimates
from adaptive.stats.layers import SUPPORTED_MODULES, UnsupportedModuleError
from adaptive.stats.reference import per_sample_gradients, reference_statistics
from adaptive.stats.statistics import FALLBACKS, GradientStatistics, StatisticsResult

__all__ = [
    "FALLBACKS",
    "SUPPORTED_MODULES",
    "GradientStatistics",
    "StatisticsResult",
    "TwoBatchNoiseScale",
    "UnsupportedModuleError",
    "group_variance",
    "per_sample_gradients",
    "reference_statistics",
    "two_batch_estimates",
]
