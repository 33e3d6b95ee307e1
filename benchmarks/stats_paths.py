"""Each way the sensor can handle a Linear or convolution layer, timed side by side per shape,
against the way it chooses by itself.

For every shape of the grid (convolutions with stride 1 and 2, 1×1, 3×3 and 5×5 kernels, 1 to
256 channels, batches 32 to 256; Linear layers on sequences), one layer alone is trained one
step (forward, backward against a fixed output gradient, ``result()``), in one process and
interleaved round by round, as:

- ``plain``: forward + backward, no statistics;
- ``native`` / ``materialise`` / ``torch``: ``GradientStatistics(layer, paths=...)`` forced to
  that path (see :mod:`adaptive.stats.planner`; ``native`` only where the compiled kernel is
  built and takes the shape);
- ``auto``: ``GradientStatistics(layer)``, which timed the candidates at its first capture and
  again at its 16th (both in the warm-up) and kept the fastest.

Reported per shape: the median step time of each, ``auto / best`` (the chosen path against
the fastest forced one, in the same rounds: 1.00 when the choice was right, within the
rounds' noise otherwise) and ``auto / plain``. Every results file names the CPU, its
instruction sets and the kernel build (``--isa avx2`` measures as on an AVX2-only CPU: torch's
ATen, MKL and oneDNN and the kernel capped to AVX2).

Usage::

    python benchmarks/stats_paths.py --threads 2
    python benchmarks/stats_paths.py --threads 2 --isa avx2 --out benchmarks/results/stats_paths_avx2
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from adaptive.stats import GradientStatistics, native
from adaptive.stats.planner import PATHS, REMEASURE_AT

RESULTS = Path(__file__).parent / "results"

# the machine description and the AVX2 emulation are shared with stats_overhead.py
_SPEC = importlib.util.spec_from_file_location(
    "bench_stats_overhead", Path(__file__).parent / "stats_overhead.py"
)
overhead = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(overhead)

# (in channels, out channels, kernel, stride, input height = width, batch)
CONVS = [
    (1, 16, 5, 1, 28, 128),
    (16, 32, 5, 1, 14, 128),
    (8, 16, 3, 1, 32, 128),
    (8, 8, 1, 1, 32, 256),
    (16, 16, 5, 2, 32, 256),
    (32, 64, 3, 2, 16, 64),
    (64, 64, 1, 1, 16, 64),
    (64, 128, 3, 2, 8, 32),
    (128, 128, 3, 1, 8, 32),
    (256, 256, 1, 1, 4, 32),
    (256, 256, 3, 1, 4, 32),
]
# (in features, out features, positions, batch)
LINEARS = [
    (128, 384, 64, 32),
    (128, 128, 64, 32),
    (128, 512, 64, 32),
    (512, 128, 64, 32),
    (64, 64, 256, 8),
    (256, 256, 16, 64),
    (1024, 1024, 8, 16),
    (32, 32, 512, 4),
    (256, 256, 256, 8),  # issue 21's language model: width 256, context 256, batch 8
    (128, 512, 1024, 2),  # long sequences: positions in tiles in the kernel
    (512, 128, 1024, 2),
]
QUICK_CONVS = [(2, 4, 3, 1, 6, 4), (3, 5, 1, 2, 6, 4)]
QUICK_LINEARS = [(6, 5, 4, 3)]


def cases(quick: bool):
    for c, o, k, s, hw, b in QUICK_CONVS if quick else CONVS:
        yield (
            f"conv {c}→{o} {k}×{k} s{s} {hw}×{hw} b{b}",
            lambda c=c, o=o, k=k, s=s: nn.Conv2d(c, o, k, stride=s, padding=k // 2),
            (b, c, hw, hw),
        )
    for n, o, t, b in QUICK_LINEARS if quick else LINEARS:
        yield (f"linear {n}→{o} t{t} b{b}", lambda n=n, o=o: nn.Linear(n, o), (b, t, n))


def build(factory, shape):
    """The timed steps of one shape: name -> step function."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    base = factory()
    with torch.no_grad():
        grad_out = torch.randn_like(base(x))
    steps = {}
    plain = factory()
    plain.load_state_dict(base.state_dict())

    def run_plain():
        plain.zero_grad(set_to_none=True)
        plain(x).backward(grad_out)

    steps["plain"] = run_plain
    probe = GradientStatistics(base, inner_products=False)
    with probe.capture():
        base(x).backward(grad_out)
    probe.result()
    (entry,) = probe.plan()
    for path in [*[p for p in PATHS if p in entry.candidates], "auto"]:
        layer = factory()
        layer.load_state_dict(base.state_dict())
        stats = GradientStatistics(
            layer, inner_products=False, paths=None if path == "auto" else {"<root>": path}
        )

        def run(layer=layer, stats=stats):
            layer.zero_grad(set_to_none=True)
            with stats.capture():
                layer(x).backward(grad_out)
            return stats.result().noise_scale

        run.stats = stats
        steps[path] = run
    return steps


