"""The demo's named run configurations: one row of the results table each.

A run names its optimizer, batch size, optional learning-rate schedule and extra callbacks as
factories of a :class:`RunContext`, so schedules can be sized in samples for any data budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import nn


@dataclass(frozen=True)
class RunContext:
    """What a run's factories may size themselves by."""

    train_size: int  # training samples per epoch
    epochs: int

    @property
    def total_samples(self) -> int:
        return self.train_size * self.epochs


OptimizerFactory = Callable[[list[nn.Parameter], RunContext], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, RunContext], dict[str, Any]]
CallbacksFactory = Callable[[RunContext], list[L.Callback]]


def _no_callbacks(ctx: RunContext) -> list[L.Callback]:
    return []


@dataclass(frozen=True)
class RunConfig:
    """A named training configuration of the demo."""

    name: str
    description: str
    optimizer: OptimizerFactory
    batch_size: int = 128
    scheduler: SchedulerFactory | None = None
    callbacks: CallbacksFactory = field(default=_no_callbacks)

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"name must be a non-empty word, got {self.name!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def _adam(params: list[nn.Parameter], ctx: RunContext) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


def _adagrad(params: list[nn.Parameter], ctx: RunContext) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(params, lr=0.01)


def _sgd_momentum(params: list[nn.Parameter], ctx: RunContext) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _power_schedule(opt: torch.optim.Optimizer, ctx: RunContext) -> dict[str, Any]:
    from adaptive.schedules import PowerScheduler

    total = ctx.total_samples  # images carry no token notion: tokens = samples
    warmup = total // 20
    # a chosen so that beta * a * n^b reaches lr_max at the end of warmup at beta = 128
    lr_max, b = 0.1, -0.51
    a = lr_max / (128 * warmup**b)
    schedule = PowerScheduler(
        opt,
        a=a,
        b=b,
        lr_max=lr_max,
        warmup_tokens=warmup,
        decay_tokens=total // 10,
        total_tokens=total,
    )
    return {"scheduler": schedule, "interval": "step", "frequency": 1}


def _sample_clock(ctx: RunContext) -> list[L.Callback]:
    from adaptive.callbacks.sample_clock import SampleClock

    return [SampleClock()]


def _norm_test_growth(ctx: RunContext) -> list[L.Callback]:
    from adaptive.callbacks.adaptive_batch_size import AdaptiveBatchSize

    # the settings that matched fixed batch 32 in a third of its steps on 3 epochs
    # (benchmarks/results/adaptive_batch.md): lr grown with the batch, batch capped at 128
    return [
        AdaptiveBatchSize(test="norm", eta=1.0, max_batch_size=128, interval=2, lr_scaling="linear")
    ]


RUNS: dict[str, RunConfig] = {
    run.name: run
    for run in (
        RunConfig("adam", "Adam lr 1e-3, batch 128 (baseline)", _adam),
        RunConfig("adagrad", "AdaGrad lr 0.01, batch 128 (baseline)", _adagrad),
        RunConfig(
            "power-scheduler",
            "SGD momentum 0.9, batch 128, power scheduler (b -0.51, lr_max 0.1, 5% warmup, "
            "10% exponential decay) clocked in samples; Shen et al. 2024",
            _sgd_momentum,
            scheduler=_power_schedule,
            callbacks=_sample_clock,
        ),
        RunConfig(
            "adaptive-batch",
            "AdaGrad lr 0.01 x batch/32, batch 32 grown by the norm test (eta 1, interval 2, "
            "max 128); AdAdaGrad, Lau et al. 2024, with linear lr scaling",
            _adagrad,
            batch_size=32,
            callbacks=_norm_test_growth,
        ),
    )
}
