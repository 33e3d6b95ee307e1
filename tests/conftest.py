"""Fixtures shared by every test directory."""

from __future__ import annotations

import os
import re
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


_ROOT = Path(__file__).resolve().parents[1]
_TRITON_CHILD = os.environ.get("ADAPTIVE_TRITON_CHILD") == "1"


def _run_interpreted_child(path: str, minimum: int) -> None:
    """Run the non-CUDA tests of ``path`` in a child pytest under ``TRITON_INTERPRET=1`` (Triton
    decides at import whether it interprets); at least ``minimum`` of them must pass, none
    fail, and only the parent-process tests (driver, import, compile) may be skipped."""
    if _TRITON_CHILD:
        pytest.skip("this is the interpreter child")
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "ADAPTIVE_TRITON_CHILD": "1",
        "PYTHONPATH": str(_ROOT),
    }
    cmd = [sys.executable, "-m", "pytest", path, "-q", "-m", "not cuda", "-p", "no:cacheprovider"]
    out = subprocess.run(cmd, cwd=_ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    last = log.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", last)
    assert passed and int(passed.group(1)) >= minimum, log[-3000:]
    assert "failed" not in last, log[-3000:]
    skipped = re.search(r"(\d+) skipped", last)
    assert skipped is None or int(skipped.group(1)) <= 3, log[-3000:]


def _compile_for_hopper(which: str) -> None:
    """Build the ``which`` ("stats" or "lamb") Triton kernels for sm_90 on this CPU with the
    compiler, not the interpreter (tests/triton_aot_worker.py)."""
    if _TRITON_CHILD:
        pytest.skip("runs in the parent process")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, str(_ROOT / "tests" / "triton_aot_worker.py"), which],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr.lower():
        pytest.skip("triton's bundled ptxas is missing here")
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.count("compiled for sm_90") == 3, out.stdout


@pytest.fixture(scope="session")
def triton_child():
    """``(run_interpreted_child(path, minimum), compile_for_hopper(which))`` for the Triton tests."""
    return _run_interpreted_child, _compile_for_hopper
