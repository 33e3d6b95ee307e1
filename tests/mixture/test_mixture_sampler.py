"""MixtureSampler / MixtureDataset: frequencies, weight changes, resume, ranks, bad input."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

from adaptive.mixture import MixtureDataset, MixtureSampler

# Chi-square goodness-of-fit tests reject at p < ALPHA: for a sampler that draws exactly
# Multinomial(n, w), a test fails with probability ALPHA per seed (10⁻⁴ here).
ALPHA = 1e-4


def source_counts(batches, k):
    flat = [s for b in batches for s, _ in b]
    return np.bincount(flat, minlength=k)


def chi_square_p(counts, weights):
    expected = np.asarray(weights, dtype=float) / np.sum(weights) * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a zero-weight source was drawn"
    return stats.chisquare(counts[keep], expected[keep]).pvalue


def test_frequencies_follow_weights_chi_square():
    w = [0.5, 0.3, 0.15, 0.05]
    sampler = MixtureSampler([100, 50, 20, 7], w, batch_size=64, seed=3, num_batches=200)
    counts = source_counts(list(sampler), 4)
    assert counts.sum() == 200 * 64
    assert chi_square_p(counts, w) > ALPHA
    # and the test has power: the same counts are far from the uniform mixture
    assert chi_square_p(counts, [1, 1, 1, 1]) < 1e-100


def test_weight_change_takes_effect_from_next_batch_and_frequencies_follow():
    w1, w2 = [0.7, 0.2, 0.1], [0.1, 0.0, 0.9]
    sampler = MixtureSampler([30, 40, 50], w1, batch_size=50, seed=11, num_batches=200)
    it = iter(sampler)
    first = [next(it) for _ in range(100)]
    sampler.set_weights(w2)
    second = list(it)
    assert len(second) == 100
    assert chi_square_p(source_counts(first, 3), w1) > ALPHA
    assert chi_square_p(source_counts(second, 3), w2) > ALPHA
    # one-hot weights: the very next batch is all from that source
    sampler2 = MixtureSampler([30, 40, 50], w1, batch_size=50, seed=11, num_batches=3)
    it2 = iter(sampler2)
    next(it2)
    sampler2.set_weights([0, 1, 0])
    assert {s for s, _ in next(it2)} == {1}


def test_each_source_is_a_permutation_before_repeating():
    sizes = [13, 7, 29]
    sampler = MixtureSampler(sizes, [1, 1, 1], batch_size=8, seed=0, num_batches=60)
    per_source: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for batch in sampler:
        for s, i in batch:
            per_source[s].append(i)
    for s, n in enumerate(sizes):
        seq = per_source[s]
        assert len(seq) >= 2 * n
        for p in range(len(seq) // n):
            assert sorted(seq[p * n : (p + 1) * n]) == list(range(n)), (s, p)


def test_unnormalised_weights_are_normalised():
    a = MixtureSampler([5, 5], [2, 6], batch_size=4, seed=1)
    b = MixtureSampler([5, 5], [0.25, 0.75], batch_size=4, seed=1)
    assert torch.allclose(a.weights, torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert list(a) == list(b)


@pytest.mark.parametrize(
    "weights, match",
    [
        ([1, -1, 1], "non-negative"),
        ([1, float("nan"), 1], "finite"),
        ([1, float("inf"), 1], "finite"),
        ([1, 1], "one entry per source"),
        ([0, 0, 0], "positive sum"),
    ],
)
def test_bad_weights_are_rejected(weights, match):
    with pytest.raises(ValueError, match=match):
        MixtureSampler([3, 3, 3], weights, batch_size=4)
    sampler = MixtureSampler([3, 3, 3], [1, 1, 1], batch_size=4)
    with pytest.raises(ValueError, match=match):
        sampler.set_weights(weights)


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="source 1 is empty"):
        MixtureSampler([3, 0, 3], [1, 1, 1], batch_size=4)
    with pytest.raises(ValueError, match="at least one source"):
        MixtureSampler([], [], batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        MixtureSampler([3], [1], batch_size=0)
    with pytest.raises(ValueError, match="divisible"):
        MixtureSampler([3], [1], batch_size=5, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="rank"):
        MixtureSampler([3], [1], batch_size=4, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="is empty"):
        MixtureDataset([[1, 2], []], names=["a", "b"])


def run_with_changes(sampler, changes, count):
    """Draw ``count`` batches, applying ``changes[step]`` weights before batch ``step``."""
    out = []
    it = iter(sampler)
    for step in range(count):
        if step in changes:
            sampler.set_weights(changes[step])
        try:
            out.append(next(it))
        except StopIteration:
            it = iter(sampler)
            out.append(next(it))
    return out


def test_resume_mid_epoch_is_exact_across_epochs():
    make = lambda: MixtureSampler([11, 5, 23], [1, 2, 3], batch_size=6, seed=7, num_batches=5)  # noqa: E731
    changes = {2: [0.6, 0.2, 0.2], 7: [0.1, 0.1, 0.8]}
    full = run_with_changes(make(), changes, 12)

    first = make()
    part = run_with_changes(first, {2: changes[2]}, 4)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = make()
    resumed.load_state_dict(state)
    rest = run_with_changes(resumed, {7 - 4: changes[7]}, 8)
    assert part + rest == full


def test_rollback_to_consumed_batches_replays_their_weights():
    """A loader fetched batches 4 and 5 ahead; a checkpoint at 4 consumed draws them again."""
    make = lambda: MixtureSampler([9, 9, 9], [1, 1, 1], batch_size=6, seed=2, num_batches=50)  # noqa: E731
    ref = make()
    it = iter(ref)
    drawn = [next(it) for _ in range(5)]
    ref.set_weights([0, 0, 1])  # decided after batch 4 was drawn
    drawn.append(next(it))  # batch 5 uses the new weights
    state = ref.state_dict(consumed=4)
    drawn += [next(it) for _ in range(3)]

    resumed = make()
    resumed.load_state_dict(state)
    again = list(zip(range(5), iter(resumed), strict=False))
    assert [b for _, b in again] == drawn[4:9]
    assert {s for s, _ in drawn[5]} == {2}
    with pytest.raises(ValueError, match="outside the batches"):
        ref.state_dict(consumed=10_000)


def test_ranks_take_contiguous_shares_of_the_same_global_batch():
    global_batches = list(MixtureSampler([10, 20], [0.3, 0.7], batch_size=8, seed=5, num_batches=6))
    shards = [
        list(
            MixtureSampler(
                [10, 20], [0.3, 0.7], batch_size=8, seed=5, num_replicas=2, rank=r, num_batches=6
            )
        )
        for r in range(2)
    ]
    for g, a, b in zip(global_batches, *shards, strict=True):
        assert len(a) == len(b) == 4
        assert a + b == g


def test_mixture_dataset_tags_sources_and_collates():
    a = TensorDataset(torch.arange(5.0).view(5, 1))
    b = [torch.tensor([100.0 + i]) for i in range(3)]
    ds = MixtureDataset([a, b], names=["a", "b"])
    assert ds.sizes == [5, 3] and len(ds) == 8
    sampler = MixtureSampler(ds.sizes, [1, 1], batch_size=4, seed=0, num_batches=3)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=lambda items: items)
    for items in loader:
        for item, source in items:
            value = (item[0] if source == 0 else item).item()
            assert (value < 100) == (source == 0)
    with pytest.raises(TypeError, match="pairs"):
        ds[3]


def test_mixture_dataset_with_huggingface_sources():
    datasets = pytest.importorskip("datasets")
    a = datasets.Dataset.from_dict({"x": [0.0, 1.0, 2.0]})
    b = datasets.Dataset.from_dict({"x": [10.0, 11.0]})
    ds = MixtureDataset([a, b])
    loader = DataLoader(
        ds, batch_sampler=MixtureSampler(ds.sizes, [1, 1], batch_size=5, num_batches=2)
    )
    items, sources = next(iter(loader))
    assert sources.dtype == torch.int64 and sources.shape == (5,)
    assert torch.equal(items["x"] >= 10, sources == 1)


DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    from adaptive.mixture import MixtureSampler

    def work(rank, port, out):
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=2)
        s = MixtureSampler([7, 13, 5], [0.2, 0.5, 0.3], batch_size=6, seed=9, num_batches=8)
        batches = []
        for step, b in enumerate(s):
            batches.append(b)
            if step == 3:
                s.set_weights([0.9, 0.05, 0.05])
        state = {"batches": batches, "weights": s.weights.tolist()}
        json.dump(state, open(f"{out}/{rank}.json", "w"))
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(work, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2)
    """
)


@pytest.mark.ddp
def test_ddp_ranks_draw_shares_of_one_global_batch(tmp_path):
    import json
    import socket

    script = tmp_path / "ddp_sampler.py"
    script.write_text(DDP_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    subprocess.run([sys.executable, str(script), str(port), str(tmp_path)], check=True, timeout=300)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2))
    assert r0["weights"] == r1["weights"]
    single = MixtureSampler([7, 13, 5], [0.2, 0.5, 0.3], batch_size=6, seed=9, num_batches=8)
    expected = run_with_changes(single, {4: [0.9, 0.05, 0.05]}, 8)
    for g, a, b in zip(expected, r0["batches"], r1["batches"], strict=True):
        assert [tuple(p) for p in a] + [tuple(p) for p in b] == g
