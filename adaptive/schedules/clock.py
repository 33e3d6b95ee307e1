"""Base class for learning-rate schedules whose clock is what was consumed, not steps taken.

With a batch size that changes during training, "step k" no longer says how far training has
gone; the samples and tokens seen do. The schedules here keep that clock in ``self`` (so
``state_dict`` checkpoints it) and are told, at each optimizer step, what that step consumed::

    sched.step(samples=32, tokens=32 * 512)   # after optimizer.step()
    sched.get_last_lr()                       # the schedule at the tokens seen so far

A loop that cannot pass the amounts to ``step`` (Lightning calls ``step()`` without arguments)
records them first with :meth:`SampleClockedScheduler.consume`; ``step()`` then commits what was
consumed since the previous step as one optimizer step's batch. A ``step()`` that finds nothing
consumed raises, which is how a scheduler stepped twice per optimizer step is caught.
"""

from __future__ import annotations

import numbers
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

_CLOCK_KEYS = (
    "samples_seen",
    "tokens_seen",
    "last_batch_samples",
    "last_batch_tokens",
    "pending_samples",
    "pending_tokens",
    "lr_scale",
)


def _as_count(name: str, value: object, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be a Python int (count it from tensor shapes, which costs no device "
            f"sync), got {type(value).__name__} {value!r}"
        )
    value = int(value)
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_nonneg(name: str, value: object) -> float:
    """Validate a non-negative real (a token budget); return it as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0 (tokens or samples), got {value}")
    return float(value)


class SampleClockedScheduler(LRScheduler):
    """An ``LRScheduler`` whose position is the number of tokens (and samples) consumed.

    Subclasses implement :meth:`multiplier`, the factor applied to each param group's initial
    lr, as a function of the tokens seen ``n`` and the batch ``beta`` (in samples) of the last
    optimizer step. Tokens default to samples for data without a token notion.

    Clock state, all plain ints/floats so ``torch.load(..., weights_only=True)`` reads it:
    ``samples_seen``, ``tokens_seen``, ``last_batch_samples``, ``last_batch_tokens`` (β of the
    last step), ``pending_*`` (consumed, not yet committed by ``step``), and ``lr_scale`` (an
    extra factor an adaptive-batch rule may set, see :meth:`set_lr_scale`).
    """

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.samples_seen = 0
        self.tokens_seen = 0
        self.last_batch_samples = 0
        self.last_batch_tokens = 0
        self.pending_samples = 0
        self.pending_tokens = 0
        self.lr_scale = 1.0
        self._constructing = True
        super().__init__(optimizer)
        self._constructing = False

    # -- the schedule ------------------------------------------------------------------------
    def multiplier(self, tokens: float, batch_samples: int) -> float:
        """Factor on the initial lr after ``tokens`` tokens, the last step's batch being
        ``batch_samples`` samples (0 before the first step)."""
        raise NotImplementedError

    def lr_at(self, tokens: float, batch_samples: int | None = None) -> list[float]:
        """The lrs the schedule gives at ``tokens`` tokens seen and last batch ``batch_samples``
        (default: the current one), without moving the clock. Useful for plots and tests."""
        beta = self.last_batch_samples if batch_samples is None else batch_samples
        m = self.multiplier(float(tokens), int(beta)) * self.lr_scale
        return [base * m for base in self.base_lrs]

    def get_lr(self) -> list[float]:  # type: ignore[override]
        m = self.multiplier(float(self.tokens_seen), self.last_batch_samples) * self.lr_scale
        return [base * m for base in self.base_lrs]

    # -- the clock ---------------------------------------------------------------------------
    def consume(self, samples: int, tokens: int | None = None) -> None:
        """Record ``samples`` (and ``tokens``, default ``samples``) consumed towards the next
        optimizer step; the next ``step()`` commits them. Call once per micro-batch, with the
        global (all-ranks) amounts."""
        samples = _as_count("samples", samples)
        tokens = samples if tokens is None else _as_count("tokens", tokens)
        self.pending_samples += samples
        self.pending_tokens += tokens

    def step(self, samples: int | None = None, tokens: int | None = None) -> None:  # type: ignore[override]
        """Advance the clock by one optimizer step's batch and set the lrs for the next step.

        Args:
            samples: samples this optimizer step consumed (global batch, after accumulation).
                Omit it when the amounts were recorded with :meth:`consume`.
            tokens: tokens this step consumed; defaults to ``samples``.
        """
        if self._constructing:
            super().step()
            return
        if samples is not None:
            self.consume(samples, tokens)
        elif tokens is not None:
            raise ValueError(
                f"step(tokens={tokens!r}) needs samples= as well: the batch size in samples is "
                "part of the clock"
            )
        if self.pending_samples == 0:
            raise RuntimeError(
                f"{type(self).__name__}.step() found no samples consumed since the last step. "
                "Pass step(samples=..., tokens=...), record micro-batches with consume(), or add "
                "the adaptive.callbacks.SampleClock callback to the Trainer; if you did, the scheduler is "
                "being stepped twice per optimizer step (e.g. by Lightning's interval='step' and "
                "by hand)."
            )
        self.samples_seen += self.pending_samples
        self.tokens_seen += self.pending_tokens
        self.last_batch_samples = self.pending_samples
        self.last_batch_tokens = self.pending_tokens
        self.pending_samples = 0
        self.pending_tokens = 0
        super().step()

    def set_lr_scale(self, scale: float) -> None:
        """Multiply every lr by ``scale`` from now on (e.g. a batch-size scaling rule from
        :mod:`adaptive.schedules.scaling`), applied to the optimizer at once."""
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not scale > 0:
            raise ValueError(f"scale must be a positive real number, got {scale!r}")
        self.lr_scale = float(scale)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    # -- checkpointing -----------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the clock and the schedule, and put the restored lrs into the optimizer so
        the next optimizer step runs at the schedule's value even if the optimizer's own state
        is not loaded."""
        missing = [k for k in _CLOCK_KEYS if k not in state_dict]
        if missing:
            raise ValueError(
                f"state_dict for {type(self).__name__} lacks clock entries {missing}; it was not "
                "produced by a sample-clocked scheduler"
            )
        super().load_state_dict(state_dict)
        self._constructing = False
        last = state_dict.get("_last_lr")
        if last is not None and len(last) == len(self.optimizer.param_groups):
            for group, lr in zip(self.optimizer.param_groups, last, strict=True):
                group["lr"] = lr
