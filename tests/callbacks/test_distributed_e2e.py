"""End to end on two gloo processes: real Trainers with the adaptive callbacks together.

Two ranks (launched as torchrun would: ``LOCAL_RANK`` + ``MASTER_PORT``, DDP on gloo, CPU) and a
single-process reference run the fits of ``ddp_worker_e2e.py``:

- adaptive batch growth + online selection (UDS) + sample clock (power schedule), and
  dynamic mixture (DoReMi) + online selection (high loss) + sample clock: every rank must hold
  the same batch-size decisions, selector memory, mixture weights, schedule clock and weights;
  each rank trains on its own ``k`` of its own share of every global batch.
- adaptive batch growth + sample clock, and dynamic mixture + sample clock: the global batches
  are the single process's batches split in two, the gradients are the same global means and
  the statistics are all-reduced, so the decisions, the clock, the weights and the parameters
  must equal the single-process run (to float32 round-off).

Per-rank selection keeps ``k`` of each rank's own candidates, which is not the same set as the
top ``2k`` of the whole global batch; so the selection fits are compared across ranks only.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
WORKER = HERE / "ddp_worker_e2e.py"
ROOT = HERE.parents[1]
LAUNCHER = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER}
    base.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    port = str(_free_port())
    procs = []
    for rank, world in ((0, 2), (1, 2), (0, 1)):
        env = dict(base)
        if world == 2:
            env.update(LOCAL_RANK=str(rank), NODE_RANK="0", MASTER_ADDR="127.0.0.1")
            env.update(MASTER_PORT=port, WORLD_SIZE="2")
        cmd = [sys.executable, str(WORKER), str(rank), str(world), str(out)]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    for p in procs:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log.decode()[-4000:]

    def load(fit: str, rank: int, world: int) -> dict:
        return torch.load(out / f"{fit}_rank{rank}_of{world}.pt", weights_only=False)

    return load


def _same_params(a: dict, b: dict, rtol: float = 0.0, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol, msg=n)


@pytest.mark.ddp
def test_growth_and_selection_agree_across_ranks(runs):
    r0, r1 = runs("growth_selection", 0, 2), runs("growth_selection", 1, 2)
    assert r0["history"] == r1["history"] and len(r0["history"]) >= 3
    # sizes count the kept samples (2 of each rank's 4 candidates at the start: 4 global)
    sizes = [h[0] for h in r0["history"]]
    assert sizes[0] == 4 and sizes[-1] > 8, "the batch never grew"
    # min(b_max, ⌈max(b, b̂)⌉) in multiples of 2 ranks, then of 8 = 2 ranks x the kept
    # micro-batch capped at 4 (max_micro_batch_size counts kept samples)
    for current, new, proposed in r0["history"]:
        unit = 8 if current // 2 >= 4 else 2
        request = min(64, max(current, unit * -(-proposed // unit)))
        # past the cap the kept micro-batch stays 4 per rank and the accumulation grows
        per_rank = request // 2
        assert new == (request if per_rank <= 4 else min(64, 8 * -(-per_rank // 4)))
    assert r0["accumulation"] == r1["accumulation"] > 1
    # UDS memory: every rank pushed the kept sketches of both ranks, in rank order
    m0, m1 = r0["memory"], r1["memory"]
    assert m0["count"] == m1["count"] > 0 and m0["ptr"] == m1["ptr"]
    assert torch.equal(m0["memory"], m1["memory"])
    # each rank kept half its candidates per micro-batch (2 of 4, growing with the pool to 4 of
    # 8); the two ranks' picks are disjoint
    pairs = list(zip(r0["trained_ids"], r1["trained_ids"], strict=True))
    assert all(len(a) == len(b) and not set(a) & set(b) for a, b in pairs)
    assert len(pairs[0][0]) == 2 and max(len(a) for a, _ in pairs) == 4
    kept = sum(len(a) for a, _ in pairs)
    assert r0["samples_trained"] == r1["samples_trained"] == 2 * kept
    assert r0["samples_scored"] == 2 * r0["samples_trained"]
    # the clock counts what was trained on, summed over ranks; both callbacks agree
    assert r0["clock"] == r1["clock"]
    assert r0["clock"]["samples"] == r0["grow_samples"] == r0["samples_trained"]
    _same_params(r0["params"], r1["params"])  # DDP keeps the replicas bit-identical


@pytest.mark.ddp
def test_mixture_and_selection_agree_across_ranks(runs):
    r0, r1 = runs("mixture_selection", 0, 2), runs("mixture_selection", 1, 2)
    assert len(r0["weights"]) == 1 + 8 // 2  # the initial weights, then one update per 2 steps
    assert r0["weights"] == r1["weights"]
    assert torch.equal(r0["sampler_weights"], r1["sampler_weights"])
    assert max(r0["weights"][-1]) > 1 / 3 + 1e-3  # the weights moved, identically
    assert r0["samples_trained"] == r1["samples_trained"] == 8 * 4
    assert r0["clock"] == r1["clock"] and r0["clock"]["samples"] == 8 * 4
    _same_params(r0["params"], r1["params"])


@pytest.mark.ddp
def test_growth_matches_the_single_process_run(runs):
    r0, r1, single = (runs("growth_exact", r, w) for r, w in ((0, 2), (1, 2), (0, 1)))
    assert r0["history"] == r1["history"]
    got = [(b, nb) for b, nb, _ in r0["history"]]
    want = [(b, nb) for b, nb, _ in single["history"]]
    assert got == want and want[-1][1] > 8
    for (_, _, p2), (_, _, p1) in zip(r0["history"], single["history"], strict=True):
        assert p2 == pytest.approx(p1, rel=1e-4)
    # the same global batches: rank 0 holds the first half of each, rank 1 the second
    for a, b, whole in zip(
        r0["trained_ids"], r1["trained_ids"], single["trained_ids"], strict=True
    ):
        assert a + b == whole
    assert r0["clock"] == r1["clock"]
    assert r0["clock"]["samples"] == single["clock"]["samples"]
    assert r0["clock"]["last_batch"] == single["clock"]["last_batch"]
    assert r0["clock"]["lr"] == pytest.approx(single["clock"]["lr"], rel=1e-12)
    _same_params(r0["params"], single["params"], rtol=1e-4, atol=1e-6)


@pytest.mark.ddp
def test_mixture_matches_the_single_process_run(runs):
    r0, r1, single = (runs("mixture_exact", r, w) for r, w in ((0, 2), (1, 2), (0, 1)))
    assert r0["weights"] == r1["weights"]
    assert len(r0["weights"]) == len(single["weights"]) == 5
    for w2, w1 in zip(r0["weights"], single["weights"], strict=True):
        assert w2 == pytest.approx(w1, rel=1e-5)
    assert r0["clock"]["samples"] == single["clock"]["samples"] == 8 * 8
    assert r0["clock"]["lr"] == pytest.approx(single["clock"]["lr"], rel=1e-12)
    _same_params(r0["params"], single["params"], rtol=1e-4, atol=1e-6)


def test_adaptive_batch_refuses_the_mixture_sampler_by_name():
    spec = importlib.util.spec_from_file_location("ddp_worker_e2e", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    from adaptive.callbacks import AdaptiveBatchSize, DynamicMixture
    from adaptive.mixture import DoReMi

    module = worker.Net("mixture", 8)
    mix = DynamicMixture(DoReMi(3), update_every=2, log=False)
    t = worker.trainer(1, [AdaptiveBatchSize(), mix], max_steps=1)
    with pytest.raises(ValueError, match="MixtureSampler"):
        t.fit(module)
