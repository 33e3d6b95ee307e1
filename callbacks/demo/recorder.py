"""Callback that records the demo's training curves without a host sync per step."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class CurveRecorder(L.Callback):
    """Keeps, per optimizer step, the loss, the global batch size and the samples seen so far.

    Losses stay device tensors until the end of each epoch, when they are read in one transfer.
    Test accuracy is recorded after every validation loop, against the samples seen by then.
    """

    def __init__(self) -> None:
        self._pending: list[torch.Tensor] = []
        self.loss: list[float] = []
        self.samples: list[int] = []
        self.batch_size: list[int] = []
        self.eval_samples: list[int] = []
        self.test_accuracy: list[float] = []

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._pending.append(loss.detach())
        global_batch = batch[0].shape[0] * trainer.world_size
        self.batch_size.append(global_batch)
        self.samples.append(pl_module.samples_seen)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        acc = trainer.callback_metrics.get("test_acc")
        if acc is not None:
            self.eval_samples.append(pl_module.samples_seen)
            self.test_accuracy.append(float(acc))

    def _flush(self) -> None:
        if self._pending:
            self.loss.extend(torch.stack(self._pending).float().cpu().tolist())
            self._pending.clear()

    def curves(self) -> dict[str, list[float] | list[int]]:
        self._flush()
        return {
            "samples": self.samples,
            "loss": self.loss,
            "batch_size": self.batch_size,
            "eval_samples": self.eval_samples,
            "test_accuracy": self.test_accuracy,
        }
