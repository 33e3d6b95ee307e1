"""AdaptiveBatchSize in real Trainer runs: growth, workers, accumulation, resume, DDP."""

from __future__ import annotations

import io
import json
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from adaptive.batching import AdaptiveBatchSampler
from adaptive.callbacks.adaptive_batch_size import AdaptiveBatchSize

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LitLogger.*")

N = 600


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 6, generator=g)
    w = torch.randn(6, 3, generator=g)
    y = (x @ w + 0.7 * torch.randn(N, 3, generator=g)).argmax(1)
    return TensorDataset(x, y, torch.arange(N))


class Net(pl.LightningModule):
    def __init__(self, batch_size=8, num_workers=0, lr=0.05, dataset=None, shuffle=True):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.bs, self.nw, self.lr, self.shuffle = batch_size, num_workers, lr, shuffle
        self.dataset = dataset if dataset is not None else _data()

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def train_dataloader(self):
        return DataLoader(
            self.dataset, batch_size=self.bs, shuffle=self.shuffle, num_workers=self.nw
        )

    def configure_optimizers(self):
        return torch.optim.Adagrad(self.parameters(), lr=self.lr)


class Recorder(pl.Callback):
    """What the training loop actually saw, batch by batch and step by step."""

    def __init__(self, reference_decisions: int = 0):
        self.sizes, self.indices, self.step_samples, self.reference = [], [], [], []
        self._since_step = 0
        self._ref_left = reference_decisions
        self._batch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sizes.append(int(batch[0].shape[0]))
        self.indices.append(batch[2].tolist())
        self._since_step += int(batch[0].shape[0])
        self._batch = batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.step_samples.append(self._since_step)
        self._since_step = 0
        if self._ref_left > 0 and trainer.accumulate_grad_batches == 1:
            self._ref_left -= 1
            self.reference.append(
                (trainer.global_step, _norm_test_reference(pl_module, self._batch))
            )


