"""Lightning ddp_spawn run (2 CPU processes, gloo) for test_gradient_statistics.py; run as a script:
``python ddp_script_gradient_statistics.py OUT_DIR``."""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptive.callbacks.gradient_statistics import GradientStatisticsLogger


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)
    )


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(
        torch.randn(16, 4, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    )


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    out = sys.argv[1]
    trainer = pl.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_steps=1,
        accumulate_grad_batches=2,
        logger=CSVLogger(out, name="ddp"),
        callbacks=[GradientStatisticsLogger(every_n_steps=1)],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(Module(), DataLoader(make_data(), batch_size=4))


if __name__ == "__main__":
    main()
