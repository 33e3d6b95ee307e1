"""LAMB, LARS and AdaGrad-Norm on FSDP2-sharded parameters (two gloo processes, CPU).

Each rank shards a small model with ``torch.distributed.fsdp.fully_shard`` (parameters become
DTensors, split along dimension 0; the last layer's 3 rows split unevenly, 2 + 1) and trains it
on its half of a batch of 8; FSDP2 reduce-scatters the mean gradient. The same optimizer on an
unsharded copy, trained on the whole batch in the same process, is the reference: after three
steps the gathered parameters (and AdaGrad-Norm's accumulator) must agree to float32 round-off.
The trust ratios of LAMB and LARS use the norms of whole tensors, and AdaGrad-Norm's step size
the norm of the whole gradient, so a rank that used only its own shards would disagree.

LAMB is checked on its reference path (``foreach=False``) and with its defaults, which must send
DTensor groups to the reference path (the fast path works on flat local memory: an uneven shard
fails to flatten, and on CPU a ResNet's shards came out non-finite before the routing).
"""

from __future__ import annotations

import json
import textwrap

import pytest

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from adaptive.optim import AdaGradNorm, Lamb, Lars, param_groups_for
    from tests.gloo_worker import finish

    torch.set_num_threads(1)
    rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)

    def make(classes):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 10), nn.LayerNorm(10), nn.Tanh(),
                             nn.Linear(10, classes))

    CASES = {
        "lamb_reference": (lambda g: Lamb(g, lr=0.05, foreach=False), 3),
        # the default (fast) path must route DTensor groups to the reference path, also with
        # CPU cache pieces smaller than a shard
        "lamb_default": (lambda g: Lamb(g, lr=0.05, cpu_block=8), 3),
        "lars_fast": (lambda g: Lars(g, lr=0.5, weight_decay=0.01), 3),
        "lars_reference": (lambda g: Lars(g, lr=0.5, weight_decay=0.01, foreach=False), 3),
        "adagrad_norm_fast": (lambda g: AdaGradNorm(g, lr=0.1), 3),
        "adagrad_norm_reference": (lambda g: AdaGradNorm(g, lr=0.1, foreach=False), 3),
    }
    result = {}
    for name, (build, classes) in CASES.items():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(8, 6, generator=g)
        y = torch.randint(0, classes, (8,), generator=g)
        ref, sharded, start = make(classes), make(classes), make(classes)
        for m in (sharded[0], sharded[3]):
            fully_shard(m)
        fully_shard(sharded)
        opt_ref = build(param_groups_for(ref, weight_decay=0.1))
        opt = build(param_groups_for(sharded, weight_decay=0.1))
        mine = slice(4 * rank, 4 * rank + 4)
        for _ in range(3):
            opt_ref.zero_grad()
            nn.functional.cross_entropy(ref(x), y).backward()
            opt_ref.step()
            opt.zero_grad()
            nn.functional.cross_entropy(sharded(x[mine]), y[mine]).backward()
            opt.step()
        pairs = list(zip(sharded.parameters(), ref.parameters(), start.parameters()))
        result[name] = {
            "dtensor": all(type(p).__name__ == "DTensor" for p, _, _ in pairs),
            "error": max((p.full_tensor() - q).abs().max().item() for p, q, _ in pairs),
            "moved": max((q - s).abs().max().item() for _, q, s in pairs),
        }
        if isinstance(opt, AdaGradNorm):
            result[name]["b_squared"] = [opt.b_squared.item(), opt_ref.b_squared.item()]
    json.dump(result, open(f"{out}/rank{rank}.json", "w"))
    finish()
    """
)


@pytest.mark.ddp
def test_sharded_steps_equal_unsharded_steps(tmp_path, run_two_ranks):
    script = tmp_path / "fsdp_optim_worker.py"
    script.write_text(WORKER)
    run_two_ranks(lambda r, port: [str(script), str(r), port, str(tmp_path)])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) == 6
    for res in ranks:
        for name, r in res.items():
            assert r["dtensor"], name
            assert r["moved"] > 1e-2, f"{name}: the reference did not train"
            # lamb_default: the unsharded run takes the fast path, the sharded one the reference
            tol = 1e-5 if name == "lamb_default" else 1e-6
            assert r["error"] < tol, f"{name}: sharded and unsharded steps differ by {r['error']}"
            if "b_squared" in r:  # b² = b0² + Σ_t ‖g_t‖² of the whole gradient
                assert r["b_squared"][0] == pytest.approx(r["b_squared"][1], rel=1e-6)
