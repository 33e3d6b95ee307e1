"""GrowableMixtureSampler: mixture draws in batches whose size grows, resumable exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adaptive.mixture import GrowableMixtureSampler


def _drain(sampler, n=None):
    out = []
    for batch in sampler:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def test_growable_mixture_sampler_sizes_weights_and_budget():
    s = GrowableMixtureSampler([50, 30, 20], [1, 1, 2], batch_size=4, num_samples=100, seed=3)
    s.set_batch_size(8, from_batch=3)
    s.set_batch_size(16, from_batch=6)
    assert len(s) == 3 + 3 + 3 + 1  # 12 + 24 + 48 = 84, then 16 of 100
    batches = _drain(s)
    assert [len(b) for b in batches] == [4, 4, 4, 8, 8, 8, 16, 16, 16, 16]
    assert sum(len(b) for b in batches) == 100  # the epoch is the budget; the last batch short
    # sources follow the weights (1:1:2) and items never repeat before a source is used up
    src = np.array([p[0] for b in batches for p in b])
    assert abs((src == 2).mean() - 0.5) < 0.15
    for k, n in enumerate([50, 30, 20]):
        items = [p[1] for b in batches for p in b if p[0] == k]
        first = items[:n]
        assert len(set(first)) == len(first) and all(0 <= i < n for i in items)
    # weights set mid-epoch reach the next batch drawn
    s2 = GrowableMixtureSampler([50, 30, 20], [1, 1, 1], batch_size=40, num_samples=400)
    it = iter(s2)
    next(it)
    s2.set_weights([0, 0, 1])
    assert all(p[0] == 2 for p in next(it))
    with pytest.raises(ValueError, match="sizes"):
        GrowableMixtureSampler([5, 0], [1, 1], batch_size=2, num_samples=10)


def test_growable_mixture_sampler_rolls_back_to_the_consumed_batch():
    def fresh():
        return GrowableMixtureSampler([40, 25, 33], [1, 1, 1], 6, num_samples=240, seed=1)

    ref = fresh()
    it = iter(ref)
    seen = [next(it) for _ in range(4)]
    ref.set_weights([0.7, 0.2, 0.1])
    ref.set_batch_size(12, from_batch=6)
    seen += [next(it) for _ in range(3)]  # batches 4..6; say the loop consumed only 5
    state = ref.state_dict(consumed_batches=5)
    assert state == ref.state_dict(consumed=5)  # DynamicMixture's count (over epochs) agrees
    ref.set_weights([0.1, 0.1, 0.8])  # after the checkpoint: batches 7.. use these
    seen += list(it)
    other = fresh()
    other.load_state_dict(json.loads(json.dumps(state)))  # survives a plain serialisation
    other.set_weights([0.1, 0.1, 0.8])
    resumed = list(other)
    assert resumed == seen[5:]
    assert [len(b) for b in resumed] == [6] + [12] * 17  # batch 5, then 6.. at the new size
    assert sum(len(b) for b in seen) == 240
