"""Several statistics consumers on one unmodified model in one Trainer: AdaptiveBatchSize and
GradientStatisticsLogger (two sensors on the same layers), on a tiny transformers Llama called
with keyword tensors and a tiny timm ViT. What each sees does not depend on the callbacks' order,
and two sensors on one model equal a lone one (each exact: tests/stats/test_stats_exact_paths.py
and test_stats_models.py check the sensors against torch.func). DynamicMixture cannot share a
train loader with AdaptiveBatchSize (each needs its own batch sampler), so the three do not run
in one Trainer."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from adaptive.callbacks import AdaptiveBatchSize, GradientStatisticsLogger
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


def run(kind: str, order: str, tmp_path):
    module = Module(kind)
    growth = AdaptiveBatchSize(test="norm", eta=0.5, max_batch_size=16, interval=1)
    logger = GradientStatisticsLogger(every_n_steps=1)
    trainer = pl.Trainer(
        max_steps=3,
        callbacks=[growth, logger] if order == "growth_first" else [logger, growth],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    return module, growth, logger


@pytest.mark.parametrize("kind", ["llama", "vit"])
def test_callbacks_order_does_not_change_what_they_see(kind, tmp_path):
    _, g1, l1 = run(kind, "growth_first", tmp_path / "a")
    _, g2, l2 = run(kind, "logger_first", tmp_path / "b")
    assert len(g1.history) == len(g2.history) >= 1
    for h1, h2 in zip(g1.history, g2.history, strict=True):
        assert h1.keys() == h2.keys()
        for k in h1:
            assert h1[k] == pytest.approx(h2[k], rel=1e-5, abs=1e-9), k
    assert l1.last_metrics and l1.last_metrics.keys() == l2.last_metrics.keys()
    for k, v in l1.last_metrics.items():
        assert v == pytest.approx(l2.last_metrics[k], rel=1e-5, abs=1e-9), k


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
