"""Plot every sample-clocked schedule against samples seen; write PNG, JSON and Markdown.

Budget: two Fashion-MNIST epochs (120,000 samples). Schedules are stepped exactly as in
training, one ``step(samples=β)`` per optimizer step:

- WSD with each decay shape, linear decay, and the refinement (arXiv 2310.07831) of the
  gradient norms logged by a short real SGD run of a small CNN on Fashion-MNIST
  (``--synthetic-norms`` uses a made-up decaying history instead);
- the power scheduler (arXiv 2408.13359) at a constant batch of 128 and under a batch that
  doubles from 32 to 512 (every fifth of the budget), next to WSD under the same growing batch
  (identical to its constant-batch curve: WSD does not depend on β).

    python benchmarks/plot_schedules.py            # writes benchmarks/results/schedules.*
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from adaptive.data import fashion_mnist
from adaptive.schedules import (
    LinearDecayScheduler,
    PowerScheduler,
    RefinedScheduler,
    WSDScheduler,
)

TOTAL = 120_000
WARMUP = 6_000
DECAY = 12_000
MARKS = [0, 3_000, 6_000, 30_000, 60_000, 100_000, 108_000, 114_000, 120_000]


def growing_batches(total: int, start: int = 32, stop: int = 512, phases: int = 5) -> list[int]:
    """Batch sizes that double every ``total / phases`` samples, from ``start`` up to ``stop``."""
    out, seen = [], 0
    while seen < total:
        batch = min(start * 2 ** (seen * phases // total), stop)
        out.append(min(batch, total - seen))
        seen += out[-1]
    return out


def run(sched, batches: list[int]) -> tuple[list[int], list[float]]:
    """Step ``sched`` through ``batches``; return samples seen and the lr of each next step."""
    xs, ys = [0], [sched.get_last_lr()[0]]
    for b in batches:
        sched.optimizer.step()
        sched.step(samples=b)
        xs.append(sched.samples_seen)
        ys.append(sched.get_last_lr()[0])
    return xs, ys


def _opt(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def real_grad_norms(steps: int, batch: int, seed: int) -> np.ndarray:
    """ℓ2 gradient norms of a short SGD run of a small CNN on Fashion-MNIST (constant lr)."""
    ds = fashion_mnist("train")
    torch.manual_seed(seed)
    xs = ds.images[: steps * batch].unsqueeze(1).float().div_(255.0)
    ys = ds.targets[: steps * batch]
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 10),
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    norms = []
    for i in tqdm(range(steps), desc="grad norms (Fashion-MNIST)"):
        sl = slice(i * batch, (i + 1) * batch)
        loss = F.cross_entropy(model(xs[sl]), ys[sl])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norms.append(
            torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
        )
        opt.step()
    return torch.stack(norms).numpy()  # one read at the end


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--synthetic-norms", action="store_true", help="skip the real gradient run")
    p.add_argument("--norm-steps", type=int, default=200, help="steps of the gradient-norm run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    constant = [128] * (TOTAL // 128) + ([TOTAL % 128] if TOTAL % 128 else [])
    growing = growing_batches(TOTAL)
    if args.synthetic_norms:
        t = np.arange(args.norm_steps)
        norms = 1.0 + 2.0 * np.exp(-t / 20) + 0.3 * t / args.norm_steps
        norm_source = "synthetic history 1 + 2 exp(-t/20) + 0.3 t/T"
    else:
        norms = real_grad_norms(args.norm_steps, 128, args.seed)
        norm_source = (
            f"l2 gradient norms of {args.norm_steps} SGD steps (batch 128) on Fashion-MNIST"
        )

    lr = 0.1
    power = dict(a=0.066, b=-0.51, warmup_tokens=WARMUP, decay_tokens=DECAY, total_tokens=TOTAL)
    curves: dict[str, tuple[list[int], list[float]]] = {}
    specs = {
        **{
            f"WSD {shape} decay": (
                lambda s=shape: WSDScheduler(_opt(lr), WARMUP, DECAY, TOTAL, decay_shape=s),
                constant,
            )
            for shape in ("linear", "cosine", "1-sqrt", "exponential")
        },
        "linear decay": (lambda: LinearDecayScheduler(_opt(lr), TOTAL, WARMUP), constant),
        "refined (SGD, G^-2)": (lambda: RefinedScheduler(_opt(lr), norms, TOTAL), constant),
        "power, batch 128": (lambda: PowerScheduler(_opt(lr), **power), constant),
        "power, batch 32->512": (lambda: PowerScheduler(_opt(lr), **power), growing),
        "WSD 1-sqrt, batch 32->512": (
            lambda: WSDScheduler(_opt(lr), WARMUP, DECAY, TOTAL, decay_shape="1-sqrt"),
            growing,
        ),
    }
    for name, (factory, batches) in tqdm(specs.items(), desc="schedules"):
        curves[name] = run(factory(), batches)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), constrained_layout=True)
    for name, (xs, ys) in curves.items():
        ax = right if name.startswith(("power", "WSD 1-sqrt, batch 32")) else left
        style = "--" if "32->512" in name and name.startswith("WSD") else "-"
        ax.plot(np.asarray(xs) / 1000, ys, style, label=name, lw=1.4)
    left.set_title("batch-independent schedules (peak lr 0.1)")
    right.set_title("power scheduler: a=0.066, b=-0.51, lr_max=0.1")
    for ax in (left, right):
        ax.set_xlabel("samples seen (thousands)")
        ax.set_ylabel("learning rate of the next step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    png = args.out_dir / "schedules.png"
    fig.savefig(png, dpi=130)

    def at(name: str, n: int) -> float:
        xs, ys = curves[name]
        i = int(np.searchsorted(xs, n, side="right")) - 1
        return ys[max(i, 0)]

    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "budget_samples": TOTAL,
        "warmup_samples": WARMUP,
        "decay_samples": DECAY,
        "refined_from": norm_source,
        "growing_batch": "32 doubling to 512, every fifth of the budget",
        "note": "schedule values only (no timing); the machine was shared with other jobs",
    }
    step = max(1, max(len(xs) for xs, _ in curves.values()) // 400)
    data = {
        "meta": meta,
        "curves": {n: {"samples": xs[::step], "lr": ys[::step]} for n, (xs, ys) in curves.items()},
        "at": {n: {str(m): at(n, m) for m in MARKS} for n in curves},
        "grad_norms": [float(g) for g in norms],
    }
    (args.out_dir / "schedules.json").write_text(json.dumps(data, indent=1))
    lines = [
        "# Sample-clocked schedules",
        "",
        f"Generated by `benchmarks/plot_schedules.py` on {meta['date']} ({meta['platform']}, "
        f"{meta['cpu_count']} CPUs, Python {meta['python']}, torch {meta['torch']}). "
        "Values only, no timing (the machine was shared).",
        "",
        f"Budget {TOTAL:,} samples (two Fashion-MNIST epochs), warmup {WARMUP:,}, decay "
        f"{DECAY:,}. Refined schedule from: {norm_source}. Growing batch: "
        f"{meta['growing_batch']}. Learning rate of the next step after *n* samples:",
        "",
        "| schedule | " + " | ".join(f"{m:,}" for m in MARKS) + " |",
        "| --- | " + " | ".join("---:" for _ in MARKS) + " |",
    ]
    for name in curves:
        lines.append(f"| {name} | " + " | ".join(f"{at(name, m):.4g}" for m in MARKS) + " |")
    lines += ["", "![schedules](schedules.png)", ""]
    (args.out_dir / "schedules.md").write_text("\n".join(lines))
    print(f"wrote {png}, schedules.json and schedules.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
