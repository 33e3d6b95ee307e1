"""Several statistics consumers on one unmodified model in one Trainer, on a tiny transformers
Llama called with keyword tensors and a tiny timm ViT: AdaptiveBatchSize and
GradientStatisticsLogger (two sensors on the same layers) and DynamicMixture with group influence
(a third, with domain groups and a target direction), each on synthetic domains (token sequences
over shifted vocabulary ranges; shifted random images). The growth and mixture callbacks share
one train loader through adaptive.mixture.GrowableMixtureSampler.

Checked: DynamicMixture alone, each update's alignment (the sensor's per-domain mean of
``⟨g_i, d⟩`` over a two-batch capture window) against torch.func per-sample gradients and the
target gradient, and its weights against the exponentiated update written out; all three at once,
in two callback orders: each sees the same numbers (growth decisions, kept batch sizes, the
logger's statistics at every step, mixture alignments and weights), and the mixture's alignments
still equal torch.func's; two sensors on one model equal a lone one (each exact:
tests/stats/test_stats_exact_paths.py and test_stats_models.py check the sensors against
torch.func); ResNet-18 with BatchNorm in training mode runs both on the group estimator."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from adaptive.callbacks import AdaptiveBatchSize, DynamicMixture, GradientStatisticsLogger
from adaptive.mixture import GroupInfluence, GrowableMixtureSampler, MixtureDataset, MixtureSampler
from adaptive.stats import GradientStatistics, UnsupportedModuleError

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg)


def tiny_vit():
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=8,
        embed_dim=16,
        depth=1,
        num_heads=2,
        num_classes=3,
        init_values=0.1,
    )


class Module(pl.LightningModule):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.net = tiny_llama() if kind == "llama" else tiny_vit()
        g = torch.Generator().manual_seed(1)
        if kind == "llama":
            self.data = TensorDataset(torch.randint(0, 32, (64, 8), generator=g))
        else:
            self.data = TensorDataset(
                torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 3, (64,), generator=g)
            )

    def loss(self, batch) -> torch.Tensor:
        if self.kind == "llama":
            (ids,) = batch
            return self.net(input_ids=ids, labels=ids).loss  # keyword tensors
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=4, shuffle=False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def make_trainer(callbacks, max_steps: int, root) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        default_root_dir=root,
    )


def fit(trainer: pl.Trainer, module: pl.LightningModule) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)


# ------------------------------------------------------------------ mixtures of synthetic domains
DOMAINS = 3


def domains(kind: str) -> tuple[list[TensorDataset], tuple[torch.Tensor, ...]]:
    """Three synthetic training domains and a target batch drawn like domain 0.

    Llama: random token sequences over overlapping thirds of the vocabulary (0-15, 8-23, 16-31).
    ViT: random images shifted by 0, 1, 2 with labels 0 / random / 2."""
    g = torch.Generator().manual_seed(3)
    if kind == "llama":
        sources = [
            TensorDataset(torch.randint(8 * d, 8 * d + 16, (32, 8), generator=g))
            for d in range(DOMAINS)
        ]
        target = (torch.randint(0, 16, (8, 8), generator=g),)
        return sources, target
    sources = []
    for d in range(DOMAINS):
        y = torch.full((32,), d) if d != 1 else torch.randint(0, 3, (32,), generator=g)
        sources.append(TensorDataset(torch.randn(32, 3, 16, 16, generator=g) + d, y))
    target = (torch.randn(8, 3, 16, 16, generator=g), torch.zeros(8, dtype=torch.long))
    return sources, target


def loss_of(net: torch.nn.Module, kind: str, data) -> torch.Tensor:
    """The mean loss of a batch (Llama: keyword tensors; token mean = mean of per-sequence means,
    the sequences being of one length)."""
    if kind == "llama":
        (ids,) = data
        return net(input_ids=ids, labels=ids).loss
    x, y = data
    return F.cross_entropy(net(x), y)


class MixModule(pl.LightningModule):
    """The tiny model trained on MixtureDataset batches ``(item, source ids)`` drawn by
    ``sampler`` (a MixtureSampler, or a GrowableMixtureSampler when the batch grows too)."""

    def __init__(self, kind: str, sampler) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.net = tiny_llama() if kind == "llama" else tiny_vit()
        self.sources, self.target = domains(kind)
        self.sampler = sampler

    def training_step(self, batch, batch_idx):
        data, _ = batch
        return loss_of(self.net, self.kind, data)

    def target_loss(self) -> torch.Tensor:
        return loss_of(self.net, self.kind, self.target)

    def train_dataloader(self):
        return DataLoader(MixtureDataset(self.sources), batch_sampler=self.sampler)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Record(pl.Callback):
    """Every training batch as drawn, the parameters it met, and what the logger logged on it."""

    def __init__(self, logger: GradientStatisticsLogger | None = None) -> None:
        self.logger = logger
        self.batches: list = []
        self.params: list[dict[str, torch.Tensor]] = []
        self.logged: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch)
        self.params.append({n: p.detach().clone() for n, p in pl_module.net.named_parameters()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.logger is not None:
            self.logged.append(dict(self.logger.last_metrics))


def influence_callback(eta: float = 1.0, update_every: int = 3, capture_steps: int = 2):
    """DynamicMixture(GroupInfluence, exponentiated) whose rule records the alignment it gets."""
    rule = GroupInfluence(DOMAINS, method="exponentiated", eta=eta)
    alignments: list[torch.Tensor] = []
    update = rule.update

    def recording(signals):
        alignments.append(signals.alignment.clone())
        return update(signals)

    rule.update = recording  # type: ignore[method-assign]
    cb = DynamicMixture(
        rule,
        update_every=update_every,
        capture_steps=capture_steps,
        target_loss=lambda module: module.target_loss(),
        log=False,
    )
    return cb, alignments


def reference_alignment(kind, net, target, record: Record, batches: range) -> torch.Tensor:
    """``Σ_{i∈domain} ⟨g_i, d⟩ / |domain|`` over the captured batches, by torch.func: ``d`` the
    target gradient at the parameters the first captured batch met, ``g_i`` the gradient of
    sample i's own loss at the parameters its batch met (float64 dots)."""
    first = record.params[batches[0]]
    d = grad(lambda p: loss_of_at(net, kind, p, target))(first)
    dots = torch.zeros(DOMAINS, dtype=torch.float64)
    counts = torch.zeros(DOMAINS, dtype=torch.float64)

    def one(params, *sample):  # a sample's own loss
        return loss_of_at(net, kind, params, tuple(t.unsqueeze(0) for t in sample))

    for k in batches:
        data, src = record.batches[k]
        g = vmap(grad(one), in_dims=(None, *[0] * len(data)))(record.params[k], *data)
        per_sample = sum(
            (g[n].double().flatten(1) @ d[n].double().flatten()) for n in record.params[k]
        )
        dots.index_add_(0, src, per_sample)
        counts.index_add_(0, src, torch.ones_like(per_sample))
    return torch.where(counts > 0, dots / counts.clamp_min(1), torch.zeros_like(dots))


