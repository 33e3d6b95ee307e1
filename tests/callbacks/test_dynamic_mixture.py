"""DynamicMixture on real Lightning Trainer runs: updates, logs, plot, resume, DDP, bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptive.callbacks.dynamic_mixture import DynamicMixture
from adaptive.mixture import DoReMi, Exp3Mixture, GroupInfluence, MixtureDataset, MixtureSampler

NAMES = ["near", "far", "opposite"]


def make_sources(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, generator=g)
    out = []
    for scale, noise in [(1.0, 0.1), (0.5, 1.0), (-1.0, 0.3)]:
        x = torch.randn(n, 4, generator=g)
        out.append(TensorDataset(x, x @ (scale * w) + noise * torch.randn(n, generator=g)))
    return out, w


class Regression(pl.LightningModule):
    def __init__(self, sampler, sources, nan_at=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.sampler, self.sources, self.nan_at = sampler, sources, nan_at
        self.seen = []  # (sources, sample losses) of every batch

    def train_dataloader(self):
        return DataLoader(MixtureDataset(self.sources, NAMES), batch_sampler=self.sampler)

    def training_step(self, batch, batch_idx):
        (x, y), src = batch
        per = (self.net(x).squeeze(-1) - y) ** 2
        if self.nan_at is not None and self.global_step == self.nan_at:
            per = per + float("nan")
        self.seen.append((src.clone(), per.detach().clone()))
        return {"loss": per.mean(), "sample_losses": per.detach()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def trainer(tmp_path, steps, callbacks, **kw):
    return pl.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        default_root_dir=tmp_path,
        **kw,
    )


def replay_exp3(seen, every, k=3):
    """EXP3 by hand (numpy) on the per-domain mean losses of each interval."""
    r_hat, pi, out = np.zeros(k), np.full(k, 1 / k), [np.full(k, 1 / k)]

    def eps(t):
        return 1 / k if t == 0 else min(1 / k, np.sqrt(np.log(k) / (k * t)))

    for t in range(1, len(seen) // every + 1):
        src = torch.cat([s for s, _ in seen[(t - 1) * every : t * every]]).numpy()
        los = torch.cat([l for _, l in seen[(t - 1) * every : t * every]]).double().numpy()
        counts = np.bincount(src, minlength=k)
        means = np.bincount(src, weights=los, minlength=k) / np.maximum(counts, 1)
        r_hat = r_hat + np.where(counts > 0, means / 10, 0) / pi
        z = np.exp(eps(t - 1) * r_hat - (eps(t - 1) * r_hat).max())
        pi = (1 - k * eps(t)) * z / z.sum() + eps(t)
        out.append(pi)
    return out


def test_exp3_updates_logs_and_plots_in_a_real_run(tmp_path):
    sources, _ = make_sources()
    sampler = MixtureSampler([64, 64, 64], [1, 1, 1], batch_size=12, seed=0, num_batches=40)
    model = Regression(sampler, sources)
    cb = DynamicMixture(Exp3Mixture(3), update_every=3, plot_path=tmp_path / "w.png")
    trainer(tmp_path, 12, [cb]).fit(model)
    assert [h["step"] for h in cb.history] == [0, 3, 6, 9, 12]
    expected = replay_exp3(model.seen, 3)
    for h, e in zip(cb.history, expected, strict=True):
        np.testing.assert_allclose(h["weights"], e, rtol=1e-9)
    torch.testing.assert_close(sampler.weights, cb.rule.weights)
    assert cb.names == NAMES
    import matplotlib.image

    img = matplotlib.image.imread(tmp_path / "w.png")
    assert img.ndim == 3 and img.shape[0] > 100


def fit_doremi(tmp_path, steps, ckpt=None, save=None):
    sources, _ = make_sources()
    sampler = MixtureSampler([64, 64, 64], [1, 1, 1], batch_size=12, seed=1, num_batches=40)
    model = Regression(sampler, sources)
    cb = DynamicMixture(DoReMi(3, eta=0.5, reference_losses=[0.1, 0.5, 0.2]), update_every=4)
    t = trainer(tmp_path, steps, [cb])
    t.fit(model, ckpt_path=ckpt)
    if save is not None:
        t.save_checkpoint(save)
    return model, cb


def test_resume_mid_interval_matches_uninterrupted_run(tmp_path):
    full_model, full_cb = fit_doremi(tmp_path / "a", 14)
    ckpt = tmp_path / "half.ckpt"
    fit_doremi(tmp_path / "b", 6, save=ckpt)  # stops mid-interval, one batch fetched ahead
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning: resuming mid-epoch
        resumed_model, resumed_cb = fit_doremi(tmp_path / "c", 14, ckpt=str(ckpt))
    assert resumed_cb.history == full_cb.history
    for (s1, l1), (s2, l2) in zip(full_model.seen[6:], resumed_model.seen, strict=True):
        assert torch.equal(s1, s2)
        torch.testing.assert_close(l1, l2)
    for p, q in zip(full_model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    state = torch.load(ckpt, weights_only=True)
    assert any("DynamicMixture" in key for key in state["callbacks"])


def test_group_influence_upweights_the_source_aligned_with_the_target(tmp_path):
    sources, w = make_sources(seed=3, n=96)
    g = torch.Generator().manual_seed(7)
    xt = torch.randn(48, 4, generator=g)
    yt = xt @ w  # the target follows source "near"
    sampler = MixtureSampler([96, 96, 96], [1, 1, 1], batch_size=24, seed=0, num_batches=50)
    model = Regression(sampler, sources)

    def target_loss(module):
        return ((module.net(xt).squeeze(-1) - yt) ** 2).mean()

    rule = GroupInfluence(3, method="exponentiated", eta=0.5)
    cb = DynamicMixture(rule, update_every=4, target_loss=target_loss, capture_steps=2)
    trainer(tmp_path, 24, [cb]).fit(model)
    final = np.array(cb.history[-1]["weights"])
    assert len(cb.history) == 7
    assert final.argmax() == 0 and final.argmin() == 2
    assert final[0] > 0.5


def test_nan_policy(tmp_path):
    sources, _ = make_sources()
    sampler = MixtureSampler([64, 64, 64], [1, 1, 1], batch_size=12, seed=0, num_batches=40)
    cb = DynamicMixture(Exp3Mixture(3), update_every=2, nan_policy="skip")
    with pytest.warns(RuntimeWarning, match="update skipped"):
        trainer(tmp_path, 6, [cb]).fit(Regression(sampler, sources, nan_at=2))
    assert [h["step"] for h in cb.history] == [0, 2, 6]
    sampler = MixtureSampler([64, 64, 64], [1, 1, 1], batch_size=12, seed=0, num_batches=40)
    cb = DynamicMixture(Exp3Mixture(3), update_every=2)
    with pytest.raises(ValueError, match="NaN"):
        trainer(tmp_path, 6, [cb]).fit(Regression(sampler, sources, nan_at=2))


def test_bad_arguments():
    with pytest.raises(TypeError, match="rule"):
        DynamicMixture(object())
    with pytest.raises(ValueError, match="update_every"):
        DynamicMixture(Exp3Mixture(3), update_every=0)
    with pytest.raises(ValueError, match="target_loss"):
        DynamicMixture(GroupInfluence(3))
    with pytest.raises(ValueError, match="2 sources"):
        DynamicMixture(Exp3Mixture(3), MixtureSampler([2, 2], [1, 1], batch_size=2))
    with pytest.raises(ValueError, match="nan_policy"):
        DynamicMixture(Exp3Mixture(3), nan_policy="ignore")


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from adaptive.mixture import Exp3Mixture, MixtureDataset, MixtureSampler
    from adaptive.callbacks.dynamic_mixture import DynamicMixture

    OUT = sys.argv[1]

    class M(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(3, 1)
            g = torch.Generator().manual_seed(0)
            self.sources = [TensorDataset(torch.randn(40, 3, generator=g) * (i + 1),
                                          torch.randn(40, generator=g)) for i in range(3)]
            self.seen = []

        def train_dataloader(self):
            sampler = MixtureSampler([40, 40, 40], [1, 1, 1], batch_size=8, seed=4, num_batches=30)
            return DataLoader(MixtureDataset(self.sources), batch_sampler=sampler)

        def training_step(self, batch, idx):
            (x, y), src = batch
            per = (self.net(x).squeeze(-1) - y) ** 2
            self.seen.append(src.tolist())
            return {"loss": per.mean(), "sample_losses": per.detach()}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Dump(pl.Callback):
        def on_train_end(self, trainer, module):
            mix = next(c for c in trainer.callbacks if isinstance(c, DynamicMixture))
            json.dump({"history": mix.history, "seen": module.seen,
                       "sampler": mix.sampler.weights.tolist()},
                      open(f"{OUT}/rank{trainer.global_rank}.json", "w"))

    if __name__ == "__main__":
        torch.manual_seed(0)
        t = pl.Trainer(max_steps=8, accelerator="cpu", devices=2, strategy="ddp_spawn",
                       use_distributed_sampler=False, logger=False, enable_progress_bar=False,
                       enable_checkpointing=False, enable_model_summary=False,
                       callbacks=[DynamicMixture(Exp3Mixture(3), update_every=1), Dump()])
        t.fit(M())
    """
)


