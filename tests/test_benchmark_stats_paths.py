"""Fast checks of the per-shape path benchmark (tiny shapes, no files kept)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch.func import functional_call, grad, vmap

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "stats_paths.py"
_SPEC = importlib.util.spec_from_file_location("bench_stats_paths", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_every_timed_path_computes_the_same_noise_scale():
    """Each forced path and the automatic choice return the noise scale of torch.func
    per-sample gradients of ⟨layer(x_i), δ_i⟩ (written out here), so the table compares like
    with like."""
    for name, factory, shape in bench.cases(quick=True):
        steps = bench.build(factory, shape)
        torch.manual_seed(0)
        x = torch.randn(shape)
        layer = factory()
        with torch.no_grad():
            d = torch.randn_like(layer(x))
        params = {k: v.detach() for k, v in layer.named_parameters()}

        def pairing(p, xi, di, layer=layer):
            return (functional_call(layer, p, (xi.unsqueeze(0),)) * di.unsqueeze(0)).sum()

        per = vmap(grad(pairing), in_dims=(None, 0, 0))(params, x, d)
        b = shape[0]
        sq = sum(g.reshape(b, -1).square().sum(1) for g in per.values())
        mean_sq = sum(g.mean(0).square().sum() for g in per.values())
        # the step's loss is the sum over samples: raw per-sample gradients, b·ḡ its gradient
        want = ((sq.sum() - b * mean_sq) / (b - 1)) / mean_sq
        assert set(steps) >= {"plain", "materialise", "torch", "auto"}, name
        for label, step in steps.items():
            if label != "plain":
                got = step()
                torch.testing.assert_close(got, want, rtol=1e-4, atol=0, msg=name + label)


def test_quick_run_writes_a_table_naming_the_machine(tmp_path):
    out = tmp_path / "paths"
    res = bench.main(["--quick", "--rounds", "1", "--steps", "1", "--out", str(out)])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["machine"]["instruction_sets"] == res["machine"]["instruction_sets"]
    assert "sse2" in saved["machine"]["instruction_sets"] or saved["machine"]["arch"] != "x86_64"
    for r in saved["shapes"].values():
        assert r["auto_path"] in r["median_ms"] and r["best_path"] in r["median_ms"]
        assert r["auto_over_best"] > 0
    text = out.with_suffix(".md").read_text()
    assert "instruction sets:" in text and "auto / best" in text
