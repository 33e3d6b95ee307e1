"""PowerScheduler against the formula of arXiv 2408.13359 written out here."""

import math

import pytest
import torch

from adaptive.schedules import PowerScheduler

A, B, LR_MAX = 0.05, -0.5, 0.1
W, D, N = 1000, 2000, 10000


def make(**kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=LR_MAX)
    args = dict(a=A, b=B, warmup_tokens=W, decay_tokens=D, total_tokens=N)
    args.update(kw)
    return opt, PowerScheduler(opt, **args)


def power(n, beta):
    return min(LR_MAX, beta * A * n**B)


def expected(n, beta, shape="exponential", m=0.0, k=1.0):
    if n < W:
        return n / W * power(W, beta)
    if n < N - D:
        return power(n, beta)
    p = min((n - (N - D)) / D, 1.0)
    if shape == "exponential":
        unit = (math.exp(-k * p) - math.exp(-k)) / (1 - math.exp(-k))
    elif shape == "linear":
        unit = 1 - p
    elif shape == "1-sqrt":
        unit = 1 - math.sqrt(p)
    else:
        unit = 0.5 * (1 + math.cos(math.pi * p))
    return power(N - D, beta) * (m + (1 - m) * unit)


def run(sched, opt, batches, tokens_per_sample=1):
    lrs = []
    for b in batches:
        opt.step()
        sched.step(samples=b, tokens=b * tokens_per_sample)
        lrs.append(sched.get_last_lr()[0])
    return lrs


def test_starts_at_zero_in_warmup_and_at_lr_max_without_warmup():
    _, sched = make()
    assert sched.get_last_lr() == [0.0]
    _, sched = make(warmup_tokens=0)
    assert sched.get_last_lr() == [LR_MAX]


@pytest.mark.parametrize("shape", ["exponential", "linear", "1-sqrt", "cosine"])
def test_values_across_warmup_stable_decay(shape):
    opt, sched = make(decay_shape=shape, min_lr_ratio=0.1)
    # constant batch 50 reaching chosen points: 500 (warmup), 1000 (boundary), 4000 (stable,
    # below the cap), 8000 (decay start), 9000 (mid decay), 10000 (end), 10500 (after)
    seen = 0
    for target in [500, 1000, 4000, 8000, 9000, 10000, 10500]:
        while seen < target:
            opt.step()
            sched.step(samples=50)
            seen += 50
        got = sched.get_last_lr()[0]
        assert got == pytest.approx(expected(seen, 50, shape, m=0.1), rel=1e-12, abs=1e-15)
    # at 4000 tokens, β=50: 50·0.05·4000^-0.5 = 0.0395 < lr_max, so the power law is active
    assert power(4000, 50) == pytest.approx(2.5 / math.sqrt(4000))


def test_continuous_at_boundaries():
    _, sched = make(decay_shape="linear")
    beta = 40
    eps = 1e-6
    for edge in (W, N - D):
        below = sched.lr_at(edge - eps, beta)[0]
        above = sched.lr_at(edge, beta)[0]
        assert below == pytest.approx(above, rel=1e-6)
    assert sched.lr_at(N, beta)[0] == pytest.approx(0.0, abs=1e-15)


def test_batch_dependence_follows_formula_when_batch_changes_every_step():
    opt, sched = make()
    batches = [7, 30, 11, 64, 3, 50, 128, 9, 200, 17, 90] * 60
    seen = 0
    for b in batches:
        opt.step()
        sched.step(samples=b)
        seen += b
        assert sched.get_last_lr()[0] == pytest.approx(expected(seen, b), rel=1e-12, abs=1e-15)
    assert sched.tokens_seen == sum(batches)
    assert sched.last_batch_samples == batches[-1]


def test_same_tokens_different_batch_sequences_scale_with_last_beta():
    # two runs reaching 4000 samples, one ending on a batch of 25 and one on 100:
    # in the stable phase the lr must be in the ratio 25 : 100 (η ∝ β below the cap)
    opt1, s1 = make()
    opt2, s2 = make()
    run(s1, opt1, [25] * 160)
    run(s2, opt2, [100] * 39 + [100])
    assert s1.tokens_seen == s2.tokens_seen == 4000
    assert s2.get_last_lr()[0] / s1.get_last_lr()[0] == pytest.approx(4.0, rel=1e-12)


def test_tokens_clock_differs_from_samples():
    opt, sched = make()
    run(sched, opt, [10] * 30, tokens_per_sample=16)  # 300 samples, 4800 tokens
    assert sched.samples_seen == 300 and sched.tokens_seen == 4800
    assert sched.get_last_lr()[0] == pytest.approx(expected(4800, 10), rel=1e-12)


def test_param_groups_keep_their_ratio():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p1], "lr": LR_MAX}, {"params": [p2], "lr": LR_MAX / 10}])
    sched = PowerScheduler(opt, a=A, b=B, warmup_tokens=W, decay_tokens=D, total_tokens=N)
    run(sched, opt, [50] * 80)
    lr0, lr1 = sched.get_last_lr()
    assert lr0 == pytest.approx(expected(4000, 50), rel=1e-12)
    assert lr1 == pytest.approx(lr0 / 10, rel=1e-12)


def test_explicit_lr_max_sets_group_zero_exactly():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = PowerScheduler(
        opt, a=A, b=B, lr_max=LR_MAX, warmup_tokens=W, decay_tokens=D, total_tokens=N
    )
    run(sched, opt, [50] * 80)
    assert sched.get_last_lr()[0] == pytest.approx(expected(4000, 50), rel=1e-12)
    assert sched.lr_at(W, 50)[0] == pytest.approx(50 * A * W**B)  # 0.079, below the cap
    assert sched.lr_at(W, 200)[0] == pytest.approx(LR_MAX)  # 0.316 capped at lr_max


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(b=0.0), "b must be < 0"),
        (dict(b=0.3), "b must be < 0"),
        (dict(a=0.0), "a must be > 0"),
        (dict(a=-1.0), "a must be > 0"),
        (dict(warmup_tokens=-5), "warmup_tokens must be >= 0"),
        (dict(decay_tokens=-1), "decay_tokens must be >= 0"),
        (dict(warmup_tokens=20000), "exceeds total_tokens"),
        (dict(warmup_tokens=9000, decay_tokens=2000), "exceeds total_tokens"),
        (dict(total_tokens=None), "needs total_tokens"),
        (dict(decay_shape="step"), "decay_shape='step' is not a known shape"),
        (dict(min_lr_ratio=1.5), "min_lr_ratio must be in"),
        (dict(lr_max=0.0), "lr_max must be a positive"),
        (dict(decay_rate=0.0), "decay_rate must be > 0"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_bad_step_amounts():
    _, sched = make()
    with pytest.raises(ValueError, match="samples must be > 0, got -3"):
        sched.step(samples=-3)
    with pytest.raises(ValueError, match="tokens must be > 0, got -1"):
        sched.step(samples=3, tokens=-1)
    with pytest.raises(TypeError, match="samples must be a Python int"):
        sched.step(samples=torch.tensor(3))
    with pytest.raises(ValueError, match="needs samples="):
        sched.step(tokens=10)
    with pytest.raises(RuntimeError, match="no samples consumed"):
        sched.step()
