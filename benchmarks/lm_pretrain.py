"""Language-model pretraining with the whole toolkit, against tuned fixed batches (issue 21).

Runs the grid of ``examples/lm_pretrain.py`` (a transformers Llama trained from scratch on the six
text domains, byte-level, WSD schedule clocked in tokens) at one token budget per run:

1. tuning, on validation: each fixed batch (small, medium, large) at each learning rate of a
   three-point grid, one seed (``--tune-seed``); where the lowest validation target-mix loss
   falls on the grid's edge, the grid grows a step that way (up to ``--lr-extensions`` times),
   so the kept lr is bracketed. Growth runs start at the small batch with the small batch's lr.
   Then the variance tests' ``eta`` (``norm``, ``inner_product``), each at ``--etas`` on the
   tuning seed: kept is the one that reaches the best fixed batch's validation loss in the
   fewest optimizer steps (read off the validation curve), else the lowest final validation
   loss. (A first run at eta 0.5 grew the batch 8 → 128 by step 122 of 253 and ended at
   validation 1.72 against the small batch's 1.41: the test's tolerance is the method's
   hyper-parameter, chosen like the baselines' lr.)
2. the grid, over ``--seeds`` (the tuning seed's runs are reused): fixed small / medium / large
   at their lrs, uniform mixing; fixed small with the mixture rule; every growth rule
   (``norm`` and ``inner_product``: AdaptiveBatchSize; ``warmup``: the doubling warmup of Merrill
   et al. 2025; ``noise_scale``: growth to the smoothed noise scale, McCandlish et al. 2018) with
   uniform mixing and with the mixture rule (DynamicMixture, group influence).

Reported on test (never used for a choice): target-mix test loss (mean, sd and spread =
max − min over seeds), optimizer steps, tokens, wall time, the sensor's share of step time, and
``steps_to_best_fixed_loss``: the optimizer steps a run needed to reach the final test loss of
the best fixed run (the fixed, uniform configuration with the lowest mean test loss; its mean
over seeds), read off the run's test-loss curve (evaluated ``--evals`` times over the budget,
linearly interpolated between evaluations; null when never reached).

Writes ``<out>/<name>.md``, ``.json`` (``runs``: name, kind, mixture, seed, test_loss, steps,
tokens, steps_to_best_fixed_loss, ...) and ``.png``; finished runs are kept in
``<out>/<name>.partial.json`` and reused with ``--resume``. ``--quick``: a tiny dry run of the
whole pipeline (seconds per run). ``--plan``: list the runs and their total tokens (and the
estimated wall time with ``--tokens-per-second``) without training.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptive.stats.native import machine as native_machine

ROOT = Path(__file__).resolve().parents[1]


def _example():
    name = "example_lm_pretrain"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "lm_pretrain.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


lm = _example()
SIZES = ("small", "medium", "large")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--tokens", type=int, default=5_000_000, help="token budget of every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tune-seed", type=int, default=0, help="seed of the lr-tuning runs")
    p.add_argument(
        "--batch-sizes", type=int, nargs=3, default=[8, 32, 128], help="small medium large"
    )
    # 5M-token runs at 1e-3 / 2e-3 / 4e-3 had their lowest validation loss at 1e-3 for the small
    # and the medium batch (the grid's edge), so the grid goes one step lower
    p.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3])
    p.add_argument(
        "--lr-extensions",
        type=int,
        default=2,
        help="steps the lr grid may grow by, one at a time, toward an edge that holds the best "
        "validation loss (default: 2)",
    )
    p.add_argument(
        "--growth-rules", nargs="+", default=["norm", "inner_product", "warmup", "noise_scale"]
    )
    p.add_argument("--mixture-rule", choices=lm.MIXTURES[1:], default="influence_exp")
    p.add_argument("--max-batch-size", type=int, default=None, help="default: the large batch")
    p.add_argument(
        "--etas",
        type=float,
        nargs="+",
        default=[0.5, 0.7, 0.85, 1.0, 2.0],
        # the norm test's range (adaptive.batching.norm_test): from 3·B_simple (0.5) through
        # B_simple (0.7) and 0.38·B_simple (0.85) to growth on estimation noise alone (≥ 1)
        help="the variance tests' eta (norm, inner_product), chosen on validation per rule: the "
        "fewest steps to the best fixed batch's validation loss (default: 0.5 0.7 0.85 1 2)",
    )
    p.add_argument("--interval", type=int, default=4)
    p.add_argument("--optimizer", choices=("adamw", "lamb"), default="adamw")
    p.add_argument("--schedule", choices=("wsd", "power"), default="wsd")
    p.add_argument("--evals", type=int, default=16)
    p.add_argument("--eval-windows", type=int, default=48)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed"))
    p.add_argument("--train-bytes", type=int, default=3_000_000)
    p.add_argument("--heldout-bytes", type=int, default=200_000)
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default=None, help="file stem (default lm_pretrain[_quick])")
    p.add_argument("--resume", action="store_true", help="reuse <out>/<name>.partial.json")
    p.add_argument("--note", default=None, help="a line under the title (e.g. what a pilot is)")
    p.add_argument("--quick", action="store_true", help="tiny model and budget: a dry run")
    p.add_argument("--plan", action="store_true", help="list the runs, train nothing")
    p.add_argument("--tokens-per-second", type=float, default=None, help="for --plan's estimate")
    p.add_argument(
        "--stop-after",
        type=float,
        default=None,
        help="seconds: start no run that, at the longest run time seen in this process, would "
        "end later; the runs done stay in <name>.partial.json for --resume (a lent machine's "
        "time limit)",
    )
    p.add_argument(
        "--prepare-data",
        action="store_true",
        help="only parse the corpora into --cache (for a machine that has the cache, not them)",
    )
    return p


class OutOfTime(Exception):
    """--stop-after: the next run would not finish in time."""


_clock = time.perf_counter  # --stop-after's clock (a test drives it)


def base_config(args: argparse.Namespace) -> Any:
    cfg = lm.RunConfig(
        tokens=args.tokens,
        optimizer=args.optimizer,
        schedule=args.schedule,
        eta=args.etas[0],
        interval=args.interval,
        evals=args.evals,
        eval_windows=args.eval_windows,
        threads=args.threads,
        precision=args.precision,
    )
    if args.quick:
        for k, v in lm.QUICK.items():
            setattr(cfg, k, v)
        cfg.tokens = args.tokens
    return cfg


def config_name(growth: str, size: str, mixture: str) -> str:
    head = f"fixed-{size}" if growth == "none" else growth
    return head if mixture == "uniform" else f"{head}+{mixture}"


# growth rules with a knob chosen on validation (the variance tests' eta)
TUNED_ETA = ("norm", "inner_product")


def make(
    base: Any,
    args: argparse.Namespace,
    *,
    growth: str,
    size: str,
    lr: float,
    mixture: str,
    seed: int,
    eta: float | None = None,
) -> Any:
    sizes = dict(zip(SIZES, args.batch_sizes, strict=True))
    cfg = dataclasses.replace(
        base,
        growth=growth,
        batch_size=sizes[size],
        max_batch_size=args.max_batch_size or sizes["large"],
        lr=lr,
        mixture=mixture,
        seed=seed,
    )
    cfg.max_micro_batch_size = min(cfg.max_micro_batch_size, cfg.max_batch_size)
    knob = ""
    if growth in TUNED_ETA:
        cfg.eta = base.eta if eta is None else eta
        knob = f"-eta{cfg.eta:g}"
    cfg.name = f"{config_name(growth, size, mixture)}{knob}-lr{lr:g}-s{seed}"
    cfg.check()
    return cfg


def bracket_lr(
    val: dict[float, float], val_loss_at: Callable[[float], float], extensions: int
) -> dict[float, float]:
    """``val`` (lr -> validation loss) grown one grid step at a time (the ratio of its two lowest
    lrs) past whichever edge holds the lowest loss, at most ``extensions`` times, until the best
    lr has a neighbour on each side: a best lr on the grid's edge is not bracketed."""
    val = dict(val)
    for _ in range(extensions):
        lrs = sorted(val)
        best = min(val, key=val.get)
        if len(lrs) < 2 or lrs[0] < best < lrs[-1]:
            break
        step = lrs[1] / lrs[0]
        lr = best / step if best == lrs[0] else best * step
        val[lr] = val_loss_at(lr)
    return val