def loss_of_at(net, kind, params, data) -> torch.Tensor:
    if kind == "llama":
        (ids,) = data
        return functional_call(net, params, (), {"input_ids": ids, "labels": ids}).loss
    x, y = data
    return F.cross_entropy(functional_call(net, params, (x,)), y)


def exponentiated(prev: np.ndarray, alignment: np.ndarray, eta: float) -> np.ndarray:
    """GroupInfluence's exponentiated update written out: ``softmax(log w + η·s/max|s|)``."""
    z = np.log(prev) + eta * alignment / (np.abs(alignment).max() + 1e-8)
    z = np.exp(z - z.max())
    return z / z.sum()


def check_mixture(kind, module, cb, alignments, record, update_every, capture_steps, eta=1.0):
    """Each update's alignment against torch.func, its weights against the rule written out."""
    steps = len(record.batches)
    assert [h["step"] for h in cb.history] == list(range(0, steps + 1, update_every))
    assert len(alignments) == len(cb.history) - 1 >= 2
    prev = np.full(DOMAINS, 1 / DOMAINS)
    for u, (got, h) in enumerate(zip(alignments, cb.history[1:], strict=True)):
        end = (u + 1) * update_every
        captured = range(end - capture_steps, end)
        want = reference_alignment(kind, module.net, module.target, record, captured)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        expected = exponentiated(prev, want.numpy(), eta)
        np.testing.assert_allclose(h["weights"], expected, rtol=1e-4)
        prev = np.asarray(h["weights"])
    assert np.abs(prev - 1 / DOMAINS).max() > 1e-2  # the weights moved
    assert int(np.argmax(prev)) == 0  # towards the domain the target is drawn like
    torch.testing.assert_close(cb.sampler.weights, cb.rule.weights.to(cb.sampler.weights.dtype))


