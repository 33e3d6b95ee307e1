"""Warmup-stable-decay and linear-decay schedules on a tokens-consumed clock.

WSD (MiniCPM, Hu et al. 2024, arXiv 2404.06395), with ``W`` = warmup_tokens, ``D`` =
decay_tokens, ``N`` = total_tokens, ``η`` the param group's initial lr and ``n`` tokens seen::

    η(n) = η · warm(n / W)                    n < W
         = η                                  W <= n < N - D
         = η · decay((n - (N - D)) / D)       N - D <= n   (held at decay(1) after N)

Warmup and decay shapes (linear, cosine, 1-sqrt, exponential) and the minimum-lr ratio are
those of :mod:`adaptive.schedules.shapes`; warmup starts from 0 and the decay ends at
``min_lr_ratio · η``. The schedule does not depend on the batch size β: the same tokens
consumed in any batch-size sequence give the same lr.

Linear decay (Defazio et al. 2023, "When, Why and How Much?", arXiv 2310.07831): the
worst-case-optimal last-iterate schedule ``η(n) = η (1 - n / N)``, here after an optional warmup.
"""

from __future__ import annotations

from torch.optim import Optimizer

from .clock import SampleClockedScheduler, check_nonneg
from .shapes import check_shape, decay_factor, warmup_factor


class WSDScheduler(SampleClockedScheduler):
    """Warmup-stable-decay (arXiv 2404.06395) with its phases measured in tokens (or samples).

    Args:
        optimizer: the optimizer; each group's initial lr is its peak.
        warmup_tokens: warmup length W.
        decay_tokens: decay length D (the last D tokens of the budget).
        total_tokens: the budget N (>= W + D).
        warmup_shape: "linear" (default), "cosine", "1-sqrt" or "exponential".
        decay_shape: "1-sqrt" (default; Hägele et al. 2024, arXiv 2405.18392), "linear",
            "cosine" or "exponential".
        min_lr_ratio: the decay ends at this fraction of the peak.
        decay_rate: rate ``k`` of the exponential shape.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_tokens: float,
        decay_tokens: float,
        total_tokens: float,
        warmup_shape: str = "linear",
        decay_shape: str = "1-sqrt",
        min_lr_ratio: float = 0.0,
        decay_rate: float = 1.0,
    ) -> None:
        warmup = check_nonneg("warmup_tokens", warmup_tokens)
        decay = check_nonneg("decay_tokens", decay_tokens)
        total = check_nonneg("total_tokens", total_tokens)
        if total == 0:
            raise ValueError("total_tokens must be > 0, got 0")
        if warmup > total:
            raise ValueError(f"warmup_tokens={warmup_tokens} is longer than total_tokens={total}")
        if warmup + decay > total:
            raise ValueError(
                f"warmup_tokens + decay_tokens = {warmup + decay} exceeds total_tokens={total}"
            )
        check_shape("warmup_shape", warmup_shape)
        check_shape("decay_shape", decay_shape)
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if not decay_rate > 0:
            raise ValueError(f"decay_rate must be > 0, got {decay_rate}")
        self.warmup_tokens = warmup
        self.decay_tokens = decay
        self.total_tokens = total
        self.warmup_shape = warmup_shape
        self.decay_shape = decay_shape
        self.min_lr_ratio = float(min_lr_ratio)
        self.decay_rate = float(decay_rate)
        super().__init__(optimizer)

    def multiplier(self, tokens: float, batch_samples: int) -> float:
        if tokens < self.warmup_tokens:
            return warmup_factor(self.warmup_shape, tokens / self.warmup_tokens, self.decay_rate)
        start = self.total_tokens - self.decay_tokens
        if tokens < start:
            return 1.0
        if self.decay_tokens == 0:  # no decay phase: the stable value holds
            return 1.0
        p = (tokens - start) / self.decay_tokens
        return decay_factor(self.decay_shape, p, self.min_lr_ratio, self.decay_rate)


class LinearDecayScheduler(WSDScheduler):
    """Linear decay to ``min_lr_ratio`` over the whole budget after an optional linear warmup
    (Defazio et al. 2023, arXiv 2310.07831): ``η(n) = η (1 - (n - W) / (N - W))`` for ``n >= W``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_tokens: float,
        warmup_tokens: float = 0,
        min_lr_ratio: float = 0.0,
    ) -> None:
        total = check_nonneg("total_tokens", total_tokens)
        warmup = check_nonneg("warmup_tokens", warmup_tokens)
        if warmup > total:
            raise ValueError(f"warmup_tokens={warmup_tokens} is longer than total_tokens={total}")
        super().__init__(
            optimizer,
            warmup_tokens=warmup,
            decay_tokens=total - warmup,
            total_tokens=total,
            warmup_shape="linear",
            decay_shape="linear",
            min_lr_ratio=min_lr_ratio,
        )
