"""SampleClock with real Lightning Trainer runs: accumulation, varying batches, DDP on gloo."""

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from adaptive.callbacks.sample_clock import SampleClock
from adaptive.schedules import PowerScheduler, WSDScheduler

TOKENS_PER_SAMPLE = 7
A, B, LR_MAX = 0.05, -0.5, 0.5
W, D, N = 70, 150, 450  # tokens


def power_lr(n, beta):
    """The power schedule of arXiv 2408.13359 written out: warmup, power law, linear decay."""

    def p(x):
        return LR_MAX if x == 0 else min(LR_MAX, beta * A * x**B)

    if n < W:
        return n / W * p(W)
    if n < N - D:
        return p(n)
    return p(N - D) * max(1 - (n - (N - D)) / D, 0.0)


class SizedBatches(torch.utils.data.Sampler):
    """Yields index lists of the given sizes (a varying batch size)."""

    def __init__(self, sizes):
        self.sizes = list(sizes)

    def __iter__(self):
        start = 0
        for s in self.sizes:
            yield list(range(start, start + s))
            start += s

    def __len__(self):
        return len(self.sizes)


class Net(pl.LightningModule):
    def __init__(
        self,
        sizes,
        schedule="power",
        interval="step",
        frequency=1,
        restep=False,
        per_rank=None,
        out=None,
    ):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.sizes, self.schedule, self.interval = sizes, schedule, interval
        self.frequency, self.restep, self.per_rank, self.out = frequency, restep, per_rank, out
        self.used_lrs = []

    def train_dataloader(self):
        sizes = self.sizes if self.per_rank is None else self.per_rank[self.trainer.global_rank]
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(sum(sizes), 4, generator=g), torch.randn(sum(sizes), 1))
        return DataLoader(data, batch_sampler=SizedBatches(sizes))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def on_before_optimizer_step(self, optimizer):
        self.used_lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.restep:
            self.lr_schedulers().step()  # a second step in the same optimizer step
        if self.out is not None and self.trainer.global_rank == 0:
            sched = self.lr_schedulers()
            Path(self.out).write_text(
                json.dumps(
                    {
                        "lrs": self.used_lrs,
                        "tokens": sched.tokens_seen,
                        "beta": sched.last_batch_samples,
                    }
                )
            )

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=LR_MAX)
        if self.schedule is None:
            return opt
        sched = PowerScheduler(
            opt, a=A, b=B, warmup_tokens=W, decay_tokens=D, total_tokens=N, decay_shape="linear"
        )
        return {
            "optimizer": opt,
            "lr_scheduler": {
                "scheduler": sched,
                "interval": self.interval,
                "frequency": self.frequency,
            },
        }


def trainer(callbacks, accumulate=1, max_epochs=1, **kw):
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=callbacks,
        accumulate_grad_batches=accumulate,
        **kw,
    )


def expected_lrs(step_batches):
    """lr used at each optimizer step: the schedule at the tokens before it, last β before it."""
    lrs, tokens, beta = [], 0, 0
    for b in step_batches:
        lrs.append(power_lr(tokens, beta))
        tokens, beta = tokens + b * TOKENS_PER_SAMPLE, b
    return lrs, tokens, beta


MICRO = [3, 5, 2, 9, 4, 4, 7, 1, 5, 6, 10]  # 11 micro-batches, accumulate 2 -> 6 steps
STEPS = [8, 11, 8, 8, 11, 10]  # the last step has a single micro-batch (end of epoch)


def tokens_fn(batch):
    return batch[0].shape[0] * TOKENS_PER_SAMPLE


def test_lightning_interval_step_with_accumulation_and_varying_batches():
    model = Net(MICRO)
    trainer([SampleClock(tokens_fn=tokens_fn)], accumulate=2).fit(model)
    sched = model.lr_schedulers()
    want, tokens, beta = expected_lrs(STEPS)
    assert len(model.used_lrs) == len(STEPS)
    for got, exp in zip(model.used_lrs, want, strict=True):
        assert got == pytest.approx(exp, rel=1e-12, abs=1e-15)
    assert sched.tokens_seen == tokens == 7 * sum(MICRO)
    assert sched.samples_seen == sum(MICRO)
    assert sched.last_batch_samples == beta == 10
    assert sched.last_epoch == len(STEPS)  # stepped exactly once per optimizer step
    assert sched.get_last_lr()[0] == pytest.approx(power_lr(tokens, beta))
    # the decay and warmup were both crossed
    assert 7 * 8 < W and tokens > N - D


