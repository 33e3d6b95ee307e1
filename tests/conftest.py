"""Fixtures shared by every test directory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(argv_for_rank) -> None:
    """Start two worker processes (``argv_for_rank(rank, port)``) and wait for both."""
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    procs = [
        subprocess.Popen(
            [sys.executable, *argv_for_rank(r, port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    for p in procs:
        log, _ = p.communicate(timeout=240)
        assert p.returncode == 0, log.decode()[-3000:]


@pytest.fixture(scope="session")
def run_two_ranks():
    """``run_two_ranks(argv_for_rank)``: two worker processes (gloo tests), both must succeed."""
    return _run_two_ranks
