"""The callbacks as a Lightning user meets them (issue 20): each set-up in a real, tiny Trainer.

1. the user's sampler is kept (weighted, subset) while the batch grows, and resumes exactly;
2. growth + selection measure, size and rescale by the kept samples; growth + selection +
   SampleClock + GradientStatisticsLogger in one Trainer; mixture + selection + schedule + logger;
3. the resized loader has a length: progress-bar total, validation at each epoch's end,
   OneCycleLR with ``estimated_stepping_batches``;
4. errors at ``setup`` (before any batch), not at the first batch;
5. resuming with another ``num_workers``;
6. (namespace: ``tests/callbacks/test_namespace.py``);
7. defaults (UDS's α, the default loss on language-model logits).
"""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import (
    DataLoader,
    RandomSampler,
    Sampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from adaptive.callbacks import (
    AdaptiveBatchSize,
    DynamicMixture,
    GradientStatisticsLogger,
    OnlineBatchSelection,
    SampleClock,
)
from adaptive.mixture import DoReMi, GrowableMixtureSampler, MixtureDataset, MixtureSampler
from adaptive.schedules import LinearDecayScheduler
from adaptive.selection import HighLossSelector, UDSSelector
from adaptive.stats import UnsupportedModuleError

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LitLogger.*")

N = 480


def _dataset(seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 6, generator=g)
    w = torch.randn(6, 3, generator=g)
    y = (x @ w + 0.7 * torch.randn(N, 3, generator=g)).argmax(1)
    return TensorDataset(x, y, torch.arange(N))


class Net(pl.LightningModule):
    """A 2-layer classifier whose loader the tests choose (sampler, batch size, workers)."""

    def __init__(self, loader_kw=None, lr=0.05, dataset=None, sched=None, val=False):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.dataset = dataset if dataset is not None else _dataset()
        self.loader_kw = {"batch_size": 8, "shuffle": True, **(loader_kw or {})}
        self.lr, self.sched, self.val = lr, sched, val
        self.candidates: list[int] = []  # loader batch sizes, before any selection
        self.val_epochs: list[int] = []
        self.steps_called = 0

    def forward(self, x):
        return self.net(x)

    def on_before_batch_transfer(self, batch, dataloader_idx):
        if self.trainer.training:
            self.candidates.append(int(batch[0].shape[0]))
        return batch

    def training_step(self, batch, batch_idx):
        self.steps_called += 1
        x, y, _ = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def train_dataloader(self):
        return DataLoader(self.dataset, **self.loader_kw)

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.val_epochs.append(self.current_epoch)

    def val_dataloader(self):
        return DataLoader(self.dataset, batch_size=64) if self.val else []

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.sched == "onecycle":
            total = self.trainer.estimated_stepping_batches
            s = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=total)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": s, "interval": "step"}}
        if self.sched == "linear-samples":
            s = LinearDecayScheduler(opt, total_tokens=2 * N)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": s, "interval": "step"}}
        return opt


