"""Lightning callback: log gradient norm, variance and noise scale every N optimizer steps.

A thin adapter over :class:`adaptive.stats.GradientStatistics`: it captures every micro-batch of
every N-th optimizer step (all accumulation micro-batches, on every rank), reads the statistics
of the whole global batch once before the optimizer step, and writes them to the Trainer's
loggers. Nothing is read back to the host except on logging steps.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from adaptive.callbacks._checks import check_model_supported
from adaptive.stats import FALLBACKS, GradientStatistics, StatisticsResult

__all__ = ["GradientStatisticsLogger"]


class GradientStatisticsLogger(Callback):
    """Log per-step gradient statistics of the (accumulated, global) batch to the Trainer's loggers.

    Logged every ``every_n_steps`` optimizer steps, at ``step = trainer.global_step`` (the number
    of optimizer steps taken before this one), under ``prefix``:

    - ``grad_norm``: ``‖ḡ‖``, the norm of the mean gradient (what ``.grad`` holds before clipping);
    - ``variance``: ``(Σ_i ‖g_i‖² − b‖ḡ‖²)/(b − 1)``, the summed per-coordinate variance of the
      per-sample gradients ``g_i``;
    - ``noise_scale``: ``variance/‖ḡ‖²``, the simple noise scale of McCandlish et al. 2018
      (arXiv 1812.06162): roughly the batch size beyond which larger batches stop helping;
    - ``batch_size``: ``b``, samples over all micro-batches and ranks;
    - with ``inner_products=True`` also ``inner_product_variance`` and ``orthogonality_variance``.

    These are exact for the global batch under DDP and gradient accumulation (see
    :class:`adaptive.stats.GradientStatistics`). Every module with trainable parameters must have a
    per-sample rule (Linear, Conv1d/2d, Embedding, LayerNorm, GroupNorm, RMSNorm, BatchNorm in eval
    mode), unless ``fallback="groups"``, which estimates the variance from micro-batch and rank
    means instead (it needs ``accumulate_grad_batches ≥ 2`` or several ranks).

    Args:
        every_n_steps: log every this many optimizer steps (positive int).
        loss_reduction: ``"mean"`` (the loss is a mean over samples) or ``"sum"``.
        prefix: prepended to every metric name.
        inner_products: also log the inner-product and orthogonality variances.
        fallback: ``None`` or ``"groups"`` (see above).

    Attributes:
        last_metrics: the last logged values as Python floats (empty before the first log).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        *,
        loss_reduction: str = "mean",
        prefix: str = "grad_stats/",
        inner_products: bool = False,
        fallback: str | None = None,
    ) -> None:
        super().__init__()
        if (
            isinstance(every_n_steps, bool)
            or not isinstance(every_n_steps, int)
            or every_n_steps < 1
        ):
            raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if fallback is not None and fallback not in FALLBACKS:
            raise ValueError(f"fallback must be None or one of {FALLBACKS}, got {fallback!r}")
        self.every_n_steps = every_n_steps
        self.loss_reduction = loss_reduction
        self.prefix = prefix
        self.inner_products = bool(inner_products)
        self.fallback = fallback
        self.stats: GradientStatistics | None = None
        self.last_metrics: dict[str, float] = {}
        self._attached = False
        self._captured = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.stats = GradientStatistics(
            pl_module,
            self.loss_reduction,  # type: ignore[arg-type]
            fallback=self.fallback,
            inner_products=self.inner_products,
            grad_scaler=getattr(trainer.precision_plugin, "scaler", None),
        )
        check_model_supported("GradientStatisticsLogger", self.stats)  # now, not at step 0

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()
        self.stats = None

    def _due(self, trainer: pl.Trainer) -> bool:
        return trainer.global_step % self.every_n_steps == 0

    def _release(self) -> None:
        if self._attached and self.stats is not None:
            self.stats.detach()
        self._attached = False

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.stats is None or not self._due(trainer):
            return
        self._release()
        self.stats.attach()
        self._attached = True

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._attached:
            self._release()
            self._captured = True

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._release()  # a skipped backward (training_step returned None) leaves hooks attached

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.stats is None or not self._captured:
            return
        self._release()
        self._captured = False
        self._log(trainer, self.stats.result(loss_divisor=trainer.accumulate_grad_batches))

    def _log(self, trainer: pl.Trainer, s: StatisticsResult) -> None:
        names = ["grad_norm", "variance", "noise_scale"]
        values = [s.grad_sq_norm.sqrt(), s.variance, s.noise_scale]
        if s.inner_product_variance is not None and s.orthogonality_variance is not None:
            names += ["inner_product_variance", "orthogonality_variance"]
            values += [s.inner_product_variance, s.orthogonality_variance]
        # the one host read of a logging step
        floats = torch.stack([v.detach().float() for v in values]).tolist()
        metrics = {self.prefix + n: v for n, v in zip(names, floats, strict=True)}
        metrics[self.prefix + "batch_size"] = float(s.batch_size)
        self.last_metrics = metrics
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