@pytest.mark.parametrize("kind", ["llama", "vit"])
def test_dynamic_mixture_group_influence_in_a_trainer(kind, tmp_path):
    """GroupInfluence on the unmodified model: every update's alignment (the sensor's group
    gradient dots over the capture window, per domain) equals torch.func's per-sample gradients
    dotted with the target gradient, and the weights follow the exponentiated update."""
    sampler = MixtureSampler([32] * DOMAINS, [1] * DOMAINS, batch_size=8, seed=0, num_batches=40)
    module = MixModule(kind, sampler)
    cb, alignments = influence_callback(update_every=3, capture_steps=2)
    record = Record()
    trainer = make_trainer([cb, record], max_steps=6, root=tmp_path)
    fit(trainer, module)
    check_mixture(kind, module, cb, alignments, record, update_every=3, capture_steps=2)


# ------------------------------------------------------------------ all three at once
def run_three(kind: str, order: str, tmp_path):
    sampler = GrowableMixtureSampler([32] * DOMAINS, [1] * DOMAINS, 4, num_samples=128, seed=0)
    module = MixModule(kind, sampler)
    growth = AdaptiveBatchSize(test="norm", eta=0.8, max_batch_size=32, interval=1)
    logger = GradientStatisticsLogger(every_n_steps=1)
    mixture, alignments = influence_callback(update_every=2, capture_steps=1)
    record = Record(logger)
    callbacks = [growth, logger, mixture]
    if order == "reversed":  # the mixture's target pass before the other sensors attach
        callbacks = callbacks[::-1]
    fit(make_trainer([*callbacks, record], max_steps=4, root=tmp_path), module)
    return module, growth, record, mixture, alignments


@pytest.mark.parametrize("kind", ["llama", "vit"])
def test_callbacks_order_does_not_change_what_they_see(kind, tmp_path):
    """AdaptiveBatchSize, GradientStatisticsLogger and DynamicMixture on one model and one loader,
    in two orders: the same growth decisions, kept batches, logged statistics at every step and
    mixture alignments and weights; the mixture's alignments equal torch.func's in both."""
    runs = [run_three(kind, order, tmp_path / order) for order in ("growth_first", "reversed")]
    (m1, g1, r1, x1, a1), (m2, g2, r2, x2, a2) = runs
    sizes1 = [int(src.shape[0]) for _, src in r1.batches]
    sizes2 = [int(src.shape[0]) for _, src in r2.batches]
    assert sizes1 == sizes2 and sizes1[0] == 4 and max(sizes1) > 4  # it grew, the same way
    for r in (r1, r2):  # the logger measured the batch trained on
        assert [m["grad_stats/batch_size"] for m in r.logged] == [float(s) for s in sizes1]
    for b1, b2 in zip(r1.batches, r2.batches, strict=True):  # the same draws
        assert torch.equal(b1[1], b2[1])
    assert len(g1.history) == len(g2.history) == 4  # a decision every step
    for h1, h2 in zip(g1.history, g2.history, strict=True):
        assert h1.keys() == h2.keys()
        for k in h1:
            assert h1[k] == pytest.approx(h2[k], rel=1e-5, abs=1e-9), k
    assert len(r1.logged) == len(r2.logged) == 4
    for l1, l2 in zip(r1.logged, r2.logged, strict=True):
        assert l1.keys() == l2.keys() and len(l1) >= 4
        for k, v in l1.items():
            assert v == pytest.approx(l2[k], rel=1e-5, abs=1e-9), k
    assert len(a1) == len(a2) == 2
    for s1, s2 in zip(a1, a2, strict=True):
        torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-6 * float(s1.abs().max()))
    for h1, h2 in zip(x1.history, x2.history, strict=True):
        assert h1["step"] == h2["step"]
        np.testing.assert_allclose(h1["weights"], h2["weights"], rtol=1e-5)
    for m, x, a, r in ((m1, x1, a1, r1), (m2, x2, a2, r2)):
        check_mixture(kind, m, x, a, r, update_every=2, capture_steps=1)


