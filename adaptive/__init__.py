"""adaptive: make the PyTorch training loop adapt as it runs (framework-free core).

Subpackages: ``stats`` (per-step gradient statistics), ``batching`` (adaptive batch growth),
``optim`` (LAMB, LARS, AdaGrad-Norm), ``schedules`` (sample-clocked learning rates),
``selection`` (online batch selection), ``mixture`` (data-mixture reweighting), ``data``.
"""

from adaptive import batching, data, mixture, models, optim, schedules, selection, stats
from adaptive.batching import AdaptiveBatchSampler, next_batch_size, norm_test
from adaptive.data import DataNotFoundError, ImageClassificationDataset, fashion_mnist, mnist
from adaptive.mixture import DoReMi, Exp3Mixture, GroupInfluence, MixtureSampler
from adaptive.optim import AdaGradNorm, Lamb, Lars, param_groups_for
from adaptive.schedules import (
    LinearDecayScheduler,
    PowerScheduler,
    RefinedScheduler,
    WSDScheduler,
)
from adaptive.selection import CABSSampler, HighLossSelector, RhoLossSelector, UDSSelector
from adaptive.stats import GradientStatistics, StatisticsResult

__version__ = "0.1.0"

__all__ = [
    "AdaGradNorm",
    "AdaptiveBatchSampler",
    "CABSSampler",
    "DataNotFoundError",
    "DoReMi",
    "Exp3Mixture",
    "GradientStatistics",
    "GroupInfluence",
    "HighLossSelector",
    "ImageClassificationDataset",
    "Lamb",
    "Lars",
    "LinearDecayScheduler",
    "MixtureSampler",
    "PowerScheduler",
    "RefinedScheduler",
    "RhoLossSelector",
    "StatisticsResult",
    "UDSSelector",
    "WSDScheduler",
    "__version__",
    "batching",
    "data",
    "fashion_mnist",
    "mixture",
    "mnist",
    "models",
    "next_batch_size",
    "norm_test",
    "optim",
    "param_groups_for",
    "schedules",
    "selection",
    "stats",
]
