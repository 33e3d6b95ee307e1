"""Lightning callback that feeds sample-clocked schedules the real global batch of every step.

Thin adapter over :class:`adaptive.schedules.SampleClockedScheduler`: at the start of each
micro-batch it counts the batch (from tensor shapes: no device sync), turns it into the global
amount across DDP ranks, and records it with ``scheduler.consume``. The scheduler is then
stepped once per optimizer step, after gradient accumulation:

- by Lightning, when ``configure_optimizers`` returns it with ``"interval": "step"`` (and
  ``"frequency": 1``): Lightning's no-argument ``step()`` commits what was consumed;
- by this callback, when the scheduler is passed as ``SampleClock(scheduler)`` and not returned
  from ``configure_optimizers``: it steps after every batch that advanced ``trainer.global_step``.

A scheduler returned with ``interval="epoch"`` or ``frequency != 1`` is refused at fit start,
and a scheduler stepped a second time in one optimizer step raises (nothing left to commit).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from adaptive.schedules import SampleClockedScheduler

BatchCounter = Callable[[Any], int]


def _first_batch_dim(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        items = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        items = list(batch)
    else:
        return None
    for item in items:
        found = _first_batch_dim(item)
        if found is not None:
            return found
    return None


def default_batch_size(batch: Any) -> int:
    """Leading dimension of the first tensor in ``batch`` (tensor, sequence or mapping)."""
    size = _first_batch_dim(batch)
    if size is None:
        raise ValueError(
            f"cannot find a tensor in the batch (type {type(batch).__name__}) to count its "
            "samples; pass SampleClock(batch_size_fn=...)"
        )
    return size


class SampleClock(pl.Callback):
    """Advance sample-clocked schedules by the global batch of each optimizer step.

    Args:
        scheduler: a scheduler this callback should step itself (not returned from
            ``configure_optimizers``); default None: only feed those Lightning steps.
        batch_size_fn: ``batch -> int`` samples in this rank's micro-batch; default: leading
            dimension of the first tensor.
        tokens_fn: ``batch -> int`` tokens in this rank's micro-batch (e.g.
            ``lambda b: b["input_ids"].numel()``); default: tokens = samples. Must return a
            Python int (count from shapes) so the step path never syncs with the device.
        ranks: how per-rank counts become global ones under DDP. "equal" (default): every rank
            has the same batch (DistributedSampler, the project's resizable sampler), so the
            global batch is ``world_size ×`` the local one; checked every ``check_interval``
            optimizer steps with one small collective. "sum": all-reduce the counts of every
            micro-batch (exact for uneven ranks; one CPU collective per micro-batch on a gloo
            side group, no device sync).
        check_interval: optimizer steps between the "equal" checks (0 disables them).

    Example::

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            sched = PowerScheduler(opt, a=0.07, b=-0.51, warmup_tokens=6_000, ...)
            return {"optimizer": opt,
                    "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        trainer = pl.Trainer(callbacks=[SampleClock()], accumulate_grad_batches=2)
    """

    def __init__(
        self,
        scheduler: SampleClockedScheduler | None = None,
        *,
        batch_size_fn: BatchCounter | None = None,
        tokens_fn: BatchCounter | None = None,
        ranks: Literal["equal", "sum"] = "equal",
        check_interval: int = 100,
    ) -> None:
        if scheduler is not None and not isinstance(scheduler, SampleClockedScheduler):
            raise TypeError(
                "scheduler must be an adaptive.schedules.SampleClockedScheduler (PowerScheduler, "
                f"WSDScheduler, ...), got {type(scheduler).__name__}"
            )
        if ranks not in ("equal", "sum"):
            raise ValueError(f"ranks={ranks!r} must be 'equal' or 'sum'")
        if isinstance(check_interval, bool) or not isinstance(check_interval, int):
            raise TypeError(f"check_interval must be an int, got {check_interval!r}")
        if check_interval < 0:
            raise ValueError(f"check_interval must be >= 0, got {check_interval}")
        self.scheduler = scheduler
        self.batch_size_fn = batch_size_fn or default_batch_size
        self.tokens_fn = tokens_fn
        self.ranks = ranks
        self.check_interval = check_interval
        self._targets: list[SampleClockedScheduler] = []
        self._drives = False
        self._last_global_step = 0
        self._local_since_check = 0
        self._steps_since_check = 0
        self._group: Any = None

    # -- wiring ----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # host-side counts travel on a gloo side group: no device tensor, no device sync
            self._group = dist.new_group(backend="gloo")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from_lightning = []
        for config in trainer.lr_scheduler_configs:
            if not isinstance(config.scheduler, SampleClockedScheduler):
                continue
            if config.interval != "step" or config.frequency != 1:
                raise ValueError(
                    f"{type(config.scheduler).__name__} is configured with interval="
                    f"{config.interval!r}, frequency={config.frequency}; a sample-clocked "
                    "schedule must be stepped once per optimizer step: return it with "
                    '{"interval": "step", "frequency": 1}'
                )
            from_lightning.append(config.scheduler)
        if not pl_module.automatic_optimization and from_lightning:
            raise ValueError(
                "with manual optimization Lightning does not step schedulers; pass the scheduler "
                "to SampleClock(scheduler) so the callback steps it"
            )
        self._drives = self.scheduler is not None and all(
            s is not self.scheduler for s in from_lightning
        )
        self._targets = from_lightning + ([self.scheduler] if self._drives else [])
        if not self._targets:
            raise ValueError(
                "SampleClock found no sample-clocked scheduler: return one from "
                "configure_optimizers with interval='step', or pass it as SampleClock(scheduler)"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_global_step = trainer.global_step

    # -- counting --------------------------------------------------------------------------
    def _global_counts(self, samples: int, tokens: int, world: int) -> tuple[int, int]:
        if world == 1:
            return samples, tokens
        if self.ranks == "equal":
            self._local_since_check += samples
            return samples * world, tokens * world
        if self._group is None:
            raise RuntimeError(
                f"SampleClock(ranks='sum') needs torch.distributed to sum counts over the "
                f"{world} ranks, but no process group is initialised; use ranks='equal'"
            )
        counts = torch.tensor([samples, tokens], dtype=torch.int64)
        dist.all_reduce(counts, group=self._group)
        total_samples, total_tokens = counts.tolist()  # CPU tensor: no device sync
        return int(total_samples), int(total_tokens)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        samples = self.batch_size_fn(batch)
        tokens = samples if self.tokens_fn is None else self.tokens_fn(batch)
        samples, tokens = self._global_counts(samples, tokens, trainer.world_size)
        for sched in self._targets:
            sched.consume(samples, tokens)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step == self._last_global_step:
            return  # still accumulating: no optimizer step in this batch
        self._last_global_step = trainer.global_step
        if self._drives:
            assert self.scheduler is not None
            self.scheduler.step()
        self._steps_since_check += 1
        if (
            self.ranks == "equal"
            and self._group is not None
            and self.check_interval
            and self._steps_since_check >= self.check_interval
        ):
            self._check_equal_ranks()

    def _check_equal_ranks(self) -> None:
        local = self._local_since_check
        spread = torch.tensor([local, -local], dtype=torch.int64)
        dist.all_reduce(spread, op=dist.ReduceOp.MAX, group=self._group)
        high, neg_low = spread.tolist()
        self._local_since_check = 0
        self._steps_since_check = 0
        if high != -neg_low:
            raise RuntimeError(
                f"SampleClock(ranks='equal') saw unequal batches across ranks over the last "
                f"{self.check_interval} optimizer steps (per-rank samples from {-neg_low} to "
                f"{high}); the global batch is not world_size x local. Use "
                "SampleClock(ranks='sum')."
            )

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "local_since_check": self._local_since_check,
            "steps_since_check": self._steps_since_check,
        }
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._local_since_check = int(state_dict.get("local_since_check", 0))
        self._steps_since_check = int(state_dict.get("steps_since_check", 0))
        if self.scheduler is not None and "scheduler" in state_dict:
            self.scheduler.load_state_dict(state_dict["scheduler"])
