"""examples/mixture_lm.py runs end to end in --quick mode on the real text domains."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NEEDED = {
    "/usr/lib/R/site-library/janeaustenr/data/Rdata.rdx": "r-cran-janeaustenr",
    "/usr/lib/bible.data": "bible-kjv-text",
    "/usr/share/games/fortunes/people.dat": "fortunes",
    "/usr/share/dictd/gcide.index": "dict-gcide",
    "/usr/share/dictd/foldoc.index": "dict-foldoc",
}
MISSING = [pkg for path, pkg in NEEDED.items() if not Path(path).exists()]


def _load():
    spec = importlib.util.spec_from_file_location(
        "example_mixture_lm", ROOT / "examples" / "mixture_lm.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(
    bool(MISSING), reason=f"text packages missing: apt-get install -y {' '.join(MISSING)}"
)
def test_mixture_lm_quick_run_writes_consistent_results(tmp_path):
    pytest.importorskip("rdata", reason="pip install rdata")
    example = _load()
    result = example.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "mixture_lm.json").read_text())
    assert (tmp_path / "mixture_lm.png").stat().st_size > 1000
    assert "| uniform |" in (tmp_path / "mixture_lm.md").read_text()
    runs = saved["runs"]
    assert {r["method"] for r in runs} == set(example.METHODS)
    for run in runs:
        # the target loss is the target-mix average of the per-domain losses
        expected = sum(w * run["domain_loss"][d] for d, w in example.TARGET_MIX.items())
        assert math.isclose(run["target_loss"], expected, rel_tol=1e-12)
        assert 0 < run["target_loss"] < math.log(256) + 0.5
        for h in run["weights"]:
            assert math.isclose(sum(h["weights"]), 1.0, rel_tol=1e-9)
            assert min(h["weights"]) >= 0
    uniform = next(r for r in runs if r["method"] == "uniform")
    assert all(abs(w - 1 / 6) < 1e-12 for w in uniform["final_weights"])
    # the adaptive rules did move the weights
    for method in ("doremi", "influence", "influence_exp"):
        run = next(r for r in runs if r["method"] == method)
        assert len(run["weights"]) > 1
        assert max(run["final_weights"]) - min(run["final_weights"]) > 1e-4, method
    assert result["summary"]["uniform"]["gain_vs_uniform"] == 0.0
