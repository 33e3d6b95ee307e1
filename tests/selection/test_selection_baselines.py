"""Uniform, high-loss and RHO-LOSS selectors and per_sample_loss against written-out references."""

from __future__ import annotations

import math

import pytest
import torch

from adaptive.selection import HighLossSelector, RhoLossSelector, UniformSelector, per_sample_loss


def test_per_sample_loss_classes_and_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, generator=g)
    labels = torch.tensor([0, 3, 1, 4])
    ref = [
        -logits[i, labels[i]] + math.log(sum(math.exp(v) for v in logits[i].tolist()))
        for i in range(4)
    ]
    torch.testing.assert_close(per_sample_loss(logits, labels), torch.tensor(ref))
    tok = torch.randn(3, 6, 7, generator=g)
    lab = torch.randint(0, 7, (3, 6), generator=g)
    lab[0, 4:] = -100
    lab[2, :] = -100
    ref = []
    for i in range(3):
        terms = [
            float(torch.logsumexp(tok[i, t], 0) - tok[i, t, lab[i, t]])
            for t in range(6)
            if lab[i, t] != -100
        ]
        ref.append(sum(terms) / len(terms) if terms else 0.0)
    torch.testing.assert_close(per_sample_loss(tok, lab), torch.tensor(ref))
    shifted = per_sample_loss(tok, lab, shift=True)
    torch.testing.assert_close(shifted, per_sample_loss(tok[:, :-1], lab[:, 1:]))
    with pytest.raises(ValueError, match="labels for"):
        per_sample_loss(logits, labels[:2])


def test_high_loss_and_rho_are_the_bruteforce_topk():
    g = torch.Generator().manual_seed(1)
    losses, holdout = torch.rand(16, generator=g), torch.rand(16, generator=g)
    assert HighLossSelector(5)(losses).tolist() == sorted(range(16), key=lambda i: -losses[i])[:5]
    red = [float(losses[i] - holdout[i]) for i in range(16)]
    assert (
        RhoLossSelector(5)(losses, holdout).tolist() == sorted(range(16), key=lambda i: -red[i])[:5]
    )
    assert HighLossSelector(20)(losses).shape == (16,)  # fewer candidates than k: keep all
    with pytest.raises(ValueError, match="holdout_losses has shape"):
        RhoLossSelector(5)(losses, holdout[:3])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        HighLossSelector(2)(losses.view(4, 4))


def test_uniform_is_seeded_distinct_and_resumable(tmp_path):
    sel = UniformSelector(4, seed=7)
    draws = [sel(10) for _ in range(3)]
    g = torch.Generator().manual_seed(7)
    assert [d.tolist() for d in draws] == [
        torch.randperm(10, generator=g)[:4].tolist() for _ in range(3)
    ]
    assert all(len(set(d.tolist())) == 4 for d in draws)
    torch.save(sel.state_dict(), tmp_path / "u.pt")
    nxt = sel(10)
    other = UniformSelector(4, seed=7)
    other.load_state_dict(torch.load(tmp_path / "u.pt", weights_only=True))
    assert other(10).tolist() == nxt.tolist()
    with pytest.raises(ValueError, match="k must be a positive int"):
        UniformSelector(-1)
