"""Resumption of sample-clocked schedules: mid-warmup and mid-decay, also via a saved file."""

import pytest
import torch

from adaptive.schedules import (
    LinearDecayScheduler,
    PowerScheduler,
    RefinedScheduler,
    WSDScheduler,
)

BATCHES = [13, 40, 7, 64, 22, 31, 5, 90, 48, 16] * 12  # 3,624 samples, varying every step


def build(kind):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(4))], lr=0.1)
    if kind == "power":
        s = PowerScheduler(
            opt,
            a=0.02,
            b=-0.5,
            warmup_tokens=500,
            decay_tokens=1500,
            total_tokens=3600,
            decay_shape="exponential",
            min_lr_ratio=0.01,
        )
    elif kind == "wsd":
        s = WSDScheduler(opt, 500, 1500, 3600, warmup_shape="cosine", decay_shape="1-sqrt")
    elif kind == "linear":
        s = LinearDecayScheduler(opt, total_tokens=3600, warmup_tokens=500)
    else:
        s = RefinedScheduler(opt, [3.0, 2.0, 1.5, 1.0, 1.2, 0.9, 0.8, 0.7], total_tokens=3600)
    return opt, s


def drive(opt, s, batches):
    out = []
    for b in batches:
        opt.step()
        s.step(samples=b, tokens=3 * b)
        out.append(s.get_last_lr()[0])
    return out


@pytest.mark.parametrize("kind", ["power", "wsd", "linear", "refined"])
@pytest.mark.parametrize("cut", [4, 40])  # 4 steps: 372 tokens (warmup); 40: 4,464 (decay)
def test_resume_equals_uninterrupted(kind, cut, tmp_path):
    opt, full = build(kind)
    reference = drive(opt, full, BATCHES)

    opt_a, first = build(kind)
    head = drive(opt_a, first, BATCHES[:cut])
    tokens_at_cut = 3 * sum(BATCHES[:cut])
    if cut == 4:
        assert tokens_at_cut < 500  # inside the warmup
    else:
        assert 3600 - 1500 <= tokens_at_cut  # past the decay start
    path = tmp_path / "sched.pt"
    torch.save(first.state_dict(), path)
    state = torch.load(path, weights_only=True)

    opt_b, resumed = build(kind)
    resumed.load_state_dict(state)
    assert opt_b.param_groups[0]["lr"] == head[-1]  # optimizer runs at the restored lr
    tail = drive(opt_b, resumed, BATCHES[cut:])
    assert head + tail == reference
    assert resumed.state_dict() == full.state_dict()


def test_power_resume_mid_decay_in_tokens():
    # the cut at 40 steps lies in the decay for the power scheduler's token clock
    opt, s = build("power")
    drive(opt, s, BATCHES[:40])
    assert 2100 <= s.tokens_seen
    assert s.last_batch_samples == BATCHES[39]


def test_consume_then_step_equals_step_with_amounts():
    opt1, s1 = build("power")
    opt2, s2 = build("power")
    for b in BATCHES[:30]:
        opt1.step()
        s1.step(samples=b, tokens=3 * b)
        opt2.step()
        half = b // 2  # two micro-batches make up the step (all batches here are >= 5)
        s2.consume(half, 3 * half)
        s2.consume(b - half, 3 * (b - half))
        s2.step()
        assert s2.get_last_lr() == s1.get_last_lr()
    assert s1.tokens_seen == s2.tokens_seen


def test_stepping_twice_is_caught():
    opt, s = build("wsd")
    opt.step()
    s.step(samples=8)
    with pytest.raises(RuntimeError, match="stepped twice"):
        s.step()


def test_load_rejects_foreign_state():
    _, s = build("wsd")
    with pytest.raises(ValueError, match="lacks clock entries"):
        s.load_state_dict({"last_epoch": 3})


def test_lr_scale_applies_now_and_persists():
    opt, s = build("wsd")
    drive(opt, s, [250] * 4)  # 3000 tokens, in the decay
    before = s.get_last_lr()[0]
    s.set_lr_scale(2.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(2 * before)
    opt.step()
    s.step(samples=10, tokens=30)
    # WSD(500, 1500, 3600), 1-sqrt decay: p = (3030 - 2100) / 1500, lr = 0.1 (1 - sqrt p), x2
    assert s.get_last_lr()[0] == pytest.approx(2 * 0.1 * (1 - (930 / 1500) ** 0.5), rel=1e-12)
    with pytest.raises(ValueError, match="scale must be a positive"):
        s.set_lr_scale(0.0)
