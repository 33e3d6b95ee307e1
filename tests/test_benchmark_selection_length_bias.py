"""benchmarks/selection_length_bias.py --quick: the counts it reports, recomputed here."""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

import pytest

pytest.importorskip("transformers")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "selection_length_bias.py"
_SPEC = importlib.util.spec_from_file_location("bench_selection_length_bias", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_quick_run_counts_response_lengths(tmp_path):
    res = bench.main(["--quick", "--batches", "3", "--out", str(tmp_path / "r.json")])
    ex = bench._example()
    pool = ex.synthetic_pairs(32 + 400, seed=1234)[32:]
    batches = ex.super_batches(len(pool), 16, 3, 0)
    want_all = statistics.mean(len(pool[i][1]) for idx in batches for i in idx)
    assert res["all"] == pytest.approx(want_all)
    for name in ("paper", "per_row"):
        kept = res["kept_lengths"][name]
        assert len(kept) == 3 * 4
        assert res["kept"][name] == pytest.approx(statistics.mean(kept))
        # every kept length is the length of some candidate of its super-batch
        for j, idx in enumerate(batches):
            lengths = {len(pool[i][1]) for i in idx}
            assert set(kept[4 * j : 4 * j + 4]) <= lengths
    assert (tmp_path / "r.json").is_file()
