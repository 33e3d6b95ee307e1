"""Concept-aware batch sampling, CABS (Ghosh et al., arXiv 2511.20643).

Each sample carries a list of concept labels (tags, detected objects, content words). From a
super-batch of ``S = B / (1 − f)`` samples drawn at random, keep ``B`` (``f`` is the fraction
*dropped*; 0.8 in the authors' config):

- CABS-FM (frequency maximisation, ``mode="frequency"``): the ``B`` samples with the most
  distinct concepts ``|C_i|`` (ties: earlier in the super-batch first). Favours dense,
  multi-concept samples.
- CABS-DM (diversity maximisation, ``mode="diversity"``): greedy towards a flat concept
  histogram. With ``K`` concepts present in the super-batch (ordered by first appearance),
  targets ``t_c = max(1, ⌊B/K⌋ + [c among the first B mod K])`` (capped at ``cap``), super-batch
  frequencies ``F_c`` and running counts ``n_c`` of the kept samples, the gain of a sample is

      h(i) = (1/|C_i|) Σ_{c∈C_i} g_c,   g_c = (t_c − n_c)/t_c + 1/F_c  if n_c < t_c,
                                         g_c = −1/2                      otherwise,

  (``h = 0`` for a sample without concepts). Repeatedly keep the sample of largest gain (ties:
  earliest), update ``n_c`` and re-score the samples sharing its concepts through a lazy
  max-heap. With ``cap`` set, a sample with any ``n_c ≥ cap`` is no longer eligible; a shortfall
  is filled at random. This follows the authors' code (bethgelab/cabs,
  ``diversity_maximisation.py``); the paper writes the saturated term as 0 instead of −1/2.

The super-batch size is ``round(B / (1 − f))`` (the authors also round the kept size to a power
of two; here ``B`` is kept exactly).
"""

from __future__ import annotations

import heapq
import math
import numbers
from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch.utils.data import Sampler

from adaptive.selection._checks import check_int, check_positive_int

Mode = Literal["diversity", "frequency"]


def frequency_select(concept_sets: Sequence[Sequence[int]], keep: int) -> list[int]:
    """CABS-FM: positions of the ``keep`` sets with the most distinct concepts (stable)."""
    order = sorted(range(len(concept_sets)), key=lambda i: -len(set(concept_sets[i])))
    return order[:keep]


def concept_targets(concept_sets: Sequence[Sequence[int]], keep: int, cap: int | None = None):
    """``({c: t_c}, {c: F_c})`` for the concepts of a super-batch (see the module docstring)."""
    order: dict[int, None] = {}
    freq: dict[int, int] = {}
    for concepts in concept_sets:
        for c in set(concepts):
            freq[c] = freq.get(c, 0) + 1
        for c in concepts:
            order.setdefault(c, None)
    if not order:
        return {}, {}
    base, extra = divmod(keep, len(order))
    targets = {}
    for rank, c in enumerate(order):
        t = max(1, base + (1 if rank < extra else 0))
        targets[c] = t if cap is None else min(t, cap)
    return targets, freq


