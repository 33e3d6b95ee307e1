"""Refinement (arXiv 2310.07831) against the formula written out here."""

import numpy as np
import pytest
import torch

from adaptive.schedules import RefinedScheduler, load_grad_norms, refine_schedule


def opt_(lr=0.3):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_constant_norms_give_linear_decay():
    g = [2.5] * 101
    for kind in ("sgd", "adam"):
        sched = refine_schedule(g, kind, filter_fraction=0.1)
        np.testing.assert_allclose(sched, 1 - np.arange(101) / 100, rtol=0, atol=1e-12)
    s = RefinedScheduler(opt_(), torch.full((51,), 0.7), total_tokens=5000)
    for n in [0, 1, 1234, 2500, 4999, 5000, 7000]:
        assert s.lr_at(n)[0] == pytest.approx(0.3 * max(1 - n / 5000, 0.0), abs=1e-12)


def test_small_history_by_hand_sgd_and_adam():
    g = [1.0, 2.0, 4.0, 2.0]
    # SGD: w = G^-2 = [1, 1/4, 1/16, 1/4]; η_t = w_t Σ_{p>t} w_p
    w = [1.0, 0.25, 0.0625, 0.25]
    eta = [w[0] * (w[1] + w[2] + w[3]), w[1] * (w[2] + w[3]), w[2] * w[3], 0.0]
    np.testing.assert_allclose(refine_schedule(g, "sgd", 0.0), np.array(eta) / max(eta))
    # Adam: w = G^-1 = [1, 1/2, 1/4, 1/2]
    w = [1.0, 0.5, 0.25, 0.5]
    eta = [w[0] * (w[1] + w[2] + w[3]), w[1] * (w[2] + w[3]), w[2] * w[3], 0.0]
    np.testing.assert_allclose(refine_schedule(g, "adam", 0.0), np.array(eta) / max(eta))


def test_median_filter_removes_spikes():
    g = np.ones(40)
    g[[5, 17, 30]] = 100.0  # isolated spikes: a width-5 median filter removes them
    np.testing.assert_allclose(refine_schedule(g, "sgd", 0.125), 1 - np.arange(40) / 39, atol=1e-12)
    assert not np.allclose(refine_schedule(g, "sgd", 0.0), 1 - np.arange(40) / 39)


def test_interpolation_over_token_budget():
    g = [1.0, 2.0, 4.0, 2.0]
    table = refine_schedule(g, "sgd", 0.0)
    s = RefinedScheduler(opt_(1.0), g, total_tokens=300, filter_fraction=0.0)
    # history position x = n / 300 * 3; n = 150 -> x = 1.5, halfway between entries 1 and 2
    assert s.lr_at(150)[0] == pytest.approx(0.5 * (table[1] + table[2]))
    assert s.lr_at(0)[0] == pytest.approx(1.0)
    opt = s.optimizer
    for b in (60, 40, 50):
        opt.step()
        s.step(samples=b)
    assert s.get_last_lr()[0] == pytest.approx(0.5 * (table[1] + table[2]))


def test_csv_with_header_and_plain(tmp_path):
    norms = [3.0, 2.0, 2.5, 1.0, 1.5]
    p = tmp_path / "log.csv"
    p.write_text(
        "step,grad_norm,loss\n" + "".join(f"{i},{g},{9 - i}\n" for i, g in enumerate(norms))
    )
    np.testing.assert_array_equal(load_grad_norms(p), norms)
    np.testing.assert_array_equal(load_grad_norms(p, column="loss"), [9, 8, 7, 6, 5])
    q = tmp_path / "plain.csv"
    q.write_text("\n".join(str(g) for g in norms) + "\n")
    np.testing.assert_array_equal(load_grad_norms(q), norms)
    # Lightning CSVLogger layout: metrics logged on separate rows leave blank cells
    lightning_csv = tmp_path / "metrics.csv"
    lightning_csv.write_text(
        "epoch,grad_stats/batch_size,grad_stats/grad_norm,step,train_loss\n"
        + "".join(f"0,128,{g},{i},\n0,,,{i},{2.0 - i / 10}\n" for i, g in enumerate(norms))
    )
    np.testing.assert_array_equal(load_grad_norms(lightning_csv), norms)
    s = RefinedScheduler(opt_(), p, total_tokens=100, filter_fraction=0.0)
    np.testing.assert_allclose(s.schedule, refine_schedule(norms, "sgd", 0.0))


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"entry 2 is 0\.0"):
        refine_schedule([1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="entry 1 is nan"):
        refine_schedule([1.0, float("nan")])
    with pytest.raises(ValueError, match=">= 2 steps"):
        refine_schedule([1.0])
    with pytest.raises(ValueError, match="optimizer='lion'"):
        refine_schedule([1.0, 2.0], "lion")
    with pytest.raises(ValueError, match="total_tokens must be >= 0"):
        RefinedScheduler(opt_(), [1.0, 2.0], total_tokens=-5)
    p = tmp_path / "two.csv"
    p.write_text("a,b\n1,2\n3,4\n")
    with pytest.raises(ValueError, match="no column named"):
        load_grad_norms(p)
    with pytest.raises(ValueError, match="column='c' is not in the header"):
        load_grad_norms(p, column="c")