@pytest.mark.ddp
def test_ddp_ranks_share_weights_and_split_the_global_batch(tmp_path):
    script = tmp_path / "ddp_mixture.py"
    script.write_text(DDP_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "MASTER_PORT": str(port), "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": root}
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, timeout=400, env=env)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert len(r0["history"]) == 9
    assert r0["history"] == r1["history"]
    assert r0["sampler"] == r1["sampler"]
    # the weights moved away from uniform, identically on both ranks
    assert max(r0["history"][-1]["weights"]) > 1 / 3 + 1e-3
    assert len(r0["seen"]) == len(r1["seen"]) == 8
    assert all(len(a) == len(b) == 4 for a, b in zip(r0["seen"], r1["seen"], strict=True))


def fit_influence(tmp_path, steps, ckpt=None, save=None):
    sources, w = make_sources(seed=3, n=96)
    g = torch.Generator().manual_seed(7)
    xt = torch.randn(48, 4, generator=g)
    yt = xt @ w
    sampler = MixtureSampler([96, 96, 96], [1, 1, 1], batch_size=24, seed=0, num_batches=50)
    model = Regression(sampler, sources)

    def target_loss(module):
        return ((module.net(xt).squeeze(-1) - yt) ** 2).mean()

    rule = GroupInfluence(3, method="exponentiated", eta=0.5)
    cb = DynamicMixture(rule, update_every=4, target_loss=target_loss, capture_steps=3)
    t = trainer(tmp_path, steps, [cb])
    t.fit(model, ckpt_path=ckpt)
    if save is not None:
        t.save_checkpoint(save)
    return model, cb


def test_group_influence_resumes_inside_its_capture_window(tmp_path):
    """A checkpoint after 7 batches (update_every 4, capture_steps 3: of the interval's batches
    4-7, batches 5 and 6 captured, 7 still to come) resumes with the same weights as the uninterrupted run:
    the sensor's captures and target direction are in the checkpoint."""
    full_model, full_cb = fit_influence(tmp_path / "a", 12)
    ckpt = tmp_path / "window.ckpt"
    fit_influence(tmp_path / "b", 7, save=ckpt)
    state = torch.load(ckpt, weights_only=True)
    (key,) = [k for k in state["callbacks"] if "DynamicMixture" in k]
    assert len(state["callbacks"][key]["sensor"]["records"]) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning: resuming mid-epoch
        resumed_model, resumed_cb = fit_influence(tmp_path / "c", 12, ckpt=str(ckpt))
    assert len(resumed_cb.history) == len(full_cb.history) == 4
    for h1, h2 in zip(full_cb.history, resumed_cb.history, strict=True):
        assert h1["step"] == h2["step"]
        np.testing.assert_allclose(h1["weights"], h2["weights"], rtol=1e-6)
    for p, q in zip(full_model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(p, q)
