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