def run_all(args) -> dict:
    out = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "note": args.note, **native.machine()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "settings": {"rounds": args.rounds, "steps": args.steps},
        "shapes": {},
    }
    for name, factory, shape in tqdm(list(cases(args.quick)), desc="shapes"):
        steps = build(factory, shape)
        # warm-up; auto measures its candidates here, at its first call and again at its 16th
        # (planner.REMEASURE_AT), so the timed rounds see its steady state
        for k, fn in steps.items():
            for _ in range(REMEASURE_AT[0] + 1 if k == "auto" else 2):
                fn()
        times = {k: [] for k in steps}
        order = list(steps)
        for r in range(args.rounds):
            for k in order[r % len(order) :] + order[: r % len(order)]:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    steps[k]()
                times[k].append((time.perf_counter() - t0) / args.steps)
        med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        forced = {k: v for k, v in med.items() if k in PATHS}
        best = min(forced, key=forced.get)
        (entry,) = steps["auto"].stats.plan()
        out["shapes"][name] = {
            "median_ms": med,
            "best_path": best,
            "auto_path": entry.path,
            "auto_reason": entry.reason,
            "auto_over_best": med["auto"] / forced[best],
            "auto_over_plain": med["auto"] / med["plain"],
            # the spread of the forced paths' round times, for judging auto / best
            "best_min_max_ms": [1e3 * min(times[best]), 1e3 * max(times[best])],
        }
    return out


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# The sensor's paths per layer shape",
        "",
        f"- date: {res['date']}",
        f"- machine: {m['platform']}, {m['torch_threads']} torch threads",
        *overhead.machine_lines(m),
        f"- versions: {', '.join(f'{k} {v}' for k, v in res['versions'].items())}",
        f"- {res['settings']['rounds']} interleaved rounds × {res['settings']['steps']} steps, "
        "wall clock; median step (forward, backward, result) in ms",
    ]
    if m.get("note"):
        lines.append(f"- note: {m['note']}")
    lines += [
        "",
        "| shape | plain | native | materialise | torch | auto (chosen) | auto / best | "
        "auto / plain |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    worst = 0.0  # over shapes where auto took another path than the fastest forced one
    for name, r in res["shapes"].items():
        t = r["median_ms"]
        cell = {p: (f"{t[p]:.2f}" if p in t else "–") for p in PATHS}
        cell[r["best_path"]] = f"**{cell[r['best_path']]}**"
        same = r["auto_path"] == r["best_path"]
        if not same:
            worst = max(worst, r["auto_over_best"])
        lines.append(
            f"| {name} | {t['plain']:.2f} | {cell['native']} | {cell['materialise']} | "
            f"{cell['torch']} | {t['auto']:.2f} ({r['auto_path']}) | {r['auto_over_best']:.2f}"
            f"{' (same path)' if same else ''} | {r['auto_over_plain']:.2f} |"
        )
    lines += [
        "",
        f"Largest auto / best where auto took another path than the fastest: {worst:.2f}. "
        "Where it took the same path, auto / best is the rounds' noise.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    return overhead.per_shape_cli(p, argv, run_all, markdown, RESULTS / "stats_paths")


if __name__ == "__main__":
    sys.exit(main() and 0)
