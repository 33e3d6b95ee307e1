"""A batch sampler whose batch size can change between any two batches.

``torch.utils.data.DataLoader`` forbids changing ``batch_size`` after construction, and
rebuilding the loader restarts the epoch with a new shuffle. :class:`AdaptiveBatchSampler` is
passed as ``DataLoader(dataset, batch_sampler=sampler)``; the loader never needs rebuilding.

How a size change reaches the right batch (the prefetch problem). The DataLoader pulls index
lists from its batch sampler ahead of the training loop: up to ``num_workers × prefetch_factor``
batches with worker processes, and Lightning's fetcher one more. A change that took effect "from
the next batch the sampler makes" would land a few batches later than the trainer believes, and
at a point that depends on timing. So a change is *scheduled at an absolute batch index of the
epoch*: ``set_batch_size(size, from_batch=k)`` makes batch ``k`` and all later batches have the
new size. The caller picks ``k`` beyond the prefetch window (:meth:`prefetch_window` gives a safe
margin); a ``k`` the sampler has already handed out raises ``ValueError`` instead of silently
applying late. The sizes are then a deterministic function of the decisions, whatever the
workers do, and a resumed run sees the same batches as an uninterrupted one. A consumer that
only counts samples can also read each batch's true size from the batch itself.

The sampler has no ``__len__`` on purpose (see :meth:`num_batches`).

Epochs, shuffling, resumption: epoch ``e`` uses the permutation drawn from ``seed + e``; an
iteration replays the epoch from its start (or from the loaded resume point). ``set_epoch`` is
called by Lightning; without it the next iteration after a finished one starts the next epoch.
``state_dict(consumed_batches=c)`` records the position *of the batch the consumer will see
next* (not of the sampler's prefetch cursor), the size in force there and the pending changes.

Distributed: ``batch_size`` is the *global* batch size. Every rank draws the same permutation and
takes its contiguous share ``batch_size / num_replicas`` of the same global batch. A short last
batch (``drop_last=False``) is padded by wrapping to the start of the permutation up to a multiple
of ``num_replicas``, so every rank steps the same number of times.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["AdaptiveBatchSampler"]


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class AdaptiveBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices; the (global) batch size may change between batches.

    Args:
        num_samples: length of the dataset.
        batch_size: initial global batch size (a multiple of ``num_replicas``).
        shuffle: draw a new permutation each epoch (``seed + epoch``); else sequential order.
        seed: base seed, identical on every rank.
        drop_last: drop a final batch shorter than the batch size in force.
        num_replicas: data-parallel ranks (default: the initialised process group, else 1).
        rank: this rank (default: the process group's rank, else 0).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.num_samples = _check_int("num_samples", num_samples, 1)
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_initialized() else 0
        self.num_replicas = _check_int("num_replicas", num_replicas, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.num_replicas:
            raise ValueError(f"rank={rank} must be < num_replicas={num_replicas}")
        self.seed = _check_int("seed", seed, 0)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self._check_size(batch_size, "batch_size")
        self._epoch = 0
        self._base_size = batch_size  # size at self._start_index
        self._changes: list[tuple[int, int]] = []  # sorted (from_batch, size) for this epoch
        self._start_index = 0  # where an iteration of this epoch begins (resume point)
        self._start_position = 0
        self._yielded = 0  # batch index after the last handed-out batch (of the live iteration)
        self._starts: dict[int, int] = {}  # batch index -> position of its first sample
        self._finished = False

    # ------------------------------------------------------------------ sizes
    def _check_size(self, size: object, name: str) -> int:
        _check_int(name, size, 1)
        assert isinstance(size, int)
        if size % self.num_replicas:
            raise ValueError(
                f"{name}={size} must be a multiple of num_replicas={self.num_replicas} so every "
                "rank gets an equal share of the global batch"
            )
        return size

    def size_at(self, batch_index: int) -> int:
        """Global batch size of batch ``batch_index`` of the current epoch."""
        keys = [k for k, _ in self._changes]
        i = bisect.bisect_right(keys, batch_index)
        return self._changes[i - 1][1] if i else self._base_size

    @property
    def batch_size(self) -> int:
        """Global size of the next batch not yet handed out."""
        return self.size_at(self._yielded)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def handed_out(self) -> int:
        """Batches of this epoch already handed to the DataLoader (possibly still in flight)."""
        return self._yielded

    def set_batch_size(self, batch_size: int, from_batch: int | None = None) -> None:
        """Use ``batch_size`` (global) from batch ``from_batch`` of the current epoch on.

        ``None`` means the next batch not yet handed out (right for loops without prefetching).
        An index past the end of the epoch takes effect at the start of the next epoch.
        """
        size = self._check_size(batch_size, "batch_size")
        if from_batch is None:
            from_batch = self._yielded
        _check_int("from_batch", from_batch, 0)
        if from_batch < self._yielded:
            raise ValueError(
                f"from_batch={from_batch} was already handed out (the sampler is at batch "
                f"{self._yielded} of this epoch): the DataLoader prefetches ahead of the loop, so "
                "schedule the change beyond the prefetch window (see prefetch_window)"
            )
        self._changes = [(k, s) for k, s in self._changes if k < from_batch]
        self._changes.append((from_batch, size))

    @staticmethod
    def prefetch_window(num_workers: int, prefetch_factor: int | None = 2, extra: int = 1) -> int:
        """Batches a DataLoader (plus ``extra`` for the trainer's fetcher) may pull ahead."""
        if num_workers <= 0:
            return extra
        return num_workers * (prefetch_factor if prefetch_factor is not None else 2) + extra

    # ------------------------------------------------------------------ epochs
    def _begin_epoch(self, epoch: int) -> None:
        self._base_size = self.size_at(1 << 62)  # changes past the end carry over
        self._changes = []
        self._epoch = epoch
        self._start_index = 0
        self._start_position = 0
        self._yielded = 0
        self._starts = {}
        self._finished = False

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (and its shuffle). Keeps a loaded mid-epoch resume point."""
        _check_int("epoch", epoch, 0)
        if epoch != self._epoch or self._finished:
            self._begin_epoch(epoch)

    def _permutation(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed + self._epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        if self._finished:
            self._begin_epoch(self._epoch + 1)
        perm = self._permutation()
        index, position = self._start_index, self._start_position
        self._yielded = index
        self._starts = {index: position}
        world = self.num_replicas
        while position < self.num_samples:
            size = self.size_at(index)
            take = min(size, self.num_samples - position)
            if take < size and self.drop_last:
                break
            batch = perm[position : position + take]
            if take % world:
                # pad a short last batch so that every rank gets the same share
                pad = world - take % world
                batch = torch.cat([batch, perm[torch.arange(pad) % self.num_samples]])
            share = batch.numel() // world
            mine = batch[self.rank * share : (self.rank + 1) * share]
            position += take
            index += 1
            self._yielded = index
            self._starts[index] = position
            yield mine.tolist()
        self._finished = True

    def num_batches(self) -> int:
        """Batches in the current epoch, given the sizes scheduled so far.

        Deliberately not ``__len__``: a length fixed when the epoch starts goes stale as soon
        as the batch grows, and trainers that trust it (Lightning marks the last batch from it)
        would miss the epoch's end. Without ``__len__`` they detect the end by prefetching.
        """
        index, position, count = self._start_index, self._start_position, self._start_index
        while position < self.num_samples:
            size = self.size_at(index)
            if self.num_samples - position < size and self.drop_last:
                break
            position += size
            index += 1
            count += 1
        return count

    # ------------------------------------------------------------------ state
    def state_dict(self, consumed_batches: int | None = None) -> dict[str, Any]:
        """State to resume at the batch the consumer sees next.

        Args:
            consumed_batches: batches of the current epoch the training loop has actually
                consumed (counting any before a resume). ``None``: all batches handed out so far,
                which is right only when nothing is prefetched.
        """
        c = self._yielded if consumed_batches is None else consumed_batches
        _check_int("consumed_batches", c, 0)
        if c not in self._starts:
            if c == self._start_index:
                position = self._start_position
            else:
                raise ValueError(
                    f"consumed_batches={c} is outside the batches handed out in this epoch "
                    f"({self._start_index}..{self._yielded})"
                )
        else:
            position = self._starts[c]
        epoch, index, size = self._epoch, c, self.size_at(c)
        changes = [[k, s] for k, s in self._changes if k > c]
        exhausted = position >= self.num_samples or (
            self.drop_last and self.num_samples - position < size
        )
        if exhausted:  # the consumer finished the epoch: resume at the next one
            size = self.size_at(1 << 62)
            epoch, index, position, changes = epoch + 1, 0, 0, []
        return {
            "num_samples": self.num_samples,
            "num_replicas": self.num_replicas,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "epoch": epoch,
            "index": index,
            "position": position,
            "batch_size": size,
            "changes": changes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("num_samples", "num_replicas", "seed", "shuffle", "drop_last"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"state_dict was saved with {key}={state[key]!r} but this sampler has "
                    f"{key}={getattr(self, key)!r}"
                )
        self._epoch = int(state["epoch"])
        self._base_size = self._check_size(int(state["batch_size"]), "batch_size")
        self._changes = [(int(k), int(s)) for k, s in state["changes"]]
        self._start_index = int(state["index"])
        self._start_position = int(state["position"])
        self._yielded = self._start_index
        self._starts = {self._start_index: self._start_position}
        self._finished = False