class Seen(pl.Callback):
    """What training_step received: sizes and dataset indices, per batch."""

    def __init__(self):
        self.sizes, self.indices, self.totals, self.steps = [], [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sizes.append(int(batch[0].shape[0]))
        self.indices.append(batch[2].tolist())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar = trainer.progress_bar_callback
        total = bar.train_progress_bar.total if isinstance(bar, TQDMProgressBar) else None
        self.totals.append((trainer.current_epoch, batch_idx, total, trainer.num_training_batches))


def _trainer(callbacks, **kw):
    args = dict(
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        num_sanity_val_steps=0,
    )
    args.update(kw)
    return pl.Trainer(callbacks=callbacks, **args)


def _grows(**kw):
    args = dict(test="norm", eta=0.3, max_batch_size=64, interval=1)
    args.update(kw)
    return AdaptiveBatchSize(**args)


# ------------------------------------------------------------------ 1. the sampler is kept
def test_weighted_and_subset_samplers_are_kept_while_the_batch_grows():
    labels = _dataset().tensors[1]
    weights = (labels == 0).double()  # class balancing taken to the extreme: class 0 only
    weighted = WeightedRandomSampler(weights, num_samples=N, replacement=True)
    cb, seen = _grows(), Seen()
    _trainer([cb, seen]).fit(Net({"sampler": weighted, "shuffle": None}))
    assert max(seen.sizes) > 8, "the batch never grew"
    flat = [i for b in seen.indices for i in b]
    assert len(flat) == N and set(labels[flat].tolist()) == {0}
    # the draw is the sampler's own, seeded with AdaptiveBatchSize(seed=0) + epoch 0
    torch.manual_seed(0)
    assert flat == list(WeightedRandomSampler(weights, num_samples=N, replacement=True))

    split = list(range(0, N, 3))  # a train split: the other two thirds are held out
    cb, seen = _grows(), Seen()
    _trainer([cb, seen], max_epochs=2).fit(
        Net({"sampler": SubsetRandomSampler(split), "shuffle": None})
    )
    assert max(seen.sizes) > 8
    epoch0 = [i for b in seen.indices for i in b][: len(split)]
    assert sorted(epoch0) == split  # each held-in sample once, nothing else
    assert set(i for b in seen.indices for i in b) == set(split)


class _PythonRandom(Sampler[int]):
    def __len__(self):
        return N

    def __iter__(self):
        import random

        return iter(random.sample(range(N), N))


def _run_with_checkpoint(tmp_path, sampler_fn, loader_kw, ckpt=None, workers=0):
    """Two epochs; the uninterrupted run saves a checkpoint every 7 optimizer steps (what
    ModelCheckpoint(every_n_train_steps=...) does mid-epoch); a run given ``ckpt`` resumes."""
    cb, seen = _grows(max_batch_size=48, interval=2, seed=3), Seen()
    saver = ModelCheckpoint(
        dirpath=tmp_path, filename="{step}", every_n_train_steps=4, save_top_k=-1
    )
    trainer = _trainer([cb, seen, saver], max_epochs=2, enable_checkpointing=True)
    model = Net({"sampler": sampler_fn(), "num_workers": workers, **loader_kw})
    trainer.fit(model, ckpt_path=ckpt)
    return cb, seen


@pytest.mark.parametrize("own_generator", [False, True])
def test_a_wrapped_sampler_resumes_exactly_through_fit_ckpt_path(tmp_path, own_generator):
    labels = _dataset().tensors[1]

    def sampler():
        gen = torch.Generator().manual_seed(5) if own_generator else None
        return WeightedRandomSampler(1.0 + labels.double(), N, replacement=True, generator=gen)

    full_cb, full = _run_with_checkpoint(tmp_path / "full", sampler, {"shuffle": None})
    per_epoch = len(full.indices) - sum(1 for r in full.totals if r[0] == 1)
    assert per_epoch > 12  # steps 4 and 12 are inside epoch 0, a later multiple inside epoch 1
    last = 4 * ((len(full.indices) - 1) // 4)
    assert last > per_epoch
    for step in (4, 12, last):
        ckpt = tmp_path / "full" / f"step={step}.ckpt"
        cb, rest = _run_with_checkpoint(tmp_path / "again", sampler, {"shuffle": None}, str(ckpt))
        assert rest.indices == full.indices[step:], step
        assert cb.history == full_cb.history


def test_a_sampler_that_cannot_be_replayed_is_refused_at_setup():
    model = Net({"sampler": _PythonRandom(), "shuffle": None})
    with pytest.raises(ValueError, match="cannot wrap the loader's sampler _PythonRandom"):
        _trainer([_grows()]).fit(model)
    assert model.steps_called == 0


# ------------------------------------------------------------------ 2. growth + selection
def _kept_norm_test(module, x, y, eta):
    """b̂ = V/(η²‖ḡ‖²) of the batch (x, y) from torch.func per-sample gradients."""
    params = {k: v.detach() for k, v in module.net.named_parameters()}

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(module.net, p, (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    G = torch.cat([t.reshape(x.shape[0], -1) for t in g.values()], 1).double()
    return (G.var(0, correction=1).sum() / (eta**2 * G.mean(0).square().sum())).item()


class _KeptReference(pl.Callback):
    """The norm test recomputed on what training_step got, at the first few decisions."""

    def __init__(self, eta):
        self.eta, self.refs, self._batch = eta, {}, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch = batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if len(self.refs) < 3:
            x, y, _ = self._batch
            self.refs[trainer.global_step] = _kept_norm_test(pl_module, x, y, self.eta)


def test_growth_with_selection_measures_sizes_and_scales_by_the_kept_samples():
    eta = 0.3
    grow = _grows(eta=eta, max_batch_size=16, lr_scaling="linear")
    select = OnlineBatchSelection(HighLossSelector(k=8))  # keep 8 of each 32 candidates
    seen, ref = Seen(), _KeptReference(eta)
    model = Net({"batch_size": 32}, lr=0.01)
    _trainer([grow, select, seen, ref], max_epochs=2).fit(model)
    # the test measured the kept batch, and its proposal is the norm test of that batch
    for h in grow.history:
        assert h["stats_batch_size"] == seen.sizes[int(h["step"])]  # kept, not candidates
    for step, b_hat in ref.refs.items():
        got = next(h["proposed"] for h in grow.history if int(h["step"]) == step)
        assert got == pytest.approx(b_hat, rel=1e-3)
    # sizes: kept batches grow to max_batch_size; the pool is 4x the kept batch, always
    assert grow.batch_size == 16 and max(seen.sizes) == 16
    for candidates, kept in zip(model.candidates, seen.sizes, strict=True):
        assert kept == max(1, candidates * 8 // 32)
    # every decision sized the kept batch (history "batch_size" is the kept target)
    assert grow.history[0]["batch_size"] == 8
    full = [c for c in model.candidates if c == 4 * 16]
    assert len(full) >= 2
    # lr rescaled by the kept batch: 0.01 × 16 / 8
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * 16 / 8)
    assert select.samples_trained == grow.samples_seen == sum(seen.sizes)
    assert select.samples_scored == 2 * N


def test_growth_selection_schedule_and_logger_in_one_trainer():
    grow = _grows(max_batch_size=40, lr_scaling="linear")
    select = OnlineBatchSelection(UDSSelector(k=4))  # 4 of each 16, default α
    logger = GradientStatisticsLogger(every_n_steps=1)
    logged = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if logger.last_metrics:
                logged.append((logger.last_metrics["grad_stats/batch_size"], batch[0].shape[0]))

    seen = Seen()
    model = Net({"batch_size": 16}, lr=0.02, sched="linear-samples")
    trainer = _trainer([grow, select, SampleClock(), logger, Record(), seen])
    trainer.fit(model)
    sched = trainer.lr_scheduler_configs[0].scheduler
    kept = sum(seen.sizes)
    assert grow.batch_size == 40 and kept == grow.samples_seen == select.samples_trained
    assert kept == N // 4  # one epoch keeps a quarter of every pool
    assert sched.samples_seen == kept  # the clock counts what was trained on
    # η = η0 (1 − n/N_total) · (b/b0): the schedule on kept samples, scaled by the kept batch
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.02 * (1 - kept / (2 * N)) * 40 / 4)
    # the logger measured the kept batch of every step
    assert logged and all(b == k for b, k in logged)


def test_mixture_selection_schedule_and_logger_in_one_trainer():
    # AdaptiveBatchSize and DynamicMixture cannot share a loader (each owns the batch sampler)
    g = torch.Generator().manual_seed(1)
    sources = [
        TensorDataset(torch.randn(80, 6, generator=g) + d, torch.full((80,), d % 3))
        for d in range(3)
    ]
    mix = MixtureDataset(sources)
    sampler = MixtureSampler([80, 80, 80], [1 / 3] * 3, batch_size=16, seed=0)

    class MixNet(Net):
        def on_before_batch_transfer(self, batch, dataloader_idx):
            return batch

        def training_step(self, batch, batch_idx):
            (x, y), _ = batch  # MixtureDataset: (item, source id)
            losses = nn.functional.cross_entropy(self.net(x), y, reduction="none")
            return {"loss": losses.mean(), "sample_losses": losses}

        def train_dataloader(self):
            return DataLoader(mix, batch_sampler=sampler)

    rule = DoReMi(3, reference_losses=[0.5, 0.5, 0.5])
    dyn = DynamicMixture(rule, update_every=3, log=False)
    select = OnlineBatchSelection(
        HighLossSelector(k=8),
        forward_fn=lambda module, batch: module(batch[0][0]),
        loss_fn=lambda logits, batch: nn.functional.cross_entropy(
            logits, batch[0][1], reduction="none"
        ),
    )
    logger = GradientStatisticsLogger(every_n_steps=2)
    model = MixNet(lr=0.02, sched="linear-samples")
    trainer = _trainer([dyn, select, SampleClock(), logger], max_steps=12)
    trainer.fit(model)
    assert sampler.batch_size == 16 and select.samples_trained == 12 * 8
    assert trainer.lr_scheduler_configs[0].scheduler.samples_seen == 12 * 8
    assert len(dyn.history) == 1 + 12 // 3
    assert logger.last_metrics["grad_stats/batch_size"] == 8.0


def test_growth_selection_mixture_schedule_and_logger_in_one_trainer():
    """All five at once, on adaptive.mixture.GrowableMixtureSampler: the batch grows in kept
    samples (the pool at twice that), the mixture reweights its sources, the schedule counts
    kept samples and the lr follows the kept batch, the logger measures the kept batch."""
    g = torch.Generator().manual_seed(1)
    sources = [
        TensorDataset(torch.randn(80, 6, generator=g) + d, torch.full((80,), d % 3))
        for d in range(3)
    ]
    mix = MixtureDataset(sources)
    sampler = GrowableMixtureSampler([80, 80, 80], [1 / 3] * 3, 16, num_samples=N, seed=0)

    class MixNet(Net):
        def on_before_batch_transfer(self, batch, dataloader_idx):
            if self.trainer.training:
                self.candidates.append(int(batch[0][0].shape[0]))
            return batch

        def training_step(self, batch, batch_idx):
            (x, y), _ = batch
            losses = nn.functional.cross_entropy(self.net(x), y, reduction="none")
            return {"loss": losses.mean(), "sample_losses": losses}

        def train_dataloader(self):
            return DataLoader(mix, batch_sampler=sampler)

    kept: list[int] = []

    class Kept(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            kept.append(int(batch[0][0].shape[0]))

    grow = _grows(max_batch_size=24, lr_scaling="linear")
    dyn = DynamicMixture(DoReMi(3, reference_losses=[0.5, 0.5, 0.5]), update_every=3, log=False)
    select = OnlineBatchSelection(
        HighLossSelector(k=8),  # 8 of each 16 candidates: the pool is twice the kept batch
        forward_fn=lambda module, batch: module(batch[0][0]),
        loss_fn=lambda logits, batch: nn.functional.cross_entropy(
            logits, batch[0][1], reduction="none"
        ),
    )
    logger = GradientStatisticsLogger(every_n_steps=1)
    logged: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append(logger.last_metrics["grad_stats/batch_size"])

    model = MixNet(lr=0.02, sched="linear-samples")
    trainer = _trainer([grow, dyn, select, SampleClock(), logger, Record(), Kept()])
    trainer.fit(model)
    total = sum(kept)
    assert total == grow.samples_seen == select.samples_trained
    assert trainer.lr_scheduler_configs[0].scheduler.samples_seen == total
    assert max(kept) > 8 and grow.batch_size <= 24  # it grew, in kept samples
    for candidates, k in zip(model.candidates, kept, strict=True):
        assert k == max(1, candidates // 2)
    assert sum(model.candidates) == N  # the epoch is the sampler's budget of candidates
    assert logged == [float(k) for k in kept]  # the logger measured what was trained on
    steps = len(kept)
    assert [h["step"] for h in dyn.history] == list(range(0, steps + 1, 3))[: 1 + steps // 3]
    torch.testing.assert_close(sampler.weights, dyn.rule.weights.to(sampler.weights.dtype))
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.02 * (1 - total / (2 * N)) * grow.batch_size / 8)


# ------------------------------------------------------------------ 3. a length
def test_progress_total_epoch_end_and_validation_follow_the_growing_batch():
    cb, seen = _grows(max_batch_size=64), Seen()
    model = Net(val=True)
    trainer = _trainer(
        [cb, seen, TQDMProgressBar(refresh_rate=1)], max_epochs=2, enable_progress_bar=True
    )
    assert len(model.train_dataloader()) == N // 8
    trainer.fit(model)
    for epoch in (0, 1):
        rows = [r for r in seen.totals if r[0] == epoch]
        ran = len(rows)
        # the bar's total and Lightning's count equal the batches the epoch really had
        assert rows[-1][2] == rows[-1][3] == ran, rows
    assert model.val_epochs == [0, 1]  # validation ran at the end of both epochs
    # len() of the loader: the next epoch's plan at the final size, 480 / 64
    assert len(trainer.train_dataloader) == math.ceil(N / 64)
    assert len(seen.sizes) < 2 * N // 8  # the batch did grow


def test_onecycle_with_estimated_stepping_batches_follows_the_sample_budget():
    model = Net(lr=0.1, sched="onecycle")
    cb, seen = _grows(max_batch_size=48), Seen()
    trainer = _trainer([cb, seen], max_epochs=2)
    trainer.fit(model)
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.total_steps == 2 * N // 8  # the budget in initial batches
    assert trainer.global_step < sched.total_steps  # fewer optimizer steps: the batch grew
    # the schedule reached its end exactly with the budget: the lr of a plain OneCycleLR
    # stepped once per initial batch of the budget (what Lightning does without growth)
    assert sched.last_epoch == sched.total_steps
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=sched.total_steps)
    for _ in range(sched.total_steps):
        opt.step()
        ref.step()
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(
        opt.param_groups[0]["lr"], rel=1e-9
    )


class _Lrs(pl.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_onecycle_under_growth_resumes_exactly(tmp_path):
    def run(ckpt=None, out="full"):
        lrs, seen = _Lrs(), Seen()
        saver = ModelCheckpoint(
            dirpath=tmp_path / out, filename="{step}", every_n_train_steps=3, save_top_k=-1
        )
        trainer = _trainer(
            [_grows(max_batch_size=48), seen, lrs, saver], max_epochs=2, enable_checkpointing=True
        )
        trainer.fit(Net(lr=0.1, sched="onecycle"), ckpt_path=ckpt)
        return lrs.lrs, seen, trainer.lr_scheduler_configs[0].scheduler

    full, seen, sched = run()
    per_epoch = sum(1 for r in seen.totals if r[0] == 0)
    assert sched.last_epoch == sched.total_steps
    # a checkpoint inside epoch 0, the one at the end of epoch 0 if there is one, one in epoch 1
    steps = [3, 3 * (per_epoch // 3), 3 * ((len(full) - 1) // 3)]
    for step in steps:
        lrs, _, resumed = run(str(tmp_path / "full" / f"step={step}.ckpt"), out=f"r{step}")
        assert lrs == full[step:], step
        assert resumed.last_epoch == sched.total_steps


def test_a_step_schedule_under_max_steps_is_refused_at_fit_start():
    model = Net(lr=0.1, sched="onecycle")
    with pytest.raises(ValueError, match=r"max_steps=5.*SampleClock.*WSDScheduler"):
        _trainer([_grows()], max_steps=5).fit(model)
    assert model.steps_called == 0
    # an lr scale OneCycleLR would overwrite at its next step is refused, not dropped
    model = Net(lr=0.1, sched="onecycle")
    with pytest.raises(ValueError, match=r"lr_scaling='linear'.*OneCycleLR"):
        _trainer([_grows(lr_scaling="linear")]).fit(model)
    assert model.steps_called == 0


# ------------------------------------------------------------------ 4. errors at setup
class _Probe(pl.Callback):
    started = False

    def on_train_start(self, trainer, pl_module):
        self.started = True


def _batchnorm(model):
    model.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize(
    ("make", "callback", "error", "match"),
    [
        (
            _batchnorm,
            lambda: _grows(),
            UnsupportedModuleError,
            r"AdaptiveBatchSize: .*'net.1' \(BatchNorm1d\).*training mode",
        ),
        (
            _batchnorm,
            lambda: GradientStatisticsLogger(every_n_steps=1),
            UnsupportedModuleError,
            r"GradientStatisticsLogger: .*'net.1' \(BatchNorm1d\)",
        ),
        (
            lambda m: setattr(m, "loader_kw", {"batch_size": None}),
            lambda: _grows(),
            ValueError,
            "batch_size=None",
        ),
    ],
)
def test_model_and_loader_errors_come_at_setup(make, callback, error, match):
    model, probe = Net(), _Probe()
    make(model)
    with pytest.raises(error, match=match):
        _trainer([callback(), probe]).fit(model)
    assert not probe.started  # raised during set-up, before training started


def test_a_dict_of_train_loaders_is_refused_clearly():
    model, probe = Net(), _Probe()
    loaders = {"a": DataLoader(model.dataset, batch_size=8), "b": DataLoader(model.dataset)}
    with pytest.raises(ValueError, match=r"single train DataLoader.*dict"):
        _trainer([_grows(), probe]).fit(model, train_dataloaders=loaders)
    assert not probe.started


def test_constructor_arguments_are_checked_at_construction():
    with pytest.raises(TypeError, match="forward_fn=42"):
        OnlineBatchSelection(UDSSelector(k=2), forward_fn=42)
    with pytest.raises(ValueError, match="max_micro_batch_size=64 exceeds max_batch_size=32"):
        AdaptiveBatchSize(max_batch_size=32, max_micro_batch_size=64)
    with pytest.raises(ValueError, match=r"AdaptiveBatchSize\(seed='x'\)"):
        AdaptiveBatchSize(seed="x")
    with pytest.raises(ValueError, match="capture_steps"):
        DynamicMixture(DoReMi(2), capture_steps=0)
    with pytest.raises(
        ValueError, match=r"lookahead=1\) is inside the loader's prefetch window of 5"
    ):
        _trainer([_grows(lookahead=1)]).fit(Net({"num_workers": 2}))


def test_an_own_batch_sampler_is_named_as_such():
    from torch.utils.data import BatchSampler

    model = Net()
    model.train_dataloader = lambda: DataLoader(
        model.dataset, batch_sampler=BatchSampler(RandomSampler(model.dataset), 8, False)
    )
    with pytest.raises(ValueError, match="its own batch_sampler \\(BatchSampler\\)"):
        _trainer([_grows()]).fit(model)


# ------------------------------------------------------------------ 5. num_workers on resume
def test_resuming_with_fewer_workers_keeps_the_trajectory_and_more_workers_warn(tmp_path):
    def shuffled():
        return RandomSampler(range(N), generator=torch.Generator().manual_seed(2))

    kw = {"shuffle": None}
    full_cb, full = _run_with_checkpoint(tmp_path / "w2", shuffled, kw, workers=2)
    ckpt = str(tmp_path / "w2" / "step=8.ckpt")
    cb, rest = _run_with_checkpoint(tmp_path / "w0", shuffled, kw, ckpt=ckpt, workers=0)
    assert cb._window == full_cb._window == 5  # the checkpoint's lookahead is kept
    assert rest.indices == full.indices[8:]
    assert cb.history == full_cb.history

    _run_with_checkpoint(tmp_path / "v0", shuffled, kw, workers=0)
    with pytest.warns(UserWarning, match="trajectory differs"):
        ckpt = str(tmp_path / "v0" / "step=8.ckpt")
        _run_with_checkpoint(tmp_path / "v2", shuffled, kw, ckpt=ckpt, workers=2)


# ------------------------------------------------------------------ 7. defaults
def test_uds_default_alpha_is_the_scale_free_one():
    logits = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    default, explicit = UDSSelector(k=4), UDSSelector(k=4, alpha=1.0)
    for _ in range(3):  # with a memory of earlier picks, so diversity counts too
        assert torch.equal(default(logits), explicit(logits))
        logits = logits.roll(1, 0)
    scaled = UDSSelector(k=4)
    assert default.alpha == 1.0 and torch.equal(scaled(logits * 7.0), UDSSelector(k=4)(logits))


def test_default_loss_warns_on_unshifted_language_model_labels():
    from adaptive.callbacks.online_batch_selection import default_loss

    ids = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(0))
    logits = torch.randn(4, 6, 11)
    with pytest.warns(UserWarning, match="shift=True"):
        default_loss(logits, {"input_ids": ids, "labels": ids})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default_loss(torch.randn(4, 3), (torch.zeros(4, 2), torch.tensor([0, 1, 2, 0])))
    assert math.isfinite(float(default_loss(logits, {"labels": ids}).sum()))
