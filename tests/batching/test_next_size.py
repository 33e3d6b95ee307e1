"""The batch-size rule and the micro-batch / accumulation split."""

from __future__ import annotations

import math

import pytest
import torch

from adaptive.batching import BatchPlan, next_batch_size, plan_batch


def _rule(current, proposed, b_max, multiple):
    # min(b_max, ⌈max(b_k, b̂)⌉), rounded up to the multiple, cap rounded down to it
    cap = (b_max // multiple) * multiple
    b = math.ceil(max(current, proposed))
    b = ((b + multiple - 1) // multiple) * multiple
    return max(current, min(b, cap))


@pytest.mark.parametrize(
    ("current", "proposed", "b_max", "multiple"),
    [
        (64, 100.2, 4096, 8),
        (64, 10.0, 4096, 8),
        (64, 5000.0, 4096, 8),
        (30, 31.0, 1000, 4),
        (16, 16.0, 16, 1),
        (8, 9.5, 100, 3),
        (2, 1e12, 60000, 2),
    ],
)
def test_rule_matches_formula(current, proposed, b_max, multiple):
    got = next_batch_size(current, torch.tensor(proposed), b_max, multiple)
    assert got == _rule(current, proposed, b_max, multiple)
    assert got % multiple == 0 or got == current


def test_never_shrinks_and_special_values():
    assert next_batch_size(128, torch.tensor(3.0), 4096, 8) == 128
    assert next_batch_size(128, torch.tensor(float("inf")), 4096, 8) == 4096
    assert next_batch_size(128, torch.tensor(float("nan")), 4096, 8) == 128
    assert next_batch_size(128, 129.0, 4100, 8) == 136
    assert next_batch_size(128, 5000.0, 4100, 8) == 4096  # cap rounded down to the multiple


def test_rule_errors_name_the_argument():
    with pytest.raises(ValueError, match="current=5000 exceeds max_batch_size=4096"):
        next_batch_size(5000, 1.0, 4096)
    with pytest.raises(TypeError, match="multiple_of"):
        next_batch_size(8, 1.0, 4096, multiple_of=2.0)
    with pytest.raises(ValueError, match="max_batch_size=4 is smaller than multiple_of=8"):
        next_batch_size(4, 1.0, 4, multiple_of=8)


def test_plan_batch_accumulates_past_micro_limit():
    assert plan_batch(96, world_size=2, max_micro_batch_size=64) == BatchPlan(48, 1, 2)
    plan = plan_batch(1000, world_size=2, max_micro_batch_size=128)
    # per rank 500 → 4 micro-batches of 128: 128·2·4 = 1024 ≥ 1000
    assert plan == BatchPlan(128, 4, 2)
    assert plan.global_batch_size == 1024
    assert plan_batch(256, 1, 128) == BatchPlan(128, 2, 1)
    with pytest.raises(ValueError, match="not a multiple of world_size=2"):
        plan_batch(7, world_size=2)
