"""Online batch selection: score candidates and keep the ones worth training on.

- :func:`uds_utility`, :class:`UDSSelector`: UDS (Zou et al., arXiv 2510.16882), from logits.
- :class:`CABSSampler`: concept-aware batch sampling (Ghosh et al., arXiv 2511.20643), from
  per-sample concept lists; :func:`diversity_select` / :func:`frequency_select` are its rules.
- :class:`UniformSelector`, :class:`HighLossSelector` (Jiang et al. 2019),
  :class:`RhoLossSelector` (Mindermann et al. 2022), with :func:`per_sample_loss`.

All are framework-free; ``adaptive.callbacks.OnlineBatchSelection`` wires the selectors into Lightning.
"""

from adaptive.selection.baselines import (
    HighLossSelector,
    RhoLossSelector,
    UniformSelector,
    per_sample_loss,
)
from adaptive.selection.cabs import (
    CABSSampler,
    concept_targets,
    diversity_select,
    frequency_select,
)
from adaptive.selection.projection import FourierSketch
from adaptive.selection.uds import UDSSelector, mean_distance, standardize
from adaptive.selection.utility import uds_utility

__all__ = [
    "CABSSampler",
    "FourierSketch",
    "HighLossSelector",
    "RhoLossSelector",
    "UDSSelector",
    "UniformSelector",
    "concept_targets",
    "diversity_select",
    "frequency_select",
    "mean_distance",
    "per_sample_loss",
    "standardize",
    "uds_utility",
]
