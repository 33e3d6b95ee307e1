"""AdaptiveBatchSampler: resizing, exact resume, DDP shares, worker prefetching."""

from __future__ import annotations

import io

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from adaptive.batching import AdaptiveBatchSampler


def _drain(sampler, n=None):
    out = []
    for i, batch in enumerate(sampler):
        if n is not None and i >= n:
            break
        out.append(batch)
    return out


def test_sizes_change_between_batches_and_cover_the_epoch():
    s = AdaptiveBatchSampler(100, batch_size=8, shuffle=True, seed=3)
    it = iter(s)
    batches = [next(it), next(it)]
    s.set_batch_size(16)  # from the next batch
    batches += [next(it)]
    s.set_batch_size(24, from_batch=5)
    batches += list(it)
    sizes = [len(b) for b in batches]
    # 8, 8, 16, 16, 16 (=64), then 24 → 88, last 12
    assert sizes == [8, 8, 16, 16, 16, 24, 12]
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(100))  # every sample once
    expected = torch.randperm(100, generator=torch.Generator().manual_seed(3)).tolist()
    assert flat == expected


def test_drop_last_len_and_epochs():
    s = AdaptiveBatchSampler(50, batch_size=16, shuffle=False, drop_last=True)
    assert s.num_batches() == 3
    assert [len(b) for b in s] == [16, 16, 16]
    s.set_epoch(1)
    s.set_batch_size(20, from_batch=1)
    assert s.num_batches() == 2  # 16 + 20 = 36, then 14 < 20 is dropped
    assert [len(b) for b in s] == [16, 20]
    # without set_epoch, a finished epoch is followed by the next one, and sizes carry over
    s2 = AdaptiveBatchSampler(40, batch_size=8, seed=1)
    e0 = _drain(s2)
    s2.set_batch_size(20, from_batch=99)  # beyond the end: from the next epoch
    e1 = _drain(s2)
    assert s2.epoch == 1
    assert [len(b) for b in e1] == [20, 20]
    assert [i for b in e0 for i in b] != [i for b in e1 for i in b]


def test_change_already_handed_out_raises():
    s = AdaptiveBatchSampler(100, batch_size=10)
    it = iter(s)
    next(it), next(it), next(it)
    with pytest.raises(ValueError, match="from_batch=2 was already handed out"):
        s.set_batch_size(20, from_batch=2)
    with pytest.raises(ValueError, match="multiple of num_replicas=2"):
        AdaptiveBatchSampler(100, batch_size=9, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="rank=2 must be < num_replicas=2"):
        AdaptiveBatchSampler(100, batch_size=8, num_replicas=2, rank=2)


def _run(sampler, schedule, stop=None):
    """Consume batches; ``schedule`` maps consumed count → (size, lookahead)."""
    out = []
    it = iter(sampler)
    for batch in it:
        out.append(batch)
        c = len(out)
        if c in schedule:
            size, ahead = schedule[c]
            sampler.set_batch_size(size, from_batch=c + ahead)
        if stop is not None and c == stop:
            break
    return out