def _norm_test_reference(module, batch, eta=0.3):
    """b̂ = V/(η²‖ḡ‖²) from torch.func per-sample gradients, V = Σ_j Var_i(g_ij)."""
    x, y, _ = batch
    params = {k: v.detach() for k, v in module.net.named_parameters()}

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(module.net, p, (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    G = torch.cat([t.reshape(x.shape[0], -1) for t in g.values()], 1).double()
    return (G.var(0, correction=1).sum() / (eta**2 * G.mean(0).square().sum())).item()


def _trainer(callbacks, **kw):
    args = dict(
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    args.update(kw)
    return pl.Trainer(callbacks=callbacks, **args)


def _expected_sizes(history, window, start_size, num_batches):
    """Per-batch sizes implied by the decisions (decided at batch i: starts at i+1+window)."""
    change = {}
    for h in history:
        if h["next_batch_size"] > h["batch_size"]:
            change[int(h["batch_idx"]) + 1 + window] = int(h["next_batch_size"])
    sizes, size = [], start_size
    for k in range(num_batches):
        size = change.get(k, size)
        sizes.append(size)
    return sizes


def test_batch_grows_in_a_real_trainer_and_matches_per_sample_reference():
    cb = AdaptiveBatchSize(test="norm", eta=0.3, max_batch_size=256, interval=2)
    rec = Recorder(reference_decisions=3)
    trainer = _trainer([cb, rec], max_epochs=2)
    trainer.fit(Net())
    assert cb.batch_size > 8 and max(rec.sizes) > 8
    # the proposals equal the norm test written out on torch.func per-sample gradients
    proposals = {int(h["step"]): h["proposed"] for h in cb.history}
    checked = [(s, ref) for s, ref in rec.reference if s in proposals]
    assert len(checked) >= 1
    for step, ref in checked:
        assert proposals[step] == pytest.approx(ref, rel=1e-3)
    # each epoch covers every sample exactly once, whatever the sizes
    seen, cum = [], 0
    for idx in rec.indices:
        seen += idx
        cum += len(idx)
        if cum == N:
            break
    assert sorted(seen) == list(range(N))
    # sizes follow the decisions exactly (no workers: the change lands window=1 batch later)
    sizes_epoch0 = []
    cum = 0
    for s in rec.sizes:
        sizes_epoch0.append(s)
        cum += s
        if cum >= N:
            break
    hist0 = [h for h in cb.history if h["epoch"] == 0]
    expected = _expected_sizes(hist0, 1, 8, len(sizes_epoch0))
    assert sizes_epoch0[:-1] == expected[:-1]  # the last batch of the epoch is the remainder
    assert rec.step_samples[-1] == rec.sizes[-1]
    assert cb.samples_seen == 2 * N


class _NaNLoss(Net):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * float("nan")


def test_non_finite_statistics_warn_and_keep_the_batch():
    # a NaN gradient makes b̂ NaN, which next_batch_size reads as "the test passed"
    cb = AdaptiveBatchSize(test="norm", eta=0.3, max_batch_size=256)
    with pytest.warns(UserWarning, match="non-finite gradient statistics"):
        _trainer([cb], max_steps=3).fit(_NaNLoss())
    assert cb.batch_size == 8
    assert all(not math.isfinite(h["variance"]) for h in cb.history)


def test_prefetching_workers_get_the_size_at_the_scheduled_batch():
    cb = AdaptiveBatchSize(test="norm", eta=0.3, max_batch_size=128, interval=3)
    rec = Recorder()
    trainer = _trainer([cb, rec])
    trainer.fit(Net(num_workers=2))
    window = AdaptiveBatchSampler.prefetch_window(2, 2, extra=1)
    assert cb._window == window == 5
    grew = [h for h in cb.history if h["next_batch_size"] > h["batch_size"]]
    assert grew, "the batch never grew"
    expected = _expected_sizes(cb.history, window, 8, len(rec.sizes))
    assert rec.sizes[:-1] == expected[:-1]
    assert sorted(i for b in rec.indices for i in b) == list(range(N))


def test_accumulation_past_the_micro_batch_limit():
    cb = AdaptiveBatchSize(
        test="norm", eta=0.2, max_batch_size=200, interval=1, max_micro_batch_size=16
    )
    rec = Recorder()
    trainer = _trainer([cb, rec], max_epochs=3)
    trainer.fit(Net())
    assert max(rec.sizes) <= 16  # micro-batches never exceed the limit
    assert cb.accumulation > 1 and trainer.accumulate_grad_batches == cb.accumulation
    assert cb.batch_size == 16 * cb.accumulation <= 200
    # once the accumulation switched, whole optimizer steps carry the global batch
    full = [s for s in rec.step_samples if s == cb.batch_size]
    assert len(full) >= 3
    assert all(s <= cb.batch_size for s in rec.step_samples)


def test_linear_lr_scaling_follows_the_batch():
    cb = AdaptiveBatchSize(test="norm", eta=0.3, max_batch_size=64, interval=1, lr_scaling="linear")
    model = Net(lr=0.01)
    trainer = _trainer([cb])
    trainer.fit(model)
    assert cb.batch_size == 64
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.01 * 64 / 8)


def _checkpointing_run(tmp_path, stop_after=None, ckpt=None):
    cb = AdaptiveBatchSize(test="norm", eta=0.3, max_batch_size=128, interval=2, seed=4)
    rec = Recorder()
    kw = {"max_epochs": 2}
    if stop_after is not None:
        kw["max_steps"] = stop_after
    trainer = _trainer([cb, rec], **kw)
    trainer.fit(Net(), ckpt_path=ckpt)
    if stop_after is not None:
        path = tmp_path / "mid.ckpt"
        trainer.save_checkpoint(path)
        return cb, rec, path
    return cb, rec, None


def test_checkpoint_resume_continues_exactly(tmp_path):
    full_cb, full, _ = _checkpointing_run(tmp_path)
    _, part, path = _checkpointing_run(tmp_path, stop_after=20)
    state = torch.load(path, weights_only=True)  # everything we store loads safely
    assert any("AdaptiveBatchSize" in k for k in state["callbacks"])
    cb2, rest, _ = _checkpointing_run(tmp_path, ckpt=str(path))
    assert part.indices + rest.indices == full.indices
    assert cb2.history == full_cb.history
    assert cb2.samples_seen == full_cb.samples_seen == 2 * N


def test_state_dict_roundtrip_weights_only():
    cb = AdaptiveBatchSize(test="coordinate", eta=0.3, max_batch_size=64, interval=1)
    _trainer([cb]).fit(Net())
    buf = io.BytesIO()
    torch.save(cb.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["target"] == cb.batch_size and state["history"] == cb.history


class _Stream(IterableDataset):
    def __iter__(self):
        yield from ((torch.zeros(6), torch.tensor(0), torch.tensor(0)) for _ in range(4))


def test_clear_errors():
    with pytest.raises(ValueError, match="test='nope'"):
        AdaptiveBatchSize(test="nope")
    with pytest.raises(ValueError, match="lr_scaling='cubic'"):
        AdaptiveBatchSize(lr_scaling="cubic")
    with pytest.raises(ValueError, match="max_batch_size"):
        AdaptiveBatchSize(max_batch_size=0)
    with pytest.raises(ValueError, match="accumulate_grad_batches=2"):
        _trainer([AdaptiveBatchSize()], accumulate_grad_batches=2).fit(Net())
    with pytest.raises(ValueError, match="map-style dataset"):
        _trainer([AdaptiveBatchSize()]).fit(Net(dataset=_Stream(), shuffle=False))
    with pytest.raises(ValueError, match="exceeds max_batch_size=4"):
        _trainer([AdaptiveBatchSize(max_batch_size=4)]).fit(Net())


def test_dataloader_passed_to_fit_is_taken_over():
    cb = AdaptiveBatchSize(test="norm", eta=0.3, max_batch_size=64, interval=1)
    rec = Recorder()
    model = Net()
    loader = DataLoader(model.dataset, batch_size=8, shuffle=True)
    _trainer([cb, rec]).fit(model, train_dataloaders=loader)
    assert max(rec.sizes) == 64
    assert sorted(i for b in rec.indices for i in b) == list(range(N))


class _DumpPerRank(pl.Callback):
    def __init__(self, path):
        self.path, self.indices = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.indices.append(batch[2].tolist())

    def on_train_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, AdaptiveBatchSize))
        out = {
            "indices": self.indices,
            "history": cb.history,
            "target": cb.batch_size,
            "world": trainer.world_size,
        }
        (self.path / f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


@pytest.mark.ddp
def test_two_process_ddp_ranks_share_the_global_batch(tmp_path):
    cb = AdaptiveBatchSize(test="norm", eta=0.3, max_batch_size=128, interval=2)
    trainer = _trainer(
        [cb, _DumpPerRank(tmp_path)], strategy="ddp_fork", devices=2, use_distributed_sampler=False
    )
    trainer.fit(Net(batch_size=4))  # 4 per rank: global batch 8
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2
    assert r0["history"] == r1["history"]  # same statistics, same decisions on both ranks
    assert r0["target"] == r1["target"] > 8
    assert len(r0["indices"]) == len(r1["indices"])
    seen = []
    for a, b in zip(r0["indices"], r1["indices"], strict=True):
        assert len(a) == len(b)
        assert not set(a) & set(b) or len(a) * 2 > N - len(seen)  # only the padded last batch
        seen += a + b
    assert sorted(set(seen)) == list(range(N))
    # the global batches are those of one sampler over the whole world
    single = AdaptiveBatchSampler(N, batch_size=8, seed=0, num_replicas=1, rank=0)
    it = iter(single)
    first = next(it)
    assert r0["indices"][0] + r1["indices"][0] == first
    assert math.isfinite(r0["history"][0]["proposed"])


def test_ddp_without_use_distributed_sampler_false_is_refused():
    trainer = _trainer([AdaptiveBatchSize()], strategy="ddp_fork", devices=2)
    with pytest.raises(Exception, match="use_distributed_sampler=False"):
        trainer.fit(Net())


class _Clocked(Net):
    def configure_optimizers(self):
        from adaptive.schedules import LinearDecayScheduler

        opt = torch.optim.Adagrad(self.parameters(), lr=self.lr)
        sched = LinearDecayScheduler(opt, total_tokens=2 * N)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_sample_clocked_schedule_sees_the_true_samples_and_the_scaling():
    from adaptive.callbacks.sample_clock import SampleClock

    cb = AdaptiveBatchSize(test="norm", eta=0.3, max_batch_size=64, interval=1, lr_scaling="sqrt")
    trainer = _trainer([cb, SampleClock()])
    trainer.fit(_Clocked(lr=0.01))
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert cb.batch_size == 64 and trainer.global_step < N // 8
    assert sched.samples_seen == cb.samples_seen == N  # counted from the batches, not steps × b0
    # η(n) = η0 (1 − n/N_total) · sqrt(64/8), with n = N samples after one epoch
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.01 * (1 - N / (2 * N)) * math.sqrt(64 / 8))


def test_adascale_lr_gain_of_the_last_growth():
    cb = AdaptiveBatchSize(
        test="norm", eta=0.3, max_batch_size=64, interval=1, lr_scaling="adascale"
    )
    trainer = _trainer([cb])
    trainer.fit(Net(lr=0.01))
    last = [h for h in cb.history if h["next_batch_size"] > h["batch_size"]][-1]
    # r = (σ² + μ²)/(σ²/S + μ²), σ² = V/b0, μ² = ‖ḡ‖² − V/b, S = b_new/b0, clamped to [1, S]
    s = last["next_batch_size"] / 8
    var, mu2 = (
        last["variance"] / 8,
        max(last["grad_sq_norm"] - last["variance"] / last["stats_batch_size"], 0.0),
    )
    gain = min(max((var + mu2) / (var / s + mu2), 1.0), s)
    assert gain > 1.0
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.01 * gain, rel=1e-6)
