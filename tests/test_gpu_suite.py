"""The dry run of the GPU suite (``bash benchmarks/gpu_suite.sh --smoke``): on CPU with tiny
shapes, every step of the script must run (the CUDA tests collected and skipped, the benchmarks
on their tiny models) and write its results."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None,
    reason="needs bash and coreutils' timeout",
)
def test_gpu_suite_smoke(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = (tmp_path / "summary.md").read_text()
    assert out.returncode == 0, summary + out.stdout[-4000:] + out.stderr[-2000:]
    for step in ("env", "cuda_tests", "stats_overhead", "optim_speed", "resnet50"):
        assert f"- {step}: ok" in summary, summary
    tests_log = (tmp_path / "cuda_tests.log").read_text()
    assert "skipped" in tests_log and "failed" not in tests_log, tests_log[-2000:]
    so = json.loads((tmp_path / "stats_overhead.json").read_text())
    assert set(so["models"]) == {"resnet18gn-tiny", "gpt2s-tiny", "vitb16-tiny"}
    for r in so["models"].values():
        assert set(r["methods"]) == {"plain", "ours_norms"}
    assert (
        "ours"
        in json.loads((tmp_path / "optim_speed.json").read_text())["param_sets"]["resnet18"][
            "results"
        ]
    )
    r50 = json.loads((tmp_path / "resnet50.json").read_text())
    # the decision ran every step (warm-up and timed), and the capped batch never grew
    assert r50["images_per_s"]["stack"] > 0 and r50["batch_decisions"] == [2, 2]
