"""The selection examples' --quick paths (no download, no optional package) run end to end."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_selection_sft_quick(tmp_path):
    result = _load("selection_sft").main(["--quick", "--out", str(tmp_path), "--no-progress"])
    saved = json.loads((tmp_path / "selection_sft_quick.json").read_text())
    assert saved["curve"] == result["curve"]
    table = (tmp_path / "selection_sft_quick.md").read_text()
    assert sum(line.startswith("| uds |") for line in table.splitlines()) == 1
    for method, curve in result["curve"].items():
        assert [p["samples"] for p in curve] == [0, 80, 160, 240], method
        assert all(math.isfinite(p["loss"]) for p in curve)
        assert curve[-1]["loss"] < curve[0]["loss"], method  # every method learns
    per_step = result["per_step"]
    assert per_step["uniform"]["select"] < per_step["uds"]["select"]  # UDS pays a forward
    assert result["same_pass"]["samples_passed"] == 4 * 32
    assert [u["keep"] for u in result["same_pass"]["uds"]] == [8, 4]
    assert all(u["over_full"] > 0 for u in result["same_pass"]["uds"])


def test_selection_cabs_quick(tmp_path):
    result = _load("selection_cabs").main(["--quick", "--out", str(tmp_path), "--no-progress"])
    assert (tmp_path / "selection_cabs_quick.json").exists()
    s = result["summary"]
    # CABS-DM flattens the concept histogram of the kept batches; FM keeps concept-rich texts
    assert s["diversity"]["distinct_concepts"]["mean"] > s["uniform"]["distinct_concepts"]["mean"]
    assert s["diversity"]["max_count"]["mean"] < s["uniform"]["max_count"]["mean"]
    assert s["frequency"]["no_concept_per_batch"]["mean"] == 0.0
    for mode in ("uniform", "diversity", "frequency"):
        assert len(result["runs"][mode]) == 2
        assert 0.0 <= s[mode]["accuracy"]["mean"] <= 1.0
