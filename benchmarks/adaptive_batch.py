"""Adaptive batch growth against fixed batches on real Fashion-MNIST and MNIST.

Configurations, all in one process with the same samples budget (``--epochs`` passes over the
training set), the same small CNN and AdaGrad: fixed small batches, a fixed large batch, and the
batch grown from ``b0`` by the norm test and by the inner-product test (AdAdaGrad, Lau, Liu,
Kolar, arXiv 2402.11215) through :class:`adaptive.batching.AdaptiveBatchSampler` and
:class:`adaptive.stats.GradientStatistics`. Reported: test accuracy, optimizer steps, wall time
of training (evaluation excluded), and the batch size against samples seen (plot).

    python benchmarks/adaptive_batch.py                # full run (about 20 min on 2 cores)
    python benchmarks/adaptive_batch.py --quick   # results/adaptive_batch_quick.*

The loop is plain PyTorch (the Lightning callback adds only the wiring): each step takes the
next index list from the sampler, and on decision steps captures the statistics of that step's
backward pass, runs the test and schedules the new size from the next batch (no prefetching
here, so no lookahead is needed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from adaptive.batching import AdaptiveBatchSampler, inner_product_test, next_batch_size, norm_test
from adaptive.data import fashion_mnist, mnist
from adaptive.models import small_cnn
from adaptive.stats import GradientStatistics

RESULTS = Path(__file__).resolve().parent / "results"


def _tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(xs), torch.stack(ys)


def load(name: str) -> dict[str, torch.Tensor]:
    fn = {"fashion_mnist": fashion_mnist, "mnist": mnist}[name]
    xtr, ytr = _tensors(fn("train"))
    xte, yte = _tensors(fn("test"))
    return {"xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte}


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(
        int((model(x[i : i + 2000]).argmax(1) == y[i : i + 2000]).sum())
        for i in range(0, len(x), 2000)
    )
    model.train()
    return correct / len(x)


def train(config: dict, data: dict, epochs: float, lr: float, seed: int, bar: tqdm) -> dict:
    torch.manual_seed(seed)
    model = small_cnn()
    opt = torch.optim.Adagrad(model.parameters(), lr=lr)
    n = len(data["ytr"])
    budget = int(epochs * n)
    sampler = AdaptiveBatchSampler(n, batch_size=config["b0"], shuffle=True, seed=seed)
    test = config.get("test")
    stats = None
    if test is not None:
        stats = GradientStatistics(model, inner_products=test == "inner_product")
    size, steps, seen = config["b0"], 0, 0
    trajectory = [[0, size]]
    elapsed = 0.0
    start = time.perf_counter()
    done = False
    while not done:
        for idx in sampler:
            index = torch.as_tensor(idx)
            x, y = data["xtr"][index], data["ytr"][index]
            decide = (
                stats is not None and size < config["b_max"] and steps % config["interval"] == 0
            )
            opt.zero_grad(set_to_none=True)
            if decide:
                with stats.capture():
                    nn.functional.cross_entropy(model(x), y).backward()
            else:
                nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            steps += 1
            seen += len(idx)
            bar.update(len(idx))
            if decide:
                s = stats.result()
                if test == "norm":
                    proposed = norm_test(s, eta=config["eta"])
                else:
                    proposed = inner_product_test(s, theta=config["eta"])
                new = next_batch_size(size, proposed, config["b_max"], 1)
                if new != size:
                    size = new
                    sampler.set_batch_size(size)  # from the next batch: nothing prefetched here
                    trajectory.append([seen, size])
            if seen >= budget:
                done = True
                break
    elapsed = time.perf_counter() - start
    trajectory.append([seen, size])
    return {
        "name": config["name"],
        "test_accuracy": accuracy(model, data["xte"], data["yte"]),
        "steps": steps,
        "samples": seen,
        "wall_s": elapsed,
        "final_batch_size": size,
        "trajectory": trajectory,
        "config": {k: v for k, v in config.items() if k != "name"},
    }


def configs(args: argparse.Namespace) -> list[dict]:
    out = [{"name": f"fixed {b}", "b0": b} for b in args.fixed]
    for test, etas in (("norm", args.eta), ("inner_product", args.theta)):
        if test not in args.tests:
            continue
        for eta in etas:
            out.append(
                {
                    "name": f"adaptive {test} ({'eta' if test == 'norm' else 'theta'}={eta}, "
                    f"b0={args.b0})",
                    "b0": args.b0,
                    "test": test,
                    "eta": eta,
                    "b_max": args.b_max,
                    "interval": args.interval,
                }
            )
    return out


def markdown(report: dict, plot_name: str) -> str:
    lines = [
        "# Adaptive batch growth vs fixed batches (small CNN, AdaGrad)",
        "",
        f"Date {report['date']}; {report['machine']['platform']}, {report['machine']['cpus']} CPUs "
        f"(load average before the run {report['machine'].get('loadavg')}); torch "
        f"{report['versions']['torch']}, python {report['versions']['python']}.",
        f"Budget {report['args']['epochs']} epochs of samples per run, lr {report['args']['lr']}, "
        f"seeds {report['args']['seeds']}. Command: `{report['command']}`",
        "",
        "| data | configuration | test acc. (mean) | optimizer steps | wall s | final batch |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for ds, rows in report["results"].items():
        for name, runs in rows.items():
            acc = sum(r["test_accuracy"] for r in runs) / len(runs)
            steps = sum(r["steps"] for r in runs) / len(runs)
            wall = sum(r["wall_s"] for r in runs) / len(runs)
            final = runs[-1]["final_batch_size"]
            lines.append(
                f"| {ds} | {name} | {100 * acc:.2f}% | {steps:.0f} | {wall:.0f} | {final} |"
            )
    lines += ["", f"Batch size against samples seen: `{plot_name}`.", ""]
    if report.get("notes"):
        lines += ["## Notes", "", report["notes"], ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(report["results"])
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4), squeeze=False)
    for ax, ds in zip(axes[0], sets, strict=True):
        for name, runs in report["results"][ds].items():
            traj = runs[0]["trajectory"]
            xs = [p[0] for p in traj]
            ys = [p[1] for p in traj]
            ax.step(xs, ys, where="post", label=f"{name}: {100 * runs[0]['test_accuracy']:.1f}%")
        ax.set_yscale("log", base=2)
        ax.set_xlabel("samples seen")
        ax.set_ylabel("batch size")
        ax.set_title(ds)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _command_args(argv: list[str]) -> list[str]:
    """The command line without the (long) --notes text, which the report prints separately."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--notes":
            skip = True
        elif not a.startswith("--notes="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["fashion_mnist", "mnist"])
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--fixed", type=int, nargs="*", default=[32, 128, 1024])
    p.add_argument("--tests", nargs="*", default=["norm", "inner_product"])
    p.add_argument("--b0", type=int, default=32)
    p.add_argument("--b-max", type=int, default=1024)
    p.add_argument("--eta", type=float, nargs="+", default=[0.5, 1.0], help="norm test η values")
    p.add_argument("--theta", type=float, nargs="+", default=[0.9], help="inner-product test θ")
    p.add_argument("--interval", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="Fashion-MNIST only, --quick-epochs of samples, fixed 32/128, one eta and theta",
    )
    p.add_argument("--quick-epochs", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--notes", default="", help="free text added to the Markdown report")
    p.add_argument("--out", default=None, help="output stem (default results/adaptive_batch)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.datasets, args.epochs, args.fixed = ["fashion_mnist"], args.quick_epochs, [32, 128]
        args.eta, args.theta = args.eta[-1:], args.theta[-1:]
    stem = args.out or str(RESULTS / ("adaptive_batch_quick" if args.quick else "adaptive_batch"))
    cfgs = configs(args)
    report: dict = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg": [round(v, 2) for v in os.getloadavg()],
        },
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "command": "python benchmarks/adaptive_batch.py "
        + " ".join(_command_args(sys.argv[1:] if argv is None else argv)),
        "args": vars(args),
        "notes": args.notes,
        "results": {},
    }
    for ds in args.datasets:
        data = load(ds)
        rows: dict[str, list] = {c["name"]: [] for c in cfgs}
        total = int(args.epochs * len(data["ytr"])) * len(cfgs) * len(args.seeds)
        with tqdm(total=total, desc=ds, unit="sample", mininterval=5) as bar:
            # interleaved: every configuration for one seed before the next seed
            for seed in args.seeds:
                for c in cfgs:
                    rows[c["name"]].append(train(c, data, args.epochs, args.lr, seed, bar))
        report["results"][ds] = rows
    Path(stem).parent.mkdir(parents=True, exist_ok=True)
    Path(stem + ".json").write_text(json.dumps(report, indent=1))
    text = markdown(report, Path(stem).name + ".png")
    Path(stem + ".md").write_text(text)
    plot(report, Path(stem + ".png"))
    print(text)
    return report


if __name__ == "__main__":
    main()
