"""Two gloo processes: the global statistics equal the single-process ones on the whole batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

WORKER = Path(__file__).with_name("ddp_worker_stats.py")


@pytest.mark.ddp
def test_two_rank_statistics_equal_single_process(two_ranks, tmp_path):
    run, check = two_ranks
    run(lambda r, port: [str(WORKER), str(r), "2", port, str(tmp_path)])
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["world_size"] == r1["world_size"] == 2
    check(r0, r1, "block")  # DDP's averaged .grad is ḡ too