@pytest.mark.parametrize("kind", ["llama", "vit"])
def test_two_sensors_on_the_model_equal_a_lone_one(kind):
    """What the two callbacks do at one step, without the Trainer: two sensors on one model (in
    both orders) against a lone sensor on a fresh copy (same seed, same first batch)."""
    module = Module(kind)
    batch = next(iter(module.train_dataloader()))
    stats = GradientStatistics(module)
    with stats.capture():
        module.loss(batch).backward()
    lone = stats.result()
    for order in (0, 1):
        module2 = Module(kind)
        pair = [GradientStatistics(module2), GradientStatistics(module2, inner_products=False)]
        first, second = pair if order == 0 else pair[::-1]
        with first.capture(), second.capture():
            module2.loss(batch).backward()
        for s in (pair[0].result(), pair[1].result()):
            for key in ("grad_sq_norm", "variance", "sum_sq_norms", "per_sample_sq_norms"):
                torch.testing.assert_close(getattr(s, key), getattr(lone, key), rtol=1e-5, atol=0)


class ResNetModule(pl.LightningModule):
    """torchvision ResNet-18 with BatchNorm in training mode: per-sample gradients are not
    defined, the group estimator (micro-batch means) is."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet18

        torch.manual_seed(0)
        self.net = resnet18(num_classes=3)
        g = torch.Generator().manual_seed(2)
        self.data = TensorDataset(
            torch.randn(48, 3, 16, 16, generator=g), torch.randint(0, 3, (48,), generator=g)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=4, shuffle=False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_resnet18_with_batchnorm_runs_on_the_group_estimator(tmp_path):
    module = ResNetModule()
    with pytest.raises(
        UnsupportedModuleError,
        match=r"BatchNorm modules 'bn1' \(BatchNorm2d\).*and 12 more.*eval mode.*GroupNorm.*fallback='groups'",
    ):
        GradientStatistics(module.net).attach()
    growth = AdaptiveBatchSize(
        test="norm",
        eta=0.5,
        max_batch_size=16,
        max_micro_batch_size=4,  # two micro-batches per step: two group means
        interval=1,
        stats_fallback="groups",
    )
    logger = GradientStatisticsLogger(every_n_steps=1, fallback="groups")
    trainer = pl.Trainer(
        max_steps=6,
        callbacks=[growth, logger],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module)
    assert module.net.bn1.training  # left as it was
    # the first step has one micro-batch: one group mean, no variance (inf), and the growth test
    # takes the largest batch; from then on each step has 4 micro-batches, and the logger reads a
    # finite group estimate
    assert growth.history[0]["stats_batch_size"] == 4
    assert logger.last_metrics["grad_stats/batch_size"] == 16
    assert all(torch.isfinite(torch.tensor(v)) for v in logger.last_metrics.values())
