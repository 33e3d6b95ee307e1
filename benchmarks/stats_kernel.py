"""The compiled Linear kernel alone against the matmul it replaces, per build and shape.

For each kernel build this CPU runs (``avx512``, ``avx2``, ``generic`` on x86-64) and each
Linear shape (batch ``b``, positions ``T``, ``n`` inputs, ``o`` outputs), in one process and
interleaved round by round:

- ``mm``: autograd's batch weight gradient, ``δᵀX`` over all ``b·T`` rows (torch's matmul);
- the kernel (:func:`adaptive.stats.native.linear_sums_and_norms`): the same gradient plus every
  sample's squared norm, without storing the per-sample gradients.

Reported: the median time of each and ``kernel / mm``. The kernel replaces the matmul in a step,
so this ratio is what it adds there (the planner of :mod:`adaptive.stats.planner` still picks,
per shape, whichever path is fastest in a whole step; ``benchmarks/stats_paths.py`` shows that).
It is the figure to tune a build's register blocking against (``LIN_ROWS``, ``LIN_NV`` in
``adaptive/stats/_kernels.c``), on the machine the build is for. ``--isa avx2`` caps torch's
matmul to AVX2 too, as on an AVX2-only CPU.

Usage::

    python benchmarks/stats_kernel.py --threads 2
    python benchmarks/stats_kernel.py --threads 2 --isa avx2 --out benchmarks/results/stats_kernel_avx2
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from adaptive.stats import native

RESULTS = Path(__file__).parent / "results"

_SPEC = importlib.util.spec_from_file_location(
    "bench_stats_overhead", Path(__file__).parent / "stats_overhead.py"
)
overhead = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(overhead)

# (batch, positions, inputs, outputs): the benchmark block's layers (64 positions), issue 21's
# language model (256), and long sequences (1024: positions in tiles)
SHAPES = [
    (32, 64, 128, 384),
    (32, 64, 128, 128),
    (32, 64, 128, 512),
    (32, 64, 512, 128),
    (8, 256, 256, 256),
    (8, 256, 256, 1024),
    (2, 1024, 128, 512),
    (2, 1024, 512, 128),
]
QUICK_SHAPES = [(3, 5, 20, 7), (2, 70, 16, 9)]


def workspace():
    buffers: dict[tuple, torch.Tensor] = {}

    def out(shape, slot=0):
        key = (slot, tuple(shape))
        if key not in buffers:
            buffers[key] = torch.empty(shape)
        return buffers[key]

    return out


def builds(isa: str | None) -> list[str]:
    """The builds to time: those installed that this CPU (or the --isa cap) runs."""
    names = [n for n in native.targets_built() if native.supported(n)]
    if isa == "avx2":
        names = [n for n in names if n != "avx512"]
    return names


def run_all(args: argparse.Namespace) -> dict:
    shapes = QUICK_SHAPES if args.quick else SHAPES
    names = builds(args.isa)
    if not names:
        raise SystemExit("no kernel build installed that this CPU runs")
    rows = []
    for b, t, n, o in tqdm_(shapes, "shapes"):
        g = torch.Generator().manual_seed(0)
        a = torch.randn(b, t, n, generator=g)
        d = torch.randn(b, t, o, generator=g)
        out = workspace()
        a2, d2 = a.reshape(-1, n), d.reshape(-1, o)
        runs = {"mm": lambda a2=a2, d2=d2: d2.t() @ a2}
        for name in names:
            runs[name] = lambda a=a, d=d, out=out: native.linear_sums_and_norms(a, d, out)

        def build(k: str):  # the build in force while k's calls are timed (not timed itself)
            return contextlib.nullcontext() if k == "mm" else native.using(k)

        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.warmup):
            for k, f in runs.items():
                with build(k):
                    f()
        for _ in range(args.rounds):
            for k, f in runs.items():
                with build(k):
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        f()
                    times[k].append((time.perf_counter() - t0) / args.steps * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        # the kernel's sum is the matmul's gradient: a check that like is timed against like
        with native.using(names[0]):
            s = native.linear_sums_and_norms(a, d, out)[0]
        err = float((s - runs["mm"]()).abs().max() / runs["mm"]().abs().max())
        rows.append(
            {
                "shape": {"b": b, "t": t, "n": n, "o": o},
                "median_ms": med,
                "kernel_over_mm": {k: med[k] / med["mm"] for k in names},
                "sum_rel_err": err,
            }
        )
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": native.machine(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rounds": args.rounds,
        "steps": args.steps,
        "note": args.note,
        "builds": names,
        "rows": rows,
    }


def tqdm_(it, desc):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return it
    return tqdm(it, desc=desc)


def markdown(res: dict) -> str:
    lines = [
        "# The compiled Linear kernel against the matmul it replaces",
        "",
        f"- date: {res['date']}",
        f"- machine: {res['platform']}, {res['threads']} torch threads",
        *overhead.machine_lines(res["machine"]),
        f"- versions: python {platform.python_version()}, torch {res['torch']}",
        f"- {res['rounds']} interleaved rounds × {res['steps']} calls; median per call in ms",
        *([f"- note: {res['note']}"] if res["note"] else []),
        "",
        "| shape | mm | " + " | ".join(f"{n} | {n} / mm" for n in res["builds"]) + " |",
        "|---|---:|" + "---:|---:|" * len(res["builds"]),
    ]
    for r in res["rows"]:
        s = r["shape"]
        cells = " | ".join(
            f"{r['median_ms'][n]:.3f} | {r['kernel_over_mm'][n]:.2f}" for n in res["builds"]
        )
        lines.append(
            f"| b{s['b']} T{s['t']} {s['n']}→{s['o']} | {r['median_ms']['mm']:.3f} | {cells} |"
        )
    lines += [
        "",
        "The kernel returns the matmul's gradient (largest relative difference over the shapes: "
        f"{max(r['sum_rel_err'] for r in res['rows']):.1e}) and every sample's squared norm.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    return overhead.per_shape_cli(p, argv, run_all, markdown, RESULTS / "stats_kernel")


if __name__ == "__main__":
    sys.exit(main() and 0)
