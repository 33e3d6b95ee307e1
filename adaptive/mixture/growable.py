"""A mixture batch sampler whose batch size can grow, so that adaptive batch growth
(:class:`adaptive.callbacks.AdaptiveBatchSize`) and dynamic mixture weights
(:class:`adaptive.callbacks.DynamicMixture`) drive one train loader together."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

from adaptive.batching import AdaptiveBatchSampler
from adaptive.mixture.sampler import MixtureSampler
from adaptive.mixture.weights import as_weights

__all__ = ["GrowableMixtureSampler"]


class GrowableMixtureSampler(AdaptiveBatchSampler, MixtureSampler):
    """A mixture batch sampler whose batch size can grow: both callbacks drive one loader.

    An :class:`AdaptiveBatchSampler` (so :class:`adaptive.callbacks.AdaptiveBatchSize` schedules
    its sizes at absolute batch indices, beyond the prefetch window, and counts the epoch's
    batches) whose batches are drawn like a :class:`MixtureSampler`'s (so
    :class:`adaptive.callbacks.DynamicMixture` sets its weights): batch ``k`` of epoch ``e`` has
    ``size_at(k)`` draws, their sources ``~ Categorical(w)`` from a stream seeded by
    ``(seed, e, k)``, their items the next unused entries of per-source permutations.

    An epoch is ``num_samples`` draws (the token budget in sequences): ``len()`` is the number
    of batches it takes under the sizes scheduled so far, and the last batch is short.

    Args:
        sizes: items per source.
        weights: initial source weights (normalised).
        batch_size: initial global batch size.
        num_samples: draws per epoch.
        seed: seed of every random stream.
        num_replicas, rank: data-parallel layout (each rank keeps its slice of the global batch).

    ``state_dict`` takes ``consumed_batches=`` (batches of the current epoch, what
    ``AdaptiveBatchSize`` passes) or ``consumed=`` (batches over all epochs, what
    ``DynamicMixture`` passes); both give the same state, rolled back to that batch, with the
    weights of the rolled-back batches kept for their replay.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float] | Tensor,
        batch_size: int,
        num_samples: int,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        AdaptiveBatchSampler.__init__(
            self,
            num_samples,
            batch_size,
            shuffle=False,
            seed=seed,
            drop_last=False,
            num_replicas=num_replicas,
            rank=rank,
        )
        try:
            checked = [int(n) for n in sizes]
        except (TypeError, ValueError) as err:
            raise TypeError(f"sizes must be a sequence of integers, got {sizes!r}") from err
        if not checked or min(checked) < 1:
            raise ValueError(f"sizes must be positive item counts of >= 1 source, got {sizes!r}")
        self.sizes = checked
        k = len(self.sizes)
        self._weights = as_weights(weights, k)
        self._cursors = [0] * k
        self._passes = [0] * k
        self._perms: list[np.ndarray | None] = [None] * k
        self._pending: collections.deque[Tensor] = collections.deque()
        self._mix: dict[int, tuple[list[int], list[int], Tensor]] = {}  # batch -> before it
        self._offset = 0  # batches of the epochs before this one

    @property
    def batches_drawn(self) -> int:
        return self._offset + self._yielded

    def _begin_epoch(self, epoch: int) -> None:
        self._offset += self._yielded
        self._mix = {}
        super()._begin_epoch(epoch)

    def _mixture_batch(self, index: int, size: int, weights: Tensor) -> list[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, 0, self._epoch, index])
        p = weights.numpy()
        sources = rng.choice(self.num_sources, size=size, p=p / p.sum())
        items = np.empty(size, dtype=np.int64)
        for s in range(self.num_sources):
            where = np.flatnonzero(sources == s)
            if where.size:
                items[where] = self._take(s, where.size)
        return [(int(s), int(i)) for s, i in zip(sources, items, strict=True)]

    def __iter__(self):  # type: ignore[override]
        if self._finished:
            self._begin_epoch(self._epoch + 1)
        index, position = self._start_index, self._start_position
        self._yielded = index
        self._starts = {index: position}
        world = self.num_replicas
        while position < self.num_samples:
            size = min(self.size_at(index), self.num_samples - position)
            draws = -(-size // world) * world  # a short last batch: every rank the same share
            weights = self._pending.popleft() if self._pending else self._weights
            self._mix[index] = (list(self._cursors), list(self._passes), weights)
            batch = self._mixture_batch(index, draws, weights)
            share = draws // world
            position += size
            index += 1
            self._yielded = index
            self._starts[index] = position
            self._finished = position >= self.num_samples
            yield batch[self.rank * share : (self.rank + 1) * share]
        self._finished = True

    def state_dict(  # type: ignore[override]
        self, consumed_batches: int | None = None, consumed: int | None = None
    ) -> dict[str, Any]:
        if consumed is not None:
            if consumed_batches is not None and consumed_batches != consumed - self._offset:
                raise ValueError("consumed and consumed_batches name different batches")
            consumed_batches = consumed - self._offset
        c = self._yielded if consumed_batches is None else consumed_batches
        state = AdaptiveBatchSampler.state_dict(self, consumed_batches=c)
        if c in self._mix and c < self._yielded:
            cursors, passes, _ = self._mix[c]
            replay = [self._mix[j][2] for j in range(c, self._yielded)]
        else:
            cursors, passes, replay = list(self._cursors), list(self._passes), []
        replay += list(self._pending)
        offset = self._offset + (c if state["epoch"] > self._epoch else 0)
        if state["epoch"] > self._epoch:
            replay = []  # the rolled-back batches are past the epoch's end: none to replay
            replay += list(self._pending)
        state.update(
            sizes=list(self.sizes),
            cursors=cursors,
            passes=passes,
            weights=self._weights.tolist(),
            pending=[w.tolist() for w in replay],
            offset=offset,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        if list(state["sizes"]) != self.sizes:
            raise ValueError(f"state has sizes={state['sizes']}, this sampler {self.sizes}")
        AdaptiveBatchSampler.load_state_dict(self, state)
        k = self.num_sources
        self._cursors = [int(c) for c in state["cursors"]]
        self._passes = [int(p) for p in state["passes"]]
        self._perms = [None] * k
        self._weights = as_weights(state["weights"], k)
        self._pending = collections.deque(as_weights(w, k) for w in state["pending"])
        self._offset = int(state["offset"])
        self._mix = {}
