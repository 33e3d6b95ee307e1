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

``len(sampler)`` is the number of batches the current epoch will have under the sizes scheduled
so far (:meth:`num_batches`): it shrinks when a larger size is scheduled, so a consumer that
trusts a length (a progress bar, Lightning's end-of-epoch detection) must re-read it after each
change; ``adaptive.callbacks.AdaptiveBatchSize`` does that for Lightning.

Where the indices come from. By default (``AdaptiveBatchSampler(num_samples, ...)``) epoch ``e``
is the permutation drawn from ``seed + e`` (or ``0..n-1`` with ``shuffle=False``). Given a user
index sampler instead (``AdaptiveBatchSampler(WeightedRandomSampler(...), ...)``, a
``SubsetRandomSampler``, a ``DistributedSampler``, any finite ``Sampler[int]`` with ``__len__``),
epoch ``e`` is that sampler's own sequence of indices, drawn once when the epoch starts: its
``set_epoch(e)`` is called when it has one, and the draw runs under
``torch.random.fork_rng`` seeded with ``seed + e``, so a sampler that draws from torch's global
generator (``RandomSampler``, ``WeightedRandomSampler``, ``SubsetRandomSampler`` without a
``generator``) gives the same epoch on every rank and on every replay, and the global RNG of the
program is left as it was. A sampler with its own ``generator`` keeps drawing from it; the
generator's state at the start of the epoch is part of :meth:`state_dict`, so a resumed run
re-draws the same epoch. Resuming *re-draws* the epoch and skips what was consumed; that is exact
for every sampler whose sequence is a function of (torch seed, epoch, own generator state), which
:meth:`check_reproducible` verifies (``AdaptiveBatchSize`` calls it at ``setup`` and refuses a
sampler that fails it, e.g. one drawing from Python's ``random`` or NumPy).

An iteration replays the epoch from its start (or from the loaded resume point). ``set_epoch`` is
called by Lightning; without it the next iteration after a finished one starts the next epoch.
``state_dict(consumed_batches=c)`` records the position *of the batch the consumer will see
next* (not of the sampler's prefetch cursor), the size in force there and the pending changes.

Distributed: ``batch_size`` is the *global* batch size. Every rank draws the same permutation (or
the same sequence of the wrapped sampler) and takes its contiguous share
``batch_size / num_replicas`` of the same global batch. A wrapped ``DistributedSampler`` already
gives each rank its own part of the data (``sharded``): each rank then takes
``batch_size / num_replicas`` consecutive indices of its own sequence per batch. A short last
batch (``drop_last=False``) is padded by wrapping to the start of the permutation up to a multiple
of ``num_replicas``, so every rank steps the same number of times.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

__all__ = ["AdaptiveBatchSampler"]


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _is_sharded(sampler: Sampler[int]) -> bool:
    """A sampler that yields only this rank's part of the data (torch's, or a subclass)."""
    return isinstance(sampler, DistributedSampler)


class AdaptiveBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices; the (global) batch size may change between batches.

    Args:
        num_samples: length of the dataset, or a finite index ``Sampler`` (with ``__len__``)
            whose sequence each epoch is batched instead of a permutation (see the module
            docstring).
        batch_size: initial global batch size (a multiple of ``num_replicas``).
        shuffle: draw a new permutation each epoch (``seed + epoch``); else sequential order.
            Only with ``num_samples`` an int (default ``True``); a wrapped sampler decides the
            order itself.
        seed: base seed, identical on every rank.
        drop_last: drop a final batch shorter than the batch size in force.
        num_replicas: data-parallel ranks (default: the initialised process group, else 1).
        rank: this rank (default: the process group's rank, else 0).
        sharded: the wrapped sampler already yields only this rank's indices (default: it is a
            ``DistributedSampler``).

    Example (class balancing kept while the batch grows)::

        weighted = WeightedRandomSampler(weights, num_samples=len(weights))
        sampler = AdaptiveBatchSampler(weighted, batch_size=32, seed=0)
        loader = DataLoader(dataset, batch_sampler=sampler)
        sampler.set_batch_size(64, from_batch=10)
    """

    def __init__(
        self,
        num_samples: int | Sampler[int],
        batch_size: int,
        shuffle: bool | None = None,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        *,
        sharded: bool | None = None,
    ) -> None:
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_initialized() else 0
        self.num_replicas = _check_int("num_replicas", num_replicas, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.num_replicas:
            raise ValueError(f"rank={rank} must be < num_replicas={num_replicas}")
        self.seed = _check_int("seed", seed, 0)
        self.sampler: Sampler[int] | None = None
        self.sharded = False
        if isinstance(num_samples, Sampler):
            if shuffle is not None:
                raise ValueError(
                    f"shuffle={shuffle!r} cannot be combined with a wrapped sampler "
                    f"({type(num_samples).__name__}): the sampler decides the order; leave "
                    "shuffle unset"
                )
            self.sampler = num_samples
            self.sharded = _is_sharded(num_samples) if sharded is None else bool(sharded)
            if self.sharded and self.num_replicas > 1:
                for attr, mine in (("num_replicas", self.num_replicas), ("rank", self.rank)):
                    theirs = getattr(num_samples, attr, mine)
                    if theirs != mine:
                        raise ValueError(
                            f"the wrapped {type(num_samples).__name__} has {attr}={theirs} but "
                            f"this AdaptiveBatchSampler has {attr}={mine}"
                        )
            try:
                length = len(num_samples)  # type: ignore[arg-type]
            except TypeError:
                raise ValueError(
                    f"AdaptiveBatchSampler can wrap only a finite sampler with __len__, got "
                    f"{type(num_samples).__name__} without one (an epoch must have an end to "
                    "plan its batches and resume inside it)"
                ) from None
            self.num_samples = _check_int(f"len({type(num_samples).__name__})", length, 1)
            self.shuffle = False
        else:
            if sharded:
                raise ValueError("sharded=True needs a wrapped sampler, not a number of samples")
            self.num_samples = _check_int("num_samples", num_samples, 1)
            self.shuffle = True if shuffle is None else bool(shuffle)
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
        # the wrapped sampler's epoch, drawn once: (epoch, indices); and its own generator's
        # state before that draw (None: it has none, or nothing was drawn yet)
        self._drawn: tuple[int, torch.Tensor] | None = None
        self._rng_before: torch.Tensor | None = None

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

    def _generator(self) -> torch.Generator | None:
        gen = getattr(self.sampler, "generator", None)
        return gen if isinstance(gen, torch.Generator) else None

    def _draw(self, epoch: int) -> torch.Tensor:
        """The wrapped sampler's sequence for ``epoch`` (set_epoch, then a seeded draw)."""
        assert self.sampler is not None
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + epoch)
            drawn = [int(i) for i in self.sampler]
        if len(drawn) != self.num_samples:
            raise ValueError(
                f"the wrapped {type(self.sampler).__name__} yielded {len(drawn)} indices in epoch "
                f"{epoch} but its len() is {self.num_samples}"
            )
        return torch.tensor(drawn, dtype=torch.int64)

    def _permutation(self) -> torch.Tensor:
        if self.sampler is not None:
            if self._drawn is None or self._drawn[0] != self._epoch:
                gen = self._generator()
                self._rng_before = None if gen is None else gen.get_state()
                self._drawn = (self._epoch, self._draw(self._epoch))
            return self._drawn[1]
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed + self._epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def check_reproducible(self) -> None:
        """Raise ``ValueError`` unless the wrapped sampler re-draws an epoch identically.

        Draws the current epoch twice (restoring the sampler's own generator in between) and
        compares: exact resumption re-draws the epoch, so a sampler that draws from a source this
        class does not seed (Python's ``random``, NumPy, the clock) would resume on other data.
        Costs two passes over the sampler; nothing is changed.
        """
        if self.sampler is None:
            return
        gen = self._generator()
        state = None if gen is None else gen.get_state()
        first = self._draw(self._epoch)
        if gen is not None:
            gen.set_state(state)
        second = self._draw(self._epoch)
        if gen is not None:
            gen.set_state(state)
        if not torch.equal(first, second):
            raise ValueError(
                f"the wrapped {type(self.sampler).__name__} gives different indices for the same "
                f"epoch and seed (torch's global generator seeded with seed + epoch, its own "
                "generator restored): it draws from a source AdaptiveBatchSampler cannot replay "
                "(Python's random, NumPy, time), so a resumed run would train on other samples. "
                "Draw from torch (e.g. torch.multinomial / torch.randperm) or from a "
                "torch.Generator stored as its .generator attribute"
            )

    def __iter__(self) -> Iterator[list[int]]:
        if self._finished:
            self._begin_epoch(self._epoch + 1)
        perm = self._permutation()
        index, position = self._start_index, self._start_position
        self._yielded = index
        self._starts = {index: position}
        world = self.num_replicas
        if self.sharded:  # a per-rank stream: each batch takes its local share of it
            while position < self.num_samples:
                share = self.size_at(index) // world
                take = min(share, self.num_samples - position)
                if take < share and self.drop_last:
                    break
                mine = perm[position : position + take]
                position += take
                index += 1
                self._yielded = index
                self._starts[index] = position
                # a consumer that trusts len() never asks past the last batch: mark the end now
                self._finished = self._exhausted(index, position)
                yield mine.tolist()
            self._finished = True
            return
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
            self._finished = self._exhausted(index, position)
            yield mine.tolist()
        self._finished = True

    def _step_of(self, index: int) -> int:
        """Stream positions batch ``index`` advances by (its size, or its local share)."""
        size = self.size_at(index)
        return size // self.num_replicas if self.sharded else size

    def _exhausted(self, index: int, position: int) -> bool:
        """No batch ``index`` starting at ``position``: the epoch ends before it."""
        left = self.num_samples - position
        return left <= 0 or (self.drop_last and left < self._step_of(index))

    def num_batches(self) -> int:
        """Batches in the current epoch, given the sizes scheduled so far (also ``len()``).

        A length read when the epoch starts goes stale as soon as a larger size is scheduled:
        read it again after each :meth:`set_batch_size` (``AdaptiveBatchSize`` updates
        Lightning's count of the epoch's batches, its progress bar and its end-of-epoch check).
        """
        if self._finished:  # all handed out: the next iteration is the next epoch
            step = self.size_at(1 << 62)
            step = step // self.num_replicas if self.sharded else step
            n = self.num_samples
            return n // step if self.drop_last else -(-n // step)
        index, position, count = self._start_index, self._start_position, self._start_index
        while position < self.num_samples:
            size = self._step_of(index)
            if self.num_samples - position < size and self.drop_last:
                break
            position += size
            index += 1
            count += 1
        return count

    def __len__(self) -> int:
        return self.num_batches()

    def position(self, batch_index: int) -> int:
        """Stream position (indices of this epoch's sequence used; per rank if ``sharded``)
        before batch ``batch_index``; for batches past the ones handed out, from the plan."""
        if batch_index in self._starts:
            return self._starts[batch_index]
        index, position = self._start_index, self._start_position
        if self._starts:
            index = max(k for k in self._starts if k <= batch_index)
            position = self._starts[index]
        while index < batch_index and position < self.num_samples:
            position = min(position + self._step_of(index), self.num_samples)
            index += 1
        return position

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
            self.drop_last and self.num_samples - position < self._step_of(c)
        )
        if exhausted:  # the consumer finished the epoch: resume at the next one
            size = self.size_at(1 << 62)
            epoch, index, position, changes = epoch + 1, 0, 0, []
        state = self._base_state(epoch, index, position, size, changes)
        if self.sampler is not None:
            state["sampler"] = type(self.sampler).__name__
            state["sharded"] = self.sharded
            gen = self._generator()
            if gen is not None:
                # the generator as it was before the draw of the epoch to resume in
                drawn = self._drawn[0] if self._drawn is not None else None
                if drawn == epoch and self._rng_before is not None:
                    state["generator"] = self._rng_before.clone()
                else:  # the next epoch (or nothing drawn yet): its draw starts from here
                    state["generator"] = gen.get_state()
        return state

    def _base_state(
        self, epoch: int, index: int, position: int, size: int, changes: list[list[int]]
    ) -> dict[str, Any]:
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
        mine = None if self.sampler is None else type(self.sampler).__name__
        if state.get("sampler") != mine:
            raise ValueError(
                f"state_dict was saved with the wrapped sampler {state.get('sampler')!r} but this "
                f"sampler wraps {mine!r}"
            )
        for key in ("num_samples", "num_replicas", "seed", "shuffle", "drop_last"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"state_dict was saved with {key}={state[key]!r} but this sampler has "
                    f"{key}={getattr(self, key)!r}"
                )
        self._drawn = None
        self._rng_before = None
        if "generator" in state:
            gen = self._generator()
            if gen is None:
                raise ValueError(
                    f"state_dict holds the generator state of the wrapped sampler but this "
                    f"{type(self.sampler).__name__} has no .generator"
                )
            gen.set_state(state["generator"])
        self._epoch = int(state["epoch"])
        self._base_size = self._check_size(int(state["batch_size"]), "batch_size")
        self._changes = [(int(k), int(s)) for k, s in state["changes"]]
        self._start_index = int(state["index"])
        self._start_position = int(state["position"])
        self._yielded = self._start_index
        self._starts = {self._start_index: self._start_position}
        self._finished = False
