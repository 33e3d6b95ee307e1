"""Language-model pretraining with the whole toolkit: batch growth, token-clocked schedules and
mixture weights in one Lightning ``Trainer``.

A causal LM with the transformers Llama architecture (random init, byte-level vocabulary of 256)
is trained from scratch on the six real text domains of :mod:`adaptive.data.text` (fiction,
scripture, quotes, dictionary, computing, code). Each domain's documents are shuffled with a fixed
seed and split *by document* into train / validation / test; hyper-parameters are chosen on
validation, results are reported on test. The loss reported is the loss on a held-out target mix
(the "technical writing" mix of ``examples/mixture_lm.py``)::

    fiction 0.05, scripture 0.05, quotes 0.15, dictionary 0.15, computing 0.30, code 0.30

    target loss = Σ_d t_d · (mean next-byte cross-entropy on domain d's windows), in nats

One run is one process-independent call of :func:`train`; every run of a comparison consumes the
same token budget (``--tokens``): the loader's one epoch *is* the budget in sequences, so a run
ends when the budget is used up, whatever its batch did.

Pieces (each a flag):

- optimizer ``--optimizer adamw|lamb`` (:class:`adaptive.optim.Lamb` with ``param_groups_for``);
- schedule ``--schedule wsd|power`` clocked in tokens (:class:`adaptive.schedules.WSDScheduler`,
  :class:`~adaptive.schedules.PowerScheduler`) fed by :class:`adaptive.callbacks.SampleClock`;
- batch ``--growth``:
  ``none`` (fixed batch), ``norm`` / ``inner_product`` (:class:`adaptive.callbacks.AdaptiveBatchSize`,
  AdAdaGrad's tests), ``warmup`` (Merrill et al. 2025, arXiv 2505.23971: the batch doubles at
  token milestones, :class:`DoublingWarmup`), ``noise_scale`` (McCandlish et al. 2018, arXiv
  1812.06162: the batch grows to the sensor's smoothed simple noise scale,
  :class:`NoiseScaleGrowth`);
- mixture ``--mixture uniform|influence|influence_exp``:
  :class:`adaptive.callbacks.DynamicMixture` with :class:`adaptive.mixture.GroupInfluence`
  (TiKMiX-D by SLSQP, or the exponentiated update) against the validation target mix, or fixed
  uniform weights.

Composition. ``AdaptiveBatchSize`` resizes an :class:`~adaptive.batching.AdaptiveBatchSampler`;
``DynamicMixture`` reweights a :class:`~adaptive.mixture.MixtureSampler`. Neither callback can
take the other's sampler, so the loader here uses :class:`GrowableMixtureSampler`, which is both:
batch ``k`` has the size the growth callback scheduled for it and draws its sources with the
weights the mixture callback set; its checkpoint holds both states, rolled back to the batch the
loop consumed, so a resumed run repeats the uninterrupted one (``tests/examples/
test_lm_pretrain.py``).

Writes ``<out>/<name>.json`` (losses on validation and test, steps, tokens, wall time, the
sensor's share of step time, loss curves, batch-size and mixture-weight trajectories) and
``<out>/<name>.png``. ``python examples/lm_pretrain.py --help``; ``--quick`` is a seconds-long
smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from adaptive.callbacks import AdaptiveBatchSize, DynamicMixture, SampleClock
from adaptive.data.text import TEXT_DOMAINS, text_domains
from adaptive.mixture import GroupInfluence, GrowableMixtureSampler, MixtureDataset
from adaptive.optim import Lamb, param_groups_for
from adaptive.schedules import PowerScheduler, WSDScheduler

TARGET_MIX = {
    "fiction": 0.05,
    "scripture": 0.05,
    "quotes": 0.15,
    "dictionary": 0.15,
    "computing": 0.30,
    "code": 0.30,
}
GROWTH = ("none", "norm", "inner_product", "warmup", "noise_scale")
MIXTURES = ("uniform", "influence", "influence_exp")
KIND = {
    "none": "fixed",
    "norm": "adaptive",
    "inner_product": "adaptive",
    "warmup": "warmup",
    "noise_scale": "noise_scale",
}


# ====================================================================================== data
class Windows(Dataset):
    """Non-overlapping windows of ``context + 1`` bytes of one byte stream (input + next byte)."""

    def __init__(self, data: np.ndarray, context: int) -> None:
        self.data = torch.from_numpy(np.asarray(data, dtype=np.int64))
        self.context = context
        self.n = (len(data) - 1) // context
        if self.n < 1:
            raise ValueError(f"a stream of {len(data)} bytes holds no window of {context} + 1")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Tensor:
        s = int(i) * self.context
        return self.data[s : s + self.context + 1]


def _to_bytes(docs: Sequence[str], limit: int) -> np.ndarray:
    out, total = [], 0
    for d in docs:
        b = (d + "\n\n").encode("utf-8", errors="replace")
        out.append(b)
        total += len(b)
        if total >= limit:
            break
    return np.frombuffer(b"".join(out)[:limit], dtype=np.uint8)


def split_domains(
    train_bytes: int,
    heldout_bytes: int,
    seed: int = 1234,
    heldout_fraction: float = 0.05,
    cache: Path | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Per domain ``{"train", "val", "test"}`` byte streams from disjoint documents.

    Each domain's documents are shuffled with ``seed``; the first ``heldout_fraction`` of them
    (at least 4) are the test documents, the next as many the validation documents, the rest
    the training documents. Each stream is cut at ``train_bytes`` / ``heldout_bytes``. ``cache``:
    an ``.npz`` file that keeps the streams between calls (parsing the corpora takes ~10 s).
    """
    key = np.array([train_bytes, heldout_bytes, seed, round(heldout_fraction * 1e6)])
    if cache is not None and cache.exists():
        with np.load(cache) as z:
            if np.array_equal(z["key"], key):
                return {
                    n: {s: z[f"{n}_{s}"] for s in ("train", "val", "test")} for n in TEXT_DOMAINS
                }
    domains = text_domains()
    out = {}
    for name in TEXT_DOMAINS:
        docs = list(domains[name])
        random.Random(seed).shuffle(docs)
        k = max(4, int(len(docs) * heldout_fraction))
        out[name] = {
            "test": _to_bytes(docs[:k], heldout_bytes),
            "val": _to_bytes(docs[k : 2 * k], heldout_bytes),
            "train": _to_bytes(docs[2 * k :], train_bytes),
        }
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"{n}_{s}": a for n, parts in out.items() for s, a in parts.items()}
        np.savez(cache, key=key, **arrays)
    return out


