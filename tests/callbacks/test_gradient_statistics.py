"""GradientStatisticsLogger in a real Lightning Trainer run, against torch.func references."""

from __future__ import annotations

import copy
import csv

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptive.callbacks.gradient_statistics import GradientStatisticsLogger
from adaptive.stats import per_sample_gradients, reference_statistics

BATCH, ACCUM, EVERY = 4, 2, 2


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.GroupNorm(1, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 4)
        )
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def forward(self, x):
        return self.net(x)

    def on_train_batch_start(self, batch, batch_idx):
        # parameters in force for the accumulation window this micro-batch starts
        if batch_idx % ACCUM == 0:
            self.snapshots[self.trainer.global_step] = copy.deepcopy(self.net.state_dict())

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def dataset(n: int = 24) -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    return TensorDataset(
        torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)
    )


def test_logs_exact_statistics_with_accumulation(tmp_path):
    data = dataset()
    model = Net()
    cb = GradientStatisticsLogger(every_n_steps=EVERY, inner_products=True)
    trainer = pl.Trainer(
        max_steps=3,
        accumulate_grad_batches=ACCUM,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path, name="gs"),
        callbacks=[cb],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=BATCH))
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = {int(r["step"]): r for r in rows if r.get("grad_stats/variance")}
    assert sorted(logged) == [0, 2]  # steps 0 and 2 of 0..2

    ref_net = copy.deepcopy(model.net)
    for step, row in logged.items():
        ref_net.load_state_dict(model.snapshots[step])
        window = slice(step * BATCH * ACCUM, (step + 1) * BATCH * ACCUM)
        x, y = data.tensors[0][window], data.tensors[1][window]
        ref = reference_statistics(per_sample_gradients(ref_net, F.cross_entropy, x, y))
        want = {
            "grad_norm": float(ref["grad_sq_norm"].sqrt()),
            "variance": float(ref["variance"]),
            "noise_scale": float(ref["noise_scale"]),
            "batch_size": float(BATCH * ACCUM),
        }
        for k, v in want.items():
            assert float(row[f"grad_stats/{k}"]) == pytest.approx(v, rel=1e-4), (step, k)
        assert float(row["grad_stats/inner_product_variance"]) > 0
    assert cb.last_metrics["grad_stats/batch_size"] == BATCH * ACCUM
    assert all(not m._forward_hooks for m in model.modules())


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="every_n_steps"):
        GradientStatisticsLogger(every_n_steps=0)
    with pytest.raises(ValueError, match="loss_reduction"):
        GradientStatisticsLogger(loss_reduction="avg")
    with pytest.raises(ValueError, match="fallback"):
        GradientStatisticsLogger(fallback="magic")


@pytest.mark.ddp
def test_ddp_two_processes_log_global_batch_statistics(tmp_path):
    """ddp_spawn on 2 CPU processes with accumulate_grad_batches=2: the logged statistics are those
    of all 16 samples of the first optimizer step (4 per micro-batch × 2 micro-batches × 2 ranks)."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("ddp_script_gradient_statistics.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    row = next(r for r in rows if r.get("grad_stats/variance"))

    spec = importlib.util.spec_from_file_location("ddp_script", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = mod.make_data()
    # 16 samples = 2 ranks × 2 micro-batches × 4: the first step reads all of them, in whatever
    # order the DistributedSampler chose
    x, y = data.tensors
    ref = reference_statistics(per_sample_gradients(mod.make_net(), F.cross_entropy, x, y))
    assert float(row["grad_stats/batch_size"]) == 16
    assert float(row["grad_stats/variance"]) == pytest.approx(float(ref["variance"]), rel=1e-4)
    assert float(row["grad_stats/grad_norm"]) == pytest.approx(
        float(ref["grad_sq_norm"].sqrt()), rel=1e-4
    )
    assert float(row["grad_stats/noise_scale"]) == pytest.approx(
        float(ref["noise_scale"]), rel=1e-4
    )
