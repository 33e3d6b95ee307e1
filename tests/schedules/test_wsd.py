"""WSD and linear decay against formulas written out here; batch-size independence."""

import math

import pytest
import torch

from adaptive.schedules import LinearDecayScheduler, WSDScheduler

PEAK = 0.2
W, D, N = 300, 400, 2000


def opt_():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=PEAK)


def warm(shape, p, k=1.0):
    return {
        "linear": p,
        "cosine": 0.5 * (1 - math.cos(math.pi * p)),
        "1-sqrt": 1 - math.sqrt(1 - p),
        "exponential": (math.exp(-k * (1 - p)) - math.exp(-k)) / (1 - math.exp(-k)),
    }[shape]


def dec(shape, p, m, k=1.0):
    unit = {
        "linear": 1 - p,
        "cosine": 0.5 * (1 + math.cos(math.pi * p)),
        "1-sqrt": 1 - math.sqrt(p),
        "exponential": (math.exp(-k * p) - math.exp(-k)) / (1 - math.exp(-k)),
    }[shape]
    return m + (1 - m) * unit


def expected(n, ws, ds, m, k=1.0):
    if n < W:
        return PEAK * warm(ws, n / W, k)
    if n < N - D:
        return PEAK
    return PEAK * dec(ds, min((n - (N - D)) / D, 1.0), m, k)


@pytest.mark.parametrize("ws", ["linear", "cosine", "1-sqrt", "exponential"])
@pytest.mark.parametrize("ds", ["linear", "cosine", "1-sqrt", "exponential"])
def test_values_at_chosen_points(ws, ds):
    opt = opt_()
    s = WSDScheduler(
        opt, W, D, N, warmup_shape=ws, decay_shape=ds, min_lr_ratio=0.05, decay_rate=3.0
    )
    seen = 0
    for target in [0, 75, 150, 300, 900, 1600, 1700, 1900, 2000, 2100]:
        while seen < target:
            opt.step()
            s.step(samples=25)
            seen += 25
        assert s.get_last_lr()[0] == pytest.approx(expected(seen, ws, ds, 0.05, 3.0), abs=1e-14)
    assert s.get_last_lr()[0] == pytest.approx(0.05 * PEAK)


def test_continuous_at_phase_boundaries():
    s = WSDScheduler(opt_(), W, D, N, warmup_shape="cosine", decay_shape="cosine")
    for edge in (W, N - D):
        assert s.lr_at(edge - 1e-7)[0] == pytest.approx(s.lr_at(edge)[0], rel=1e-6)
    assert s.lr_at(0)[0] == 0.0 and s.lr_at(N)[0] == pytest.approx(0.0, abs=1e-15)


def test_same_samples_different_batch_sequences_same_lr():
    opt1, opt2 = opt_(), opt_()
    s1 = WSDScheduler(opt1, W, D, N)
    s2 = WSDScheduler(opt2, W, D, N)
    seq1 = [10] * 170  # 1700 samples
    seq2 = [1, 99, 50, 250, 300, 400, 600]  # 1700 samples, wildly varying
    for b in seq1:
        opt1.step()
        s1.step(samples=b)
    for b in seq2:
        opt2.step()
        s2.step(samples=b)
    assert s1.samples_seen == s2.samples_seen == 1700
    assert s1.get_last_lr() == s2.get_last_lr()
    assert s1.get_last_lr()[0] == pytest.approx(PEAK * (1 - math.sqrt(0.25)))


def test_linear_decay_formula():
    opt = opt_()
    s = LinearDecayScheduler(opt, total_tokens=1000, warmup_tokens=100, min_lr_ratio=0.0)
    for n in [0, 50, 100, 400, 999, 1000, 5000]:
        want = PEAK * n / 100 if n < 100 else PEAK * max(1 - (n - 100) / 900, 0.0)
        assert s.lr_at(n)[0] == pytest.approx(want, abs=1e-15)


@pytest.mark.parametrize(
    ("args", "kw", "match"),
    [
        ((-1, 10, 100), {}, "warmup_tokens must be >= 0"),
        ((10, -1, 100), {}, "decay_tokens must be >= 0"),
        ((200, 0, 100), {}, "warmup_tokens=200 is longer than total_tokens"),
        ((50, 60, 100), {}, "exceeds total_tokens"),
        ((0, 0, 0), {}, "total_tokens must be > 0"),
        ((10, 10, 100), {"warmup_shape": "quadratic"}, "warmup_shape='quadratic'"),
        ((10, 10, 100), {"min_lr_ratio": -0.1}, "min_lr_ratio must be in"),
    ],
)
def test_bad_arguments(args, kw, match):
    with pytest.raises(ValueError, match=match):
        WSDScheduler(opt_(), *args, **kw)
    with pytest.raises(ValueError, match="warmup_tokens=20 is longer than total_tokens"):
        LinearDecayScheduler(opt_(), total_tokens=10, warmup_tokens=20)