def eval_windows(stream: np.ndarray, context: int, count: int) -> Tensor:
    """``count`` windows spread evenly over a held-out stream (fixed, so every eval agrees)."""
    ds = Windows(stream, context)
    idx = np.linspace(0, len(ds) - 1, num=min(count, len(ds))).astype(int)
    return torch.stack([ds[int(i)] for i in idx])


# ================================================================= the composed batch sampler
# ===================================================================== growth rules as callbacks
class NoiseScaleGrowth(AdaptiveBatchSize):
    """Grow the batch to the smoothed simple noise scale (McCandlish et al. 2018, arXiv
    1812.06162): ``B_simple = tr Σ / |G|²``.

    Every ``interval`` optimizer steps the sensor gives the per-sample variance ``V`` (an
    unbiased estimate of ``tr Σ``) and ``‖ḡ‖²``; ``|G|² ≈ ‖ḡ‖² − V/b`` (unbiased). Both are
    smoothed by exponential moving averages (``beta``) *before* the ratio, as the paper advises,
    and the batch becomes ``min(b_max, ⌈max(b, factor · B_simple)⌉)`` (never shrinks).
    Everything else (scheduling beyond the prefetch window, accumulation, checkpoints) is
    :class:`AdaptiveBatchSize`'s. The averages are device tensors (no host sync) and are
    checkpointed.
    """

    def __init__(self, *, beta: float = 0.9, factor: float = 1.0, **kwargs: Any) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must lie in [0, 1), got {beta!r}")
        if not factor > 0:
            raise ValueError(f"factor must be > 0, got {factor!r}")
        super().__init__(test="norm", eta=1.0, **kwargs)
        self.beta = float(beta)
        self.factor = float(factor)
        self._ema: Tensor | None = None  # [tr Σ, |G|²]

    def _propose(self, stats: Any, optimizer: torch.optim.Optimizer) -> Tensor:
        v = stats.variance.float().reshape(())
        g2 = (stats.grad_sq_norm.float().reshape(()) - v / stats.batch_size).clamp_min(0.0)
        now = torch.stack([v, g2])
        if self._ema is None:
            self._ema = now
        else:  # .to: a restored average may sit on the CPU
            self._ema = self.beta * self._ema.to(now.device) + (1 - self.beta) * now
        return self.factor * self._ema[0] / self._ema[1].clamp_min(1e-30)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["noise_ema"] = None if self._ema is None else self._ema.detach().cpu()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ema = state_dict.get("noise_ema")
        self._ema = None if ema is None else ema.clone()
        super().load_state_dict(state_dict)


