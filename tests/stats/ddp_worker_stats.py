"""One rank of the two-process gloo test in test_stats_distributed.py (run as a script)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from adaptive.stats import GradientStatistics
from tests.gloo_worker import finish

HERE = Path(__file__).parent


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("stats_models", HERE / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    model, loss_fn = mod.make_model("block")
    x, y = mod.data_for("block", 12, seed=4)
    gids = torch.arange(12) % 3
    ddp = DistributedDataParallel(model)
    stats = GradientStatistics(ddp, num_groups=3, per_coordinate=True)
    # rank r holds samples [6r, 6r+6) as two micro-batches of 3, accumulated with no_sync.
    lo = 6 * rank
    for k in range(2):
        sl = slice(lo + 3 * k, lo + 3 * k + 3)
        ctx = ddp.no_sync() if k == 0 else torch.enable_grad()
        with ctx, stats.capture(group_ids=gids[sl]):
            (loss_fn(ddp(x[sl]), y[sl]) / 2).backward()
    s = stats.result()
    # again with the norm statistics alone: the fused layers go through the compiled CPU
    # kernel where it is built (per-coordinate sums above keep them on the torch code)
    model2, _ = mod.make_model("block")
    ddp2 = DistributedDataParallel(model2)
    stats2 = GradientStatistics(ddp2, inner_products=False)
    for k in range(2):
        sl = slice(lo + 3 * k, lo + 3 * k + 3)
        ctx = ddp2.no_sync() if k == 0 else torch.enable_grad()
        with ctx, stats2.capture():
            (loss_fn(ddp2(x[sl]), y[sl]) / 2).backward()
    s2 = stats2.result()
    norms_only = {
        n: getattr(s2, n)
        for n in ("per_sample_sq_norms", "sum_sq_norms", "grad_sq_norm", "variance", "noise_scale")
    }
    norms_only["grads"] = {n: p.grad for n, p in model2.named_parameters()}
    torch.save(
        {
            "norms_only": norms_only,
            "batch_size": s.batch_size,
            "world_size": s.world_size,
            "per_sample_sq_norms": s.per_sample_sq_norms,
            **{
                n: getattr(s, n)
                for n in (
                    "sum_sq_norms",
                    "grad_sq_norm",
                    "variance",
                    "noise_scale",
                    "inner_product_variance",
                    "orthogonality_variance",
                    "group_counts",
                    "group_sum_sq_norms",
                )
            },
            "coordinate_sq_sums": s.coordinate_sq_sums,
            "mean_grads": s.mean_grads,
            "grads": {n: p.grad for n, p in model.named_parameters()},
        },
        f"{out}/rank{rank}.pt",
    )
    finish()


if __name__ == "__main__":
    main()
