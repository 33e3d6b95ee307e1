"""Adaptive batch growth (AdAdaGrad, Lau, Liu, Kolar 2024, arXiv 2402.11215).

- tests of the gradient noise that propose a batch size (:mod:`.growth_tests`);
- the rule that turns a proposal into the next batch size and the micro-batch / accumulation
  split (:mod:`.next_size`);
- a batch sampler whose size can change between batches, resumably and under DDP
  (:mod:`.sampler`).
"""

from adaptive.batching.growth_tests import (
    augmented_inner_product_test,
    coordinate_norm_test,
    inner_product_test,
    norm_test,
    orthogonality_test,
)
from adaptive.batching.next_size import BatchPlan, next_batch_size, plan_batch
from adaptive.batching.sampler import AdaptiveBatchSampler

__all__ = [
    "AdaptiveBatchSampler",
    "BatchPlan",
    "augmented_inner_product_test",
    "coordinate_norm_test",
    "inner_product_test",
    "next_batch_size",
    "norm_test",
    "orthogonality_test",
    "plan_batch",
]
