"""A weighted multi-source batch sampler whose weights may change between batches.

Each global batch of ``batch_size`` draws is made in two steps from a random stream that depends
only on ``(seed, epoch, batch index)``:

1. the source of every draw: ``s_j ~ Categorical(w)`` independently (``w`` the current weights), so
   the number of draws from source ``i`` is ``Multinomial(batch_size, w)``;
2. the index within each source: the next unused entries of a per-source random permutation
   (a fresh permutation, seeded by ``(seed, source, pass)``, when a source is used up), so every
   source is seen without repetition before any item repeats.

Every rank runs the same sampler with the same seed and weights, so all ranks compute the same
global batch; rank ``r`` of ``R`` keeps the ``r``-th contiguous slice of ``batch_size / R`` pairs.
The state (epoch, batch index, per-source cursors and passes, weights) is a few integers and
floats, so a run stopped mid-epoch resumes with exactly the batches it would have drawn.

Used by DoReMi (Xie et al. 2023, arXiv 2305.10429), ODM (Albalak et al. 2023, arXiv 2312.02406)
and TiKMiX (arXiv 2508.17677), which all resample sources by changing per-domain weights.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from adaptive.mixture.weights import as_weights

__all__ = ["MixtureDataset", "MixtureSampler"]

# Separate random streams for "which source" and "which permutation".
_BATCH_STREAM = 0
_PERM_STREAM = 1


def _check_sizes(sizes: Sequence[int]) -> list[int]:
    try:
        out = [int(n) for n in sizes]
    except (TypeError, ValueError) as err:
        raise TypeError(f"sizes must be a sequence of integers, got {sizes!r}") from err
    if not out:
        raise ValueError("sizes must name at least one source, got an empty sequence")
    for i, (n, raw) in enumerate(zip(out, sizes, strict=True)):
        if n != raw:
            raise TypeError(f"sizes[{i}] must be an integer, got {raw!r}")
        if n <= 0:
            raise ValueError(
                f"source {i} is empty (sizes[{i}] = {n}); remove it or give it at least one item"
            )
    return out


class MixtureSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(source, index)`` pairs drawn from several sources with changeable weights.

    Args:
        sizes: number of items in each source (all positive).
        weights: relative sampling weight of each source; normalised to sum to one (a vector that
            does not sum to one is rescaled, not rejected). Negative, NaN or infinite entries, an
            all-zero vector or a wrong length raise ``ValueError``.
        batch_size: global batch size (draws per step over all ranks); must be divisible by the
            number of replicas.
        seed: seed of every random stream.
        num_replicas, rank: the distributed layout; ``None`` reads ``torch.distributed`` when the
            iteration starts (1 and 0 when it is not initialised).
        num_batches: batches per epoch (``len(sampler)``); default
            ``max(1, sum(sizes) // batch_size)``.
        history: how many recent batches :meth:`state_dict` can roll back to (``consumed=``), which
            covers batches a DataLoader or Lightning fetched ahead of the training step.

    ``set_weights`` changes the weights of every batch generated afterwards. With ``num_workers=0``
    that is the next batch; a loader that prefetches ``p`` batches (Lightning fetches one ahead) has
    already drawn those with the old weights.

    Example::

        sampler = MixtureSampler([len(a), len(b)], [0.7, 0.3], batch_size=32, seed=0)
        loader = DataLoader(MixtureDataset([a, b]), batch_sampler=sampler)
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float] | torch.Tensor,
        batch_size: int,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        num_batches: int | None = None,
        history: int = 64,
    ) -> None:
        self.sizes = _check_sizes(sizes)
        k = len(self.sizes)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if num_batches is None:
            num_batches = max(1, sum(self.sizes) // batch_size)
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
        if not isinstance(history, int) or history < 0:
            raise ValueError(f"history must be a non-negative integer, got {history!r}")
        self.batch_size = batch_size
        self.seed = seed
        self.num_batches = num_batches
        self._num_replicas = num_replicas
        self._rank = rank
        self._check_layout(num_replicas, rank)
        self._weights = as_weights(weights, k)
        self._epoch = 0
        self._step = 0  # batch index within the epoch
        self._total = 0  # batches generated since the start
        self._cursors = [0] * k
        self._passes = [0] * k
        self._perms: list[np.ndarray | None] = [None] * k
        self._pending: collections.deque[torch.Tensor] = collections.deque()
        self._snapshots: collections.deque[dict[str, Any]] = collections.deque(maxlen=history + 1)

    # -- configuration -------------------------------------------------------------------------
    @property
    def num_sources(self) -> int:
        return len(self.sizes)

    @property
    def weights(self) -> torch.Tensor:
        """The weights of the next batch drawn after the pending ones (float64, sums to one)."""
        return self._weights.clone()

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batches_drawn(self) -> int:
        """Global batches generated since the start (over all epochs)."""
        return self._total

    def set_weights(self, weights: Sequence[float] | torch.Tensor) -> None:
        """Use ``weights`` (normalised, see the class doc) for every batch generated from now on."""
        self._weights = as_weights(weights, self.num_sources)

    def __len__(self) -> int:
        return self.num_batches

    def _check_layout(self, num_replicas: int | None, rank: int | None) -> None:
        if num_replicas is not None and (not isinstance(num_replicas, int) or num_replicas < 1):
            raise ValueError(f"num_replicas must be a positive integer, got {num_replicas!r}")
        if num_replicas is not None and self.batch_size % num_replicas:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by num_replicas ({num_replicas})"
            )
        if rank is not None and (
            not isinstance(rank, int)
            or rank < 0
            or (num_replicas is not None and rank >= num_replicas)
        ):
            raise ValueError(f"rank must be an integer in [0, num_replicas), got {rank!r}")

    def _layout(self) -> tuple[int, int]:
        replicas, rank = self._num_replicas, self._rank
        dist = torch.distributed
        initialised = dist.is_available() and dist.is_initialized()
        if replicas is None:
            replicas = dist.get_world_size() if initialised else 1
        if rank is None:
            rank = dist.get_rank() if initialised else 0
        self._check_layout(replicas, rank)
        return replicas, rank

    # -- drawing -------------------------------------------------------------------------------
    def _perm(self, source: int) -> np.ndarray:
        perm = self._perms[source]
        if perm is None:
            rng = np.random.default_rng([self.seed, _PERM_STREAM, source, self._passes[source]])
            perm = rng.permutation(self.sizes[source])
            self._perms[source] = perm
        return perm

    def _take(self, source: int, count: int) -> np.ndarray:
        """The next ``count`` indices of ``source``, starting a new permutation when used up."""
        out = []
        while count > 0:
            perm = self._perm(source)
            start = self._cursors[source]
            n = min(count, len(perm) - start)
            out.append(perm[start : start + n])
            count -= n
            self._cursors[source] = start + n
            if self._cursors[source] == len(perm):
                self._cursors[source] = 0
                self._passes[source] += 1
                self._perms[source] = None
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    def _draw(self, weights: torch.Tensor) -> list[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, _BATCH_STREAM, self._epoch, self._step])
        p = weights.numpy()
        sources = rng.choice(self.num_sources, size=self.batch_size, p=p / p.sum())
        indices = np.empty(self.batch_size, dtype=np.int64)
        for s in range(self.num_sources):
            where = np.flatnonzero(sources == s)
            if where.size:
                indices[where] = self._take(s, where.size)
        return [(int(s), int(i)) for s, i in zip(sources, indices, strict=True)]

    def _position(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "step": self._step,
            "total": self._total,
            "cursors": list(self._cursors),
            "passes": list(self._passes),
        }

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        replicas, rank = self._layout()
        share = self.batch_size // replicas
        while self._step < self.num_batches:
            weights = self._pending.popleft() if self._pending else self._weights
            snapshot = self._position()
            snapshot["used"] = weights
            self._snapshots.append(snapshot)
            batch = self._draw(weights)
            self._step += 1
            self._total += 1
            yield batch[rank * share : (rank + 1) * share]
        self._epoch += 1
        self._step = 0

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """The sampler's state; loads with ``torch.load(..., weights_only=True)``.

        Args:
            consumed: the number of global batches the training loop has actually used (counted
                over all epochs). Batches drawn beyond it (prefetched) are rolled back, and the
                weights they were drawn with are kept so that a resumed run draws them again
                identically. ``None``: every drawn batch counts as consumed.
        """
        if consumed is None or consumed == self._total:
            position = self._position()
            replay = []
        else:
            by_total = {snap["total"]: i for i, snap in enumerate(self._snapshots)}
            if consumed not in by_total:
                lo = self._snapshots[0]["total"] if self._snapshots else self._total
                raise ValueError(
                    f"consumed={consumed} is outside the batches this sampler can roll back to "
                    f"([{lo}, {self._total}]); raise history= or checkpoint more often"
                )
            first = by_total[consumed]
            snaps = list(self._snapshots)[first:]
            position = {k: v for k, v in snaps[0].items() if k != "used"}
            replay = [snap["used"] for snap in snaps]
        replay = replay + list(self._pending)
        return {
            **position,
            "seed": self.seed,
            "sizes": list(self.sizes),
            "batch_size": self.batch_size,
            "num_batches": self.num_batches,
            "weights": self._weights.tolist(),
            "pending": [w.tolist() for w in replay],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; the sizes and batch size must match."""
        for key in ("sizes", "batch_size", "num_batches", "seed"):
            mine = getattr(self, key)
            theirs = list(state[key]) if key == "sizes" else state[key]
            if theirs != mine:
                raise ValueError(f"state has {key}={theirs}, but this sampler has {key}={mine}")
        self._epoch = int(state["epoch"])
        self._step = int(state["step"])
        self._total = int(state["total"])
        self._cursors = [int(c) for c in state["cursors"]]
        self._passes = [int(p) for p in state["passes"]]
        self._perms = [None] * self.num_sources
        self._weights = as_weights(state["weights"], self.num_sources)
        self._pending = collections.deque(
            as_weights(w, self.num_sources, "pending weights") for w in state["pending"]
        )
        self._snapshots.clear()


