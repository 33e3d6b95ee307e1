"""OnlineBatchSelection in real Lightning runs: training_step sees exactly the kept samples.

Every run records, per step, the full super-batch (``on_before_batch_transfer`` runs before the
selection), the parameters and the batch ``training_step`` received. The test then recomputes
the scoring forward with those parameters and a fresh reference selector and checks the kept
rows, and that the SGD update is the gradient of the mean loss over the kept rows only.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from adaptive.callbacks.online_batch_selection import OnlineBatchSelection
from adaptive.selection import (
    HighLossSelector,
    RhoLossSelector,
    UDSSelector,
    UniformSelector,
    per_sample_loss,
)

LR = 0.5
Pair = namedtuple("Pair", ["x", "y"])


class Rows(Dataset):
    def __init__(self, kind: str, n: int = 48, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.kind = kind
        self.x = torch.randn(n, 4, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.ids = torch.randint(0, 11, (n, 6), generator=g)
        self.mask = torch.ones(n, 6, dtype=torch.long)
        self.mask[::2, 4:] = 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.kind == "tensor":
            return self.x[i]
        if self.kind == "tuple":
            return self.x[i], self.y[i]
        if self.kind == "namedtuple":
            return Pair(self.x[i], self.y[i])
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.ids[i]}


class Net(pl.LightningModule):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 5)
        self.lin = nn.Linear(4, 3)
        self.head = nn.Linear(5, 11)
        self.drop = nn.Dropout(0.5)  # eval-mode scoring must switch it off
        self.supers, self.params, self.seen = [], [], []

    def forward(self, x=None, input_ids=None, attention_mask=None):
        if input_ids is not None:
            return self.head(self.emb(input_ids))
        return self.lin(self.drop(x) if self.kind == "tensor" else x)

    def loss(self, batch):
        if self.kind == "tensor":
            return self.lin(batch).pow(2).mean()  # no dropout: the update is checkable
        if self.kind == "dict":
            logits = self(input_ids=batch["input_ids"])
            return F.cross_entropy(logits.transpose(1, 2), batch["labels"])
        return F.cross_entropy(self(batch[0]), batch[1])

    def on_before_batch_transfer(self, batch, dataloader_idx):
        if self.trainer.training:
            self.supers.append(copy.deepcopy(batch))
        return batch

    def training_step(self, batch, batch_idx):
        self.params.append({k: v.detach().clone() for k, v in self.state_dict().items()})
        self.seen.append(copy.deepcopy(batch))
        return self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def _fit(kind, selection, epochs=1, ckpt=None, model=None, extra=(), batch_size=8):
    model = model or Net(kind)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[selection, *extra],
    )
    trainer.fit(model, DataLoader(Rows(kind), batch_size=batch_size), ckpt_path=ckpt)
    return model, trainer


def _take(batch, idx):
    if isinstance(batch, torch.Tensor):
        return batch[idx]
    if isinstance(batch, dict):
        return {k: v[idx] for k, v in batch.items()}
    return (
        type(batch)(*(v[idx] for v in batch))
        if hasattr(batch, "_fields")
        else [v[idx] for v in batch]
    )


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b)
    else:
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y)


def _reference_keep(kind, selector, model, supers, params, holdout=None):
    """Re-score every super-batch with the step's parameters and a fresh selector."""
    ref = Net(kind).eval()
    kept = []
    for batch, state in zip(supers, params, strict=True):
        ref.load_state_dict(state)
        with torch.no_grad():
            if kind == "dict":
                logits = ref(input_ids=batch["input_ids"])
            else:
                logits = ref(batch if kind == "tensor" else batch[0])
        if isinstance(selector, UDSSelector):
            mask = batch["attention_mask"] if kind == "dict" else None
            kept.append(selector(logits, mask))
        elif isinstance(selector, HighLossSelector):
            kept.append(selector(per_sample_loss(logits, batch[1])))
        else:
            hold = holdout(batch[0])
            kept.append(
                selector(per_sample_loss(logits, batch[1]), per_sample_loss(hold, batch[1]))
            )
    return kept


@pytest.mark.parametrize(
    ("kind", "make"),
    [
        ("tensor", lambda: UDSSelector(k=3, alpha=1.0, memory_size=10)),
        ("tuple", lambda: HighLossSelector(k=3)),
        ("namedtuple", lambda: UDSSelector(k=3, alpha=0.5, memory_size=10)),
        ("dict", lambda: UDSSelector(k=3, alpha=2.0, memory_size=10, max_length=6)),
    ],
)
def test_training_step_sees_only_the_kept_rows(kind, make):
    selection = OnlineBatchSelection(make())
    model, _ = _fit(kind, selection)
    assert len(model.seen) == 6 and selection.samples_trained == 18
    assert selection.samples_scored == 48
    kept = _reference_keep(kind, make(), model, model.supers, model.params)
    for super_batch, seen, idx in zip(model.supers, model.seen, kept, strict=True):
        _assert_same(seen, _take(super_batch, idx))
    assert model.training  # modes restored after the eval-mode scoring
    if kind == "tensor":
        # SGD step = gradient of the mean loss over the 3 kept rows, not the 8 candidates
        ref = Net(kind)
        ref.load_state_dict(model.params[0])
        ref.loss(_take(model.supers[0], kept[0])).backward()
        torch.testing.assert_close(
            model.params[1]["lin.weight"], model.params[0]["lin.weight"] - LR * ref.lin.weight.grad
        )


