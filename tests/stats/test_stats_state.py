"""GradientStatistics.state_dict: captures interrupted by a checkpoint resume to the same result."""

from __future__ import annotations

import io

import pytest
import torch

from adaptive.stats import GradientStatistics, per_sample_gradients, reference_statistics


def test_captures_resume_through_a_checkpoint(models):
    make_model, data_for = models
    model, loss_fn = make_model("cnn")
    x, y = data_for("cnn", 9, seed=2)
    gids = torch.arange(9) % 3
    target = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    parts = [slice(0, 3), slice(3, 6), slice(6, 9)]

    def sensor():
        return GradientStatistics(model, per_coordinate=True, num_groups=3)

    first = sensor()
    first.set_target(target)
    for sl in parts[:2]:
        with first.capture(group_ids=gids[sl]):
            (loss_fn(model(x[sl]), y[sl]) / 3).backward()
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = sensor()
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    with resumed.capture(group_ids=gids[parts[2]]):
        (loss_fn(model(x[parts[2]]), y[parts[2]]) / 3).backward()
    got = resumed.result()
    ref = reference_statistics(
        per_sample_gradients(model, loss_fn, x, y), target=target, group_ids=gids, num_groups=3
    )
    for n in ("sum_sq_norms", "grad_sq_norm", "variance", "group_grad_dots", "group_sum_sq_norms"):
        want = ref[n]
        assert float((getattr(got, n).double() - want).abs().max() / want.abs().max()) < 1e-4, n
    for n, v in got.coordinate_sq_sums.items():
        assert torch.allclose(v.double(), ref["coordinate_sq_sums"][n], rtol=1e-4, atol=1e-9)
    with pytest.raises(RuntimeError, match="while attached"):
        resumed.attach(group_ids=gids[:3])
        resumed.state_dict()
    resumed.detach()
