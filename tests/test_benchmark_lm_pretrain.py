"""benchmarks/lm_pretrain.py: the grid's plan, and a --quick dry run of the whole pipeline
(tuning on validation, the grid over seeds, steps to the best fixed loss, the files)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEEDED = {
    "/usr/lib/R/site-library/janeaustenr/data/Rdata.rdx": "r-cran-janeaustenr",
    "/usr/lib/bible.data": "bible-kjv-text",
    "/usr/share/games/fortunes/people.dat": "fortunes",
    "/usr/share/dictd/gcide.index": "dict-gcide",
    "/usr/share/dictd/foldoc.index": "dict-foldoc",
}
MISSING = [pkg for path, pkg in NEEDED.items() if not Path(path).exists()]


def _load():
    name = "benchmark_lm_pretrain"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "lm_pretrain.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench = _load()


def test_plan_counts_the_grid():
    out = bench.main(["--plan"])
    # tuning: 3 sizes x 3 lrs, and the 2 variance tests x 5 etas; per seed: 3 fixed +
    # fixed-small with the rule + 4 rules x 2 mixtures = 12, the tuning seed's 3 fixed runs and
    # its 2 uniform variance-test runs reused
    assert out["runs"] == 9 + 10 + 3 * 12 - 3 - 2
    assert out["tokens"] == out["runs"] * (5_000_000 // 256) * 256


def test_choose_eta_takes_the_fewest_steps_to_the_validation_threshold():
    def rec(curve, steps=30):
        return {
            "evals": [{"step": s, "val_loss": v} for s, v in curve],
            "val_loss": curve[-1][1],
            "steps": steps,
        }

    recs = {
        0.5: rec([(0, 5.0), (10, 3.4), (20, 3.2)]),  # never reaches 3.0; lowest final loss
        1.0: rec([(0, 5.0), (10, 4.0), (30, 2.9)]),  # reaches 3.0 at step 10 + 20·(1/1.1)
        2.0: rec([(0, 5.0), (30, 3.5), (40, 2.0)]),  # reaches it at 30 + 10·(0.5/1.5)
    }
    eta, table = bench.choose_eta(recs, 3.0)
    assert eta == 1.0
    assert table[1.0]["steps_to_val_threshold"] == pytest.approx(10 + 20 / 1.1)
    assert table[2.0]["steps_to_val_threshold"] == pytest.approx(30 + 10 / 3)
    assert table[0.5]["steps_to_val_threshold"] is None
    # none reaches it: the lowest final validation loss
    eta, _ = bench.choose_eta(recs, 1.0)
    assert eta == 2.0


def test_noise_scale_profile_pools_each_part_as_a_ratio_of_sums():
    def run(name, tests):
        return {
            "config_name": name,
            "budget_tokens": 1000 * 10,
            "config": {"context": 10},  # a budget of 1000 sequences
            "growth_history": [
                {"samples": n, "variance": v, "grad_sq_norm": g, "stats_batch_size": b}
                for n, v, g, b in tests
            ],
        }

    runs = [
        # seed 0: two tests in the first half, one in the second
        run("norm", [(100, 8.0, 3.0, 4), (400, 4.0, 2.0, 2), (600, 6.0, 2.5, 4)]),
        # seed 1: one test in the first half; the next test's |G|² estimate is negative; a
        # non-finite test (the callback warns and keeps the batch) is skipped
        run("norm", [(200, 2.0, 1.0, 2), (999, 9.0, 1.0, 3), (500, float("nan"), 1.0, 2)]),
        {  # no tests, only scheduled changes: left out
            "config_name": "warmup",
            "budget_tokens": 10000,
            "config": {"context": 10},
            "growth_history": [{"samples": 300, "batch_size": 8}],
        },
    ]
    prof = bench.noise_scale_profile(runs, ["norm", "warmup"], parts=2)
    assert list(prof) == ["norm"]
    # first half: V = 8 + 4 + 2; |G|² = (3 - 8/4) + (2 - 4/2) + (1 - 2/2) = 1
    # second half: V = 6 + 9; |G|² = (2.5 - 6/4) + (1 - 9/3) = -1: not positive, no figure
    assert prof["norm"] == [pytest.approx(14.0), None]
    prof = bench.noise_scale_profile(runs[:1], ["norm"], parts=4)
    # quarters: tests at 100 and 400 go to parts 0 and 1, 600 to part 2, none in part 3
    assert prof["norm"] == [
        pytest.approx(8.0 / 1.0),
        None,  # |G|² = 2 - 4/2 = 0
        pytest.approx(6.0 / 1.0),
        None,
    ]


def test_plot_dots_each_rules_critical_batch_over_its_batch_size(monkeypatch, tmp_path):
    got = {}
    monkeypatch.setattr(
        bench.lm,
        "plot_runs",
        lambda path, runs, critical: got.update(names=[r["name"] for r in runs], critical=critical),
    )
    runs = [
        {"config_name": "fixed-small", "seed": 0, "tokens": 1000},
        {"config_name": "norm", "seed": 1, "tokens": 1000},  # another seed: not plotted
        {"config_name": "norm", "seed": 0, "tokens": 1000},
    ]
    profile = {"norm": [2.0, None, 8.0, 16.0]}  # quarters of the budget; one without a figure
    bench.plot(tmp_path / "p.png", runs, ["fixed-small", "norm"], 0, profile)
    assert got["names"] == ["fixed-small", "norm"]
    # at the middle of each quarter: 125, (375 left out), 625, 875 tokens
    assert got["critical"] == {"norm": [(125.0, 2.0), (625.0, 8.0), (875.0, 16.0)]}


def test_steps_to_reach_interpolates_the_test_curve():
    run = {
        "evals": [
            {"step": 0, "test_loss": 5.0},
            {"step": 10, "test_loss": 4.0},
            {"step": 30, "test_loss": 3.0},
        ]
    }
    assert bench.steps_to_reach(run, 3.5) == pytest.approx(20.0)
    assert bench.steps_to_reach(run, 4.0) == pytest.approx(10.0)
    assert bench.steps_to_reach(run, 2.9) is None


def _curve(name, seed, points):
    return {
        "config_name": name,
        "seed": seed,
        "test_loss": points[-1][1],
        "evals": [{"step": st, "test_loss": loss} for st, loss in points],
    }


def test_equal_loss_steps_reads_every_curve_at_the_highest_final_loss():
    runs = [
        _curve("norm", 0, [(0, 5.0), (100, 3.0), (200, 2.0)]),
        _curve("norm", 1, [(0, 5.0), (100, 2.6), (200, 2.2)]),
        _curve("warmup", 0, [(0, 5.0), (50, 3.0), (80, 2.5)]),  # the highest final loss
        _curve("fixed-small", 0, [(0, 5.0), (10, 1.0)]),  # not compared: ignored
    ]
    got = bench.equal_loss_steps(runs, ["norm", "warmup", "noise_scale"])
    assert got["test_loss"] == 2.5
    # norm s0: 3.0 → 2.0 over 100..200 crosses 2.5 halfway, at 150; s1: 5.0 → 2.6 over 0..100
    # never, 2.6 → 2.2 over 100..200 crosses at 100 + 100 * 0.1 / 0.4 = 125
    assert got["steps"]["norm"] == pytest.approx((150 + 125) / 2)
    assert got["steps"]["warmup"] == pytest.approx(80.0)
    assert "noise_scale" not in got["steps"]  # no runs
    assert bench.equal_loss_steps(runs, ["inner_product"]) is None


def test_goals_pair_the_mixture_gain_by_seed_and_compare_steps_at_equal_loss():
    def row(seeds, losses, steps=1000.0):
        return {
            "seeds": seeds,
            "test_losses": losses,
            "test_loss_mean": sum(losses) / len(losses),
            "test_loss_spread": max(losses) - min(losses),
            "steps_mean": steps,
            "steps_to_best_fixed_loss_mean": None,
            "reached_best_fixed_loss": f"0/{len(seeds)}",
        }

    table = {
        "fixed-small": row([0, 1, 2], [1.50, 1.40, 1.45]),
        "fixed-small+mix": row([2, 0, 1], [1.44, 1.49, 1.38]),  # another order of seeds
    }
    equal = {"test_loss": 1.6, "steps": {"norm": 300.0, "warmup": 400.0, "noise_scale": 250.0}}
    goals = bench.goals_text(table, ["norm"], "mix", equal)
    (mix,) = [g for g in goals if g.startswith("fixed-small: mix")]
    # paired by seed: 1.50 - 1.49, 1.40 - 1.38, 1.45 - 1.44; the mean gain 0.0133 is within the
    # spread 0.11 of either configuration
    assert "per seed +0.0100, +0.0200, +0.0100" in mix
    assert "+0.0133 (NOT beyond the seed spread, spread 0.1100" in mix
    (eq,) = [g for g in goals if "equal loss" in g]
    assert eq.startswith("norm against warmup and noise_scale") and eq.endswith("NOT met")
    equal["steps"]["noise_scale"] = 350.0
    (eq,) = [g for g in bench.goals_text(table, ["norm"], "mix", equal) if "equal loss" in g]
    assert eq.endswith(": met")


@pytest.mark.slow
@pytest.mark.skipif(
    bool(MISSING), reason=f"text packages missing: apt-get install -y {' '.join(MISSING)}"
)
def test_quick_dry_run_writes_the_schema(tmp_path):
    pytest.importorskip("rdata", reason="pip install rdata")
    result = bench.main(
        [
            "--quick",
            "--seeds",
            "0",
            "1",
            "--lrs",
            "0.002",
            "0.004",
            "--growth-rules",
            "norm",
            "warmup",
            "noise_scale",
            "--etas",
            "0.5",
            "1",
            "2",
            "--out",
            str(tmp_path),
            "--cache",
            str(tmp_path / "c.npz"),
        ]
    )
    saved = json.loads((tmp_path / "lm_pretrain_quick.json").read_text())
    assert (tmp_path / "lm_pretrain_quick.png").stat().st_size > 5000
    md = (tmp_path / "lm_pretrain_quick.md").read_text()
    assert "QUICK DRY RUN" in md and "| fixed-small |" in md
    # the critical batch the sensor measured: rules with growth tests only (not the warmup)
    assert "## The critical batch along the runs" in md
    prof = saved["noise_scale_profile"]
    assert {"norm", "noise_scale"} <= set(prof) and "warmup" not in prof
    assert all(len(row) == 10 for row in prof.values())
    assert any(v is not None and v > 0 for row in prof.values() for v in row)
    runs = saved["runs"]
    # per seed: 3 fixed + fixed-small+rule + 3 rules x 2 mixtures
    assert len(runs) == 2 * (3 + 1 + 3 * 2)
    assert {r["kind"] for r in runs} == {"fixed", "adaptive", "warmup", "noise_scale"}
    assert {r["mixture"] for r in runs} == {"uniform", "influence_exp"}
    budget = (saved["runs"][0]["config"]["tokens"] // 32) * 32
    for r in runs:
        for key in ("name", "kind", "mixture", "seed", "test_loss", "steps", "tokens"):
            assert key in r
        assert "steps_to_best_fixed_loss" in r
        assert r["tokens"] == budget  # equal token budget
        assert r["test_loss"] == r["evals"][-1]["test_loss"]
    # the norm test's eta: every --etas value tried on the tuning seed, the kept one by the rule
    (t,) = saved["eta_tuning"]
    assert t["rule"] == "norm" and len(t["etas"]) == 3
    reached = {e: v["steps_to_val_threshold"] for e, v in t["etas"].items()}
    if any(v is not None for v in reached.values()):
        want = min((e for e in reached if reached[e] is not None), key=lambda e: reached[e])
    else:
        want = min(t["etas"], key=lambda e: t["etas"][e]["val_loss"])
    assert float(want) == t["best_eta"] == saved["meta"]["best_eta"]["norm"]
    norm_runs = [r for r in runs if r["config"]["growth"] == "norm"]
    assert {r["config"]["eta"] for r in norm_runs} == {t["best_eta"]}
    # the table names the kept eta for the variance tests only
    assert saved["summary"]["norm"]["eta"] == t["best_eta"]
    assert saved["summary"]["fixed-small"]["eta"] is None
    assert saved["summary"]["warmup"]["eta"] is None
    # the lr of each fixed batch is the validation argmin of its tuning runs
    for t in saved["tuning"]:
        assert t["best_lr"] == float(min(t["val"], key=lambda k: t["val"][k]))
        lrs = sorted(map(float, t["val"]))
        assert {0.002, 0.004} <= set(lrs) and len(lrs) <= 2 + 2  # at most 2 edge extensions
        for lo, hi in itertools.pairwise(lrs):  # a grid of ×2 steps
            assert math.isclose(hi / lo, 2.0)
        assert lrs[0] < t["best_lr"] < lrs[-1] or len(lrs) == 4  # bracketed, or out of steps
    # the threshold is the mean final test loss of the best fixed configuration
    fixed = {
        n: s["test_loss_mean"]
        for n, s in saved["summary"].items()
        if n.startswith("fixed-") and "+" not in n
    }
    best = min(fixed, key=fixed.get)
    assert saved["meta"]["best_fixed"] == best
    assert math.isclose(saved["meta"]["best_fixed_loss"], fixed[best], rel_tol=1e-12)
    for r in runs:
        s = r["steps_to_best_fixed_loss"]
        if s is None:
            assert min(e["test_loss"] for e in r["evals"]) > fixed[best]
        else:
            assert 0 <= s <= r["steps"]
    # fixed runs keep their batch; larger fixed batches take fewer steps
    steps = {n: saved["summary"][n]["steps_mean"] for n in ("fixed-small", "fixed-large")}
    assert steps["fixed-large"] < steps["fixed-small"]
    # the training time is summed over every run the grid read: tuning, eta tuning and grid
    trained = sum(len(t["val"]) for t in saved["tuning"]) + 3  # 3 etas of the norm test
    trained += len(runs) - 3 - 1  # seed 0's fixed and norm runs are the tuning runs
    assert saved["meta"]["runs_trained"] == trained
    assert saved["meta"]["total_seconds"] > sum(r["wall_seconds"] for r in runs)
    assert f"{trained} runs with the tuning" in md
    # a speed result names the CPU and the instruction sets it ran with
    isa = saved["meta"]["cpu"]["instruction_sets"]
    assert f"instruction sets: {', '.join(isa)};" in md
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = next(
            set(line.partition(":")[2].split())
            for line in cpuinfo.read_text().splitlines()
            if line.split(":")[0].strip() in ("flags", "Features")
        )
        assert set(isa) <= flags
        assert ("avx2" in isa) == ("avx2" in flags)
        assert ("avx512f" in isa) == ("avx512f" in flags)
    # steps at equal loss: every growth rule's curve read at the highest final loss among them
    eq = saved["equal_loss_steps"]
    growth = [r for r in runs if r["config_name"] in ("norm", "warmup", "noise_scale")]
    assert eq["test_loss"] == max(r["test_loss"] for r in growth)
    assert set(eq["steps"]) == {"norm", "warmup", "noise_scale"}
    assert result["goals"]  # the closing verdicts are written


@pytest.mark.skipif(
    bool(MISSING), reason=f"text packages missing: apt-get install -y {' '.join(MISSING)}"
)
def test_stop_after_keeps_the_runs_done_for_resume(tmp_path, monkeypatch):
    """``--stop-after`` (a lent machine's time limit) starts no run that would end past it, at
    the longest run time seen, and leaves the runs done in the partial file for ``--resume``;
    ``--prepare-data`` writes the cache a machine without the corpora reads."""
    pytest.importorskip("rdata", reason="pip install rdata")
    cache = tmp_path / "c.npz"
    assert bench.main(["--quick", "--prepare-data", "--cache", str(cache)]) == {"cache": str(cache)}
    assert cache.stat().st_size > 0
    ticks = iter(range(0, 10_000, 10))  # every reading of the clock: 10 s later
    monkeypatch.setattr(bench, "_clock", lambda: next(ticks))
    common = ["--quick", "--seeds", "0", "--lrs", "0.002", "--growth-rules", "norm"]
    common += ["--out", str(tmp_path), "--cache", str(cache)]
    # start 0; run 1: checked at 10 (10 + 0 ≤ 25), 20 s to 30, longest 10; run 2 checked at
    # 40: 40 + 10 > 25, so it does not start
    got = bench.main([*common, "--stop-after", "25"])
    assert got["runs_done"] == 1 and got["stopped_before"]
    partial = json.loads((tmp_path / "lm_pretrain_quick.partial.json").read_text())["runs"]
    assert len(partial) == 1
    assert not (tmp_path / "lm_pretrain_quick.json").exists()
    with pytest.raises(SystemExit):
        bench.main([*common, "--stop-after", "0"])


@pytest.mark.slow
@pytest.mark.skipif(
    bool(MISSING) or shutil.which("bash") is None or shutil.which("timeout") is None,
    reason="needs the text packages, bash and coreutils' timeout",
)
def test_gpu_script_dry_run(tmp_path):
    """``bash benchmarks/lm_pretrain_gpu.sh --smoke``: the lent machine's steps on CPU (the
    environment line, the resumable grid under --stop-after, the result files)."""
    pytest.importorskip("rdata", reason="pip install rdata")
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path)}
    out = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "lm_pretrain_gpu.sh"), "--smoke", "--limit", "600"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "torch" in (tmp_path / "env.txt").read_text()
    saved = json.loads((tmp_path / "lm_pretrain_quick.json").read_text())
    assert len(saved["runs"]) == 2 * (3 + 1 + 1 * 2)
    assert "grid complete" in out.stdout


def test_bracket_lr_extends_the_grid_toward_the_best_edge():
    """A best lr on the grid's edge gets neighbours a grid step (×2) beyond it, one at a time,
    until it is bracketed or the extensions run out; an interior best adds nothing."""
    tried: list[float] = []

    def loss(lr, optimum):  # a bowl in log lr, lowest at the optimum
        return (math.log2(lr) - math.log2(optimum)) ** 2

    def runner(optimum):
        def run(lr):
            tried.append(lr)
            return loss(lr, optimum)

        return run

    def grid(optimum):
        return {lr: loss(lr, optimum) for lr in (1e-3, 2e-3, 4e-3)}

    # best on the lower edge: 5e-4, then 2.5e-4 (the optimum), then 1.25e-4 brackets it
    got = bench.bracket_lr(grid(2.5e-4), runner(2.5e-4), extensions=5)
    assert tried == pytest.approx([5e-4, 2.5e-4, 1.25e-4])
    assert min(got, key=got.get) == pytest.approx(2.5e-4)
    # upper edge, one extension allowed: 8e-3 added, still on the edge, out of steps
    tried.clear()
    got = bench.bracket_lr(grid(3.2e-2), runner(3.2e-2), extensions=1)
    assert tried == pytest.approx([8e-3]) and len(got) == 4
    # an interior best: nothing to add, the input is returned unchanged
    tried.clear()
    assert bench.bracket_lr(grid(2e-3), runner(2e-3), extensions=2) == grid(2e-3)
    assert tried == []
