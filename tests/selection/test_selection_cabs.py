"""CABS-DM / CABS-FM against a small case worked out by hand; the sampler's layout and resume."""

from __future__ import annotations

import pytest
import torch

from adaptive.selection import CABSSampler, concept_targets, diversity_select, frequency_select

# positions 0..5 of a super-batch; concepts a=0, b=1, c=2, d=3 (first appearance order)
SETS = [[0, 1], [0], [2], [0, 2], [3], [1, 3]]


def test_targets_and_frequencies_by_hand():
    targets, freq = concept_targets(SETS, keep=3)
    # K=4 concepts, keep=3: floor(3/4)=0, the first 3 concepts get +1, the last is clamped to 1
    assert targets == {0: 1, 1: 1, 2: 1, 3: 1}
    assert freq == {0: 3, 1: 2, 2: 2, 3: 2}
    targets, _ = concept_targets(SETS, keep=10, cap=2)
    assert targets == {0: 2, 1: 2, 2: 2, 3: 2}  # 10/4 = 2 rem 2 -> 3,3,2,2, capped at 2


def test_diversity_greedy_by_hand():
    # gains at n=0: g_c = (t-n)/t + 1/F_c: a 1+1/3, b,c,d 1+1/2
    #   h = [1.4167, 1.3333, 1.5, 1.4167, 1.5, 1.5] -> pick 2 (tie with 4, 5: earliest)
    # c saturated (-1/2): h3 = (4/3 - 1/2)/2 = 0.4167 -> pick 4 (tie with 5)
    # d saturated: h5 = (3/2 - 1/2)/2 = 0.5 -> max is h0 = 1.4167 -> pick 0
    assert diversity_select(SETS, keep=3) == [2, 4, 0]
    # frequency: most distinct concepts first, ties by position
    assert frequency_select(SETS, keep=3) == [0, 3, 5]


def test_diversity_cap_fills_shortfall_at_random():
    # cap=1, keep=4: 2, 4, 0 as above; then 1 (a), 3 (a, c), 5 (b, d) all hit the cap
    gen = torch.Generator().manual_seed(11)
    expected_fill = [1, 3, 5][torch.randperm(3, generator=torch.Generator().manual_seed(11))[0]]
    assert diversity_select(SETS, keep=4, cap=1, generator=gen) == [2, 4, 0, expected_fill]


def test_samples_without_concepts_and_duplicates():
    sets = [[], [0, 0, 0], [1]]
    # duplicates count once: FM ties 1 and 2 by position; the empty sample has gain 0
    assert frequency_select(sets, keep=2) == [1, 2]
    assert diversity_select(sets, keep=2) == [1, 2]


def _concepts(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        [
            f"w{int(c)}"
            for c in torch.randint(
                0, 12, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g
            )
        ]
        for _ in range(n)
    ]


def test_sampler_layout_determinism_and_replicas():
    concepts = _concepts()
    sampler = CABSSampler(concepts, batch_size=4, filter_ratio=0.8, mode="diversity", seed=3)
    assert sampler.super_batch_size == 20 and len(sampler) == 3
    batches = list(sampler)
    order = torch.randperm(60, generator=torch.Generator().manual_seed(3)).tolist()
    ids = {c: i for i, c in enumerate(sampler.concept_names)}
    sets = [[ids[c] for c in concepts[i]] for i in order[:20]]
    assert batches[0] == [order[p] for p in diversity_select(sets, 4)]
    again = CABSSampler(concepts, batch_size=4, filter_ratio=0.8, mode="diversity", seed=3)
    assert list(again) == batches
    assert list(sampler) != batches  # epoch 1 reshuffles
    shares = [
        list(CABSSampler(concepts, 4, 0.8, "diversity", 3, num_replicas=2, rank=r)) for r in (0, 1)
    ]
    for j, kept in enumerate(batches):
        assert shares[0][j] == kept[0::2] and shares[1][j] == kept[1::2]


def test_sampler_resumes_mid_epoch(tmp_path):
    concepts = _concepts(100, seed=1)
    full = CABSSampler(concepts, batch_size=5, filter_ratio=0.5, mode="frequency", seed=0)
    ref = list(full) + list(full)  # two epochs
    part = CABSSampler(concepts, batch_size=5, filter_ratio=0.5, mode="frequency", seed=0)
    it = iter(part)
    head = [next(it) for _ in range(4)]
    torch.save(part.state_dict(), tmp_path / "cabs.pt")
    resumed = CABSSampler(concepts, batch_size=5, filter_ratio=0.5, mode="frequency", seed=0)
    resumed.load_state_dict(torch.load(tmp_path / "cabs.pt", weights_only=True))
    assert head + list(resumed) + list(resumed) == ref


def test_sampler_bad_arguments():
    concepts = _concepts()
    with pytest.raises(ValueError, match=r"filter_ratio=1.0 must lie in \[0, 1\)"):
        CABSSampler(concepts, 4, filter_ratio=1.0)
    with pytest.raises(ValueError, match="mode='size'"):
        CABSSampler(concepts, 4, mode="size")
    with pytest.raises(ValueError, match="needs at least that many samples"):
        CABSSampler(concepts, 40, filter_ratio=0.5)
    with pytest.raises(ValueError, match="divisible by num_replicas=3"):
        CABSSampler(concepts, 4, num_replicas=3)
    with pytest.raises(TypeError, match=r"concepts\[0\] must be an iterable"):
        CABSSampler(["cat", "dog"] * 20, 4)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        CABSSampler(concepts, 0)
