"""The demo's outputs: a results table (printed, Markdown, JSON) and a PNG of the curves."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adaptive.callbacks.demo.train import RunResult

COLUMNS = (
    ("run", "name", "{}"),
    ("test acc", "test_accuracy", "{:.2%}"),
    ("optimizer steps", "optimizer_steps", "{:d}"),
    ("samples seen", "samples_seen", "{:,d}"),
    ("wall time (s)", "wall_time_s", "{:.1f}"),
)


def format_table(results: Sequence[RunResult]) -> str:
    """A Markdown table with one row per run."""
    header = [c[0] for c in COLUMNS]
    rows = [[fmt.format(getattr(r, attr)) for _, attr, fmt in COLUMNS] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| "
        + " | ".join(
            v.rjust(w) if i else v.ljust(w)
            for i, (v, w) in enumerate(zip(row, widths, strict=True))
        )
        + " |"
        for row in rows
    ]
    return "\n".join(lines)


def _smooth(values: list[float], window: int) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if window <= 1 or len(x) < window:
        return x
    kernel = np.ones(window) / window
    return np.convolve(x, kernel, mode="valid")


def plot_curves(results: Sequence[RunResult], path: Path) -> Path:
    """Training loss, test accuracy and batch size against samples seen, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in results:
        c = r.curves
        window = max(1, len(c["loss"]) // 50)
        loss = _smooth(c["loss"], window)
        axes[0].plot(
            np.asarray(c["samples"][window - 1 :], dtype=float)[: len(loss)], loss, label=r.name
        )
        axes[1].plot(
            c["eval_samples"], [100 * a for a in c["test_accuracy"]], marker="o", label=r.name
        )
        axes[2].step(c["samples"], c["batch_size"], where="post", label=r.name)
    axes[0].set(xlabel="samples seen", ylabel="training loss (moving average)", yscale="log")
    axes[1].set(xlabel="samples seen", ylabel="test accuracy (%)")
    axes[2].set(xlabel="samples seen", ylabel="global batch size", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Small CNN on Fashion-MNIST")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(results: Sequence[RunResult], out_dir: Path, meta: dict) -> dict[str, Path]:
    """Write ``summary.md``, ``summary.json`` and ``training_curves.png`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = format_table(results)
    md = out_dir / "summary.md"
    md.write_text(
        "# Demo: small CNN on Fashion-MNIST\n\n"
        + "\n".join(f"- {k}: {v}" for k, v in meta.items())
        + "\n\n"
        + table
        + "\n\n"
        + "\n".join(f"- `{r.name}`: {r.description}" for r in results)
        + "\n"
    )
    js = out_dir / "summary.json"
    runs = [{**r.row(), "curves": r.curves} for r in results]
    js.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    png = plot_curves(results, out_dir / "training_curves.png")
    return {"markdown": md, "json": js, "plot": png}
