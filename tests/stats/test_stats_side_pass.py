"""A component's own forward/backward inside ``side_pass()`` is invisible to every attached
sensor, so two consumers in one Trainer (growth and mixture influence) see the same numbers in
either order."""

from __future__ import annotations

import copy
import types

import torch

from adaptive.stats import (
    GradientStatistics,
    per_sample_gradients,
    reference_statistics,
    side_pass,
)


def rel(got, want):
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


def test_a_side_pass_is_not_captured(models):
    make_model, data_for = models
    for kind in ("cnn", "block"):
        model, loss_fn = make_model(kind)
        x, y = data_for(kind, 6, seed=1)
        side_x, side_y = data_for(kind, 4, seed=2)  # another batch size: would be refused
        stats = GradientStatistics(model)
        with stats.capture():
            with side_pass():  # e.g. a target gradient on validation data
                torch.autograd.grad(loss_fn(model(side_x), side_y), list(model.parameters()))
            model.zero_grad()
            loss_fn(model(x), y).backward()
        s = stats.result()
        ref = reference_statistics(per_sample_gradients(model, loss_fn, x, y))
        assert rel(s.per_sample_sq_norms, ref["per_sample_sq_norms"]) < 1e-4
        assert rel(s.grad_sq_norm, ref["grad_sq_norm"]) < 1e-4
        assert rel(s.inner_product_variance, ref["inner_product_variance"]) < 1e-4


def test_the_mixture_target_pass_leaves_another_sensor_alone(models):
    """DynamicMixture's target direction is computed while the growth sensor may already be
    attached (callbacks in that order): the growth sensor's numbers equal a lone sensor's."""
    from adaptive.callbacks.dynamic_mixture import DynamicMixture

    make_model, data_for = models
    model, loss_fn = make_model("cnn")
    lone_model = copy.deepcopy(model)
    x, y = data_for("cnn", 6, seed=3)
    vx, vy = data_for("cnn", 5, seed=4)
    growth = GradientStatistics(model)
    holder = types.SimpleNamespace(target_loss=lambda m: loss_fn(m(vx), vy))
    with growth.capture():
        direction = DynamicMixture._target_direction(holder, model)
        loss_fn(model(x), y).backward()
    lone = GradientStatistics(lone_model)
    with lone.capture():
        loss_fn(lone_model(x), y).backward()
    a, b = growth.result(), lone.result()
    assert torch.allclose(a.per_sample_sq_norms, b.per_sample_sq_norms, rtol=1e-5)
    assert torch.allclose(a.variance, b.variance, rtol=1e-5)
    # and the direction is the validation gradient, written out with autograd
    want = torch.autograd.grad(loss_fn(lone_model(vx), vy), list(lone_model.parameters()))
    for (n, _), g in zip(model.named_parameters(), want, strict=True):
        assert rel(direction[n], g) < 1e-5
