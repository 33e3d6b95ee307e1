"""The power scheduler of Shen et al. 2024, "Power Scheduler: A Batch Size and Token Number
Agnostic Learning Rate Scheduler" (arXiv 2408.13359), clocked in tokens actually consumed.

    η_power(n, β) = min(η_max, β · a · n^b)

with ``n`` the tokens seen and ``β`` the batch size in samples (sequences) of the last
optimizer step. Paper defaults (with μP): a = 4, b = -0.51, η_max = 0.02.

The full schedule, with ``W`` = warmup_tokens, ``D`` = decay_tokens, ``N`` = total_tokens:

- warmup, ``n < W``:        ``η = (n / W) · η_power(W, β)`` (linear, up to the value at the end
  of warmup, evaluated at the current β);
- stable, ``W <= n < N-D``: ``η = η_power(n, β)``;
- decay, ``N-D <= n``:     ``η = f(p) · η_power(N - D, β)`` with ``p = (n - (N-D)) / D``
  clipped to 1, ``f`` a decay shape from :mod:`adaptive.schedules.shapes` going from 1 to
  ``min_lr_ratio`` (default: exponential, the WSD-style cool-down; also linear, 1-sqrt, cosine).

Readings this implementation chose (the paper's decay form is not confirmed in our notes):
the decay starts from the power value at ``N - D`` for the *current* β, so the curve is
continuous in ``n`` at both boundaries for a fixed β and follows β when it changes; after ``N``
the lr stays at ``min_lr_ratio · η_power(N - D, β)``; ``η_power(0, β) = η_max`` (``0^b`` is
infinite). IBM's reference code converts steps to tokens with a fixed factor, which is wrong as
soon as the batch size changes; here ``n`` is the running sum of what each step consumed.

Param groups: group 0 follows η exactly; every other group keeps its ratio to group 0's
initial lr (``lr_g = η · lr0_g / lr0_0``).
"""

from __future__ import annotations

import math
import numbers

from torch.optim import Optimizer

from .clock import SampleClockedScheduler, check_nonneg
from .shapes import check_shape, decay_factor


class PowerScheduler(SampleClockedScheduler):
    """Power scheduler (arXiv 2408.13359) on a tokens-consumed clock.

    Args:
        optimizer: the optimizer; group 0's lr is the reference (see module docstring).
        a: the power law's coefficient (> 0).
        b: the power law's exponent (< 0).
        lr_max: the cap η_max; default: the optimizer's lr of param group 0.
        warmup_tokens: length of the linear warmup, in tokens (= samples without tokens).
        decay_tokens: length of the final decay; needs ``total_tokens``.
        total_tokens: the token budget; the decay ends there.
        decay_shape: "exponential" (default), "linear", "1-sqrt" or "cosine".
        min_lr_ratio: the decay ends at this fraction of its start value.
        decay_rate: the rate ``k`` of the exponential shape (1 is IBM's annealing form).

    Example::

        opt = torch.optim.AdamW(model.parameters(), lr=0.02)
        sched = PowerScheduler(opt, a=4.0, b=-0.51, warmup_tokens=10**8,
                               decay_tokens=10**9, total_tokens=10**10)
        for batch in loader:
            ...; opt.step()
            sched.step(samples=batch.shape[0], tokens=batch.numel())
    """

    def __init__(
        self,
        optimizer: Optimizer,
        a: float = 4.0,
        b: float = -0.51,
        lr_max: float | None = None,
        warmup_tokens: float = 0,
        decay_tokens: float = 0,
        total_tokens: float | None = None,
        decay_shape: str = "exponential",
        min_lr_ratio: float = 0.0,
        decay_rate: float = 1.0,
    ) -> None:
        for name, value in (("a", a), ("b", b), ("decay_rate", decay_rate)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a real number, got {value!r}")
        if not a > 0:
            raise ValueError(f"a must be > 0 (the power law's coefficient), got {a}")
        if not b < 0:
            raise ValueError(
                f"b must be < 0 (the lr must fall as tokens grow; the paper uses -0.51), got {b}"
            )
        if not decay_rate > 0:
            raise ValueError(f"decay_rate must be > 0, got {decay_rate}")
        if lr_max is None:
            lr_max = float(optimizer.param_groups[0]["lr"])
        if isinstance(lr_max, bool) or not isinstance(lr_max, numbers.Real) or not lr_max > 0:
            raise ValueError(f"lr_max must be a positive real number, got {lr_max!r}")
        warmup = check_nonneg("warmup_tokens", warmup_tokens)
        decay = check_nonneg("decay_tokens", decay_tokens)
        if total_tokens is None:
            if decay > 0:
                raise ValueError(
                    f"decay_tokens={decay_tokens} needs total_tokens: the decay ends at the budget"
                )
        else:
            total = check_nonneg("total_tokens", total_tokens)
            if warmup + decay > total:
                raise ValueError(
                    f"warmup_tokens + decay_tokens = {warmup + decay} exceeds total_tokens="
                    f"{total}: warmup and decay must fit in the budget"
                )
        check_shape("decay_shape", decay_shape)
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.a = float(a)
        self.b = float(b)
        self.lr_max = float(lr_max)
        self.warmup_tokens = warmup
        self.decay_tokens = decay
        self.total_tokens = None if total_tokens is None else float(total_tokens)
        self.decay_shape = decay_shape
        self.min_lr_ratio = float(min_lr_ratio)
        self.decay_rate = float(decay_rate)
        super().__init__(optimizer)

    def power_lr(self, tokens: float, batch_samples: int) -> float:
        """``min(lr_max, β · a · n^b)``; ``lr_max`` at ``n = 0``."""
        if tokens <= 0:
            return self.lr_max
        return min(self.lr_max, batch_samples * self.a * math.pow(tokens, self.b))

    def lr_value(self, tokens: float, batch_samples: int) -> float:
        """The schedule's absolute lr (group 0) at ``tokens`` seen, last batch ``batch_samples``."""
        if tokens < self.warmup_tokens:
            return tokens / self.warmup_tokens * self.power_lr(self.warmup_tokens, batch_samples)
        if self.decay_tokens > 0 and self.total_tokens is not None:
            start = self.total_tokens - self.decay_tokens
            if tokens >= start:
                p = (tokens - start) / self.decay_tokens
                f = decay_factor(self.decay_shape, p, self.min_lr_ratio, self.decay_rate)
                return f * self.power_lr(start, batch_samples)
        return self.power_lr(tokens, batch_samples)

    def multiplier(self, tokens: float, batch_samples: int) -> float:
        return self.lr_value(tokens, batch_samples) / float(self.base_lrs[0])
