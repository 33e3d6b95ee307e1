"""A quick run of the kernel-against-matmul benchmark (tiny shapes, files in a temporary folder)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from adaptive.stats import native

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "stats_kernel.py"
_SPEC = importlib.util.spec_from_file_location("bench_stats_kernel", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


@pytest.mark.skipif(not native.available(), reason="the compiled kernel is not built")
def test_quick_run_times_every_build_against_the_matmul(tmp_path):
    out = tmp_path / "k"
    res = bench.main(
        ["--quick", "--rounds", "2", "--steps", "1", "--warmup", "0", "--out", str(out)]
    )
    runnable = [n for n in native.targets_built() if native.supported(n)]
    assert res["builds"] == runnable
    assert len(res["rows"]) == len(bench.QUICK_SHAPES)
    for r in res["rows"]:
        assert set(r["median_ms"]) == {"mm", *runnable}
        for n in runnable:
            ratio = r["kernel_over_mm"][n]
            assert ratio == pytest.approx(r["median_ms"][n] / r["median_ms"]["mm"])
        # the timed kernel computes the matmul's gradient (one of the shapes goes in tiles)
        assert r["sum_rel_err"] < 1e-5
    assert any(r["shape"]["t"] > 64 for r in res["rows"])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["threads"] == torch.get_num_threads()
    md = out.with_suffix(".md").read_text()
    assert "instruction sets:" in md and "/ mm" in md
