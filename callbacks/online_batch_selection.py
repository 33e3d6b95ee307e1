"""Lightning callback: train on the part of each super-batch that the selector keeps.

Thin adapter over :mod:`adaptive.selection`. The train dataloader yields *super-batches* (say 32
samples); the callback scores each one without gradients and hands Lightning the kept sub-batch
(say 8), so the user's unchanged ``training_step`` computes its (mean) loss over the kept
samples only.

Mechanism: at fit start the callback wraps ``trainer.strategy.batch_to_device`` (on this
strategy instance only; restored at teardown). Lightning calls it once per training batch,
after ``on_before_batch_transfer``, the device transfer and the user's
``on_after_batch_transfer``, and *before* any ``on_train_batch_start`` hook. So the scoring
forward sees the batch exactly as ``training_step`` would, and everything after it (every
callback's ``on_train_batch_start``, ``SampleClock``'s sample count, ``training_step``,
logging's batch-size inference, ``on_train_batch_end``) sees only the kept sub-batch. Replacing
the batch object this way works for tensors, tuples, namedtuples and mappings alike (a hook
that receives the batch cannot replace a tuple in place). Validation batches pass untouched.

``samples_trained`` / ``samples_scored`` count, over all ranks, the samples trained on and the
samples scored; a sample-clocked schedule (``adaptive.callbacks.SampleClock``) counts the kept batch it
receives, i.e. the same ``samples_trained``. A ``training_step`` that takes
``dataloader_iter`` bypasses the transfer and is refused.

Under DDP every rank keeps ``min(k, n)`` of its own ``n`` candidates (equal on all ranks with a
``DistributedSampler``), and the UDS memory receives the kept sketches of *all* ranks (one
``all_gather`` of ``k × d`` numbers per step), so all ranks hold the same selector state.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor, nn

from adaptive.selection import (
    HighLossSelector,
    RhoLossSelector,
    UDSSelector,
    UniformSelector,
    per_sample_loss,
)

Selector = UDSSelector | HighLossSelector | RhoLossSelector | UniformSelector
ForwardFn = Callable[[nn.Module, Any], Tensor]
LossFn = Callable[[Tensor, Any], Tensor]
MaskFn = Callable[[Any], Tensor | None]


def _leading(batch: Any) -> int | None:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    items = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(batch, (Mapping, list, tuple)):
        for item in items:
            found = _leading(item)
            if found is not None:
                return found
    return None


def subset_batch(batch: Any, index: Tensor, n: int) -> Any:
    """Rows ``index`` of every tensor (and list) in ``batch`` whose leading dimension is ``n``.

    Tensors are indexed on their device (no host sync). A Python list of ``n`` items (e.g. raw
    strings) is indexed on the host, which reads ``index`` back once.
    """
    if isinstance(batch, Tensor):
        if batch.dim() > 0 and batch.shape[0] == n:
            return batch.index_select(0, index.to(batch.device))
        return batch
    if isinstance(batch, Mapping):
        return type(batch)({key: subset_batch(v, index, n) for key, v in batch.items()})
    if isinstance(batch, tuple):
        items = [subset_batch(v, index, n) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    if isinstance(batch, list):
        if len(batch) == n and not any(isinstance(v, (Tensor, Mapping, tuple)) for v in batch):
            return [batch[i] for i in index.tolist()]
        return [subset_batch(v, index, n) for v in batch]
    return batch


def default_forward(module: nn.Module, batch: Any) -> Tensor:
    """Logits of ``module`` on ``batch``: ``module(x)`` for a tensor, ``module(batch[0])`` for a
    tuple/list, ``module(**inputs)`` (without ``labels``) for a mapping; ``.logits`` is read from
    an output object or mapping that has it."""
    if isinstance(batch, Tensor):
        out = module(batch)
    elif isinstance(batch, Mapping):
        out = module(**{k: v for k, v in batch.items() if k != "labels"})
    elif isinstance(batch, (list, tuple)) and batch:
        out = module(batch[0])
    else:
        raise TypeError(
            f"cannot run the scoring forward on a batch of type {type(batch).__name__}; pass "
            "OnlineBatchSelection(forward_fn=lambda module, batch: logits)"
        )
    if isinstance(out, Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"the model returned {type(out).__name__} without a .logits tensor; pass "
            "OnlineBatchSelection(forward_fn=lambda module, batch: logits)"
        )
    return logits


def default_labels(batch: Any) -> Tensor:
    if isinstance(batch, Mapping) and "labels" in batch:
        return batch["labels"]
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        return batch[1]
    raise TypeError(
        f"cannot find labels in a batch of type {type(batch).__name__} (expected batch[1] or "
        "batch['labels']); pass OnlineBatchSelection(loss_fn=lambda logits, batch: losses)"
    )


def default_loss(logits: Tensor, batch: Any) -> Tensor:
    """Per-sample cross-entropy of ``logits`` against the batch's labels (see per_sample_loss).

    Sequence logits ``(b, T, V)`` are scored position by position, token ``t`` against label
    ``t`` (no shift), with a warning: a causal LM whose labels are its inputs (the Hugging Face
    ``labels=input_ids`` convention) must be scored with ``shift=True`` instead, which the callback
    cannot tell from the shapes.
    """
    if logits.dim() == 3:
        warnings.warn(
            "OnlineBatchSelection's default loss scores (b, T, V) logits against labels at the "
            "same position (no shift). For a causal language model whose labels are its input "
            "ids, pass loss_fn=lambda logits, batch: per_sample_loss(logits, batch['labels'], "
            "shift=True); if the labels are already aligned with the logits, pass "
            "loss_fn=lambda logits, batch: per_sample_loss(logits, batch['labels']) to silence "
            "this warning",
            UserWarning,
            stacklevel=2,
        )
    return per_sample_loss(logits, default_labels(batch))


def default_mask(batch: Any) -> Tensor | None:
    return batch.get("attention_mask") if isinstance(batch, Mapping) else None


class OnlineBatchSelection(pl.Callback):
    """Score each training super-batch without gradients and train on the selector's pick.

    Args:
        selector: an :mod:`adaptive.selection` selector: ``UDSSelector`` (needs logits),
            ``HighLossSelector`` (per-sample losses), ``RhoLossSelector`` (losses and the
            holdout model's losses) or ``UniformSelector`` (no forward at all).
        forward_fn: ``(module, batch) -> logits`` for the scoring forward; default
            :func:`default_forward`. Also used on ``holdout_model``.
        loss_fn: ``(logits, batch) -> (b,)`` per-sample losses; default cross-entropy against
            ``batch[1]`` / ``batch["labels"]``, unshifted, warning on sequence logits (pass your
            own for causal LMs, e.g. ``per_sample_loss(logits, batch["labels"], shift=True)``).
        mask_fn: ``batch -> (b, T) mask or None`` for UDS; default ``batch["attention_mask"]``.
        holdout_model: the irreducible-loss model RHO-LOSS needs (frozen, moved to the device).
        eval_mode: score with the module in eval mode (no dropout: deterministic scores, equal
            on every rank); each submodule's mode is restored afterwards.

    The dataloader's batch size is the super-batch; the selector's ``k`` is what is trained on.

    Example::

        loader = DataLoader(train, batch_size=32, shuffle=True)       # super-batches
        sel = OnlineBatchSelection(UDSSelector(k=8, alpha=1.0))
        pl.Trainer(callbacks=[sel]).fit(model, loader)                # steps on 8 samples
        sel.samples_trained, sel.samples_scored
    """

    def __init__(
        self,
        selector: Selector,
        *,
        forward_fn: ForwardFn | None = None,
        loss_fn: LossFn | None = None,
        mask_fn: MaskFn | None = None,
        holdout_model: nn.Module | None = None,
        eval_mode: bool = True,
    ) -> None:
        if not isinstance(
            selector, (UDSSelector, HighLossSelector, RhoLossSelector, UniformSelector)
        ):
            raise TypeError(
                "selector must be an adaptive.selection UDSSelector, HighLossSelector, "
                f"RhoLossSelector or UniformSelector, got {type(selector).__name__} (CABSSampler "
                "is a batch sampler: give it to the DataLoader instead)"
            )
        if isinstance(selector, RhoLossSelector) and not isinstance(holdout_model, nn.Module):
            raise ValueError(
                "RhoLossSelector needs holdout_model=<nn.Module trained on holdout data> to "
                f"compute the irreducible loss, got {type(holdout_model).__name__}"
            )
        if holdout_model is not None and not isinstance(selector, RhoLossSelector):
            raise ValueError("holdout_model is only used with RhoLossSelector")
        for name, fn, shape in (
            ("forward_fn", forward_fn, "(module, batch) -> logits"),
            ("loss_fn", loss_fn, "(logits, batch) -> (b,) per-sample losses"),
            ("mask_fn", mask_fn, "batch -> (b, T) mask or None"),
        ):
            if fn is not None and not callable(fn):
                raise TypeError(
                    f"OnlineBatchSelection({name}={fn!r}): {name} must be a callable {shape}"
                )
        self.selector = selector
        self.forward_fn = forward_fn or default_forward
        self.loss_fn = loss_fn or default_loss
        self.mask_fn = mask_fn or default_mask
        self.holdout_model = holdout_model
        self.eval_mode = bool(eval_mode)
        self.samples_scored = 0
        self.samples_trained = 0
        self.last_indices: Tensor | None = None
        self._strategy: Any = None
        self._fraction: tuple[int, int] | None = None

    def keep_fraction(self, kept: int, candidates: int) -> None:
        """Keep ``⌊n · kept / candidates⌋`` (at least 1) of each batch of ``n`` candidates
        instead of the selector's fixed ``k``: set by ``adaptive.callbacks.AdaptiveBatchSize`` so that the
        kept batch grows with the candidate pool. The selector's ``k`` follows each batch."""
        if kept < 1 or candidates < kept:
            raise ValueError(f"keep_fraction({kept}, {candidates}) must keep 1..all candidates")
        self._fraction = (kept, candidates)

    # -- wiring ----------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if is_param_in_hook_signature(pl_module.training_step, "dataloader_iter", explicit=True):
            raise ValueError(
                "OnlineBatchSelection replaces the batch during Lightning's batch transfer, which "
                "a training_step taking dataloader_iter bypasses; take the batch instead"
            )
        if self.holdout_model is not None:
            self.holdout_model.to(pl_module.device).eval().requires_grad_(False)
        strategy = trainer.strategy
        if "batch_to_device" in vars(strategy):
            raise RuntimeError(
                "strategy.batch_to_device is already wrapped (two OnlineBatchSelection "
                "callbacks?); use one selection callback per Trainer"
            )
        original = strategy.batch_to_device

        def batch_to_device(batch: Any, device: Any = None, dataloader_idx: int = 0) -> Any:
            batch = original(batch, device, dataloader_idx)
            return self._select(trainer, pl_module, batch) if trainer.training else batch

        strategy.batch_to_device = batch_to_device
        self._strategy = strategy

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._strategy is not None and "batch_to_device" in vars(self._strategy):
            del self._strategy.batch_to_device
        self._strategy = None

    # -- selection -------------------------------------------------------------------------
    def _indices(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, n: int):
        sel = self.selector
        if isinstance(sel, UniformSelector):
            return sel(n, module.device)
        modes = [(m, m.training) for m in module.modules()] if self.eval_mode else []
        if self.eval_mode:
            module.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                logits = self.forward_fn(module, batch)
                if isinstance(sel, UDSSelector):
                    gather = None
                    if trainer.world_size > 1:

                        def gather(t: Tensor) -> Tensor:
                            return trainer.strategy.all_gather(t).reshape(-1, t.shape[-1])

                    return sel(logits, self.mask_fn(batch), gather=gather)
                losses = self.loss_fn(logits, batch)
                if isinstance(sel, HighLossSelector):
                    return sel(losses)
                assert self.holdout_model is not None
                holdout = self.loss_fn(self.forward_fn(self.holdout_model, batch), batch)
                return sel(losses, holdout)
        finally:
            for m, was_training in modes:
                m.training = was_training

    def _select(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any) -> Any:
        n = _leading(batch)
        if n is None:
            raise TypeError(
                f"found no tensor in the training batch (type {type(batch).__name__}) to select "
                "samples from; batches may be tensors, tuples/lists or mappings of tensors"
            )
        if self._fraction is not None:  # growing batches: keep the same fraction of every pool
            kept, candidates = self._fraction
            self.selector.k = max(1, n * kept // candidates)
        index = self._indices(trainer, module, batch, n)
        self.last_indices = index
        world = trainer.world_size
        self.samples_scored += n * world
        self.samples_trained += int(index.shape[0]) * world  # a shape: no device sync
        return subset_batch(batch, index, n)

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "selector": self.selector.state_dict(),
            "samples_scored": self.samples_scored,
            "samples_trained": self.samples_trained,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.selector.load_state_dict(state_dict["selector"])
        self.samples_scored = int(state_dict["samples_scored"])
        self.samples_trained = int(state_dict["samples_trained"])
