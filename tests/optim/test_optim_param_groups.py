"""param_groups_for: which parameters decay and adapt, checked on torchvision's ResNet-18."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from adaptive.optim import Lamb, param_groups_for


def test_resnet18_groups():
    model = torchvision.models.resnet18(weights=None)
    groups = param_groups_for(model, weight_decay=0.05)
    decay, plain = groups
    assert decay["weight_decay"] == 0.05 and decay["adapt"] is True
    assert plain["weight_decay"] == 0.0 and plain["adapt"] is False
    # 20 conv weights + fc weight decay; 20 BN weights + 20 BN biases + fc bias do not
    assert len(decay["params"]) == 21
    assert len(plain["params"]) == 41
    assert {id(p) for p in decay["params"]} == {
        id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    }
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )


def test_exclude_regex_frozen_and_shared():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied
    model = nn.Sequential(emb, nn.LayerNorm(4), nn.Linear(4, 4), head)
    model[2].weight.requires_grad_(False)
    groups = param_groups_for(model, weight_decay=0.1, exclude=[r"^0\."])
    assert len(groups) == 1  # nothing left to decay: embedding excluded, linear frozen
    plain = groups[0]["params"]
    assert [id(p) for p in plain].count(id(emb.weight)) == 1
    assert all(p.requires_grad for p in plain)
    with pytest.raises(TypeError, match="exclude must be a sequence"):
        param_groups_for(model, exclude="bias")
    with pytest.raises(ValueError, match=r"weight_decay must be in \[0.0, inf\), got -1.0"):
        param_groups_for(model, weight_decay=-1.0)


def test_groups_drive_lamb():
    """The plain group takes the plain Adam-style step (no decay, ratio 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    opt = Lamb(param_groups_for(model, weight_decay=0.1), lr=0.1)
    model(torch.randn(8, 3)).square().mean().backward()
    bias0 = model[0].bias.detach().clone()
    g = model[0].bias.grad.clone()
    opt.step()
    # step 1 of Adam with bias correction: m_hat/(sqrt(v_hat)+eps) = g/(|g|+eps), ratio 1, no decay
    torch.testing.assert_close(model[0].bias.detach(), bias0 - 0.1 * g / (g.abs() + 1e-6))