def tuning_job(base, args, size: str, lr: float):
    """A fixed batch ``size`` at ``lr``, uniform mixing, on the tuning seed."""
    return make(base, args, growth="none", size=size, lr=lr, mixture="uniform", seed=args.tune_seed)


def tuning_jobs(base, args):
    return [tuning_job(base, args, size, lr) for size in SIZES for lr in args.lrs]


def eta_jobs(base, args, lr: float):
    """The variance tests at each of ``--etas``: small batch growing, uniform mixing, the tuning
    seed, the small batch's tuned ``lr``."""
    return [
        make(
            base,
            args,
            growth=rule,
            size="small",
            lr=lr,
            mixture="uniform",
            seed=args.tune_seed,
            eta=eta,
        )
        for rule in args.growth_rules
        if rule in TUNED_ETA
        for eta in args.etas
    ]


def choose_eta(recs: dict[float, dict], threshold: float) -> tuple[float, dict[float, dict]]:
    """The eta whose run reaches the validation loss ``threshold`` (the best fixed run's) in the
    fewest optimizer steps, read off its validation curve; where none reaches it, the one with
    the lowest final validation loss. Returns it and, per eta, those two figures."""
    table = {
        eta: {
            "steps_to_val_threshold": steps_to_reach(r, threshold, "val_loss"),
            "val_loss": r["val_loss"],
            "steps": r["steps"],
        }
        for eta, r in recs.items()
    }
    reached = {
        e: t["steps_to_val_threshold"]
        for e, t in table.items()
        if t["steps_to_val_threshold"] is not None
    }
    if reached:
        return min(reached, key=reached.get), table
    return min(table, key=lambda e: table[e]["val_loss"]), table