def test_callback_drives_a_scheduler_it_was_given():
    opt_holder = {}

    class Owned(Net):
        def configure_optimizers(self):
            return opt_holder["opt"]

    model = Owned(MICRO, schedule=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    opt_holder["opt"] = opt
    sched = WSDScheduler(
        opt, warmup_tokens=10, decay_tokens=20, total_tokens=56, decay_shape="linear"
    )
    trainer([SampleClock(sched)], accumulate=2).fit(model)
    # WSD depends only on samples seen: lr used at step k is the formula at the samples before k
    seen, want = 0, []
    for b in STEPS:
        n = seen
        want.append(0.3 * (n / 10 if n < 10 else 1.0 if n < 36 else 1 - (n - 36) / 20))
        seen += b
    assert model.used_lrs == pytest.approx(want, rel=1e-12)
    assert sched.samples_seen == sum(MICRO) and sched.last_epoch == len(STEPS)


def test_interval_epoch_is_refused():
    with pytest.raises(ValueError, match="interval='epoch'"):
        trainer([SampleClock()]).fit(Net(MICRO, interval="epoch"))
    with pytest.raises(ValueError, match="frequency=2"):
        trainer([SampleClock()]).fit(Net(MICRO, frequency=2))


def test_double_stepping_is_caught():
    with pytest.raises(RuntimeError, match="stepped twice"):
        trainer([SampleClock()]).fit(Net(MICRO, restep=True))


def test_no_scheduler_and_bad_arguments():
    with pytest.raises(ValueError, match="found no sample-clocked scheduler"):
        trainer([SampleClock()]).fit(Net(MICRO, schedule=None))
    with pytest.raises(ValueError, match="ranks='all'"):
        SampleClock(ranks="all")
    with pytest.raises(TypeError, match="SampleClockedScheduler"):
        SampleClock(torch.optim.lr_scheduler.StepLR(torch.optim.SGD([torch.zeros(1)], lr=1), 1))


def _ddp_fit(tmp_path, per_rank, ranks, check_interval=100):
    out = tmp_path / "rank0.json"
    model = Net(None, per_rank=per_rank, out=str(out))
    t = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=2,
        strategy="ddp_notebook",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[SampleClock(tokens_fn=tokens_fn, ranks=ranks, check_interval=check_interval)],
    )
    error = None
    try:
        t.fit(model)
    except Exception as exc:  # the child's error comes back wrapped
        error = exc
    return json.loads(out.read_text()), error


@pytest.mark.ddp
def test_ddp_two_ranks_uneven_batches_sum(tmp_path):
    per_rank = [[3, 6, 2, 8, 5], [4, 1, 7, 2, 9]]
    rec, error = _ddp_fit(tmp_path, per_rank, "sum")
    assert error is None
    steps = [a + b for a, b in zip(*per_rank, strict=True)]
    want, tokens, beta = expected_lrs(steps)
    assert rec["lrs"] == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert rec["tokens"] == tokens and rec["beta"] == beta == 14


@pytest.mark.ddp
def test_ddp_two_ranks_equal_batches_then_divergence_is_caught(tmp_path):
    # equal per-rank batches for 4 steps (global = 2 x local), then rank 1 differs
    per_rank = [[3, 6, 2, 8, 5, 5], [3, 6, 2, 8, 1, 5]]
    rec, error = _ddp_fit(tmp_path, per_rank, "equal", check_interval=2)
    want, _, _ = expected_lrs([2 * b for b in per_rank[0]])
    assert rec["lrs"][:4] == pytest.approx(want[:4], rel=1e-12, abs=1e-15)
    assert error is not None and "unequal batches across ranks" in str(error)
    assert math.isfinite(rec["lrs"][-1])


class Resumable(Net):
    """Net whose optimizer (and, for the callback-driven mode, schedule) is built outside."""

    def __init__(self, mode):
        super().__init__(MICRO, schedule="power" if mode == "lightning" else None)
        self.mode = mode
        self.opt = torch.optim.SGD(self.parameters(), lr=0.3)
        self.sched = WSDScheduler(self.opt, 20, 60, 2 * sum(MICRO), decay_shape="cosine")

    def configure_optimizers(self):
        if self.mode == "lightning":
            return super().configure_optimizers()
        return self.opt


@pytest.mark.parametrize("mode", ["lightning", "callback"])
def test_trainer_resume_from_checkpoint_equals_uninterrupted(mode, tmp_path):
    def clock(model):
        return SampleClock(model.sched if mode == "callback" else None, tokens_fn=tokens_fn)

    full = Resumable(mode)
    trainer([clock(full)], accumulate=2, max_epochs=2).fit(full)

    first = Resumable(mode)
    t1 = trainer([clock(first)], accumulate=2, max_epochs=1)
    t1.fit(first)
    ckpt = tmp_path / "epoch1.ckpt"
    t1.save_checkpoint(ckpt)

    second = Resumable(mode)
    trainer([clock(second)], accumulate=2, max_epochs=2).fit(second, ckpt_path=ckpt)
    assert len(full.used_lrs) == 2 * len(STEPS)
    assert first.used_lrs + second.used_lrs == full.used_lrs
    s_full = full.lr_schedulers() if mode == "lightning" else full.sched
    s_res = second.lr_schedulers() if mode == "lightning" else second.sched
    assert s_res.tokens_seen == s_full.tokens_seen and s_res.last_epoch == s_full.last_epoch
    assert s_res.get_last_lr() == s_full.get_last_lr()