class DoublingWarmup(AdaptiveBatchSize):
    """Batch-size warmup of Merrill et al. 2025 ("Critical Batch Size Revisited", arXiv
    2505.23971): the batch doubles each time the tokens seen pass a milestone,
    ``b(n) = min(b_max, b₀ · 2^{#{m ∈ milestones : m <= n}})``.

    No statistics are measured (the sensor stays detached); the change is scheduled through
    :class:`AdaptiveBatchSize`'s machinery (beyond the prefetch window, exact on resume, lr
    scaling and accumulation as configured).
    """

    def __init__(self, milestones: Sequence[float], tokens_per_sample: int, **kwargs: Any) -> None:
        ms = [float(m) for m in milestones]
        if any(m <= 0 for m in ms) or ms != sorted(ms):
            raise ValueError(f"milestones must be increasing positive token counts, got {ms}")
        if not isinstance(tokens_per_sample, int) or tokens_per_sample < 1:
            raise ValueError(f"tokens_per_sample must be a positive int, got {tokens_per_sample}")
        super().__init__(test="norm", **kwargs)
        self.milestones = ms
        self.tokens_per_sample = tokens_per_sample

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._stats = None  # a schedule, not a test: nothing to measure

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.sampler is None:
            return
        tokens = self._samples_seen * self.tokens_per_sample  # before this step's batch
        doublings = sum(1 for m in self.milestones if m <= tokens)
        target = min(self.max_batch_size, self._base_size * 2**doublings)
        if target > self._target:
            current = self._target
            new = self._decide(trainer, float(target), (0.0, 0.0, 1))
            self.history.append(
                {
                    "step": float(trainer.global_step),
                    "samples": float(self._samples_seen),
                    "batch_size": float(current),
                    "proposed": float(target),
                    "next_batch_size": float(new),
                }
            )