def test_exact_resume_mid_epoch_through_weights_only_checkpoint():
    schedule = {2: (12, 2), 5: (20, 3)}
    full = AdaptiveBatchSampler(203, batch_size=4, seed=5)
    ref = _run(full, schedule) + _drain(full)  # two epochs

    first = AdaptiveBatchSampler(203, batch_size=4, seed=5)
    part = _run(first, schedule, stop=4)  # the change scheduled at 2 (from batch 4) is pending
    # the sampler handed out one more batch than consumed (as a prefetching loader would)
    state = first.state_dict(consumed_batches=4)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    resumed = AdaptiveBatchSampler(203, batch_size=4, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # what Lightning does on restart: keeps the resume point
    rest = []
    for batch in resumed:
        rest.append(batch)
        c = 4 + len(rest)
        if c in schedule:
            size, ahead = schedule[c]
            resumed.set_batch_size(size, from_batch=c + ahead)
    rest += _drain(resumed)
    assert part + rest == ref
    with pytest.raises(ValueError, match="seed"):
        AdaptiveBatchSampler(203, batch_size=4, seed=6).load_state_dict(state)


def test_state_at_epoch_end_resumes_next_epoch():
    s = AdaptiveBatchSampler(30, batch_size=10, seed=2)
    _drain(s)
    state = s.state_dict(consumed_batches=3)
    assert (state["epoch"], state["index"], state["position"]) == (1, 0, 0)
    t = AdaptiveBatchSampler(30, batch_size=10, seed=2)
    t.load_state_dict(state)
    assert _drain(t) == _drain(s)


def test_ranks_share_the_same_global_batch():
    world = 2
    single = AdaptiveBatchSampler(37, batch_size=8, seed=9, num_replicas=1, rank=0)
    ranks = [
        AdaptiveBatchSampler(37, batch_size=8, seed=9, num_replicas=world, rank=r)
        for r in range(world)
    ]
    for s in [single, *ranks]:
        s.set_batch_size(12, from_batch=2)
    g = _drain(single)
    per_rank = [_drain(s) for s in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(g)
    for k, global_batch in enumerate(g[:-1]):
        assert per_rank[0][k] + per_rank[1][k] == global_batch
    # last batch: 37 − 8·2 − 12 = 9 samples, padded by wrapping to 10 → 5 per rank
    last = per_rank[0][-1] + per_rank[1][-1]
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(9)).tolist()
    assert last == g[-1] + perm[:1]
    assert len(per_rank[0][-1]) == 5


class _Indices(Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, i):
        return torch.tensor(i)


def test_worker_prefetch_cannot_apply_a_stale_size():
    """Changes scheduled beyond the prefetch window land on exactly the scheduled batch."""
    sampler = AdaptiveBatchSampler(1000, batch_size=4, seed=0)
    loader = DataLoader(_Indices(), batch_sampler=sampler, num_workers=2, prefetch_factor=2)
    window = AdaptiveBatchSampler.prefetch_window(2, 2, extra=0)
    assert window == 4
    sizes, seen = [], []
    decisions = {3: 8, 7: 16, 12: 32}
    expected_from = {}
    for batch in loader:
        sizes.append(len(batch))
        seen += batch.tolist()
        c = len(sizes)
        if c in decisions:
            # the loader has already pulled up to `window` batches ahead of us
            assert sampler.handed_out > c
            expected_from[c + window] = decisions[c]
            sampler.set_batch_size(decisions[c], from_batch=c + window)
        if c == 20:
            break
    want, size = [], 4
    for k in range(20):
        size = expected_from.get(k, size)
        want.append(size)
    assert sizes == want
    # a change inside the window is refused rather than applied late
    sampler2 = AdaptiveBatchSampler(1000, batch_size=4)
    loader2 = DataLoader(_Indices(), batch_sampler=sampler2, num_workers=2, prefetch_factor=2)
    it = iter(loader2)
    next(it)
    with pytest.raises(ValueError, match="already handed out"):
        sampler2.set_batch_size(8, from_batch=2)
    del it
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist()
    assert seen == perm[: len(seen)]


# ---------------------------------------------------------------- wrapping a user sampler
from torch.utils.data import (  # noqa: E402
    DistributedSampler,
    RandomSampler,
    Sampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)


def _weighted(gen=None):
    # only the even indices carry weight: a sampler drawing "class 0" of a 2-class set
    weights = torch.tensor([1.0 if i % 2 == 0 else 0.0 for i in range(60)])
    return WeightedRandomSampler(weights, num_samples=60, replacement=True, generator=gen)


def test_wrapped_sampler_draws_are_kept_and_only_batching_changes():
    s = AdaptiveBatchSampler(_weighted(), batch_size=4, seed=7)
    assert len(s) == 15
    s.set_batch_size(8, from_batch=2)
    assert len(s) == 2 + 7  # 8 samples at size 4, then 52 at size 8 (the last one 4)
    batches = _drain(s)
    assert [len(b) for b in batches] == [4, 4] + [8] * 6 + [4]
    flat = [i for b in batches for i in b]
    assert all(i % 2 == 0 for i in flat)  # the weights are honoured: no odd index ever
    # exactly the sampler's own sequence for epoch 0, drawn under torch.manual_seed(seed + 0)
    torch.manual_seed(7)
    assert flat == list(_weighted())
    # subset: a train split never leaks the held-out indices
    subset = SubsetRandomSampler(list(range(10, 30)))
    t = AdaptiveBatchSampler(subset, batch_size=6, seed=1)
    got = [i for b in _drain(t) for i in b]
    assert sorted(got) == list(range(10, 30))


def test_wrapped_sampler_leaves_the_global_rng_alone_and_redraws_per_epoch():
    s = AdaptiveBatchSampler(RandomSampler(range(40)), batch_size=8, seed=3)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    e0 = [i for b in _drain(s) for i in b]
    assert torch.equal(torch.rand(3), before)
    e1 = [i for b in _drain(s) for i in b]
    assert sorted(e0) == sorted(e1) == list(range(40)) and e0 != e1
    torch.manual_seed(3 + 1)
    assert e1 == list(RandomSampler(range(40)))


def _reload(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("own_generator", [False, True])
def test_wrapped_sampler_resumes_exactly_mid_epoch_and_across_epochs(own_generator):
    def make():
        gen = torch.Generator().manual_seed(11) if own_generator else None
        return AdaptiveBatchSampler(_weighted(gen), batch_size=4, seed=2)

    schedule = {2: (8, 1)}  # decided after batch 2: size 8 from batch 3
    full = make()
    ref = _run(full, schedule) + _drain(full) + _drain(full)  # three epochs
    assert len(ref) == 9 + 8 + 8

    # mid-epoch 0, with the loader one batch ahead of the consumer
    first = make()
    part = _run(first, schedule, stop=4)
    resumed = make()
    resumed.load_state_dict(_reload(first.state_dict(consumed_batches=3)))
    resumed.set_epoch(0)
    assert part[:3] + _drain(resumed) + _drain(resumed) + _drain(resumed) == ref

    # at the end of epoch 0 (resumes at epoch 1) and in the middle of epoch 1
    for consumed_in_epoch_1 in (0, 5):
        first = make()
        part = _run(first, schedule)
        it = iter(first)
        part += [next(it) for _ in range(consumed_in_epoch_1)]
        if consumed_in_epoch_1:
            next(it)  # prefetched, not consumed
            state = first.state_dict(consumed_batches=consumed_in_epoch_1)
        else:
            state = first.state_dict(consumed_batches=9)  # taken after epoch 0's last batch
            part = part[:9]
        resumed = make()
        resumed.load_state_dict(_reload(state))
        resumed.set_epoch(1)
        assert part + _drain(resumed) + _drain(resumed) == ref


def test_wrapped_distributed_sampler_is_sharded_per_rank():
    data = list(range(30))
    ranks = [
        AdaptiveBatchSampler(
            DistributedSampler(data, num_replicas=2, rank=r, shuffle=True, seed=4),
            batch_size=4,
            num_replicas=2,
            rank=r,
        )
        for r in range(2)
    ]
    for s in ranks:
        s.set_batch_size(8, from_batch=1)
    assert len(ranks[0]) == len(ranks[1]) == 5
    per_rank = [_drain(s) for s in ranks]
    # each rank batches its own DistributedSampler sequence: 2, then 4 per step (15 = 2+4+4+4+1)
    for r, batches in enumerate(per_rank):
        ds = DistributedSampler(data, num_replicas=2, rank=r, shuffle=True, seed=4)
        assert [i for b in batches for i in b] == list(ds)
        assert [len(b) for b in batches] == [2, 4, 4, 4, 1]
    assert len(ranks[0]) == 4  # all handed out: the next epoch's plan, 15 at 4 per rank
    with pytest.raises(ValueError, match="rank=1"):
        AdaptiveBatchSampler(
            DistributedSampler(data, num_replicas=2, rank=1), batch_size=4, num_replicas=2, rank=0
        )


class _PythonRandomSampler(Sampler[int]):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __iter__(self):
        import random

        return iter(random.sample(range(self.n), self.n))


class _Endless(Sampler[int]):
    def __iter__(self):
        while True:
            yield 0


def test_unreplayable_or_endless_samplers_and_shuffle_are_refused():
    s = AdaptiveBatchSampler(_PythonRandomSampler(50), batch_size=5)
    with pytest.raises(ValueError, match="_PythonRandomSampler gives different indices"):
        s.check_reproducible()
    AdaptiveBatchSampler(_weighted(torch.Generator().manual_seed(0)), 4).check_reproducible()
    with pytest.raises(ValueError, match="finite sampler with __len__"):
        AdaptiveBatchSampler(_Endless(), batch_size=4)
    with pytest.raises(ValueError, match="shuffle=True cannot be combined"):
        AdaptiveBatchSampler(_weighted(), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="wrapped sampler 'WeightedRandomSampler'"):
        AdaptiveBatchSampler(60, batch_size=4).load_state_dict(
            AdaptiveBatchSampler(_weighted(), batch_size=4).state_dict()
        )


def test_len_is_the_planned_batches_and_shrinks_when_the_batch_grows():
    s = AdaptiveBatchSampler(100, batch_size=10, seed=0)
    loader = DataLoader(_Indices(), batch_sampler=s)
    assert len(loader) == 10
    it = iter(loader)
    next(it), next(it)
    s.set_batch_size(30, from_batch=3)
    # 3 batches of 10, then 30, 30 and a last one of 10
    assert len(loader) == s.num_batches() == 6
    assert s.position(3) == 30 and s.position(5) == 90
    assert len(list(it)) == 4
    # a consumer that trusts len() stops after the last batch without asking for another: the
    # sampler knows the epoch is over, and its length is already the next epoch's at size 30
    assert len(loader) == 4
    for epoch in (1, 2):
        it = iter(loader)
        batches = [next(it) for _ in range(len(loader))]  # never asks past the end
        assert s.epoch == epoch and sum(len(b) for b in batches) == 100


def test_a_wrapped_sampler_gives_every_rank_its_share_of_one_global_batch():
    def make(world, rank):
        s = AdaptiveBatchSampler(_weighted(), batch_size=4, seed=5, num_replicas=world, rank=rank)
        s.set_batch_size(8, from_batch=2)
        return s

    single = _drain(make(1, 0))
    per_rank = [_drain(make(2, r)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == len(single)
    for k, global_batch in enumerate(single):
        assert per_rank[0][k] + per_rank[1][k] == global_batch  # 60 = 4 + 4 + 8·6 + 4: no pad