def grid_jobs(base, args, best_lr: dict[str, float], eta: dict[str, float] | None = None):
    eta = eta or {}
    jobs = []
    mix = args.mixture_rule
    for seed in args.seeds:
        for size in SIZES:
            jobs.append(
                make(
                    base,
                    args,
                    growth="none",
                    size=size,
                    lr=best_lr[size],
                    mixture="uniform",
                    seed=seed,
                )
            )
        jobs.append(
            make(
                base, args, growth="none", size="small", lr=best_lr["small"], mixture=mix, seed=seed
            )
        )
        for rule in args.growth_rules:
            for mixture in ("uniform", mix):
                jobs.append(
                    make(
                        base,
                        args,
                        growth=rule,
                        size="small",
                        lr=best_lr["small"],
                        mixture=mixture,
                        seed=seed,
                        eta=eta.get(rule),
                    )
                )
    return jobs


def config_of(run: dict[str, Any]) -> str:
    c = run["config"]
    size = next((s for s, b in run["sizes"].items() if b == c["batch_size"]), str(c["batch_size"]))
    return config_name(c["growth"], size, c["mixture"])


def steps_to_reach(run: dict[str, Any], threshold: float, key: str = "test_loss") -> float | None:
    """Optimizer steps at which the run's test (or, with ``key="val_loss"``, validation) curve
    first reaches ``threshold`` (linear interpolation between evaluations); None when it never
    does."""
    ev = run["evals"]
    for a, b in itertools.pairwise(ev):
        if b[key] <= threshold:
            if a[key] <= threshold:
                return float(a["step"])
            f = (a[key] - threshold) / (a[key] - b[key])
            return float(a["step"] + f * (b["step"] - a["step"]))
    if ev and ev[0][key] <= threshold:
        return float(ev[0]["step"])
    return None