def diversity_select(
    concept_sets: Sequence[Sequence[int]],
    keep: int,
    *,
    cap: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """CABS-DM greedy selection: positions of the kept samples, in the order they were picked."""
    sets = [sorted(set(c)) for c in concept_sets]
    n = len(sets)
    keep = min(keep, n)
    targets, freq = concept_targets(sets, keep, cap)
    counts = dict.fromkeys(targets, 0)
    holders: dict[int, list[int]] = {c: [] for c in targets}
    for i, concepts in enumerate(sets):
        for c in concepts:
            holders[c].append(i)

    def gain(i: int) -> float:
        if not sets[i]:
            return 0.0
        total = 0.0
        for c in sets[i]:
            t, n_c = targets[c], counts[c]
            total += (t - n_c) / t + 1.0 / freq[c] if n_c < t else -0.5
        return total / len(sets[i])

    def eligible(i: int) -> bool:
        return cap is None or all(counts[c] < cap for c in sets[i])

    version = [0] * n
    heap = [(-gain(i), i, 0) for i in range(n)]
    heapq.heapify(heap)
    taken = [False] * n
    picked: list[int] = []
    while heap and len(picked) < keep:
        _neg, i, ver = heapq.heappop(heap)
        if taken[i] or ver != version[i] or not eligible(i):
            continue
        taken[i] = True
        picked.append(i)
        touched = set()
        for c in sets[i]:
            counts[c] += 1
            touched.update(holders[c])
        for j in sorted(touched):
            if not taken[j]:
                version[j] += 1
                heapq.heappush(heap, (-gain(j), j, version[j]))
    if len(picked) < keep:  # every remaining sample hit the cap: fill at random
        rest = [i for i in range(n) if not taken[i]]
        order = torch.randperm(len(rest), generator=generator).tolist()
        picked += [rest[p] for p in order[: keep - len(picked)]]
    return picked


class CABSSampler(Sampler[list[int]]):
    """Batch sampler yielding CABS-selected batches of dataset indices (no model signal).

    Args:
        concepts: one iterable of hashable concept labels per dataset sample.
        batch_size: ``B``, samples kept per batch (globally, over all replicas).
        filter_ratio: ``f ∈ [0, 1)``, fraction of each super-batch dropped.
        mode: ``"diversity"`` (CABS-DM) or ``"frequency"`` (CABS-FM).
        seed: the epoch's order is ``randperm(N)`` from a generator seeded ``seed + epoch``.
        cap: optional per-concept cap of CABS-DM (see the module docstring).
        drop_last: drop the last, incomplete super-batch of an epoch (default); otherwise keep
            ``round((1 − f)·len)`` of it.
        num_replicas, rank: under DDP every rank computes the same global selection and
            yields its share ``kept[rank::num_replicas]`` (``B`` divisible by ``num_replicas``).

    Iterating yields ``len(self)`` lists of indices; ``set_epoch`` (called by Lightning) picks
    the epoch, and an epoch left mid-way resumes where it stopped from ``state_dict``.

    Example::

        sampler = CABSSampler(concepts, batch_size=256, filter_ratio=0.8, mode="diversity")
        loader = DataLoader(dataset, batch_sampler=sampler)
    """

    def __init__(
        self,
        concepts: Sequence[Iterable[Hashable]],
        batch_size: int,
        filter_ratio: float = 0.8,
        mode: Mode = "diversity",
        seed: int = 0,
        *,
        cap: int | None = None,
        drop_last: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if isinstance(concepts, (str, bytes)) or not isinstance(concepts, Sequence):
            raise TypeError(
                "concepts must be a sequence with one iterable of concept labels per sample, "
                f"got {type(concepts).__name__}"
            )
        self.batch_size = check_positive_int("batch_size", batch_size)
        if isinstance(filter_ratio, bool) or not isinstance(filter_ratio, numbers.Real):
            raise TypeError(f"filter_ratio must be a float in [0, 1), got {filter_ratio!r}")
        if not 0.0 <= filter_ratio < 1.0:
            raise ValueError(
                f"filter_ratio={filter_ratio} must lie in [0, 1): the fraction of each "
                "super-batch dropped (0.8 keeps one fifth)"
            )
        if mode not in ("diversity", "frequency"):
            raise ValueError(f"mode={mode!r} must be 'diversity' (CABS-DM) or 'frequency' (FM)")
        self.filter_ratio = float(filter_ratio)
        self.mode = mode
        self.seed = check_int("seed", seed)
        self.cap = None if cap is None else check_positive_int("cap", cap)
        self.drop_last = bool(drop_last)
        self.num_replicas = check_positive_int("num_replicas", num_replicas)
        self.rank = check_int("rank", rank)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank={rank} must lie in [0, num_replicas={num_replicas})")
        if self.batch_size % self.num_replicas:
            raise ValueError(
                f"batch_size={batch_size} must be divisible by num_replicas={num_replicas} "
                "(every rank trains on the same number of samples)"
            )
        ids: dict[Hashable, int] = {}
        self._sets: list[list[int]] = []
        for i, labels in enumerate(concepts):
            if isinstance(labels, (str, bytes)) or not isinstance(labels, Iterable):
                raise TypeError(
                    f"concepts[{i}] must be an iterable of concept labels (e.g. a list of "
                    f"strings), got {type(labels).__name__} {labels!r}"
                )
            self._sets.append([ids.setdefault(c, len(ids)) for c in labels])
        self.concept_names = list(ids)
        self.super_batch_size = round(self.batch_size / (1.0 - self.filter_ratio))
        if self.super_batch_size > len(self._sets):
            raise ValueError(
                f"a super-batch of batch_size / (1 - filter_ratio) = {self.super_batch_size} "
                f"samples needs at least that many samples; the data set has {len(self._sets)}"
            )
        self.epoch = 0
        self.batches_done = 0  # batches of the current epoch already yielded

    def __len__(self) -> int:
        n, s = len(self._sets), self.super_batch_size
        return n // s if self.drop_last else math.ceil(n / s)

    def set_epoch(self, epoch: int) -> None:
        epoch = check_int("epoch", epoch)
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0

    def select(self, super_batch: Sequence[int]) -> list[int]:
        """Global kept dataset indices for one super-batch of dataset indices."""
        sets = [self._sets[i] for i in super_batch]
        if len(super_batch) == self.super_batch_size:
            keep = self.batch_size
        else:
            keep = round((1.0 - self.filter_ratio) * len(super_batch))
            keep -= keep % self.num_replicas
        if self.mode == "frequency":
            positions = frequency_select(sets, keep)
        else:
            gen = torch.Generator().manual_seed(self.seed + 7919 * (self.epoch + 1))
            positions = diversity_select(sets, keep, cap=self.cap, generator=gen)
        return [super_batch[p] for p in positions]

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(
            len(self._sets), generator=torch.Generator().manual_seed(self.seed + self.epoch)
        ).tolist()
        s = self.super_batch_size
        for j in range(self.batches_done, len(self)):
            kept = self.select(order[j * s : (j + 1) * s])
            self.batches_done = j + 1
            share = kept[self.rank :: self.num_replicas]
            if share:
                yield share
        self.epoch, self.batches_done = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"checkpoint seed {state['seed']} differs from seed={self.seed}")
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