class MixtureDataset(Dataset):
    """Several map-style sources behind one dataset indexed by ``(source, index)`` pairs.

    ``dataset[(s, i)]`` is ``(sources[s][i], s)``: the item tagged with its source id, so the
    default collate function turns a batch into ``[collated items, int64 tensor of source ids]``
    (the group ids that per-group statistics need). Works with torch datasets, HuggingFace
    ``datasets.Dataset`` and plain sequences. Use with a :class:`MixtureSampler` as
    ``batch_sampler``.
    """

    def __init__(self, sources: Sequence[Any], names: Sequence[str] | None = None) -> None:
        if len(sources) == 0:
            raise ValueError("sources must hold at least one data source, got none")
        if names is not None and len(names) != len(sources):
            raise ValueError(f"names has {len(names)} entries but there are {len(sources)} sources")
        self.sources = list(sources)
        self.names = (
            list(names) if names is not None else [f"source{i}" for i in range(len(sources))]
        )
        for i, src in enumerate(self.sources):
            if len(src) == 0:
                raise ValueError(f"source {i} ({self.names[i]!r}) is empty; remove it or fill it")

    @property
    def sizes(self) -> list[int]:
        return [len(src) for src in self.sources]

    def __len__(self) -> int:
        return sum(self.sizes)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int]:
        try:
            source, index = key
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"MixtureDataset is indexed by (source, index) pairs, got {key!r}"
            ) from err
        return self.sources[source][int(index)], int(source)