def test_rho_loss_with_holdout_model_and_uniform():
    holdout = nn.Linear(4, 3)
    selection = OnlineBatchSelection(RhoLossSelector(k=2), holdout_model=holdout)
    model, _ = _fit("tuple", selection)
    kept = _reference_keep(
        "tuple", RhoLossSelector(k=2), model, model.supers, model.params, holdout
    )
    for super_batch, seen, idx in zip(model.supers, model.seen, kept, strict=True):
        _assert_same(seen, _take(super_batch, idx))
    model, _ = _fit("tuple", OnlineBatchSelection(UniformSelector(k=5, seed=3)))
    g = torch.Generator().manual_seed(3)
    for super_batch, seen in zip(model.supers, model.seen, strict=True):
        _assert_same(seen, _take(super_batch, torch.randperm(8, generator=g)[:5]))


class CountBatches(pl.Callback):
    def __init__(self):
        self.count = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.count += batch.shape[0]


def test_later_hooks_and_sample_clock_count_trained_samples():
    counter = CountBatches()
    selection = OnlineBatchSelection(UDSSelector(k=3, alpha=1.0))
    _fit("tensor", selection, extra=[counter])
    assert counter.count == selection.samples_trained == 18
    schedules = pytest.importorskip("adaptive.schedules", reason="sample-clocked schedules absent")
    sample_clock = pytest.importorskip(
        "adaptive.callbacks.sample_clock", reason="SampleClock absent"
    )

    class Flat(schedules.SampleClockedScheduler):
        def multiplier(self, tokens, batch_samples):
            return 1.0

    class ClockedNet(Net):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=LR)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": Flat(opt), "interval": "step"}}

    selection = OnlineBatchSelection(UDSSelector(k=3, alpha=1.0))
    _, trainer = _fit(
        "tensor", selection, model=ClockedNet("tensor"), extra=[sample_clock.SampleClock()]
    )
    assert trainer.lr_scheduler_configs[0].scheduler.samples_seen == selection.samples_trained


def test_checkpoint_resume_matches_uninterrupted_run(tmp_path):
    make = lambda: OnlineBatchSelection(UDSSelector(k=3, alpha=1.0, memory_size=10))  # noqa: E731
    full_sel = make()
    full, _ = _fit("tuple", full_sel, epochs=2)
    first_sel = make()
    _, trainer = _fit("tuple", first_sel, epochs=1)
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    state = torch.load(tmp_path / "one.ckpt", weights_only=True)
    assert any("OnlineBatchSelection" in key for key in state["callbacks"])
    resumed_sel = make()
    resumed, _ = _fit("tuple", resumed_sel, epochs=2, ckpt=str(tmp_path / "one.ckpt"))
    torch.testing.assert_close(resumed_sel.selector.memory(), full_sel.selector.memory())
    assert resumed_sel.samples_trained == full_sel.samples_trained == 36
    for key, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value)


def test_bad_configuration_errors():
    with pytest.raises(TypeError, match="CABSSampler is a batch sampler"):
        OnlineBatchSelection(object())
    with pytest.raises(ValueError, match="needs holdout_model"):
        OnlineBatchSelection(RhoLossSelector(k=2))
    with pytest.raises(ValueError, match="only used with RhoLossSelector"):
        OnlineBatchSelection(HighLossSelector(k=2), holdout_model=nn.Linear(2, 2))
    with pytest.raises(TypeError, match="cannot find labels"):
        _fit("tensor", OnlineBatchSelection(HighLossSelector(k=2)))


DDP_SCRIPT = """
import sys, torch, lightning.pytorch as pl
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from adaptive.selection import UDSSelector
from adaptive.callbacks.online_batch_selection import OnlineBatchSelection

out = sys.argv[1]

class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)
        self.log_ = {"supers": [], "seen": [], "params": []}
    def forward(self, x):
        return self.lin(x)
    def on_before_batch_transfer(self, batch, i):
        if self.trainer.training:
            self.log_["supers"].append(batch[0].clone())
        return batch
    def training_step(self, batch, i):
        self.log_["params"].append({k: v.detach().clone() for k, v in self.state_dict().items()})
        self.log_["seen"].append(batch[0].clone())
        return self.lin(batch[0]).pow(2).mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
sel = OnlineBatchSelection(UDSSelector(k=3, alpha=1.0, memory_size=12))
model = Net()
trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                     enable_progress_bar=False, enable_checkpointing=False,
                     enable_model_summary=False, callbacks=[sel])
trainer.fit(model, DataLoader(TensorDataset(x), batch_size=8))
model.log_["memory"] = sel.selector.memory().clone()
model.log_["samples_trained"] = sel.samples_trained
torch.save(model.log_, f"{out}/rank{trainer.global_rank}.pt")
"""


@pytest.mark.ddp
def test_ddp_ranks_agree_on_memory_and_counts(tmp_path):
    script = tmp_path / "ddp_selection.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    logs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # 64 samples, 2 ranks, super-batches of 8: 4 steps of 3 kept samples per rank
    assert logs[0]["samples_trained"] == logs[1]["samples_trained"] == 4 * 3 * 2
    torch.testing.assert_close(logs[0]["memory"], logs[1]["memory"])
    # reference: one selector scoring both ranks' super-batches against the shared memory
    ref, lin = UDSSelector(k=3, alpha=1.0, memory_size=12), nn.Linear(4, 3)
    for step in range(4):
        lin.load_state_dict({k[4:]: v for k, v in logs[0]["params"][step].items()})
        chosen = []
        for log in logs:
            with torch.no_grad():
                scores, sketches, _ = ref.score(lin(log["supers"][step]))
            keep = torch.topk(scores, 3).indices
            torch.testing.assert_close(log["seen"][step], log["supers"][step][keep])
            chosen.append(sketches[keep])
        ref.push(torch.cat(chosen))
    torch.testing.assert_close(ref.memory(), logs[0]["memory"])
