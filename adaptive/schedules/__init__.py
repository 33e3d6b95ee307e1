"""Learning-rate schedules whose clock is the samples and tokens consumed, not steps taken.

All schedulers are ``torch.optim.lr_scheduler.LRScheduler`` subclasses; call
``sched.step(samples=..., tokens=...)`` after each optimizer step (or let
``adaptive.callbacks.SampleClock`` do it under Lightning). See ``ALGORITHMS.md`` section 4.
"""

from .clock import SampleClockedScheduler
from .power import PowerScheduler
from .refined import RefinedScheduler, load_grad_norms, refine_schedule
from .scaling import adascale_gain, lr_scale_factor, scale_lr
from .shapes import SHAPES, decay_factor, warmup_factor
from .tuning import POWER_SPACE, fit_power_law, tune_power_scheduler, tune_schedule
from .wsd import LinearDecayScheduler, WSDScheduler

__all__ = [
    "POWER_SPACE",
    "SHAPES",
    "LinearDecayScheduler",
    "PowerScheduler",
    "RefinedScheduler",
    "SampleClockedScheduler",
    "WSDScheduler",
    "adascale_gain",
    "decay_factor",
    "fit_power_law",
    "load_grad_norms",
    "lr_scale_factor",
    "refine_schedule",
    "scale_lr",
    "tune_power_scheduler",
    "tune_schedule",
    "warmup_factor",
]
