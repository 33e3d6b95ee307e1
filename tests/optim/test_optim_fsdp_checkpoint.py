"""Lamb, Lars and AdaGradNorm on FSDP2 through torch.distributed.checkpoint (two gloo processes).

The way Lightning's ModelParallel strategy checkpoints: ``get_optimizer_state_dict`` /
``get_model_state_dict``, ``dcp.save`` to a directory, then a fresh sharded model and optimizer
``dcp.load`` it and ``set_*_state_dict``. Two steps, a checkpoint, two more steps must give the
parameters of four uninterrupted steps, bit for bit. AdaGradNorm used to fail at the first call
(``KeyError: 'global'``: its accumulator sat under a string key in ``optimizer.state``).
"""

from __future__ import annotations

import json
import textwrap

import pytest

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard
    from adaptive.optim import AdaGradNorm, Lamb, Lars, param_groups_for
    from tests.gloo_worker import finish

    torch.set_num_threads(1)
    rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)

    def make(seed=0):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(6, 10), nn.LayerNorm(10), nn.Tanh(), nn.Linear(10, 3))
        for sub in (m[0], m[3]):
            fully_shard(sub)
        fully_shard(m)
        return m

    CASES = {
        "lamb_reference": lambda g: Lamb(g, lr=0.05, foreach=False),
        "lamb_default": lambda g: Lamb(g, lr=0.05),
        "lars": lambda g: Lars(g, lr=0.5, weight_decay=0.01),
        "adagrad_norm": lambda g: AdaGradNorm(g, lr=0.1),
    }
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=gen)
    y = torch.randint(0, 3, (8,), generator=gen)
    mine = slice(4 * rank, 4 * rank + 4)

    def train(m, opt, n):
        for _ in range(n):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x[mine]), y[mine]).backward()
            opt.step()

    result = {}
    for name, build in CASES.items():
        ref, start = make(), make()
        opt_ref = build(param_groups_for(ref, weight_decay=0.1))
        train(ref, opt_ref, 4)
        m = make()
        opt = build(param_groups_for(m, weight_decay=0.1))
        train(m, opt, 2)
        osd = get_optimizer_state_dict(m, opt)
        ckpt = f"{out}/{name}"
        dcp.save({"model": get_model_state_dict(m), "optim": osd}, checkpoint_id=ckpt)
        m2 = make(seed=5)
        opt2 = build(param_groups_for(m2, weight_decay=0.1))
        target = {"model": get_model_state_dict(m2), "optim": get_optimizer_state_dict(m2, opt2)}
        dcp.load(target, checkpoint_id=ckpt)
        set_model_state_dict(m2, target["model"])
        set_optimizer_state_dict(m2, opt2, target["optim"])
        train(m2, opt2, 2)
        pairs = list(zip(ref.parameters(), m2.parameters(), start.parameters()))
        result[name] = {
            "error": max((p.full_tensor() - q.full_tensor()).abs().max().item()
                         for p, q, _ in pairs),
            "moved": max((p.full_tensor() - s.full_tensor()).abs().max().item()
                         for p, _, s in pairs),
            "state_keys": sorted({k for st in osd["state"].values() for k in st}),
        }
    json.dump(result, open(f"{out}/rank{rank}.json", "w"))
    finish()
    """
)


@pytest.mark.ddp
def test_fsdp2_distributed_checkpoint_resumes_bit_for_bit(tmp_path, run_two_ranks):
    script = tmp_path / "fsdp_dcp_worker.py"
    script.write_text(WORKER)
    run_two_ranks(lambda r, port: [str(script), str(r), port, str(tmp_path)])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    keys = {
        "lamb_reference": ["exp_avg", "exp_avg_sq", "step"],
        "lamb_default": ["exp_avg", "exp_avg_sq", "step"],
        "lars": ["momentum_buffer"],
        "adagrad_norm": ["b_squared"],
    }
    for res in ranks:
        assert res.keys() == keys.keys()
        for name, r in res.items():
            assert r["moved"] > 1e-2, name
            assert r["error"] == 0.0, f"{name}: resumed run differs by {r['error']}"
            assert r["state_keys"] == keys[name], name
