"""Dynamic data mixtures: a weighted multi-source sampler and the rules that reweight it.

- :class:`MixtureSampler` / :class:`MixtureDataset`: batches of ``(source, index)`` pairs with
  weights changeable between batches, exact mid-epoch resume, the same draws on every rank.
- :class:`GrowableMixtureSampler`: the same draws in batches whose size can grow, for adaptive
  batch growth and mixture reweighting on one loader.
- Rules (a plain function plus a small stateful class each): :class:`DoReMi` (excess loss,
  arXiv 2305.10429), :class:`Exp3Mixture` (ODM bandit, arXiv 2312.02406), :class:`GroupInfluence`
  (TiKMiX group influence, arXiv 2508.17677).
"""

from adaptive.mixture.doremi import DoReMi, doremi_update, excess_loss
from adaptive.mixture.exp3 import Exp3Mixture, exp3_exploration, exp3_probabilities
from adaptive.mixture.growable import GrowableMixtureSampler
from adaptive.mixture.influence import (
    GroupInfluence,
    alignment_from_statistics,
    exponentiated_influence_update,
    group_alignment,
    tikmix_objective,
    tikmix_weights,
)
from adaptive.mixture.sampler import MixtureDataset, MixtureSampler
from adaptive.mixture.signals import DomainLossMeter, MixtureSignals, domain_sums
from adaptive.mixture.weights import apply_floor, as_weights

__all__ = [
    "DoReMi",
    "DomainLossMeter",
    "Exp3Mixture",
    "GroupInfluence",
    "GrowableMixtureSampler",
    "MixtureDataset",
    "MixtureSampler",
    "MixtureSignals",
    "alignment_from_statistics",
    "apply_floor",
    "as_weights",
    "domain_sums",
    "doremi_update",
    "excess_loss",
    "exp3_exploration",
    "exp3_probabilities",
    "exponentiated_influence_update",
    "group_alignment",
    "tikmix_objective",
    "tikmix_weights",
]
