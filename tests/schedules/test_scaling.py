"""Batch-size scaling rules against their formulas."""

import math

import pytest
import torch

from adaptive.schedules import adascale_gain, lr_scale_factor, scale_lr


def test_rules():
    assert lr_scale_factor(512, 128, "none") == 1.0
    assert lr_scale_factor(512, 128, "linear") == 4.0
    assert lr_scale_factor(512, 128, "sqrt") == 2.0
    assert scale_lr(0.1, 96, 32, "sqrt") == pytest.approx(0.1 * math.sqrt(3))
    assert scale_lr(0.1, 96, 32, "adascale", gain=2.5) == pytest.approx(0.25)


def test_adascale_gain_formula_and_limits():
    var, mu2, s = 3.0, 1.0, 4.0
    assert adascale_gain(var, mu2, s) == pytest.approx((3 + 1) / (3 / 4 + 1))
    assert adascale_gain(0.0, 2.0, 8.0) == 1.0  # no noise: no gain
    assert adascale_gain(5.0, 0.0, 8.0) == 8.0  # pure noise: gain S (linear scaling)
    assert adascale_gain(0.0, 0.0, 8.0) == 1.0
    t = adascale_gain(torch.tensor([3.0, 0.0, 5.0]), torch.tensor([1.0, 2.0, 0.0]), 4.0)
    torch.testing.assert_close(t, torch.tensor([4 / 1.75, 1.0, 4.0]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="rule='cubic' is not a scaling rule"):
        lr_scale_factor(2, 1, "cubic")
    with pytest.raises(ValueError, match="base_batch_size must be a positive"):
        lr_scale_factor(2, 0, "linear")
    with pytest.raises(ValueError, match="needs gain="):
        scale_lr(0.1, 2, 1, "adascale")
    with pytest.raises(ValueError, match="scale must be >= 1"):
        adascale_gain(1.0, 1.0, 0.5)
