"""Large-batch optimizers: LAMB, LARS and AdaGrad-Norm as ``torch.optim.Optimizer`` classes.

Each has a fast path (``torch._foreach_*``, trust ratios by ``torch.where``, no host sync) and a
readable reference path (``foreach=False``) that the tests hold it to.
"""

from .adagrad_norm import AdaGradNorm
from .lamb import Lamb
from .lars import Lars
from .param_groups import param_groups_for

__all__ = ["AdaGradNorm", "Lamb", "Lars", "param_groups_for"]
