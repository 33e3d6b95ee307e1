"""Fast checks of the gradient-statistics benchmark (tiny batches, one round, no files)."""

from __future__ import annotations

import argparse
import importlib.util
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, grad, vmap

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "stats_overhead.py"
_SPEC = importlib.util.spec_from_file_location("bench_stats_overhead", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_methods_agree_on_per_sample_norms():
    """Every timed method computes the same per-sample squared norms (torch.func written out
    here as the reference), so the table compares like with like."""
    factory, loss_fn, x, y = bench.make_case("cnn", 6, torch.device("cpu"))
    x, y = x[:6], y[:6]
    methods = bench.build_methods(factory, loss_fn, x, y, torch.device("cpu"))
    torch.manual_seed(0)
    model = factory()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    want = sum(g.reshape(6, -1).square().sum(1) for g in per.values())
    # ours returns the noise scale; the peers return per-sample squared norms of the sample's
    # own loss (vmap, and Opacus, which undoes the mean) or of its term in the mean loss
    # (BackPACK: 1/b of the gradient, so 1/b² of the squared norm)
    torch.testing.assert_close(methods["vmap"](), want, rtol=1e-4, atol=1e-7)
    for label in bench.OPACUS_MODES:
        if label in methods:  # each Opacus mode that runs here (none without opacus)
            torch.testing.assert_close(methods[label](), want, rtol=1e-4, atol=1e-7)
    if "backpack" in methods:
        torch.testing.assert_close(methods["backpack"]() * 36, want, rtol=1e-4, atol=1e-7)
    mean = sum(g.mean(0).square().sum() for g in per.values())
    variance = (want.sum() - 6 * mean) / 5
    for label in ("ours_norms", "ours_norms_torch", "ours_norms_unfused", "ours_all"):
        if label in methods:  # ours_norms_torch: only where the compiled kernel is built
            torch.testing.assert_close(methods[label](), variance / mean, rtol=1e-4, atol=0)


def test_one_round_table_has_every_method_and_page_faults():
    args = argparse.Namespace(
        device="cpu",
        models=["cnn", "block"],
        batches=[4, 2],
        rounds=1,
        steps=1,
        warmup=0,
        clock="process",
        note="test",
    )
    res = bench.run(args)
    for name in ("cnn", "block"):
        methods = res["models"][name]["methods"]
        assert {"plain", "ours_norms", "ours_all", "vmap"} <= set(methods)
        assert methods["plain"]["ratio_to_plain_median"] == 1.0
        assert all(m["median_page_faults_per_step"] >= 0 for m in methods.values())
    # the machine and each layer's path are recorded: a speed result names its CPU
    assert res["machine"]["instruction_sets"] and "kernel_build_used" in res["machine"]
    plan = {e["layer"]: e for e in res["models"]["cnn"]["plan"]}
    assert {"0", "3"} <= set(plan)  # the two convolutions
    assert all(e["path"] in ("native", "materialise", "torch") for e in plan.values())
    table = bench.markdown(res)
    assert "| ours_norms |" in table and "page faults / step" in table
    assert "instruction sets:" in table and "Path per layer" in table


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_stops_page_faults_on_reallocation():
    """After ``keep_freed_memory()`` a freed 16 MB block is reused without faulting its pages in
    again (by default glibc unmaps it and the next allocation faults ~4000 pages). Run in a
    child process: mallopt changes the whole process."""
    code = textwrap.dedent(
        f"""
        import resource, sys, torch
        sys.path.insert(0, {str(_PATH.parent)!r})
        import stats_overhead as b

        def faults():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(5):
                x = torch.empty(4_000_000)
                x.fill_(1.0)
                del x
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

        before = faults()
        assert b.keep_freed_memory()
        faults()  # the heap grows once
        print(before, faults())
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = map(int, out.stdout.split())
    assert before > 5 * 1000  # 16 MB is ~3900 pages, faulted in on every allocation
    assert after < 50


def test_opacus_norms_match_ours_on_models_it_supports():
    """Each Opacus mode's per-sample squared norms (the timed step's return value) equal
    ``per_sample_sq_norms`` of ours on the CNN and the transformer block, checked here and by
    the benchmark's own untimed check."""
    pytest.importorskip("opacus")
    from adaptive.stats import GradientStatistics

    for name, b in (("cnn", 6), ("block", 3)):
        factory, loss_fn, x, y = bench.make_case(name, b, torch.device("cpu"))
        refused: dict[str, str] = {}
        methods = bench.build_methods(factory, loss_fn, x, y, torch.device("cpu"), refused)
        torch.manual_seed(0)
        model = factory()
        stats = GradientStatistics(model, inner_products=False)
        with stats.capture():
            loss_fn(model(x), y).backward()
        ours = stats.result().per_sample_sq_norms
        assert ours.shape == (b,)
        for label in bench.OPACUS_MODES:
            assert label in methods, (name, label, refused.get(label))
            torch.testing.assert_close(methods[label](), ours, rtol=1e-4, atol=0)
        check = bench.opacus_check(factory, loss_fn, x, y, torch.device("cpu"))
        for label in bench.OPACUS_MODES:
            assert check[label]["agrees"] and check[label]["max_rel_diff"] <= 1e-4, label
            assert check[label]["differing"] == []


def test_opacus_rows_refusals_and_check_in_a_short_run():
    """Every Opacus mode is a row on every model: timed, or ``refused: <error>`` (never left
    out silently). The tiny Llama ties its embedding to its head, which ghost clipping
    refuses; where a mode runs, the record says whether its norms are ours."""
    pytest.importorskip("opacus")
    args = argparse.Namespace(
        device="cpu",
        models=["cnn", "llama-tiny-seq256"],
        batches=[4, 2],
        rounds=1,
        steps=1,
        warmup=0,
        clock="process",
        note="test",
    )
    res = bench.run(args)
    for name, r in res["models"].items():
        for label in bench.OPACUS_MODES:
            timed, refused = label in r["methods"], label in r["refused"]
            assert timed != refused, (name, label)
            if refused:
                assert r["refused"][label].startswith("refused: ")
                assert r["opacus_check"][label] == {"refused": r["refused"][label]}
            else:
                assert r["methods"][label]["median_step_ms"] > 0
                assert r["opacus_check"][label]["max_rel_diff"] <= 1e-4, (name, label)
    assert set(res["models"]["cnn"]["refused"]) <= {"backpack"}
    llama = res["models"]["llama-tiny-seq256"]
    assert "tying" in llama["refused"]["opacus_ghost"]
    assert "opacus_hooks" in llama["methods"]  # the tied weight is handled by the hooks
    table = bench.markdown(res)
    assert "| opacus_hooks |" in table and "| opacus_ghost | refused: " in table
    assert "Opacus's per-sample squared norms against ours" in table


def test_without_opacus_the_rows_say_so(monkeypatch):
    """With Opacus not importable, each of its modes is refused as "opacus not installed"."""
    for mod in [m for m in sys.modules if m == "opacus" or m.startswith("opacus.")]:
        monkeypatch.setitem(sys.modules, mod, None)
    monkeypatch.setitem(sys.modules, "opacus", None)
    factory, loss_fn, x, y = bench.make_case("cnn", 4, torch.device("cpu"))
    refused: dict[str, str] = {}
    methods = bench.build_methods(factory, loss_fn, x, y, torch.device("cpu"), refused)
    for label in bench.OPACUS_MODES:
        assert label not in methods and refused[label] == "opacus not installed"
    assert bench.opacus_check(factory, loss_fn, x, y, torch.device("cpu")) == {
        label: {"refused": "opacus not installed"} for label in bench.OPACUS_MODES
    }


def test_methods_filter_builds_no_opacus_rows():
    """``--methods plain ours_norms`` (gpu_suite.sh) builds no Opacus mode (each would run a
    trial step) and lists none as refused."""
    factory, loss_fn, x, y = bench.make_case("cnn", 4, torch.device("cpu"))
    refused: dict[str, str] = {}
    keep = {"plain", "ours_norms"}
    methods = bench.build_methods(factory, loss_fn, x, y, torch.device("cpu"), refused, keep)
    assert not set(bench.OPACUS_MODES) & (set(methods) | set(refused))
    assert "backpack" not in methods and "backpack" not in refused
