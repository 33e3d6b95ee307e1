"""The statistics sensor on FSDP2-sharded models: two gloo processes equal one process.

Each rank shards a model of ``conftest.py`` with ``torch.distributed.fsdp.fully_shard`` (every
module with parameters, then the root; parameters become DTensors) and captures its 6 samples of
a 12-sample batch as two accumulated micro-batches of 3 (gradient sync off for the first, as
``no_sync`` under DDP). The per-sample norms come from each layer's whole weights, which FSDP
gathers for the forward, and ``‖ḡ‖²`` from the whole per-rank gradients, all-reduced: so every
statistic must equal the single-process one on the whole batch (torch.func per-sample gradients
for the exact statistics, the same four micro-batches for the pooled inner-product estimates).
FSDP1 (``FullyShardedDataParallel``), whose flat parameters mix layers, is refused by name (FSDP1
needs an accelerator even to wrap a model, so that test builds the wrapper bare).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from adaptive.stats import (
    GradientStatistics,
    UnsupportedModuleError,
)

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

HERE = Path(__file__).parent

WORKER = textwrap.dedent(
    """
    import importlib.util, sys
    import torch, torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from adaptive.stats import GradientStatistics
    from tests.gloo_worker import finish

    rank, port, out, conftest = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("stats_models", conftest)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    results = {}
    for kind in ("block", "cnn"):
        model, loss_fn = mod.make_model(kind)
        for sub in model.modules():
            if sub is not model and any(True for _ in sub.parameters(recurse=False)):
                fully_shard(sub)
        fully_shard(model)
        x, y = mod.data_for(kind, 12, seed=4)
        gids = torch.arange(12) % 3
        stats = GradientStatistics(model, num_groups=3, per_coordinate=True)
        lo = 6 * rank
        for k in range(2):
            sl = slice(lo + 3 * k, lo + 3 * k + 3)
            model.set_requires_gradient_sync(k == 1)
            with stats.capture(group_ids=gids[sl]):
                (loss_fn(model(x[sl]), y[sl]) / 2).backward()
        s = stats.result()
        results[kind] = {
            "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters()),
            "batch_size": s.batch_size,
            "per_sample_sq_norms": s.per_sample_sq_norms,
            "coordinate_sq_sums": s.coordinate_sq_sums,
            "mean_grads": s.mean_grads,
            "grads": {n: p.grad.full_tensor() for n, p in model.named_parameters()},
            **{
                n: getattr(s, n)
                for n in (
                    "sum_sq_norms", "grad_sq_norm", "variance", "noise_scale",
                    "inner_product_variance", "orthogonality_variance", "group_counts",
                    "group_sum_sq_norms",
                )
            },
        }
    torch.save(results, f"{out}/rank{rank}.pt")
    finish()
    """
)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, two_ranks):
    out = tmp_path_factory.mktemp("fsdp_stats")
    script = out / "fsdp_stats_worker.py"
    script.write_text(WORKER)
    run, _ = two_ranks
    conftest = str(HERE / "conftest.py")
    run(lambda r, port: [str(script), str(r), port, str(out), conftest])
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.ddp
@pytest.mark.parametrize("kind", ["block", "cnn"])
def test_sharded_statistics_equal_single_process(ranks, kind, two_ranks):
    r0, r1 = ranks[0][kind], ranks[1][kind]
    assert r0["sharded"] and r1["sharded"]
    two_ranks[1](r0, r1, kind)  # FSDP's reduced gradient is ḡ too


def test_fsdp1_is_refused_by_name():
    """FSDP1 needs an accelerator to wrap a model, so the wrapper here is built bare: the
    refusal depends only on finding it among the modules."""
    from torch import nn
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapper = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    nn.Module.__init__(wrapper)
    model = nn.Sequential(nn.Linear(3, 2), wrapper)
    with pytest.raises(UnsupportedModuleError, match=r"module '1' is wrapped in Fully"):
        GradientStatistics(model)
