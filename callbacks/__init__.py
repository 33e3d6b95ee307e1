"""Lightning plug-ins for the adaptive toolkit: thin adapters over the framework-free core."""

from callbacks.adaptive_batch_size import AdaptiveBatchSize
from callbacks.dynamic_mixture import DynamicMixture
from callbacks.gradient_statistics import GradientStatisticsLogger
from callbacks.online_batch_selection import OnlineBatchSelection
from callbacks.sample_clock import SampleClock

__all__ = [
    "AdaptiveBatchSize",
    "DynamicMixture",
    "GradientStatisticsLogger",
    "OnlineBatchSelection",
    "SampleClock",
]
