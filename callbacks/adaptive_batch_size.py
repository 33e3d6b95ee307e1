"""Lightning callback that grows the batch when the gradient noise allows (AdAdaGrad).

Thin adapter over :mod:`adaptive.batching` and :class:`adaptive.stats.GradientStatistics`
(Lau, Liu, Kolar 2024, arXiv 2402.11215). Every ``interval`` optimizer steps it captures the
per-sample gradient statistics of that step's batch, runs the chosen test, applies
``b_{k+1} = min(b_max, ⌈max(b_k, b̂_k)⌉)`` and schedules the new size on the train loader's
:class:`~adaptive.batching.AdaptiveBatchSampler`. Past ``max_micro_batch_size`` the per-rank
micro-batch stays fixed and ``trainer.accumulate_grad_batches`` grows instead.

Installation: at ``setup("fit")`` the callback wraps the ``train_dataloader`` hook of the
datamodule or LightningModule (or replaces a DataLoader passed to ``fit``) so that the loader it
returns is rebuilt with an :class:`AdaptiveBatchSampler` (same dataset, collate function, workers;
the loader's ``batch_size`` is the initial per-rank micro-batch). The loader's index sampler is
kept: ``shuffle=True`` / ``False`` become the sampler's own seeded permutation / sequential order,
and any other sampler (``WeightedRandomSampler``, ``SubsetRandomSampler``, a
``DistributedSampler``, your own) is wrapped: the batches draw from it, only their size changes
(see :class:`AdaptiveBatchSampler` for what resuming means for it). A loader that already uses an
``AdaptiveBatchSampler`` is used as it is. Where this cannot work, ``setup`` raises ``ValueError``
saying why: iterable datasets (no indices to batch), loaders with their own ``batch_sampler`` or
``batch_size=None``, several train loaders, a sampler that cannot be replayed for resumption,
``Trainer(accumulate_grad_batches != 1)`` (the callback owns accumulation), manual optimization,
DDP with Lightning's distributed-sampler injection on (pass ``Trainer(use_distributed_sampler=False)``:
the sampler shards every global batch itself), and a model the statistics sensor cannot measure
(checked at ``setup``, not at the first batch).

With :class:`adaptive.callbacks.OnlineBatchSelection` (growth + selection). The test measures the kept
samples, which are what is trained on, so sizes are *kept* sizes: ``batch_size``,
``max_batch_size``, ``max_micro_batch_size``, the lr scaling and the logs all count kept samples.
The candidate pool grows with them at the loader's keep fraction ``k / batch_size`` (reduced to
``p / q``): a kept batch ``b`` is drawn from ``b · q / p`` candidates, and the selection callback
keeps the same fraction of every candidate batch (its selector's ``k`` follows). Kept sizes are
therefore multiples of ``p`` (and of the ranks).

Length. The sampler has a length, the planned number of batches of the epoch under the sizes
scheduled so far, and after every decision the callback updates Lightning's view of it
(``trainer.num_training_batches``, the fetcher's end-of-epoch check, a float
``val_check_interval``, the progress bar's total), so the bar has a total and an ETA and the
epoch's last batch is known. ``trainer.estimated_stepping_batches`` is the optimizer steps of the
run at the initial batch, i.e. the sample budget in units of the initial batch. A torch
scheduler that Lightning steps every optimizer step (OneCycleLR, cosine, LambdaLR: ``interval=
"step"``) is kept on that clock: after each optimizer step the callback steps it again for every
further initial batch's worth of candidates the step consumed (``⌊consumed / b₀⌋`` during an
epoch, the epoch's full count at its end), so it reaches its last step at the end of the budget
however the batch grew, and ``total_steps=trainer.estimated_stepping_batches`` is right. With
``Trainer(max_steps=...)`` the budget is in optimizer steps, whose number a growing batch changes:
such a scheduler is refused; use :class:`adaptive.callbacks.SampleClock` with a schedule clocked in samples
or tokens (:class:`~adaptive.schedules.WSDScheduler`, :class:`~adaptive.schedules.PowerScheduler`,
:class:`~adaptive.schedules.LinearDecayScheduler`).

Timing. A new size is scheduled at an absolute batch index beyond the DataLoader's prefetch
window (``num_workers × prefetch_factor`` plus Lightning's one-batch fetcher), aligned so that
an accumulation window never straddles the change; the accumulation count and any lr rescaling
switch at that same batch. Sizes therefore never depend on worker timing, and a checkpoint
resumes exactly, with the same number of workers: resuming with another ``num_workers`` changes
the prefetch window and so the batch at which later decisions land (the decisions stay right,
the trajectory differs). Pass ``lookahead=`` to make the window independent of the workers. The
sample clock of sample-clocked schedules (``adaptive.callbacks.SampleClock``) counts each batch from its
own tensors, so it stays right whatever the size.

Logged every decision (``pl_module.log``): ``adaptive_batch/batch_size`` (global batch in force),
``adaptive_batch/proposed`` (``b̂``), ``adaptive_batch/test_ratio`` (``b̂ / b``; the test passes
when ≤ 1), ``adaptive_batch/accumulation``. One host read per decision.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler

from adaptive.batching import (
    AdaptiveBatchSampler,
    augmented_inner_product_test,
    coordinate_norm_test,
    inner_product_test,
    next_batch_size,
    norm_test,
    orthogonality_test,
    plan_batch,
)
from adaptive.callbacks._checks import check_model_supported, check_seed, single_train_loader_source
from adaptive.mixture import MixtureSampler
from adaptive.schedules import SampleClockedScheduler, adascale_gain, lr_scale_factor
from adaptive.stats import FALLBACKS, GradientStatistics

__all__ = ["AdaptiveBatchSize"]

TESTS = ("norm", "inner_product", "orthogonality", "augmented", "coordinate")
LR_SCALINGS = ("none", "linear", "sqrt", "adascale")


def _positive_int(name: str, value: object, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class AdaptiveBatchSize(pl.Callback):
    """Grow the training batch by a variance test, every ``interval`` optimizer steps.

    Args:
        test: ``"norm"`` (Byrd et al. 2012), ``"inner_product"``, ``"orthogonality"``,
            ``"augmented"`` (Bollapragada et al. 2018) or ``"coordinate"`` (coordinate-wise norm
            test in AdaGrad's geometry; reads ``torch.optim.Adagrad``'s accumulator when the
            optimizer is one).
        eta: tolerance η of the norm and coordinate tests, and θ of the inner-product test.
        nu: tolerance ν of the orthogonality test.
        max_batch_size: b_max, the largest global batch.
        interval: optimizer steps between decisions.
        max_micro_batch_size: largest per-rank micro-batch; past it, accumulation grows.
            ``None``: no limit.
        lr_scaling: ``"none"`` (the paper's choice), ``"linear"``, ``"sqrt"`` (relative to the
            initial batch) or ``"adascale"`` (AdaScale gain for the new batch, from the
            statistics of the step that decided it). The scale reaches sample-clocked schedules
            (``set_lr_scale``), ``LambdaLR`` (its ``base_lrs``) and a bare optimizer; any other
            torch scheduler recomputes the lr from its own settings, so that pair is refused at
            fit start.
        seed: shuffle seed of the installed sampler (same on every rank), also the seed of a
            wrapped sampler's draws (``seed + epoch``).
        loss_reduction: how ``training_step``'s loss reduces over samples (``"mean"`` or
            ``"sum"``), passed to :class:`GradientStatistics`.
        lookahead: batches between a decision and the batch the new size starts at; default
            the loader's prefetch window.
        stats_fallback: passed to ``GradientStatistics(fallback=...)`` for models with layers
            the per-sample hooks do not support.
        multiple_of: global batch sizes are multiples of ``multiple_of × world_size``.

    With :class:`adaptive.callbacks.OnlineBatchSelection` in the same Trainer every size above counts the
    kept (trained-on) samples; see the module docstring.
    """

    def __init__(
        self,
        test: str = "norm",
        eta: float = 0.1,
        max_batch_size: int = 4096,
        interval: int = 1,
        max_micro_batch_size: int | None = None,
        lr_scaling: str = "none",
        *,
        nu: float = 1.0,
        seed: int = 0,
        loss_reduction: str = "mean",
        lookahead: int | None = None,
        stats_fallback: str | None = None,
        multiple_of: int = 1,
    ) -> None:
        if test not in TESTS:
            raise ValueError(f"test={test!r} is not a batch-size test; use one of {list(TESTS)}")
        if lr_scaling not in LR_SCALINGS:
            raise ValueError(f"lr_scaling={lr_scaling!r}; use one of {list(LR_SCALINGS)}")
        for name, value in (("eta", eta), ("nu", nu)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive float, got {value!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if lookahead is not None and (
            isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0
        ):
            raise ValueError(f"lookahead must be an int >= 0 or None, got {lookahead!r}")
        if stats_fallback is not None and stats_fallback not in FALLBACKS:
            raise ValueError(
                f"stats_fallback must be None or one of {list(FALLBACKS)}, got {stats_fallback!r}"
            )
        self.test = test
        self.eta = float(eta)
        self.nu = float(nu)
        self.max_batch_size = _positive_int("max_batch_size", max_batch_size)
        self.interval = _positive_int("interval", interval)
        self.max_micro_batch_size = _positive_int(
            "max_micro_batch_size", max_micro_batch_size, allow_none=True
        )
        self.lr_scaling = lr_scaling
        self.multiple_of = _positive_int("multiple_of", multiple_of)
        if (
            self.max_micro_batch_size is not None
            and self.max_micro_batch_size > self.max_batch_size
        ):
            raise ValueError(
                f"max_micro_batch_size={self.max_micro_batch_size} exceeds max_batch_size="
                f"{self.max_batch_size}: a micro-batch is part of one global batch; pass "
                f"max_micro_batch_size <= {self.max_batch_size} (or None)"
            )
        self.seed = check_seed("AdaptiveBatchSize", seed)
        self.loss_reduction = loss_reduction
        self.lookahead = lookahead
        self.stats_fallback = stats_fallback
        self.sampler: AdaptiveBatchSampler | None = None
        self.history: list[dict[str, float]] = []
        self._stats: GradientStatistics | None = None
        self._world = 1
        self._base_size = 0  # global batch at the start (for lr scaling)
        self._target = 0  # latest scheduled global batch
        self._accumulation = 1
        self._pending: list[list[int | float]] = []  # [epoch, from_batch, accumulation, lr factor]
        self._lr_factor = 1.0
        self._micro = 0  # captured micro-batches in the current window
        self._capturing = False
        self._consumed = 0  # batches of the current epoch consumed
        self._epoch = 0
        self._samples_seen = 0
        self._loaded: dict[str, Any] | None = None
        self._window = 1
        self._batch_idx = 0
        self._keep = (1, 1)  # kept p per q candidates (OnlineBatchSelection), reduced
        self._selection: Any = None
        self._base_candidates = 0  # sampler (global) batch at the start: the schedulers' unit
        self._units = 0  # that count at the last optimizer step
        self._last_global_step = 0
        self._step_schedulers: list[Any] = []

    # ---------------------------------------------------------------- public read-outs
    @property
    def batch_size(self) -> int:
        """The latest scheduled global batch size."""
        return self._target

    @property
    def accumulation(self) -> int:
        return self._accumulation

    @property
    def samples_seen(self) -> int:
        """Global samples consumed by training so far (counted from the batches' tensors)."""
        return self._samples_seen

    # ---------------------------------------------------------------- installation
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError(
                "AdaptiveBatchSize needs automatic optimization: it reads the statistics in "
                "on_before_optimizer_step and sets trainer.accumulate_grad_batches"
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) conflicts "
                "with AdaptiveBatchSize, which sets the accumulation itself: leave it at 1, pass "
                "AdaptiveBatchSize(max_micro_batch_size=...)"
            )
        self._world = trainer.world_size
        connector = getattr(trainer, "_accelerator_connector", None)
        if self._world > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ValueError(
                "AdaptiveBatchSize under a distributed strategy needs "
                "Trainer(use_distributed_sampler=False): Lightning would otherwise try to rebuild "
                "the resizable batch sampler around a DistributedSampler; AdaptiveBatchSampler "
                "gives every rank its share of the same global batch itself"
            )
        self._stats = GradientStatistics(
            pl_module,
            loss_reduction=self.loss_reduction,  # type: ignore[arg-type]
            per_coordinate=self.test == "coordinate",
            inner_products=self.test in ("inner_product", "orthogonality", "augmented"),
            fallback=self.stats_fallback,
        )
        check_model_supported("AdaptiveBatchSize", self._stats)
        from adaptive.callbacks.online_batch_selection import OnlineBatchSelection

        selections = [c for c in trainer.callbacks if isinstance(c, OnlineBatchSelection)]
        self._selection = selections[0] if selections else None
        source = trainer.fit_loop._data_source  # where Lightning will request the loader
        instance = source.instance
        single_train_loader_source("AdaptiveBatchSize", instance)
        if isinstance(instance, DataLoader):
            source.instance = self._install(trainer, instance)
            return
        if instance is None or not callable(getattr(instance, "train_dataloader", None)):
            raise ValueError(
                "AdaptiveBatchSize found no train dataloader to install its sampler in: pass "
                "one to fit(train_dataloaders=...) or define train_dataloader() on the "
                f"LightningModule or datamodule (got {type(instance).__name__})"
            )
        original: Callable[[], Any] = instance.train_dataloader

        def train_dataloader() -> Any:
            return self._install(trainer, original())

        instance.train_dataloader = train_dataloader  # instance attribute: the hook Lightning calls

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._stats is not None and self._capturing:
            self._stats.detach()
            self._capturing = False

    def _install(self, trainer: pl.Trainer, loader: Any) -> DataLoader:
        if not isinstance(loader, DataLoader):
            raise ValueError(
                f"AdaptiveBatchSize needs the train dataloader to be a torch DataLoader, got "
                f"{type(loader).__name__}"
            )
        if isinstance(loader.dataset, IterableDataset):
            raise ValueError(
                "AdaptiveBatchSize needs a map-style dataset: an IterableDataset has no indices "
                "for a batch sampler to group"
            )
        if isinstance(loader.batch_sampler, AdaptiveBatchSampler):
            sampler = loader.batch_sampler
            if sampler.num_replicas != self._world:
                raise ValueError(
                    f"the loader's AdaptiveBatchSampler has num_replicas={sampler.num_replicas} "
                    f"but the trainer runs {self._world} processes"
                )
            new = loader
        else:
            if isinstance(loader.batch_sampler, MixtureSampler):
                raise ValueError(
                    "AdaptiveBatchSize cannot resize a MixtureSampler (the batch sampler of "
                    "DynamicMixture): for batch growth and dynamic mixtures on one train loader, "
                    "build it with adaptive.mixture.GrowableMixtureSampler, which both callbacks "
                    "drive"
                )
            if loader.batch_sampler is None:
                raise ValueError(
                    "AdaptiveBatchSize needs a DataLoader that makes batches: this one has "
                    "batch_size=None (automatic batching off, the dataset returns whole batches); "
                    "build it with batch_size=<initial per-device batch>"
                )
            if loader.batch_size is None:
                raise ValueError(
                    "AdaptiveBatchSize cannot take over a DataLoader built with its own "
                    f"batch_sampler ({type(loader.batch_sampler).__name__}); build it with "
                    "batch_size=... and sampler=<your index sampler> (which is kept), or with an "
                    "AdaptiveBatchSampler"
                )
            global_micro = loader.batch_size * self._world
            index_sampler = loader.sampler
            plain_shuffle = (
                type(index_sampler) is RandomSampler
                and not index_sampler.replacement
                and index_sampler.generator is None
                and index_sampler.num_samples == len(loader.dataset)  # type: ignore[arg-type]
            )
            common = {
                "batch_size": global_micro,
                "seed": self.seed,
                "drop_last": loader.drop_last,
                "num_replicas": self._world,
                "rank": trainer.global_rank,
            }
            if plain_shuffle or type(index_sampler) is SequentialSampler:
                # DataLoader(shuffle=True/False): the sampler's own seeded permutation / order
                sampler = AdaptiveBatchSampler(
                    len(loader.dataset),  # type: ignore[arg-type]
                    shuffle=plain_shuffle,
                    **common,
                )
            else:  # the user's sampler is kept: batches draw from it
                try:
                    sampler = AdaptiveBatchSampler(index_sampler, **common)
                    sampler.check_reproducible()
                except ValueError as err:
                    raise ValueError(
                        f"AdaptiveBatchSize cannot wrap the loader's sampler "
                        f"{type(index_sampler).__name__}: {err}"
                    ) from None
            kwargs: dict[str, Any] = {
                "num_workers": loader.num_workers,
                "collate_fn": loader.collate_fn,
                "pin_memory": loader.pin_memory,
                "timeout": loader.timeout,
                "worker_init_fn": loader.worker_init_fn,
                "multiprocessing_context": loader.multiprocessing_context,
                "persistent_workers": loader.persistent_workers,
            }
            if loader.num_workers > 0:
                kwargs["prefetch_factor"] = loader.prefetch_factor
            new = DataLoader(loader.dataset, batch_sampler=sampler, **kwargs)
        self.sampler = sampler
        window = AdaptiveBatchSampler.prefetch_window(new.num_workers, new.prefetch_factor, extra=1)
        if self.lookahead is not None and self.lookahead < window:
            raise ValueError(
                f"AdaptiveBatchSize(lookahead={self.lookahead}) is inside the loader's prefetch "
                f"window of {window} batches (num_workers={new.num_workers}, prefetch_factor="
                f"{new.prefetch_factor}, plus Lightning's fetcher): a change would be scheduled "
                f"on a batch already handed out; use lookahead >= {window}"
            )
        self._window = window if self.lookahead is None else self.lookahead
        self._keep = self._keep_fraction(sampler)
        if self._loaded is not None:
            self._restore(self._loaded)
            self._loaded = None
        else:
            p, q = self._keep
            self._base_candidates = sampler.batch_size
            micro_global = sampler.batch_size * p // q  # kept samples per micro-batch
            self._target = self._base_size = micro_global * self._accumulation
            if self._target > self.max_batch_size:
                raise ValueError(
                    f"the initial global batch {self._target} exceeds max_batch_size="
                    f"{self.max_batch_size}"
                )
            if self.max_micro_batch_size is not None and (
                micro_global // self._world > self.max_micro_batch_size
            ):
                raise ValueError(
                    f"the loader's batch_size={micro_global // self._world} exceeds "
                    f"max_micro_batch_size={self.max_micro_batch_size}"
                )
        return new

    def _keep_fraction(self, sampler: AdaptiveBatchSampler) -> tuple[int, int]:
        """(p, q): kept samples per candidates under OnlineBatchSelection, else (1, 1)."""
        if self._selection is None:
            return (1, 1)
        candidates = sampler.batch_size // self._world
        kept = min(int(self._selection.selector.k), candidates)
        g = math.gcd(kept, candidates)
        p, q = kept // g, candidates // g
        cap = self.max_micro_batch_size
        if cap is not None and cap % p:
            raise ValueError(
                f"with OnlineBatchSelection keeping {kept} of {candidates} candidates, kept "
                f"micro-batches are multiples of {p}: max_micro_batch_size={cap} is not; use a "
                f"multiple of {p}"
            )
        # selection keeps p/q of every candidate batch, so the kept batch grows with the pool
        self._selection.keep_fraction(p, q)
        return (p, q)

    # ---------------------------------------------------------------- length and schedulers
    def _sync_length(self, trainer: pl.Trainer) -> None:
        """Tell Lightning the epoch's planned number of batches (it shrinks as the batch grows)."""
        if self.sampler is None:
            return
        n = self.sampler.num_batches()
        loop = trainer.fit_loop
        if loop.max_batches == n:
            return
        loop.max_batches = n  # trainer.num_training_batches: the epoch's last batch, the bar
        fetcher = getattr(loop, "_data_fetcher", None)
        if fetcher is not None and getattr(fetcher, "length", None) is not None:
            fetcher.length = n
            fetcher.done = fetcher.fetched >= n
        interval = trainer.val_check_interval
        if isinstance(interval, float) and trainer.val_check_batch not in (None, float("inf")):
            trainer.val_check_batch = max(1, int(n * interval))
        bar = trainer.progress_bar_callback
        tqdm_bar = getattr(bar, "_train_progress_bar", None)
        if tqdm_bar is not None and hasattr(tqdm_bar, "total"):
            tqdm_bar.total = n
            tqdm_bar.refresh()
        progress = getattr(bar, "progress", None)
        task = getattr(bar, "train_progress_bar_id", None)
        if progress is not None and task is not None:
            progress.update(task, total=n)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step_schedulers = []
        for config in trainer.lr_scheduler_configs:
            sched = config.scheduler
            if self.lr_scaling != "none" and not isinstance(
                sched, (SampleClockedScheduler, ReduceLROnPlateau, LambdaLR)
            ):
                # the factor reaches a torch scheduler through base_lrs, which only LambdaLR's
                # closed form reads back; OneCycleLR, cosine, step decay would drop it silently
                raise ValueError(
                    f"AdaptiveBatchSize(lr_scaling={self.lr_scaling!r}) cannot rescale the lr "
                    f"set by {type(sched).__name__}, which computes it from its own settings "
                    "(max_lr, the previous lr) rather than from base_lrs: use lr_scaling='none', "
                    "a LambdaLR, or a sample-clocked schedule (adaptive.schedules, with "
                    "adaptive.callbacks.SampleClock), whose lr scale the callback sets"
                )
            if config.interval != "step" or isinstance(
                sched, (SampleClockedScheduler, ReduceLROnPlateau)
            ):
                continue
            name = type(sched).__name__
            if config.frequency != 1:
                raise ValueError(
                    f"AdaptiveBatchSize keeps step-interval schedulers on a clock of samples; "
                    f"{name} is configured with frequency={config.frequency}: return it with "
                    '{"interval": "step", "frequency": 1}'
                )
            if trainer.max_steps != -1:
                raise ValueError(
                    f"Trainer(max_steps={trainer.max_steps}) with {name} stepped every optimizer "
                    "step under AdaptiveBatchSize: the budget is in optimizer steps, whose number "
                    "depends on how the batch grows, so the schedule cannot be placed. Budget in "
                    "epochs (max_epochs; total_steps=trainer.estimated_stepping_batches), or use "
                    "adaptive.callbacks.SampleClock with a schedule clocked in samples or tokens "
                    "(adaptive.schedules.WSDScheduler, PowerScheduler, LinearDecayScheduler)"
                )
            self._step_schedulers.append(sched)

    def _units_per_epoch(self) -> int:
        """Initial batches in one epoch: Lightning's batch count before any growth."""
        assert self.sampler is not None
        n = self.sampler.num_samples
        unit = (
            self._base_candidates // self._world if self.sampler.sharded else self._base_candidates
        )
        return n // unit if self.sampler.drop_last else -(-n // unit)

    def _align_schedulers(self, trainer: pl.Trainer, batch_idx: int) -> None:
        """After an optimizer step: step-interval schedulers advance by initial batches consumed.

        Target after batch ``i`` of epoch ``e``: ``e · U + ⌊position(i + 1) / b₀⌋``, and
        ``(e + 1) · U`` at the epoch's last batch, where ``U`` is the epoch's count of initial
        batches (what Lightning's ``estimated_stepping_batches`` counts per epoch) and ``b₀`` the
        initial batch (per rank for a sharded sampler). Every step but an epoch's last consumes at
        least ``b₀``, so the target grows by at least one per step and Lightning's own step is
        never one too many; the last step lands on ``(e + 1) · U`` exactly.
        """
        if trainer.global_step == self._last_global_step:
            return  # accumulating: no optimizer step (and no scheduler step) in this batch
        self._last_global_step = trainer.global_step
        if not self._step_schedulers or self.sampler is None:
            return
        per_epoch = self._units_per_epoch()
        done = self.sampler.epoch * per_epoch
        if batch_idx + 1 >= trainer.num_training_batches:  # kept equal to the planned count
            units = done + per_epoch
        else:
            unit = self._base_candidates
            if self.sampler.sharded:
                unit //= self._world
            units = done + self.sampler.position(batch_idx + 1) // unit
        extra = units - self._units - 1  # Lightning has stepped once already
        self._units = units
        for sched in self._step_schedulers:
            for _ in range(max(extra, 0)):
                sched.step()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_length(trainer)

    # ---------------------------------------------------------------- per batch
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        epoch = trainer.current_epoch
        self._epoch = epoch
        self._batch_idx = batch_idx
        self._apply_pending(trainer, epoch, batch_idx)
        if self._stats is None or self._target >= self.max_batch_size:
            return
        due = (trainer.global_step + 1) % self.interval == 0
        window_start = batch_idx % self._accumulation == 0
        if due and (self._micro > 0 or window_start) and not self._capturing:
            self._stats.attach()
            self._capturing = True

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._capturing and self._stats is not None:
            self._stats.detach()
            self._capturing = False
            self._micro += 1

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._micro == 0 or self._stats is None:
            return
        complete = self._micro == self._accumulation
        self._micro = 0
        if not complete:  # a short window at the end of an epoch: loss scaling differs, skip
            self._stats.reset()
            return
        stats = self._stats.result()
        proposed = self._propose(stats, optimizer)
        current = self._target
        ratio = proposed / current
        # one read per decision: the proposal, the test ratio, and what AdaScale needs
        parts = [proposed, ratio, stats.variance, stats.grad_sq_norm]
        host = torch.stack([t.reshape(()).float() for t in parts]).double().cpu().tolist()
        b_hat, test_ratio, variance, grad_sq = host
        if not (math.isfinite(variance) and math.isfinite(grad_sq)):
            # the tests map a NaN statistic to "passed": say so instead of silently keeping b
            rank_zero_warn(
                f"AdaptiveBatchSize: non-finite gradient statistics at step {trainer.global_step} "
                f"(variance={variance}, grad_sq_norm={grad_sq}); the batch size stays {current}. "
                "Causes: non-finite gradients (a NaN/inf loss), or stats_fallback='groups' with a "
                "single group (one device, no accumulation)."
            )
        new = self._decide(trainer, b_hat, (variance, grad_sq, int(stats.batch_size)))
        record = {
            "step": float(trainer.global_step),
            "epoch": float(self._epoch),
            "batch_idx": float(self._batch_idx),
            "samples": float(self._samples_seen),
            "batch_size": float(current),
            "proposed": b_hat,
            "test_ratio": test_ratio,
            "next_batch_size": float(new),
            "variance": variance,
            "grad_sq_norm": grad_sq,
            "stats_batch_size": float(stats.batch_size),
        }
        self.history.append(record)
        log = {
            "adaptive_batch/batch_size": float(current),
            "adaptive_batch/proposed": b_hat
            if math.isfinite(b_hat)
            else float(self.max_batch_size),
            "adaptive_batch/test_ratio": test_ratio if math.isfinite(test_ratio) else 1e30,
            "adaptive_batch/accumulation": float(self._accumulation),
        }
        pl_module.log_dict(log, on_step=True, on_epoch=False, sync_dist=False)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._consumed = batch_idx + 1
        self._epoch = trainer.current_epoch
        size = _leading_dim(batch)
        if size is not None:
            self._samples_seen += size * self._world
        self._align_schedulers(trainer, batch_idx)

    # ---------------------------------------------------------------- decisions
    def _propose(self, stats: Any, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        if self.test == "norm":
            return norm_test(stats, self.eta)
        if self.test == "inner_product":
            return inner_product_test(stats, self.eta)
        if self.test == "orthogonality":
            return orthogonality_test(stats, self.nu)
        if self.test == "augmented":
            return augmented_inner_product_test(stats, self.eta, self.nu)
        precond = None
        inner = getattr(optimizer, "optimizer", optimizer)  # Lightning wraps the optimizer
        if isinstance(inner, torch.optim.Adagrad):
            assert self._stats is not None
            by_param = {id(p): n for n, p in self._stats.model.named_parameters()}
            precond = {}
            for group in inner.param_groups:
                for p in group["params"]:
                    state = inner.state.get(p)
                    if id(p) in by_param and state and "sum" in state:
                        precond[by_param[id(p)]] = state["sum"]
            if set(precond) != set(stats.mean_grads or {}):
                precond = None  # some parameter lacks an accumulator: use the batch moment
        return coordinate_norm_test(stats, self.eta, preconditioner=precond)

    def _decide(self, trainer: pl.Trainer, b_hat: float, moments: tuple[float, float, int]) -> int:
        """Apply the rule and schedule the new size; returns the new global batch."""
        assert self.sampler is not None
        current = self._target
        micro_cap = self.max_micro_batch_size
        p, q = self._keep
        # granularity: ranks (× p kept per q candidates), and once the micro-batch is capped,
        # ranks × micro-batch
        unit = self._world * math.lcm(self.multiple_of, p)
        if micro_cap is not None and current // self._world >= micro_cap:
            unit = self._world * micro_cap
        new = next_batch_size(current, b_hat, self.max_batch_size, unit)
        if new == current:
            return current
        plan = plan_batch(new, self._world, micro_cap)
        accumulation = plan.accumulation
        if plan.global_batch_size > self.max_batch_size:
            accumulation = max(1, self.max_batch_size // (plan.micro_batch_size * self._world))
        realised = plan.micro_batch_size * self._world * accumulation
        if realised <= current:
            return current
        # the change starts on a batch beyond the prefetch window, aligned with both windows
        step = math.lcm(self._accumulation, accumulation)
        # the current batch is consumed; the loader has handed out at most `window` more
        earliest = self._batch_idx + 1 + self._window
        from_batch = -(-earliest // step) * step
        candidates = plan.micro_batch_size * q // p  # kept micro-batch drawn from this many
        self.sampler.set_batch_size(candidates * self._world, from_batch=from_batch)
        self._sync_length(trainer)
        if self.lr_scaling in ("linear", "sqrt"):
            factor = lr_scale_factor(realised, self._base_size, self.lr_scaling)
        elif self.lr_scaling == "adascale":
            # AdaScale gain at S = realised / b0 (Johnson et al. 2020, arXiv 2007.05105), with
            # σ² = V / b0 (base-batch gradient variance) and μ² = ‖ḡ‖² − V/b (unbiased)
            variance, grad_sq, b = moments
            factor = float(
                adascale_gain(
                    variance / self._base_size,
                    max(grad_sq - variance / b, 0.0),
                    realised / self._base_size,
                )
            )
        else:
            factor = 1.0
        self._pending.append([self._epoch, from_batch, accumulation, factor])
        self._target = realised
        return realised

    def _apply_pending(self, trainer: pl.Trainer, epoch: int, batch_idx: int) -> None:
        keep = []
        for entry in self._pending:
            e, f, accumulation, factor = entry
            if epoch > e or batch_idx >= f:
                self._accumulation = int(accumulation)
                trainer.accumulate_grad_batches = int(accumulation)
                self._set_lr_factor(trainer, float(factor))
            else:
                keep.append(entry)
        self._pending = keep

    def _set_lr_factor(self, trainer: pl.Trainer, factor: float) -> None:
        if factor == self._lr_factor:
            return
        change = factor / self._lr_factor
        self._lr_factor = factor
        clocked = set()
        for config in trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, SampleClockedScheduler):
                config.scheduler.set_lr_scale(factor)
                clocked.add(id(config.scheduler.optimizer))
            elif hasattr(config.scheduler, "base_lrs"):
                config.scheduler.base_lrs = [lr * change for lr in config.scheduler.base_lrs]
        for optimizer in trainer.optimizers:
            if id(optimizer) in clocked:
                continue
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * change

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "target": self._target,
            "base_size": self._base_size,
            "accumulation": self._accumulation,
            "pending": [list(p) for p in self._pending],
            "lr_factor": self._lr_factor,
            "epoch": self._epoch,
            "consumed": self._consumed,
            "samples_seen": self._samples_seen,
            "history": [dict(h) for h in self.history],
            "keep": list(self._keep),
            "base_candidates": self._base_candidates,
            "units": self._units,
            "window": self._window,
        }
        if self.sampler is not None:
            state["sampler"] = self.sampler.state_dict(consumed_batches=self._consumed)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)
        if self.sampler is not None:  # loaded after the loader was built
            self._restore(self._loaded)
            self._loaded = None

    def _restore(self, state: dict[str, Any]) -> None:
        self._target = int(state["target"])
        self._base_size = int(state["base_size"])
        self._accumulation = int(state["accumulation"])
        self._pending = [list(p) for p in state["pending"]]
        self._lr_factor = float(state["lr_factor"])
        self._epoch = int(state["epoch"])
        self._consumed = int(state["consumed"])
        self._samples_seen = int(state["samples_seen"])
        self.history = [dict(h) for h in state["history"]]
        keep = tuple(int(v) for v in state.get("keep", (1, 1)))
        if keep != self._keep:
            raise ValueError(
                f"the checkpoint was trained keeping {keep[0]} of {keep[1]} candidates "
                f"(OnlineBatchSelection) but this run keeps {self._keep[0]} of {self._keep[1]}"
            )
        self._base_candidates = int(state.get("base_candidates", self._base_size))
        self._units = int(state.get("units", 0))
        saved = state.get("window")
        if saved is not None and int(saved) != self._window:
            if int(saved) > self._window:
                # fewer workers now: the saved (longer) lookahead is still beyond the prefetch
                # window, so later decisions land on the batches they landed on before
                self._window = int(saved)
            else:
                rank_zero_warn(
                    f"AdaptiveBatchSize: resuming with a prefetch window of {self._window} "
                    f"batches (num_workers, prefetch_factor) where the checkpoint used "
                    f"{int(saved)}: later size changes land {self._window - int(saved)} batch(es) "
                    "later than in the original run, so the trajectory differs from it. Resume "
                    "with the original num_workers, or set AdaptiveBatchSize(lookahead=...) to "
                    "a value valid for both."
                )
        if self.sampler is not None and "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sampler is None:
            raise ValueError(
                "AdaptiveBatchSize did not install its sampler: the train dataloader was not "
                "requested through the hooks it wraps"
            )
        trainer.accumulate_grad_batches = self._accumulation
        self._last_global_step = trainer.global_step
        self._sync_length(trainer)


def _leading_dim(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    items = batch.values() if isinstance(batch, dict) else batch
    if isinstance(items, (list, tuple)) or isinstance(batch, dict):
        for item in items:
            found = _leading_dim(item)
            if found is not None:
                return found
    return None