# ================================================================================= the module
def build_model(layers: int, width: int, heads: int, context: int) -> torch.nn.Module:
    """A randomly initialised Llama (transformers) with a 256-byte vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if width % heads:
        raise ValueError(f"--width {width} must be a multiple of --heads {heads}")
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=width,
        intermediate_size=round(width * 8 / 3 / 16) * 16,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=context,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def window_losses(model: torch.nn.Module, windows: Tensor) -> Tensor:
    """Mean next-byte cross-entropy of each window, shape ``(b,)`` (nats)."""
    x, y = windows[:, :-1], windows[:, 1:]
    logits = model(input_ids=x).logits
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="none"
    )
    return ce.view(y.shape).mean(dim=1)


class LMModule(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, cfg: RunConfig, total_tokens: int) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.total_tokens = total_tokens

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        windows, _ = batch
        per = window_losses(self.model, windows)
        loss = per.mean()
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return {"loss": loss, "sample_losses": per.detach()}

    def configure_optimizers(self) -> Any:
        cfg = self.cfg
        groups = param_groups_for(self.model, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "lamb":
            opt = Lamb(groups, lr=cfg.lr, betas=(0.9, 0.95))
        else:
            opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
        n = float(self.total_tokens)
        warm = cfg.warmup_fraction * n
        decay = cfg.decay_fraction * n
        if cfg.schedule == "wsd":
            sched = WSDScheduler(opt, warmup_tokens=warm, decay_tokens=decay, total_tokens=n)
        else:
            # lr = min(lr, β·a·n^b) with a chosen so that the cap binds until the warmup's end
            # at the initial batch (a = lr / (β₀ · W^b)): the peak is --lr, then the power law
            a = cfg.lr / (cfg.batch_size * max(warm, 1.0) ** cfg.power_b)
            sched = PowerScheduler(
                opt,
                a=a,
                b=cfg.power_b,
                lr_max=cfg.lr,
                warmup_tokens=warm,
                decay_tokens=decay,
                total_tokens=n,
            )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ================================================================== measuring and recording
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Recorder(pl.Callback):
    """Per batch: tokens, optimizer step, batch size, train loss, wall time, and whether a sensor
    was capturing; every ``eval_every`` tokens (and at the end): validation and test target-mix
    losses on fixed windows. Checkpointed, so a resumed run's record continues the original's.

    Put it after the growth and mixture callbacks: their capture flags are read at batch start.
    On CUDA each batch's time is taken between two synchronisations (a measurement cost of this
    example's recorder, not of the toolkit: the callbacks themselves never synchronise per step).
    """

    def __init__(
        self,
        val: dict[str, Tensor],
        test: dict[str, Tensor],
        eval_every: int,
        sensors: Sequence[pl.Callback] = (),
    ) -> None:
        self.val, self.test = val, test
        self.eval_every = eval_every
        self.sensors = list(sensors)
        self.tokens = 0
        self.rows: list[dict[str, float]] = []
        self.evals: list[dict[str, Any]] = []
        self._loss: list[Tensor] = []  # device scalars, read when rows are finalised
        self._t0 = 0.0
        self._capturing = False

    @torch.no_grad()
    def evaluate(self, pl_module: pl.LightningModule, step: int) -> dict[str, Any]:
        was = pl_module.training
        pl_module.eval()
        out: dict[str, Any] = {"step": step, "tokens": self.tokens}
        for split, sets in (("val", self.val), ("test", self.test)):
            dom = {
                n: float(window_losses(pl_module.model, w.to(pl_module.device)).mean())
                for n, w in sets.items()
            }
            out[f"{split}_domain"] = dom
            out[f"{split}_loss"] = sum(TARGET_MIX[n] * dom[n] for n in TEXT_DOMAINS)
        pl_module.train(was)
        return out

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.evals:
            self.evals.append(self.evaluate(pl_module, 0))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._capturing = any(bool(getattr(cb, "_capturing", False)) for cb in self.sensors)
        _sync(pl_module.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        _sync(pl_module.device)
        seconds = time.perf_counter() - self._t0
        windows = batch[0]
        before = self.tokens
        self.tokens += int(windows.shape[0]) * (int(windows.shape[1]) - 1)
        self._loss.append(outputs["loss"].detach())
        self.rows.append(
            {
                "batch": len(self.rows),
                "step": trainer.global_step,
                "tokens": self.tokens,
                "micro_batch": int(windows.shape[0]),
                # the global batch in force (the growth callback sets the accumulation)
                "batch_size": int(windows.shape[0]) * int(trainer.accumulate_grad_batches),
                "seconds": seconds,
                "sensor": self._capturing,
            }
        )
        if self.tokens // self.eval_every > before // self.eval_every:
            self.evals.append(self.evaluate(pl_module, trainer.global_step))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.evals[-1]["tokens"] != self.tokens:
            self.evals.append(self.evaluate(pl_module, trainer.global_step))

    def _flush(self) -> None:
        """Read the pending training losses (one host read for all of them) into the rows."""
        if self._loss:
            values = torch.stack(self._loss).double().cpu().tolist()
            for r, v in zip(self.rows[len(self.rows) - len(values) :], values, strict=True):
                r["loss"] = v
            self._loss = []

    def losses(self) -> list[float]:
        """Training loss of every recorded batch."""
        self._flush()
        return [r["loss"] for r in self.rows]

    def state_dict(self) -> dict[str, Any]:
        self._flush()
        return {
            "tokens": self.tokens,
            "rows": [dict(r) for r in self.rows],
            "evals": [dict(e) for e in self.evals],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens = int(state_dict["tokens"])
        self.rows = [dict(r) for r in state_dict["rows"]]
        self.evals = [dict(e) for e in state_dict["evals"]]
        self._loss = []


class SaveAndStop(pl.Callback):
    """Save a checkpoint at the end of optimizer step ``step`` and stop the run there: a
    mid-run checkpoint taken inside the loop (what ``ModelCheckpoint(every_n_train_steps=)``
    does), so resuming from it continues the epoch. Place it after every other callback."""

    def __init__(self, step: int, path: str | Path) -> None:
        if not isinstance(step, int) or step < 1:
            raise ValueError(f"step must be a positive int, got {step!r}")
        self.step, self.path, self.saved = step, Path(path), False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.saved and trainer.global_step >= self.step:
            trainer.save_checkpoint(self.path)
            self.saved = True
            trainer.should_stop = True


# ======================================================================================= a run
PRECISIONS = ("32-true", "bf16-mixed")


@dataclass
class RunConfig:
    """Everything one run depends on (saved in its JSON)."""

    name: str = "run"
    seed: int = 0
    tokens: int = 5_000_000
    context: int = 256
    layers: int = 4
    width: int = 256
    heads: int = 4
    batch_size: int = 16
    max_batch_size: int = 256
    max_micro_batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.1
    schedule: str = "wsd"
    warmup_fraction: float = 0.05
    decay_fraction: float = 0.2
    power_b: float = -0.51
    growth: str = "none"
    eta: float = 0.5
    interval: int = 4
    lr_scaling: str = "none"
    warmup_milestones: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.6])
    noise_beta: float = 0.9
    noise_factor: float = 1.0
    mixture: str = "uniform"
    update_every: int = 20
    capture_steps: int = 4
    influence_eta: float = 0.3
    influence_floor: float = 0.02
    target_batch: int = 32
    eval_windows: int = 48
    evals: int = 16
    threads: int = 0
    # "bf16-mixed": autocast to bfloat16 (float32 weights and optimizer state): 1.4-1.8x the
    # tokens/s of float32 on an AMX CPU (Sapphire Rapids, 2 threads, this model)
    precision: str = "32-true"

    def check(self) -> None:
        if self.growth not in GROWTH:
            raise ValueError(f"growth={self.growth!r}; use one of {list(GROWTH)}")
        if self.mixture not in MIXTURES:
            raise ValueError(f"mixture={self.mixture!r}; use one of {list(MIXTURES)}")
        if self.optimizer not in ("adamw", "lamb"):
            raise ValueError(f"optimizer={self.optimizer!r}; use 'adamw' or 'lamb'")
        if self.schedule not in ("wsd", "power"):
            raise ValueError(f"schedule={self.schedule!r}; use 'wsd' or 'power'")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; use one of {list(PRECISIONS)}")
        for name in ("tokens", "context", "layers", "width", "heads", "batch_size", "interval"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.tokens < self.context * self.batch_size:
            raise ValueError(
                f"tokens={self.tokens} is less than one batch ({self.batch_size} x {self.context})"
            )
        if self.growth != "none" and self.max_batch_size < self.batch_size:
            raise ValueError(f"max_batch_size={self.max_batch_size} < batch_size={self.batch_size}")
        if not 0 <= self.warmup_fraction + self.decay_fraction <= 1:
            raise ValueError("warmup_fraction + decay_fraction must lie in [0, 1]")
        if self.growth == "warmup":
            if self.lr_scaling == "adascale":
                raise ValueError(
                    "lr_scaling='adascale' needs the gradient statistics, which growth='warmup' "
                    "does not measure; use 'none', 'linear' or 'sqrt'"
                )
            ms = list(self.warmup_milestones)
            if not ms or ms != sorted(ms) or not 0 < ms[0] or ms[-1] > 1:
                raise ValueError(
                    f"warmup_milestones must be increasing fractions of the budget in (0, 1], "
                    f"got {ms}"
                )
        if self.growth == "none" and self.batch_size > self.max_micro_batch_size:
            if self.batch_size % self.max_micro_batch_size:
                raise ValueError(
                    f"batch_size={self.batch_size} must be a multiple of max_micro_batch_size="
                    f"{self.max_micro_batch_size} (the fixed batch is accumulated from them)"
                )
        if self.mixture != "uniform" and not 1 <= self.capture_steps <= self.update_every:
            raise ValueError("capture_steps must lie in [1, update_every]")

    @property
    def kind(self) -> str:
        return KIND[self.growth]


def fixed_accumulation(cfg: RunConfig) -> int:
    """Micro-batches per optimizer step of a fixed batch larger than ``max_micro_batch_size``
    (growth runs: the growth callback sets the accumulation itself)."""
    if cfg.growth != "none" or cfg.batch_size <= cfg.max_micro_batch_size:
        return 1
    return cfg.batch_size // cfg.max_micro_batch_size


def build(cfg: RunConfig, splits: dict[str, dict[str, np.ndarray]]):
    """The module, the train loader and the callbacks of one run (nothing trained yet)."""
    cfg.check()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_model(cfg.layers, cfg.width, cfg.heads, cfg.context)
    module = LMModule(model, cfg, cfg.tokens)
    sources = [Windows(splits[n]["train"], cfg.context) for n in TEXT_DOMAINS]
    sequences = cfg.tokens // cfg.context
    sampler = GrowableMixtureSampler(
        [len(s) for s in sources],
        [1.0] * len(sources),
        batch_size=cfg.batch_size // fixed_accumulation(cfg),
        num_samples=sequences,
        seed=cfg.seed,
        num_replicas=1,
        rank=0,
    )
    loader = DataLoader(MixtureDataset(sources, list(TEXT_DOMAINS)), batch_sampler=sampler)
    module.train_dataloader = lambda: loader  # type: ignore[method-assign]

    callbacks: list[pl.Callback] = [
        SampleClock(tokens_fn=lambda b: int(b[0].shape[0]) * (int(b[0].shape[1]) - 1))
    ]
    growth_cb: AdaptiveBatchSize | None = None
    common = {
        "max_batch_size": cfg.max_batch_size,
        "max_micro_batch_size": cfg.max_micro_batch_size,
        "lr_scaling": cfg.lr_scaling,
        "seed": cfg.seed,
    }
    if cfg.growth in ("norm", "inner_product"):
        growth_cb = AdaptiveBatchSize(test=cfg.growth, eta=cfg.eta, interval=cfg.interval, **common)
    elif cfg.growth == "noise_scale":
        growth_cb = NoiseScaleGrowth(
            beta=cfg.noise_beta, factor=cfg.noise_factor, interval=cfg.interval, **common
        )
    elif cfg.growth == "warmup":
        growth_cb = DoublingWarmup(
            [f * cfg.tokens for f in cfg.warmup_milestones], cfg.context, **common
        )

    val = {n: eval_windows(splits[n]["val"], cfg.context, cfg.eval_windows) for n in TEXT_DOMAINS}
    test = {n: eval_windows(splits[n]["test"], cfg.context, cfg.eval_windows) for n in TEXT_DOMAINS}
    mixture_cb = None
    if cfg.mixture != "uniform":
        # the target: the validation mix (held-out documents), never the test documents
        counts = {n: max(1, round(cfg.target_batch * TARGET_MIX[n])) for n in TEXT_DOMAINS}
        parts = {n: eval_windows(splits[n]["val"], cfg.context, counts[n]) for n in TEXT_DOMAINS}
        target = torch.cat([parts[n] for n in TEXT_DOMAINS])
        mix = torch.cat(
            [torch.full((len(parts[n]),), TARGET_MIX[n] / len(parts[n])) for n in TEXT_DOMAINS]
        )

        def target_loss(m: pl.LightningModule) -> Tensor:
            return (window_losses(m.model, target.to(m.device)) * mix.to(m.device)).sum()

        rule = GroupInfluence(
            len(TEXT_DOMAINS),
            method="tikmix" if cfg.mixture == "influence" else "exponentiated",
            eta=cfg.influence_eta,
            floor=cfg.influence_floor,
        )
        mixture_cb = DynamicMixture(
            rule,
            update_every=cfg.update_every,
            target_loss=target_loss,
            capture_steps=cfg.capture_steps,
            names=list(TEXT_DOMAINS),
            log=False,
        )
        callbacks.append(mixture_cb)
    if growth_cb is not None:
        # either order works: DynamicMixture's target-gradient pass runs inside
        # adaptive.stats.side_pass(), which the growth sensor does not capture
        callbacks.append(growth_cb)
    recorder = Recorder(
        val, test, max(1, cfg.tokens // cfg.evals), [c for c in (growth_cb, mixture_cb) if c]
    )
    callbacks.append(recorder)
    return module, sampler, callbacks, recorder, growth_cb, mixture_cb


def train(
    cfg: RunConfig,
    splits: dict[str, dict[str, np.ndarray]],
    out: Path | None = None,
    *,
    stop_at: int | None = None,
    save: str | Path | None = None,
    ckpt_path: str | None = None,
    ckpt_every: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one run; returns its record (also written to ``<out>/<name>.json`` and ``.png``).

    ``stop_at`` + ``save``: save a checkpoint at the end of optimizer step ``stop_at`` (from
    inside the loop, as ``ModelCheckpoint`` does) and stop there; ``ckpt_path``: resume from a
    checkpoint; ``ckpt_every``: keep a checkpoint every that many steps under ``<out>/ckpt``.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    module, _sampler, callbacks, recorder, growth_cb, mixture_cb = build(cfg, splits)
    if stop_at is not None:
        if save is None:
            raise ValueError("stop_at needs save=<checkpoint path>")
        callbacks.append(SaveAndStop(stop_at, save))  # last: the others' batch ends ran
    if ckpt_every:
        if out is None:
            raise ValueError("ckpt_every needs out=<directory>")
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(
            ModelCheckpoint(
                dirpath=out / "ckpt" / cfg.name,
                every_n_train_steps=ckpt_every,
                save_top_k=-1,
                save_last=True,
            )
        )
    trainer = pl.Trainer(
        max_epochs=1,
        max_steps=-1,
        accelerator="auto",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=bool(ckpt_every),
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        gradient_clip_val=1.0,
        accumulate_grad_batches=fixed_accumulation(cfg),
        precision=cfg.precision,
    )
    t0 = time.perf_counter()
    trainer.fit(module, ckpt_path=ckpt_path)
    wall = time.perf_counter() - t0
    recorder.losses()
    rows = recorder.rows
    step_seconds = sum(r["seconds"] for r in rows)
    sensed = [r["seconds"] for r in rows if r["sensor"]]
    plain = [r["seconds"] for r in rows if not r["sensor"]]
    # the sensor's cost: captured batches' excess over the median uncaptured batch
    base = float(np.median(plain)) if plain else float("nan")
    extra = sum(max(s - base, 0.0) for s in sensed) if plain else float("nan")
    final = recorder.evals[-1]
    # sizes in force, with the optimizer step and the tokens at which each began (the budget's
    # short last batch is not a size change)
    batch_traj: list[dict[str, int]] = []
    prev_step, prev_tokens = 0, 0
    for n, r in enumerate(rows):
        short_last = (
            n == len(rows) - 1 and batch_traj and r["batch_size"] < batch_traj[-1]["batch_size"]
        )
        if not short_last and (not batch_traj or r["batch_size"] != batch_traj[-1]["batch_size"]):
            batch_traj.append(
                {"step": prev_step, "tokens": prev_tokens, "batch_size": r["batch_size"]}
            )
        prev_step, prev_tokens = r["step"], r["tokens"]
    weights = []
    if mixture_cb is not None:
        tokens_after = [0] + [r["tokens"] for r in rows]
        for h in mixture_cb.history:
            b = min(int(h["step"]), len(rows))
            weights.append(
                {"batch": int(h["step"]), "tokens": tokens_after[b], "weights": h["weights"]}
            )
    else:
        weights.append(
            {"batch": 0, "tokens": 0, "weights": [1 / len(TEXT_DOMAINS)] * len(TEXT_DOMAINS)}
        )
    record = {
        "name": cfg.name,
        "kind": cfg.kind,
        "mixture": cfg.mixture,
        "seed": cfg.seed,
        "config": asdict(cfg),
        "test_loss": final["test_loss"],
        "val_loss": final["val_loss"],
        "test_domain": final["test_domain"],
        "val_domain": final["val_domain"],
        "steps": trainer.global_step,
        "batches": len(rows),
        "tokens": recorder.tokens,
        "budget_tokens": (cfg.tokens // cfg.context) * cfg.context,
        "wall_seconds": wall,
        "step_seconds": step_seconds,
        "tokens_per_second": recorder.tokens / step_seconds if step_seconds else float("nan"),
        "sensor_batches": len(sensed),
        "sensor_seconds": extra,
        "sensor_share": extra / step_seconds if step_seconds else float("nan"),
        "parameters": sum(p.numel() for p in module.model.parameters()),
        "evals": recorder.evals,
        "train": [
            {k: r[k] for k in ("step", "tokens", "batch_size", "micro_batch", "loss")} for r in rows
        ],
        "batch_size_trajectory": batch_traj,
        "weights_trajectory": weights,
        "growth_history": list(getattr(growth_cb, "history", []) or []),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": str(module.device),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{cfg.name}.json").write_text(json.dumps(record, indent=1))
        plot_runs(out / f"{cfg.name}.png", [record])
    return record


# ====================================================================================== plots
def loss_window(runs: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """The loss axes' range: from just under the lowest loss any curve reaches to the highest
    final test loss plus the spread between the two (at least 0.5 nats), so the late part of
    training, where the runs differ, fills the panel; the first fall runs off the top."""
    lo = min(min(e["test_loss"], e["val_loss"]) for r in runs for e in r["evals"])
    hi = max(r["evals"][-1]["test_loss"] for r in runs)
    return lo - 0.02, hi + max(0.5, hi - lo)


def plot_runs(
    path: Path,
    runs: Sequence[dict[str, Any]],
    critical: dict[str, Sequence[tuple[float, float]]] | None = None,
) -> Path:
    """Loss vs tokens and vs optimizer steps (test, validation dashed), batch size vs tokens
    (with ``critical[name]``, (tokens, sequences) points of the measured critical batch, dotted
    in the run's colour), and the first mixture run's weights vs tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    colors = [plt.cm.tab20(i % 20) for i in range(20)]  # up to 20 runs, distinct colours
    for i, run in enumerate(runs):
        c = colors[i % len(colors)]
        ev = run["evals"]
        tok = [e["tokens"] for e in ev]
        axes[0].plot(tok, [e["test_loss"] for e in ev], color=c)
        axes[0].plot(tok, [e["val_loss"] for e in ev], color=c, ls="--", lw=0.8)
        axes[1].plot(
            [e["step"] for e in ev], [e["test_loss"] for e in ev], color=c, label=run["name"]
        )
        bt = run["batch_size_trajectory"]
        xs = [b["tokens"] for b in bt] + [run["tokens"]]
        ys = [b["batch_size"] for b in bt] + [bt[-1]["batch_size"]]
        axes[2].step(xs, ys, where="post", color=c)
        if critical and critical.get(run["name"]):
            cx, cy = zip(*critical[run["name"]], strict=True)
            axes[2].plot(cx, cy, color=c, ls=":", marker=".", lw=1)
    for ax, xl in zip(axes[:3], ("tokens", "optimizer steps", "tokens"), strict=True):
        ax.set_xlabel(xl)
    axes[0].set_ylabel("target-mix loss (nats; test solid, val dashed)")
    axes[1].set_ylabel("target-mix test loss")
    for ax in axes[:2]:
        ax.set_ylim(*loss_window(runs))
    axes[2].set_ylabel("batch (sequences)" + ("; dotted: B_simple" if critical else ""))
    axes[2].set_yscale("log", base=2)
    # the steps panel's top right stays empty: the runs with many steps are the low-loss ones
    axes[1].legend(fontsize=7, loc="upper right")
    mixed = [r for r in runs if r["mixture"] != "uniform"]
    ax = axes[3]
    if mixed:
        run = mixed[0]
        wt = run["weights_trajectory"]
        xs = [w["tokens"] for w in wt] + [run["tokens"]]
        w = np.array([x["weights"] for x in wt] + [wt[-1]["weights"]])
        ax.stackplot(xs, w.T, labels=TEXT_DOMAINS, step="post")
        ax.set_title(f"mixture weights: {run['name']}", fontsize=9)
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    else:
        ax.text(0.5, 0.5, "uniform mixture\n(no reweighting)", ha="center", va="center")
    ax.set_xlabel("tokens")
    ax.set_ylabel("sampling weight")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ======================================================================================== CLI
QUICK = {
    "tokens": 24 * 8 * 32,
    "context": 32,
    "layers": 1,
    "width": 32,
    "heads": 2,
    "batch_size": 4,
    "max_batch_size": 32,
    "max_micro_batch_size": 16,
    "update_every": 4,
    "capture_steps": 2,
    "interval": 2,
    "target_batch": 12,
    "eval_windows": 8,
    "evals": 4,
}
QUICK_DATA = {"train_bytes": 40_000, "heldout_bytes": 8_000}


def parser() -> argparse.ArgumentParser:
    d = RunConfig()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--name", default=None, help="run name (default: from the settings)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--tokens", type=int, default=d.tokens, help="token budget of the run")
    p.add_argument("--context", type=int, default=d.context)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="(initial) sequences")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    p.add_argument("--max-micro-batch-size", type=int, default=d.max_micro_batch_size)
    p.add_argument("--optimizer", choices=("adamw", "lamb"), default=d.optimizer)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--schedule", choices=("wsd", "power"), default=d.schedule)
    p.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction)
    p.add_argument("--decay-fraction", type=float, default=d.decay_fraction)
    p.add_argument("--power-b", type=float, default=d.power_b)
    p.add_argument("--growth", choices=GROWTH, default=d.growth)
    p.add_argument("--eta", type=float, default=d.eta, help="tolerance of the norm / IP test")
    p.add_argument("--interval", type=int, default=d.interval, help="steps between decisions")
    p.add_argument(
        "--lr-scaling", choices=("none", "linear", "sqrt", "adascale"), default=d.lr_scaling
    )
    p.add_argument(
        "--warmup-milestones",
        type=float,
        nargs="+",
        default=d.warmup_milestones,
        help="fractions of the budget at which --growth warmup doubles the batch",
    )
    p.add_argument("--noise-beta", type=float, default=d.noise_beta)
    p.add_argument("--noise-factor", type=float, default=d.noise_factor)
    p.add_argument("--mixture", choices=MIXTURES, default=d.mixture)
    p.add_argument("--update-every", type=int, default=d.update_every)
    p.add_argument("--capture-steps", type=int, default=d.capture_steps)
    p.add_argument("--influence-eta", type=float, default=d.influence_eta)
    p.add_argument("--influence-floor", type=float, default=d.influence_floor)
    p.add_argument("--target-batch", type=int, default=d.target_batch)
    p.add_argument("--eval-windows", type=int, default=d.eval_windows, help="per domain, split")
    p.add_argument("--evals", type=int, default=d.evals, help="evaluations over the budget")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: default)")
    p.add_argument(
        "--precision", default=d.precision, choices=PRECISIONS, help="Lightning's precision"
    )
    p.add_argument("--train-bytes", type=int, default=3_000_000, help="per domain")
    p.add_argument("--heldout-bytes", type=int, default=200_000, help="per domain and split")
    p.add_argument("--cache", type=Path, default=None, help=".npz file for the parsed streams")
    p.add_argument("--out", type=Path, default=Path("results/lm_pretrain"))
    p.add_argument("--quick", action="store_true", help="a tiny model and budget (seconds)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--ckpt-every", type=int, default=0, help="checkpoint every N steps under <out>/ckpt/<name>"
    )
    p.add_argument("--resume", default=None, help="a checkpoint of this run to continue from")
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    fields = RunConfig.__dataclass_fields__
    cfg = RunConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    if args.quick:
        for k, v in QUICK.items():
            setattr(cfg, k, v)
        args.train_bytes, args.heldout_bytes = (
            QUICK_DATA["train_bytes"],
            QUICK_DATA["heldout_bytes"],
        )
    cfg.name = args.name or default_name(cfg)
    cfg.check()
    return cfg


def default_name(cfg: RunConfig) -> str:
    growth = "fixed" if cfg.growth == "none" else cfg.growth
    return f"{growth}-b{cfg.batch_size}-lr{cfg.lr:g}-{cfg.mixture}-s{cfg.seed}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        parser().error(str(err))
    splits = split_domains(args.train_bytes, args.heldout_bytes, cache=args.cache)
    record = train(
        cfg,
        splits,
        args.out,
        progress=not args.no_progress,
        ckpt_every=args.ckpt_every,
        ckpt_path=args.resume,
    )
    print(
        f"{cfg.name}: test loss {record['test_loss']:.4f} (val {record['val_loss']:.4f}), "
        f"{record['steps']} steps, {record['tokens']:,} tokens, {record['wall_seconds']:.0f} s, "
        f"{record['tokens_per_second']:.0f} tokens/s, sensor share {record['sensor_share']:.1%}",
        file=sys.stderr,
    )
    return record


if __name__ == "__main__":
    main()