def summarise(runs: list[dict[str, Any]], order: list[str]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for name in order:
        rs = [r for r in runs if r["config_name"] == name]
        if not rs:
            continue
        loss = np.array([r["test_loss"] for r in rs])
        table[name] = {
            "kind": rs[0]["kind"],
            "mixture": rs[0]["mixture"],
            "lr": rs[0]["config"]["lr"],
            # the variance tests' tuned eta; the other rules have none
            "eta": rs[0]["config"]["eta"] if rs[0]["config"]["growth"] in TUNED_ETA else None,
            "seeds": [r["seed"] for r in rs],
            "test_losses": loss.tolist(),  # in the order of "seeds"
            "test_loss_mean": float(loss.mean()),
            "test_loss_sd": float(loss.std(ddof=1)) if len(loss) > 1 else 0.0,
            "test_loss_spread": float(loss.max() - loss.min()),
            "val_loss_mean": float(np.mean([r["val_loss"] for r in rs])),
            "steps_mean": float(np.mean([r["steps"] for r in rs])),
            "tokens": int(np.mean([r["tokens"] for r in rs])),
            "wall_seconds_mean": float(np.mean([r["wall_seconds"] for r in rs])),
            "sensor_share_mean": float(np.nanmean([r["sensor_share"] for r in rs])),
            "final_batch_mean": float(
                np.mean([r["batch_size_trajectory"][-1]["batch_size"] for r in rs])
            ),
        }
        reached = [r["steps_to_best_fixed_loss"] for r in rs]
        got = [s for s in reached if s is not None]
        table[name]["steps_to_best_fixed_loss_mean"] = float(np.mean(got)) if got else None
        table[name]["reached_best_fixed_loss"] = f"{len(got)}/{len(rs)}"
    return table


def equal_loss_steps(runs: list[dict[str, Any]], names: list[str]) -> dict[str, Any] | None:
    """Steps each configuration in ``names`` needs to a loss all of them reach: the highest final
    test loss among their runs (every run ends at or below it). The mean over seeds per name."""
    rs = [r for r in runs if r["config_name"] in names]
    if not rs:
        return None
    level = max(r["test_loss"] for r in rs)
    steps = {}
    for name in names:
        got = [steps_to_reach(r, level) for r in rs if r["config_name"] == name]
        if got:
            steps[name] = float(np.mean(got))
    return {"test_loss": float(level), "steps": steps}


def noise_scale_profile(
    runs: list[dict[str, Any]], order: list[str], parts: int = 10
) -> dict[str, list[float | None]]:
    """The critical batch measured along each configuration's runs: the simple noise scale
    ``B_simple = tr Σ / |G|²`` (McCandlish et al. 2018, arXiv 1812.06162), in sequences, per
    ``1/parts`` of the token budget, from every growth test the sensor ran (all seeds pooled).

    Pooled as a ratio of sums, ``Σ V / Σ (‖ḡ‖² − V/b)``, with ``V`` the test's per-sample
    variance, ``ḡ`` its batch gradient and ``b`` its batch: ``‖ḡ‖² − V/b`` is the unbiased
    estimate of ``|G|²``, which one test alone can put at or below zero. ``None`` where a part
    has no test or its pooled ``|G|²`` is not positive. Configurations without tests (fixed
    batches, the doubling warmup, whose history holds scheduled changes) are left out."""
    out: dict[str, list[float | None]] = {}
    for name in order:
        num, den = np.zeros(parts), np.zeros(parts)
        seen = np.zeros(parts, dtype=bool)
        for r in runs:
            if r["config_name"] != name:
                continue
            budget = r["budget_tokens"] / r["config"]["context"]  # in sequences
            for h in r.get("growth_history") or []:
                if "variance" not in h:  # a scheduled change (the warmup), not a test
                    continue
                if not (math.isfinite(h["variance"]) and math.isfinite(h["grad_sq_norm"])):
                    continue  # the callback warned; it kept the batch
                k = min(parts - 1, int(h["samples"] / budget * parts))
                num[k] += h["variance"]
                den[k] += h["grad_sq_norm"] - h["variance"] / h["stats_batch_size"]
                seen[k] = True
        if seen.any():
            out[name] = [
                float(n / d) if ok and d > 0 else None
                for n, d, ok in zip(num, den, seen, strict=True)
            ]
    return out


def write_markdown(
    path: Path,
    meta: dict,
    table: dict,
    goals: list[str],
    tuning: list[dict],
    eta_tuning: list[dict] | None = None,
    noise_scale: dict[str, list[float | None]] | None = None,
):
    lines = [
        f"# LM pretraining with the whole toolkit{' (QUICK DRY RUN: not a result)' if meta['quick'] else ''}",
        "",
        *([f"**{meta['note']}**", ""] if meta.get("note") else []),
        f"Machine: {meta['machine']}, {meta['cpus']} CPUs (shared), torch {meta['torch']}, "
        + (
            f"CPU {meta['cpu']['cpu']} (instruction sets: "
            f"{', '.join(meta['cpu']['instruction_sets'])}; torch CPU capability "
            f"{meta['cpu']['torch_cpu_capability']}), "
            if "cpu" in meta
            else ""
        )
        + f"{meta['date']}. Model: {meta['model']}. Budget {meta['tokens']:,} tokens per run; seeds "
        f"{meta['seeds']}; {meta['optimizer']}, {meta['schedule']} schedule clocked in tokens; "
        f"precision {meta.get('precision', '32-true')}. "
        + (
            f"{meta['runs_trained']} runs with the tuning, {meta['total_seconds'] / 3600:.1f} h "
            "of training in all. "
            if "runs_trained" in meta
            else ""
        )
        + "Loss: target-mix next-byte cross-entropy (nats) on held-out *test* documents; the lrs "
        "were chosen on *validation* documents.",
        "",
        "Learning-rate tuning (validation target-mix loss, seed "
        f"{meta['tune_seed']}): "
        + "; ".join(
            f"{t['size']} b={t['batch_size']}: "
            + ", ".join(f"lr {float(lr):g} → {v:.4f}" for lr, v in t["val"].items())
            + f" (kept {t['best_lr']:g})"
            for t in tuning
        ),
        "",
        *(
            [
                "Variance tests' eta (validation, seed "
                f"{meta['tune_seed']}, small batch at its lr; the fewest steps to the best fixed "
                "validation loss "
                f"{eta_tuning[0]['val_threshold']:.4f}, else the lowest final validation loss; "
                "each run's optimizer steps over the whole budget in brackets): "
                + "; ".join(
                    f"{t['rule']}: "
                    + ", ".join(
                        f"eta {float(e):g} → "
                        + (
                            "never"
                            if v["steps_to_val_threshold"] is None
                            else f"{v['steps_to_val_threshold']:.0f} steps"
                        )
                        + f" (val {v['val_loss']:.4f}, {v['steps']} steps)"
                        for e, v in t["etas"].items()
                    )
                    + f" (kept {t['best_eta']:g})"
                    for t in eta_tuning
                ),
                "",
            ]
            if eta_tuning
            else []
        ),
        "| run | kind | mixture | lr | eta | test loss (mean ± sd) | spread | steps | tokens "
        "| final batch | steps to best fixed loss (reached) | wall s | sensor share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in table.items():
        st = s["steps_to_best_fixed_loss_mean"]
        eta = "-" if s.get("eta") is None else f"{s['eta']:g}"
        lines.append(
            f"| {name} | {s['kind']} | {s['mixture']} | {s['lr']:g} | {eta} | "
            f"{s['test_loss_mean']:.4f} ± "
            f"{s['test_loss_sd']:.4f} | {s['test_loss_spread']:.4f} | {s['steps_mean']:.0f} | "
            f"{s['tokens']:,} | {s['final_batch_mean']:.0f} | "
            f"{'never' if st is None else f'{st:.0f}'} ({s['reached_best_fixed_loss']}) | "
            f"{s['wall_seconds_mean']:.0f} | {s['sensor_share_mean']:.1%} |"
        )
    lines += [
        "",
        f"Best fixed run: **{meta['best_fixed']}** (final test loss "
        f"{meta['best_fixed_loss']:.4f}, the threshold of the steps column; steps read off each "
        f"run's test curve, {meta['evals']} evaluations over the budget, linearly interpolated).",
        "Sensor share: the excess wall time of the batches on which a sensor captured (growth "
        "test, group-influence capture, target-gradient pass) over the median batch without one, "
        "as a share of all batches' time.",
        "",
        "## Goals",
        "",
        *[f"- {g}" for g in goals],
        "",
    ]
    if noise_scale:
        parts = len(next(iter(noise_scale.values())))
        small = meta["batch_sizes"]["small"]
        lines += [
            "## The critical batch along the runs",
            "",
            "The simple noise scale B_simple = tr Σ / |G|² (McCandlish et al. 2018), in sequences "
            f"of {meta['context']} tokens, that the sensor measured in each tenth of the token "
            "budget (all seeds' growth tests pooled: Σ V / Σ (‖ḡ‖² − V/b)); the fixed small "
            f"batch is {small} sequences. By McCandlish et al.'s model a batch b needs about "
            "(1 + b / B_simple) × the fewest tokens and (1 + B_simple / b) × the fewest steps "
            "to a given loss.",
            "",
            "| run | "
            + " | ".join(f"{100 * k // parts}–{100 * (k + 1) // parts}%" for k in range(parts))
            + " |",
            "|---|" + "---:|" * parts,
            *(
                f"| {name} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in row) + " |"
                for name, row in noise_scale.items()
            ),
            "",
        ]
    path.write_text("\n".join(lines) + "\n")


def goals_text(
    table: dict, growth_rules: list[str], mix: str, equal: dict[str, Any] | None = None
) -> list[str]:
    out = []
    small = table.get("fixed-small")
    if small:
        for rule in growth_rules:
            s = table.get(rule)
            if not s:
                continue
            st = s["steps_to_best_fixed_loss_mean"]
            if st is None:
                out.append(
                    f"{rule}: never reached the best fixed loss in {s['reached_best_fixed_loss']} seeds: goal NOT met"
                )
            else:
                saving = 1 - st / small["steps_mean"]
                verdict = (
                    "met"
                    if saving >= 0.5
                    and s["reached_best_fixed_loss"].split("/")[0]
                    == s["reached_best_fixed_loss"].split("/")[1]
                    else "NOT met"
                )
                out.append(
                    f"{rule}: reached the best fixed loss in {st:.0f} steps against fixed-small's "
                    f"{small['steps_mean']:.0f} ({saving:+.0%} fewer; goal ≥ 50%: {verdict})"
                )
    if equal and equal["steps"]:
        st = equal["steps"]
        baselines = [b for b in ("warmup", "noise_scale") if b in st]
        listed = ", ".join(f"{n} {v:.0f}" for n, v in st.items())
        for rule in [r for r in st if r in TUNED_ETA]:
            if baselines:
                beats = all(st[rule] < st[b] for b in baselines)
                out.append(
                    f"{rule} against {' and '.join(baselines)} on steps at equal loss (test "
                    f"{equal['test_loss']:.4f}, the highest final loss among them; {listed}): "
                    f"{'met' if beats else 'NOT met'}"
                )
    for head in ["fixed-small", *growth_rules]:
        u, m = table.get(head), table.get(f"{head}+{mix}")
        if not u or not m:
            continue
        gain = u["test_loss_mean"] - m["test_loss_mean"]
        mixed = dict(zip(m["seeds"], m["test_losses"], strict=True))
        paired = [
            f"{a - mixed[seed]:+.4f}"
            for seed, a in zip(u["seeds"], u["test_losses"], strict=True)
            if seed in mixed
        ]
        spread = max(u["test_loss_spread"], m["test_loss_spread"])
        if min(len(u["seeds"]), len(m["seeds"])) < 2:
            verdict = "one seed: no spread, no verdict"
        elif gain > spread:
            verdict = "beyond the seed spread"
        else:
            verdict = "NOT beyond the seed spread"
        out.append(
            f"{head}: {mix} vs uniform: test loss {gain:+.4f} ({verdict}, spread {spread:.4f}; "
            f"per seed {', '.join(paired)})"
        )
    return out


def plot(
    path: Path,
    runs: list[dict],
    order: list[str],
    seed: int,
    noise_scale: dict[str, list[float | None]] | None = None,
) -> None:
    """One seed's run per configuration; each growth rule's measured critical batch (the
    ``noise_scale_profile``, all seeds) dotted over its batch size, at the middle of each part
    of the budget."""
    chosen = []
    critical: dict[str, list[tuple[float, float]]] = {}
    for name in order:
        r = next((r for r in runs if r["config_name"] == name and r["seed"] == seed), None)
        if r is None:
            continue
        chosen.append({**r, "name": name})
        row = (noise_scale or {}).get(name)
        if row:
            critical[name] = [
                ((k + 0.5) / len(row) * r["tokens"], v) for k, v in enumerate(row) if v is not None
            ]
    lm.plot_runs(path, chosen, critical)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.quick:
        if args.tokens == parser().get_default("tokens"):
            args.tokens = 24 * 8 * 32
        if args.batch_sizes == parser().get_default("batch_sizes"):
            args.batch_sizes = [4, 8, 16]
        args.train_bytes, args.heldout_bytes = (
            lm.QUICK_DATA["train_bytes"],
            lm.QUICK_DATA["heldout_bytes"],
        )
    for rule in args.growth_rules:
        if rule not in lm.GROWTH[1:]:
            parser().error(f"--growth-rules: {rule!r} is not one of {list(lm.GROWTH[1:])}")
    if args.lr_extensions < 0:
        parser().error(f"--lr-extensions must be 0 or more, got {args.lr_extensions}")
    if args.tune_seed not in args.seeds:
        parser().error(f"--tune-seed {args.tune_seed} must be one of --seeds {args.seeds}")
    if args.stop_after is not None and args.stop_after <= 0:
        parser().error(f"--stop-after must be positive seconds, got {args.stop_after}")
    if args.prepare_data:
        if args.cache is None:
            parser().error("--prepare-data needs --cache FILE.npz")
        lm.split_domains(args.train_bytes, args.heldout_bytes, cache=args.cache)
        print(f"wrote {args.cache}")
        return {"cache": str(args.cache)}
    started = _clock()
    name = args.name or ("lm_pretrain_quick" if args.quick else "lm_pretrain")
    base = base_config(args)
    placeholder = dict.fromkeys(SIZES, args.lrs[0])
    if args.plan:
        tune = tuning_jobs(base, args) + eta_jobs(base, args, args.lrs[0])
        grid = [  # the tuning seed's fixed and variance-test runs come from the tuning
            j
            for j in grid_jobs(base, args, placeholder)
            if not (
                j.seed == args.tune_seed
                and j.mixture == "uniform"
                and j.growth in ("none", *TUNED_ETA)
            )
        ]
        n = len(tune) + len(grid)
        tokens = sum((j.tokens // j.context) * j.context for j in tune + grid)
        print(
            f"{len(tune)} tuning runs + {len(grid)} grid runs = {n} runs, {tokens:,} tokens "
            f"(and up to {args.lr_extensions} more tuning runs per batch size where the best lr "
            "is on the grid's edge)"
        )
        if args.tokens_per_second:
            print(
                f"estimated {tokens / args.tokens_per_second / 3600:.1f} h of training "
                f"at {args.tokens_per_second:.0f} tokens/s (evaluations not included)"
            )
        return {"runs": n, "tokens": tokens}

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover

        def tqdm(x, **_):
            return x

    splits = lm.split_domains(args.train_bytes, args.heldout_bytes, cache=args.cache)
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / f"{name}.partial.json"
    done: dict[str, dict] = {}
    if args.resume and partial.exists():  # only runs made with the same precision
        done = {
            r["name"]: r
            for r in json.loads(partial.read_text())["runs"]
            if r.get("config", {}).get("precision", "32-true") == args.precision
        }
    sizes = dict(zip(SIZES, args.batch_sizes, strict=True))

    longest = [0.0]  # the longest run trained by this process, seconds

    def run(cfg) -> dict:
        if cfg.name in done:
            return done[cfg.name]
        if args.stop_after is not None and _clock() - started + longest[0] > args.stop_after:
            raise OutOfTime(cfg.name)
        t_run = _clock()
        rec = lm.train(cfg, splits, progress=False)
        longest[0] = max(longest[0], _clock() - t_run)
        rec.pop("train")  # per-batch rows: kept out of the summary file
        rec["sizes"] = sizes
        done[cfg.name] = rec
        partial.write_text(json.dumps({"runs": list(done.values())}))
        print(
            f"{cfg.name}: val {rec['val_loss']:.4f} test {rec['test_loss']:.4f} "
            f"{rec['steps']} steps {rec['wall_seconds']:.0f} s",
            file=sys.stderr,
        )
        return rec

    try:
        return _grid(args, name, base, sizes, run, partial, tqdm)
    except OutOfTime as stop:
        print(
            f"--stop-after {args.stop_after:.0f} s: stopped before {stop}; {len(done)} runs "
            f"done, kept in {partial} (go on with --resume)",
            file=sys.stderr,
        )
        return {"stopped_before": str(stop), "runs_done": len(done)}


def _grid(args, name, base, sizes, train, partial, tqdm) -> dict[str, Any]:
    """The tuning runs, the grid, and the result files (every run through ``train``)."""
    used: dict[str, dict] = {}  # every run this grid reads, trained now or in an earlier process

    def run(cfg) -> dict:
        used[cfg.name] = rec = train(cfg)
        return rec

    tuning, best_lr = [], {}
    for size in SIZES:
        recs = [
            run(c)
            for c in tqdm(
                [c for c in tuning_jobs(base, args) if c.batch_size == sizes[size]],
                desc=f"tuning {size}",
            )
        ]
        val = {r["config"]["lr"]: r["val_loss"] for r in recs}
        val = bracket_lr(
            val,
            lambda lr, size=size: run(tuning_job(base, args, size, lr))["val_loss"],
            args.lr_extensions,
        )
        best_lr[size] = min(val, key=val.get)
        tuning.append(
            {"size": size, "batch_size": sizes[size], "val": val, "best_lr": best_lr[size]}
        )
    # the variance tests' eta, on validation: the fewest steps to the best fixed validation loss
    val_threshold = min(t["val"][t["best_lr"]] for t in tuning)
    eta_tuning, best_eta = [], {}
    jobs = eta_jobs(base, args, best_lr["small"])
    recs = {c.name: run(c) for c in tqdm(jobs, desc="tuning eta")}
    for rule in [r for r in args.growth_rules if r in TUNED_ETA]:
        by_eta = {c.eta: recs[c.name] for c in jobs if c.growth == rule}
        best_eta[rule], table = choose_eta(by_eta, val_threshold)
        eta_tuning.append(
            {
                "rule": rule,
                "val_threshold": val_threshold,
                "etas": table,
                "best_eta": best_eta[rule],
            }
        )
    runs = [run(c) for c in tqdm(grid_jobs(base, args, best_lr, best_eta), desc="grid")]
    for r in runs:
        r["config_name"] = config_of(r)
    order = list(dict.fromkeys(r["config_name"] for r in runs))
    fixed = {
        n: np.mean([r["test_loss"] for r in runs if r["config_name"] == n])
        for n in order
        if n.startswith("fixed-") and "+" not in n
    }
    best_fixed = min(fixed, key=fixed.get)
    threshold = float(fixed[best_fixed])
    for r in runs:
        r["steps_to_best_fixed_loss"] = steps_to_reach(r, threshold)
    table = summarise(runs, order)
    equal = equal_loss_steps(runs, [r for r in args.growth_rules if r in order])
    goals = goals_text(table, args.growth_rules, args.mixture_rule, equal)
    noise_scale = noise_scale_profile(runs, order)
    cfg0 = base
    meta = {
        "quick": args.quick,
        "note": args.note,
        "machine": platform.platform(),
        "cpu": native_machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": f"transformers Llama, {cfg0.layers} layers, width {cfg0.width}, "
        f"{cfg0.heads} heads, context {cfg0.context}, byte vocabulary",
        "tokens": args.tokens,
        "seeds": args.seeds,
        "tune_seed": args.tune_seed,
        "optimizer": args.optimizer,
        "schedule": args.schedule,
        "precision": args.precision,
        "evals": cfg0.evals,
        "batch_sizes": sizes,
        "context": cfg0.context,
        "best_lr": best_lr,
        "best_eta": best_eta,
        "best_fixed": best_fixed,
        "best_fixed_loss": threshold,
        # summed over runs: a grid resumed across processes took longer than the last one
        "runs_trained": len(used),
        "total_seconds": sum(r["wall_seconds"] for r in used.values()),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    keep = (
        "name",
        "config_name",
        "kind",
        "mixture",
        "seed",
        "test_loss",
        "val_loss",
        "steps",
        "tokens",
        "steps_to_best_fixed_loss",
        "wall_seconds",
        "sensor_share",
        "tokens_per_second",
        "test_domain",
        "evals",
        "batch_size_trajectory",
        "weights_trajectory",
        "config",
    )
    result = {
        "meta": meta,
        "tuning": tuning,
        "eta_tuning": eta_tuning,
        "summary": table,
        "equal_loss_steps": equal,
        "noise_scale_profile": noise_scale,
        "goals": goals,
        "runs": [{k: r[k] for k in keep} for r in runs],
    }
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    write_markdown(args.out / f"{name}.md", meta, table, goals, tuning, eta_tuning, noise_scale)
    plot(args.out / f"{name}.png", runs, order, args.seeds[0], noise_scale)
    partial.unlink(missing_ok=True)
    print((args.out / f"{name}.md").read_text())
    return result


if __name__ == "__main__":
    main()
