"""One process of the end-to-end distributed test (test_distributed_e2e.py); run as a script.

    python ddp_worker_e2e.py RANK WORLD OUT_DIR

``WORLD = 2``: one of two ranks launched like torchrun (``LOCAL_RANK``, ``MASTER_PORT`` set by
the test), real ``Trainer`` runs on DDP/gloo/CPU. ``WORLD = 1``: the single-process reference.
Each fit writes what the test compares to ``OUT_DIR/<fit>_rank<RANK>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptive.callbacks import AdaptiveBatchSize, DynamicMixture, OnlineBatchSelection, SampleClock
from adaptive.mixture import DoReMi, MixtureDataset, MixtureSampler
from adaptive.schedules import PowerScheduler
from adaptive.selection import HighLossSelector, UDSSelector, per_sample_loss

FEATURES, CLASSES, N = 8, 4, 192
GLOBAL_MICRO = 8  # global (super-)batch of one micro step at the start
POWER = dict(a=0.05, b=-0.5, lr_max=0.3, warmup_tokens=16, decay_tokens=64, total_tokens=512)
REFERENCE_LOSSES = [0.2, 0.9, 1.6]


def data(seed: int, n: int = N, scale: float = 1.0) -> TensorDataset:
    """Labels from a fixed random linear teacher, with 20% of them resampled (noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g) * scale
    teacher = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(99))
    y = (x @ teacher).argmax(1)
    noisy = torch.rand(n, generator=g) < 0.2
    y[noisy] = torch.randint(0, CLASSES, (int(noisy.sum()),), generator=g)
    return TensorDataset(x, y)


class Net(pl.LightningModule):
    """A small MLP classifier; ``kind`` picks the loader (plain or mixture)."""

    def __init__(self, kind: str, per_rank: int) -> None:
        super().__init__()
        self.kind, self.per_rank = kind, per_rank
        self.net = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, CLASSES))
        self.trained_ids: list[list[int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def train_dataloader(self):
        if self.kind == "plain":
            ds = data(0)
            ids = TensorDataset(ds.tensors[0], ds.tensors[1], torch.arange(N))
            return DataLoader(ids, batch_size=self.per_rank, shuffle=True)
        sources = [data(10 + i, n=64, scale=1.0 + i) for i in range(3)]
        sampler = MixtureSampler([64, 64, 64], [1, 1, 1], batch_size=GLOBAL_MICRO, seed=3)
        return DataLoader(MixtureDataset(sources), batch_sampler=sampler)

    def training_step(self, batch, batch_idx):
        if self.kind == "plain":
            x, y, ids = batch
            self.trained_ids.append(ids.tolist())
            return nn.functional.cross_entropy(self(x), y)
        (x, y), _ = batch
        per = nn.functional.cross_entropy(self(x), y, reduction="none")
        return {"loss": per.mean(), "sample_losses": per.detach()}

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=POWER["lr_max"])
        sched = PowerScheduler(opt, **POWER)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def trainer(world: int, callbacks: list, max_steps: int) -> pl.Trainer:
    kw: dict = {}
    if world > 1:
        from lightning.pytorch.strategies import DDPStrategy

        kw["strategy"] = DDPStrategy(process_group_backend="gloo")
    return pl.Trainer(
        accelerator="cpu",
        devices=world,
        max_steps=max_steps,
        max_epochs=4,
        callbacks=callbacks,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


def clock_of(t: pl.Trainer) -> dict:
    sched = t.lr_scheduler_configs[0].scheduler
    return {
        "samples": sched.samples_seen,
        "last_batch": sched.last_batch_samples,
        "lr": t.optimizers[0].param_groups[0]["lr"],
        "steps": t.global_step,
    }


def params_of(module: nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def fit_growth_selection(world: int) -> dict:
    """AdaptiveBatchSize + OnlineBatchSelection (UDS) + SampleClock (power) in one Trainer."""
    pl.seed_everything(0, verbose=False)
    per_rank = GLOBAL_MICRO // world
    module = Net("plain", per_rank)
    grow = AdaptiveBatchSize(
        test="norm", eta=0.5, max_batch_size=64, interval=1, max_micro_batch_size=per_rank
    )
    uds = UDSSelector(k=per_rank // 2, alpha=1.0, memory_size=64, seed=1)
    select = OnlineBatchSelection(uds)
    t = trainer(world, [grow, select, SampleClock()], max_steps=10)
    t.fit(module)
    return {
        "history": [(h["batch_size"], h["next_batch_size"], h["proposed"]) for h in grow.history],
        "accumulation": grow.accumulation,
        "grow_samples": grow.samples_seen,
        "memory": uds.state_dict(),
        "samples_trained": select.samples_trained,
        "samples_scored": select.samples_scored,
        "trained_ids": module.trained_ids,
        "clock": clock_of(t),
        "params": params_of(module),
    }


def fit_mixture_selection(world: int) -> dict:
    """DynamicMixture (DoReMi) + OnlineBatchSelection (high loss) + SampleClock in one Trainer."""
    pl.seed_everything(0, verbose=False)
    module = Net("mixture", GLOBAL_MICRO // world)
    mix = DynamicMixture(DoReMi(3, reference_losses=REFERENCE_LOSSES), update_every=2, log=False)
    select = OnlineBatchSelection(
        HighLossSelector(k=GLOBAL_MICRO // world // 2),
        forward_fn=lambda m, b: m(b[0][0]),
        loss_fn=lambda logits, b: per_sample_loss(logits, b[0][1]),
    )
    t = trainer(world, [mix, select, SampleClock()], max_steps=8)
    t.fit(module)
    return {
        "weights": [h["weights"] for h in mix.history],
        "sampler_weights": mix.sampler.weights,
        "samples_trained": select.samples_trained,
        "clock": clock_of(t),
        "params": params_of(module),
    }


def fit_growth_exact(world: int) -> dict:
    """AdaptiveBatchSize + SampleClock; global batches equal to the single-process run."""
    pl.seed_everything(0, verbose=False)
    module = Net("plain", GLOBAL_MICRO // world)
    # global sizes are multiples of 2 in both layouts (world x multiple_of)
    grow = AdaptiveBatchSize(test="norm", eta=0.5, max_batch_size=64, multiple_of=2 // world)
    t = trainer(world, [grow, SampleClock()], max_steps=8)
    t.fit(module)
    return {
        "history": [(h["batch_size"], h["next_batch_size"], h["proposed"]) for h in grow.history],
        "trained_ids": module.trained_ids,
        "clock": clock_of(t),
        "params": params_of(module),
    }


def fit_mixture_exact(world: int) -> dict:
    """DynamicMixture (DoReMi) + SampleClock; weights equal to the single-process run."""
    pl.seed_everything(0, verbose=False)
    module = Net("mixture", GLOBAL_MICRO // world)
    mix = DynamicMixture(DoReMi(3, reference_losses=REFERENCE_LOSSES), update_every=2, log=False)
    t = trainer(world, [mix, SampleClock()], max_steps=8)
    t.fit(module)
    return {
        "weights": [h["weights"] for h in mix.history],
        "clock": clock_of(t),
        "params": params_of(module),
    }


FITS = {
    "growth_selection": fit_growth_selection,
    "mixture_selection": fit_mixture_selection,
    "growth_exact": fit_growth_exact,
    "mixture_exact": fit_mixture_exact,
}


def main() -> None:
    rank, world, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    for name, fit in FITS.items():
        if world == 1 and name.endswith("_selection"):
            continue  # per-rank selection has no single-process equivalent
        torch.save(fit(world), out / f"{name}_rank{rank}_of{world}.pt")


if __name__ == "__main__":
    main()
