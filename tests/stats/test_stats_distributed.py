"""Two gloo processes: the global statistics equal the single-process ones on the whole batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaptive.stats import GradientStatistics, per_sample_gradients, reference_statistics

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

WORKER = Path(__file__).with_name("ddp_worker_stats.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close(got, want, rtol=1e-4):
    got, want = got.double(), want.double()
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    assert err <= rtol, f"relative error {err:.2e}"


@pytest.mark.ddp
def test_two_rank_statistics_equal_single_process(models, tmp_path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), "2", str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out.decode()[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))

    make_model, data_for = models
    model, loss_fn = make_model("block")
    x, y = data_for("block", 12, seed=4)
    gids = torch.arange(12) % 3
    # single process, the whole batch as four accumulated micro-batches of 3
    stats = GradientStatistics(model, num_groups=3, per_coordinate=True)
    for k in range(4):
        sl = slice(3 * k, 3 * k + 3)
        with stats.capture(group_ids=gids[sl]):
            (loss_fn(model(x[sl]), y[sl]) / 4).backward()
    single = stats.result()
    ref = reference_statistics(per_sample_gradients(model, loss_fn, x, y))

    for res in (r0, r1):
        assert res["batch_size"] == 12 and res["world_size"] == 2
        for n in ("sum_sq_norms", "grad_sq_norm", "variance", "noise_scale"):
            close(res[n], ref[n])
        # pooled inner-product estimates: same four micro-batches, so same numbers
        for n in (
            "inner_product_variance",
            "orthogonality_variance",
            "group_counts",
            "group_sum_sq_norms",
        ):
            close(res[n], getattr(single, n))
        for n, v in res["coordinate_sq_sums"].items():
            close(v, ref["coordinate_sq_sums"][n])
            close(res["mean_grads"][n], ref["mean_grads"][n])
            close(res["grads"][n], ref["mean_grads"][n])  # DDP's averaged .grad is ḡ too
    for n in ("variance", "inner_product_variance"):
        assert torch.equal(r0[n], r1[n])  # identical on every rank
    local = torch.cat([r0["per_sample_sq_norms"], r1["per_sample_sq_norms"]])
    close(local, ref["per_sample_sq_norms"])
