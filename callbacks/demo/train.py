"""Train one named run with a Lightning Trainer and measure it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from adaptive.callbacks.demo.module import ImageClassifier
from adaptive.callbacks.demo.recorder import CurveRecorder
from adaptive.callbacks.demo.runs import RunConfig, RunContext
from adaptive.models import small_cnn

_NOT_IN_ROW = ("curves", "model")


@dataclass
class RunResult:
    """One row of the demo table, with the curves behind the plot."""

    name: str
    description: str
    test_accuracy: float
    optimizer_steps: int
    samples_seen: int
    wall_time_s: float
    curves: dict[str, list] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)

    def row(self) -> dict[str, object]:
        """The table's columns (no curves, no model)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_IN_ROW}


def train_run(
    config: RunConfig,
    train: Dataset,
    test: Dataset,
    *,
    epochs: int = 2,
    seed: int = 0,
    progress: bool = True,
    num_workers: int = 0,
) -> RunResult:
    """Train ``config`` for ``epochs`` on ``train``; evaluate on ``test`` after every epoch."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    L.seed_everything(seed, verbose=False)
    ctx = RunContext(train_size=len(train), epochs=epochs)
    module = ImageClassifier(
        small_cnn(),
        optimizer=lambda params: config.optimizer(params, ctx),
        scheduler=(lambda opt: config.scheduler(opt, ctx)) if config.scheduler else None,
    )
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(
        train,
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=num_workers,
    )
    test_loader = DataLoader(test, batch_size=1000, num_workers=num_workers)
    recorder = CurveRecorder()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[recorder, *config.callbacks(ctx)],
    )
    start = time.perf_counter()
    trainer.fit(module, train_loader, test_loader)
    wall = time.perf_counter() - start
    curves = recorder.curves()
    accuracy = curves["test_accuracy"][-1] if curves["test_accuracy"] else float("nan")
    return RunResult(
        name=config.name,
        description=config.description,
        test_accuracy=accuracy,
        optimizer_steps=trainer.global_step,
        samples_seen=module.samples_seen,
        wall_time_s=wall,
        curves=curves,
        model=module.model,
    )


def warm_up(train: Dataset, test: Dataset) -> None:
    """A two-step throwaway fit, so one-time start-up costs do not land in the first run's time."""
    from adaptive.callbacks.demo.runs import RUNS

    config = next(iter(RUNS.values()))
    L.seed_everything(0, verbose=False)
    ctx = RunContext(train_size=len(train), epochs=1)
    module = ImageClassifier(small_cnn(), optimizer=lambda params: config.optimizer(params, ctx))
    trainer = L.Trainer(
        max_steps=2,
        limit_val_batches=1,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(train, batch_size=32), DataLoader(test, batch_size=32))
