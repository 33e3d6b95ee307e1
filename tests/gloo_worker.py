"""How the two-process gloo test workers end (imported by the scripts ``run_two_ranks`` starts)."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def finish() -> None:
    """Wait for the other rank, destroy the process group and leave without interpreter teardown.

    Call it after the worker has written its results. The barrier keeps a rank from closing its
    connections while the other still has a collective in flight. ``os._exit`` skips interpreter
    finalisation, where torch 2.14's gloo threads once aborted a finished worker (SIGABRT,
    "terminate called without an active exception") in CI, after every result was written.
    """
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
