"""Lightning callback that reweights a :class:`~adaptive.mixture.MixtureSampler` while training.

Thin adapter over the rules in :mod:`adaptive.mixture`. Every ``update_every`` training batches it
turns what it measured into signals, asks the rule for new weights, sets them on the sampler (the
next batches drawn use them), logs them as ``mixture/<source>`` and records them; at the end of
training it can draw the weights over time into a PNG.

What it measures:

- loss rules (:class:`~adaptive.mixture.DoReMi`, :class:`~adaptive.mixture.Exp3Mixture`): the
  per-domain mean training loss, from ``training_step`` returning a dict with ``"loss"``,
  ``"sample_losses"`` (``(b,)``, unreduced) and optionally ``"reference_losses"`` (``(b,)``, a
  reference model's loss on the same samples, for DoReMi); the source ids come from the batch
  (``sources_fn``, default: the last element of a tuple/list batch, or ``batch["source"]``,
  which is what :class:`~adaptive.mixture.MixtureDataset` with the default collate gives).
  Accumulated on the device with ``scatter_add``; read once per update.
- :class:`~adaptive.mixture.GroupInfluence`: ``target_loss(pl_module)`` gives the mean loss on a
  target (validation) batch; at the start of the last ``capture_steps`` batches of each interval
  its gradient becomes the statistics sensor's target ``d``, and the sensor
  (:class:`adaptive.stats.GradientStatistics`) reads ``Σ_{i∈domain} ⟨g_i, d⟩`` from those batches'
  ordinary backward passes; the alignment is the per-domain mean.

Under DDP the interval's sums are all-reduced before the rule runs (the sensor all-reduces its
own), the target gradient is averaged over ranks, and rank 0's weights are broadcast, so every rank
sets the same weights and the samplers keep drawing the same global batches. Use
``Trainer(use_distributed_sampler=False)``: the sampler splits the global batch over ranks itself.

Checkpoints hold the rule's state, the update history and the sampler's state rolled back to the
last batch the loop consumed (Lightning fetches one batch ahead), so a resumed run draws the
same batches with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor

from adaptive.mixture import (
    DomainLossMeter,
    DoReMi,
    Exp3Mixture,
    GroupInfluence,
    MixtureDataset,
    MixtureSampler,
    MixtureSignals,
    alignment_from_statistics,
)
from adaptive.stats import side_pass

Rule = DoReMi | Exp3Mixture | GroupInfluence


def default_sources(batch: Any) -> Tensor:
    """Source ids of a batch: ``batch["source"]`` or the last element of a tuple/list batch."""
    if isinstance(batch, Mapping) and "source" in batch:
        return batch["source"]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[-1], Tensor):
        return batch[-1]
    raise ValueError(
        f"cannot find the source ids in a batch of type {type(batch).__name__}; use "
        "MixtureDataset (batches end with the source ids) or pass sources_fn=batch -> ids"
    )


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class DynamicMixture(pl.Callback):
    """Update a mixture sampler's weights every ``update_every`` batches from a reweighting rule.

    Args:
        rule: a :class:`~adaptive.mixture.DoReMi`, :class:`~adaptive.mixture.Exp3Mixture` or
            :class:`~adaptive.mixture.GroupInfluence` with one domain per source.
        sampler: the :class:`~adaptive.mixture.MixtureSampler` of the training loader; default
            None: found on ``trainer.train_dataloader`` at the start of training (the one found
            there is used whenever there is one, since spawned processes hold copies).
        update_every: batches between weight updates (the first update after ``update_every``).
        target_loss: ``pl_module -> scalar`` mean loss on a target batch; required by
            :class:`~adaptive.mixture.GroupInfluence`, ignored otherwise.
        capture_steps: batches at the end of each interval whose backward passes the sensor
            captures (GroupInfluence only).
        sources_fn: ``batch -> (b,)`` source ids; default :func:`default_sources`.
        names: source names for logs and the plot (default: the MixtureDataset's names).
        nan_policy: ``"raise"`` (default): a NaN/inf loss of a drawn domain raises ``ValueError``;
            ``"skip"``: that update is skipped with a warning and the weights stay.
        plot_path: where to write the weights-over-time PNG at the end (rank 0); None: no plot.
        log: log the weights with ``pl_module.log_dict`` at every update.
    """

    def __init__(
        self,
        rule: Rule,
        sampler: MixtureSampler | None = None,
        *,
        update_every: int = 100,
        target_loss: Callable[[pl.LightningModule], Tensor] | None = None,
        capture_steps: int = 1,
        sources_fn: Callable[[Any], Tensor] | None = None,
        names: Sequence[str] | None = None,
        nan_policy: Literal["raise", "skip"] = "raise",
        plot_path: str | Path | None = None,
        log: bool = True,
    ) -> None:
        if not isinstance(rule, (DoReMi, Exp3Mixture, GroupInfluence)):
            raise TypeError(
                f"rule must be a DoReMi, Exp3Mixture or GroupInfluence, got {type(rule).__name__}"
            )
        if sampler is not None and not isinstance(sampler, MixtureSampler):
            raise TypeError(f"sampler must be a MixtureSampler, got {type(sampler).__name__}")
        if sampler is not None and sampler.num_sources != rule.num_domains:
            raise ValueError(
                f"the sampler has {sampler.num_sources} sources but the rule has "
                f"{rule.num_domains} domains"
            )
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be a positive integer, got {update_every!r}")
        if (
            isinstance(capture_steps, bool)
            or not isinstance(capture_steps, int)
            or not 1 <= capture_steps <= update_every
        ):
            raise ValueError(
                f"capture_steps must be an integer in [1, update_every={update_every}], "
                f"got {capture_steps!r}"
            )
        if isinstance(rule, GroupInfluence) and target_loss is None:
            raise ValueError("GroupInfluence needs target_loss=pl_module -> target mean loss")
        if target_loss is not None and not callable(target_loss):
            raise TypeError(
                f"target_loss must be a callable pl_module -> loss, got {target_loss!r}"
            )
        if sources_fn is not None and not callable(sources_fn):
            raise TypeError(f"sources_fn must be a callable batch -> ids, got {sources_fn!r}")
        if nan_policy not in ("raise", "skip"):
            raise ValueError(f"nan_policy must be 'raise' or 'skip', got {nan_policy!r}")
        if names is not None and len(names) != rule.num_domains:
            raise ValueError(f"names has {len(names)} entries for {rule.num_domains} domains")
        self.rule = rule
        self.sampler = sampler
        self.update_every = update_every
        self.target_loss = target_loss
        self.capture_steps = capture_steps
        self.sources_fn = sources_fn or default_sources
        self.names = list(names) if names is not None else None
        self.nan_policy = nan_policy
        self.plot_path = Path(plot_path) if plot_path is not None else None
        self.log = log
        self.history: list[dict[str, Any]] = []
        self._meter = DomainLossMeter(rule.num_domains)
        self._batches = 0  # training batches consumed since the start (over all epochs)
        self._restored_sampler: dict[str, Any] | None = None
        self._restored_sensor: dict[str, Any] | None = None
        self._stats: Any = None
        self._capturing = False
        self._skipped = 0

    @property
    def _influence(self) -> bool:
        return isinstance(self.rule, GroupInfluence)

    # -- wiring ---------------------------------------------------------------------------------
    def _find_sampler(self, trainer: pl.Trainer) -> MixtureSampler:
        loaders = trainer.train_dataloader
        candidates = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        if isinstance(loaders, Mapping):
            candidates = list(loaders.values())
        for loader in candidates:
            for attr in ("batch_sampler", "sampler"):
                found = getattr(loader, attr, None)
                if isinstance(found, MixtureSampler):
                    if self.names is None and isinstance(
                        getattr(loader, "dataset", None), MixtureDataset
                    ):
                        self.names = list(loader.dataset.names)
                    return found
        if self.sampler is not None:
            return self.sampler
        raise ValueError(
            "DynamicMixture found no MixtureSampler on the training DataLoader (batch_sampler=) "
            "and none was passed; build the loader as DataLoader(MixtureDataset(sources), "
            "batch_sampler=MixtureSampler(...)) and use Trainer(use_distributed_sampler=False)"
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self._influence or self._stats is not None:
            return
        from adaptive.callbacks._checks import check_model_supported
        from adaptive.stats import GradientStatistics

        self._stats = GradientStatistics(
            pl_module, num_groups=self.rule.num_domains, inner_products=False
        )
        check_model_supported("DynamicMixture(GroupInfluence)", self._stats)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored_sensor is not None:  # resumed inside a capture window
            self._stats.load_state_dict(self._restored_sensor)
            self._restored_sensor = None
        self.sampler = self._find_sampler(trainer)
        if self.sampler.num_sources != self.rule.num_domains:
            raise ValueError(
                f"the sampler has {self.sampler.num_sources} sources but the rule has "
                f"{self.rule.num_domains} domains"
            )
        if self.names is None:
            self.names = [f"source{i}" for i in range(self.rule.num_domains)]
        if self._restored_sampler is not None:
            self.sampler.load_state_dict(self._restored_sampler)
            self._restored_sampler = None
        elif self._batches == 0:
            # sampling follows the rule from the first batch on
            self.sampler.set_weights(self.rule.weights)
            self.history.append({"step": 0, "weights": self.rule.weights.tolist()})

    # -- measuring ------------------------------------------------------------------------------
    def _target_direction(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        with side_pass():  # not a training sample for any other attached sensor
            loss = self.target_loss(pl_module)
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        flat = torch.cat(
            [
                (g if g is not None else torch.zeros_like(p)).reshape(-1)
                for g, (_, p) in zip(grads, named, strict=True)
            ]
        )
        if _distributed():  # one direction d for every rank: the mean target gradient
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
        out, start = {}, 0
        for n, p in named:
            out[n] = flat[start : start + p.numel()].view_as(p).detach()
            start += p.numel()
        return out

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._influence:
            return
        position = self._batches % self.update_every  # this batch's place in the interval
        first = self.update_every - self.capture_steps
        if position < first:
            return
        if position == first:
            self._stats.set_target(self._target_direction(pl_module))
        self._stats.attach(group_ids=self.sources_fn(batch).reshape(-1))
        self._capturing = True

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._capturing:
            self._stats.detach()
            self._capturing = False

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._capturing:  # no backward ran (e.g. a skipped step): drop the capture
            self._stats.detach()
            self._capturing = False
        if not self._influence:
            if not isinstance(outputs, Mapping) or "sample_losses" not in outputs:
                raise ValueError(
                    f"{type(self.rule).__name__} reads per-sample losses: training_step must "
                    "return "
                    "a dict with 'loss' and 'sample_losses' (the unreduced (b,) loss)"
                )
            ref = outputs.get("reference_losses")
            self._meter.add(
                outputs["sample_losses"].detach(),
                self.sources_fn(batch).reshape(-1),
                None if ref is None else ref.detach(),
            )
        self._batches += 1
        if self._batches % self.update_every == 0:
            self._update(trainer, pl_module)

    # -- updating -------------------------------------------------------------------------------
    def _signals(self, trainer: pl.Trainer) -> MixtureSignals:
        if self._influence:
            # each captured batch's loss was divided by the accumulation count only (the default,
            # the number of captures, would scale the dots by capture_steps)
            res = self._stats.result(loss_divisor=trainer.accumulate_grad_batches)
            alignment = alignment_from_statistics(res.group_grad_dots, res.group_counts).cpu()
            counts = res.group_counts.detach().cpu().to(torch.float64)
            return MixtureSignals(torch.zeros_like(counts), counts, alignment=alignment)
        signals = self._meter.signals(all_reduce=True)
        self._meter.reset()
        return signals

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        signals = self._signals(trainer)
        check = signals.alignment if self._influence else signals.losses[signals.counts > 0]
        if self.nan_policy == "skip" and not bool(torch.isfinite(check).all()):
            self._skipped += 1
            warnings.warn(
                f"DynamicMixture: non-finite signal at batch {self._batches}; update skipped "
                f"({self._skipped} so far)",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        weights = self.rule.update(signals).to(torch.float64)
        if _distributed():  # every rank must draw the same global batches
            w = weights.to(pl_module.device)
            dist.broadcast(w, src=0)
            weights = w.cpu()
        self.sampler.set_weights(weights)
        self.history.append({"step": self._batches, "weights": weights.tolist()})
        if self.log:
            pl_module.log_dict(
                {f"mixture/{n}": float(w) for n, w in zip(self.names, weights, strict=True)},
                on_step=True,
                on_epoch=False,
                rank_zero_only=True,
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.plot_path is not None and trainer.is_global_zero and self.history:
            self.plot(self.plot_path)

    def plot(self, path: str | Path) -> Path:
        """Draw the recorded weights over training steps as a stacked area chart (PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [h["step"] for h in self.history]
        weights = list(zip(*[h["weights"] for h in self.history], strict=True))
        names = self.names or [f"source{i}" for i in range(len(weights))]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.stackplot(steps, weights, labels=names, step="post")
        ax.set_xlabel("training batch")
        ax.set_ylabel("sampling weight")
        ax.set_ylim(0, 1)
        ax.set_title(f"{type(self.rule).__name__} mixture weights")
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    # -- checkpointing --------------------------------------------------------------------------
    def _in_window(self) -> bool:
        """Whether batches of the current interval were captured but not yet used."""
        position = self._batches % self.update_every
        return self._influence and position > self.update_every - self.capture_steps

    def state_dict(self) -> dict[str, Any]:
        # inside a capture window the sensor holds this interval's captures and target: keep them
        # (between windows it holds nothing that matters, and the target is model-sized)
        sensor = self._stats.state_dict() if self._in_window() else None
        return {
            "sensor": sensor,
            "rule": self.rule.state_dict(),
            "batches": self._batches,
            "history": [dict(h) for h in self.history],
            "skipped": self._skipped,
            "meter": self._meter.state_dict(),
            "sampler": (
                None if self.sampler is None else self.sampler.state_dict(consumed=self._batches)
            ),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rule.load_state_dict(state_dict["rule"])
        self._batches = int(state_dict["batches"])
        self.history = [dict(h) for h in state_dict["history"]]
        self._skipped = int(state_dict["skipped"])
        self._restored_sampler = state_dict["sampler"]
        self._meter.load_state_dict(state_dict["meter"])
        self._restored_sensor = state_dict.get("sensor")
