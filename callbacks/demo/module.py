"""LightningModule for the demo: a classifier whose optimizer and schedule come from a run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], dict[str, Any]]


class ImageClassifier(L.LightningModule):
    """Cross-entropy classifier that counts the samples it trains on.

    ``samples_seen`` is the number of training samples consumed over all ranks, counted from the
    batches themselves, so it stays right when a callback changes the batch size mid-run.
    Test accuracy is computed in the validation loop on the held-out test split.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self._optimizer_factory = optimizer
        self._scheduler_factory = scheduler
        self.samples_seen = 0
        self._correct = torch.zeros((), dtype=torch.long)
        self._count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.samples_seen += x.shape[0] * self.trainer.world_size
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._correct = torch.zeros((), dtype=torch.long, device=self.device)
        self._count = 0

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self._correct += (self(x).argmax(dim=1) == y).sum()
        self._count += y.shape[0]

    def on_validation_epoch_end(self) -> None:
        # one read per evaluation, not per step
        self.log("test_acc", self._correct.float() / max(self._count, 1), prog_bar=True)

    def configure_optimizers(self):
        optimizer = self._optimizer_factory(list(self.parameters()))
        if self._scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self._scheduler_factory(optimizer)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["samples_seen"] = self.samples_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.samples_seen = int(checkpoint.get("samples_seen", 0))
