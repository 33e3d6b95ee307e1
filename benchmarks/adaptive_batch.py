"""Adaptive batch growth against fixed batches on real Fashion-MNIST and MNIST.

Configurations, all in one process with the same samples budget (``--epochs`` passes over the
training set), the same small CNN and AdaGrad: fixed small batches, a fixed large batch, and the
batch grown from ``b0`` by the norm test and by the inner-product test (AdAdaGrad, Lau, Liu,
Kolar, arXiv 2402.11215) through :class:`adaptive.batching.AdaptiveBatchSampler` and
:class:`adaptive.stats.GradientStatistics`. Reported: test accuracy, optimizer steps, wall time
of training (evaluation excluded), and the batch size against samples seen (plot).

    python benchmarks/adaptive_batch.py          # results/adaptive_batch.* (~25 min, 1 thread)
    python benchmarks/adaptive_batch.py --quick  # results/adaptive_batch_quick.*

The defaults are the committed table's settings (results/adaptive_batch.md): fixed 32, 128,
1024 and 32 at lr 0.02; the norm test (eta 1.0) every 2 steps from b0 = 32 up to 128, AdaGrad's
lr scaled linearly with the batch; seeds 0, 1, 2.

The loop is plain PyTorch (the Lightning callback adds only the wiring): each step takes the
next index list from the sampler, and on decision steps captures the statistics of that step's
backward pass, runs the test and schedules the new size from the next batch (no prefetching
here, so no lookahead is needed).

Options beyond the paper's setting (it keeps the lr unchanged as the batch grows):
``--lr-scaling linear|sqrt|adascale`` sets the lr to ``lr · B/b0``, ``lr · sqrt(B/b0)`` or ``lr``
times the AdaScale gain each time the batch grows (:mod:`adaptive.schedules.scaling`);
``--tests augmented`` (inner-product and orthogonality tests, ``--nu``); ``--optimizer
adagrad_norm``; ``--model small_cnn5`` (the AdAdaGrad MNIST CNN, 5x5 kernels) or
``small_cnn_fc`` (a hidden layer); ``--fixed-lr B:LR`` adds a fixed batch B at lr LR (a tuned
baseline). The report ends with the issue's goal checked on its own table: an adaptive run within
``--goal-points`` of the best fixed batch of at most ``--small-max`` samples, in at most
1/``--goal-step-ratio`` of that run's optimizer steps.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from adaptive.batching import (
    AdaptiveBatchSampler,
    augmented_inner_product_test,
    inner_product_test,
    next_batch_size,
    norm_test,
)
from adaptive.data import fashion_mnist, mnist
from adaptive.models import small_cnn
from adaptive.optim import AdaGradNorm
from adaptive.schedules import adascale_gain, lr_scale_factor
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


# small_cnn5: the AdAdaGrad MNIST CNN (5x5 kernels); small_cnn_fc: with a 128-unit hidden layer
MODELS = {
    "small_cnn": small_cnn,
    "small_cnn5": partial(small_cnn, kernel_size=5),
    "small_cnn_fc": partial(small_cnn, hidden=128),
}
OPTIMIZERS = ("adagrad", "adagrad_norm")
LR_SCALINGS = ("none", "linear", "sqrt", "adascale")
TESTS = ("norm", "inner_product", "augmented")


def make_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """``torch.optim.Adagrad`` (per coordinate) or AdaGrad-Norm (one scalar accumulator)."""
    if name == "adagrad":
        return torch.optim.Adagrad(model.parameters(), lr=lr)
    if name == "adagrad_norm":
        return AdaGradNorm(model.parameters(), lr=lr)
    raise ValueError(f"optimizer={name!r} is not known; use one of {list(OPTIMIZERS)}")


def lr_factor(rule: str, size: int, b0: int, stats) -> float:
    """The factor on the base lr for batch ``size`` grown from ``b0`` under ``rule``.

    ``linear``/``sqrt``: ``B/B0`` and ``sqrt(B/B0)``. ``adascale``: the AdaScale gain
    ``r = (σ² + μ²)/(σ²/S + μ²)`` at ``S = B/B0`` (Johnson et al. 2020, arXiv 2007.05105) with
    ``σ² = V/B0`` (the base batch's gradient variance, ``V`` the per-sample variance summed over
    coordinates) and ``μ² = ‖ḡ‖² − V/b`` (unbiased), from the statistics of the decision step, as
    :class:`adaptive.callbacks.AdaptiveBatchSize` does.
    """
    if rule == "adascale":
        variance = float(stats.variance)
        grad_sq = float(stats.grad_sq_norm)
        mu2 = max(grad_sq - variance / stats.batch_size, 0.0)
        return float(adascale_gain(variance / b0, mu2, size / b0))
    return lr_scale_factor(size, b0, rule)


def train(config: dict, data: dict, epochs: float, lr: float, seed: int, bar: tqdm) -> dict:
    torch.manual_seed(seed)
    model = MODELS[config.get("model", "small_cnn")]()
    lr = config.get("lr", lr)
    opt = make_optimizer(config.get("optimizer", "adagrad"), model, lr)
    rule = config.get("lr_scaling", "none")
    n = len(data["ytr"])
    budget = int(epochs * n)
    sampler = AdaptiveBatchSampler(n, batch_size=config["b0"], shuffle=True, seed=seed)
    test = config.get("test")
    stats = None
    if test is not None:
        stats = GradientStatistics(model, inner_products=test in ("inner_product", "augmented"))
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
                elif test == "inner_product":
                    proposed = inner_product_test(s, theta=config["eta"])
                else:
                    proposed = augmented_inner_product_test(s, theta=config["eta"], nu=config["nu"])
                new = next_batch_size(size, proposed, config["b_max"], 1)
                if new != size:
                    size = new
                    sampler.set_batch_size(size)  # from the next batch: nothing prefetched here
                    trajectory.append([seen, size])
                    if rule != "none":
                        factor = lr_factor(rule, size, config["b0"], s)
                        for group in opt.param_groups:
                            group["lr"] = lr * factor
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
        "final_lr": opt.param_groups[0]["lr"],
        "trajectory": trajectory,
        "config": {k: v for k, v in config.items() if k != "name"},
    }


def _extras(args: argparse.Namespace, rule: str) -> str:
    """The non-default settings, appended to a configuration's name."""
    parts = []
    if args.model != "small_cnn":
        parts.append(f"model={args.model}")
    if args.optimizer != "adagrad":
        parts.append(f"opt={args.optimizer}")
    if rule != "none":
        parts.append(f"lr {rule}")
    return "".join(f", {p}" for p in parts)


def configs(args: argparse.Namespace) -> list[dict]:
    common = {"model": args.model, "optimizer": args.optimizer}
    extras = _extras(args, "none")
    suffix = f" ({extras[2:]})" if extras else ""
    out = [{"name": f"fixed {b}{suffix}", "b0": b, **common} for b in args.fixed]
    for b, lr in getattr(args, "fixed_lr", []):
        lr_suffix = f" ({extras[2:]}, lr {lr:g})" if extras else f" (lr {lr:g})"
        out.append({"name": f"fixed {b}{lr_suffix}", "b0": b, "lr": lr, **common})
    for test, etas in (
        ("norm", args.eta),
        ("inner_product", args.theta),
        ("augmented", args.theta),
    ):
        if test not in args.tests:
            continue
        for eta in etas:
            for rule in args.lr_scaling:
                label = "eta" if test == "norm" else "theta"
                extra = f", nu={args.nu}" if test == "augmented" else ""
                if args.b_max != 1024:
                    extra += f", b_max={args.b_max}"
                if args.interval != 1:
                    extra += f", every {args.interval}"
                out.append(
                    {
                        "name": f"adaptive {test} ({label}={eta}{extra}, b0={args.b0}"
                        f"{_extras(args, rule)})",
                        "b0": args.b0,
                        "test": test,
                        "eta": eta,
                        "nu": args.nu,
                        "b_max": args.b_max,
                        "interval": args.interval,
                        "lr_scaling": rule,
                        **common,
                    }
                )
    return out


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def goal(report: dict) -> list[str]:
    """The issue's goal, checked on the table itself.

    Reference: the fixed run with the best mean accuracy among fixed batches of at most
    ``--small-max`` samples. A configuration meets the goal when its mean accuracy is at least the
    reference's minus ``--goal-points`` percentage points and its mean optimizer steps are at most
    the reference's divided by ``--goal-step-ratio``.
    """
    args = report["args"]
    tol, ratio = args.get("goal_points", 0.5), args.get("goal_step_ratio", 3.0)
    small_max = args.get("small_max", 128)
    lines = []
    for ds, rows in report["results"].items():
        fixed = {
            name: runs
            for name, runs in rows.items()
            if not runs[0]["config"].get("test") and runs[0]["config"]["b0"] <= small_max
        }
        if not fixed:
            lines.append(f"- {ds}: no fixed batch <= {small_max} in the table; goal not checked.")
            continue
        ref = max(fixed, key=lambda n: _mean_sd([r["test_accuracy"] for r in fixed[n]])[0])
        ref_acc = _mean_sd([r["test_accuracy"] for r in fixed[ref]])[0]
        ref_steps = _mean_sd([r["steps"] for r in fixed[ref]])[0]
        need_acc, need_steps = ref_acc - tol / 100, ref_steps / ratio
        met = []
        for name, runs in rows.items():
            if not runs[0]["config"].get("test"):
                continue
            acc = _mean_sd([r["test_accuracy"] for r in runs])[0]
            steps = _mean_sd([r["steps"] for r in runs])[0]
            if acc >= need_acc - 1e-12 and steps <= need_steps:
                met.append(f"{name} ({100 * acc:.2f}%, {steps:.0f} steps)")
        verdict = "yes: " + "; ".join(met) if met else "no"
        lines.append(
            f"- {ds}: best fixed small batch is {ref} ({100 * ref_acc:.2f}%, {ref_steps:.0f} "
            f"steps), so the goal is >= {100 * need_acc:.2f}% in <= {need_steps:.0f} steps. "
            f"Goal met? {verdict}"
        )
    return lines


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
        "| data | configuration | test acc. (mean) | acc. sd (min-max) | optimizer steps "
        "| wall s | final batch |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for ds, rows in report["results"].items():
        for name, runs in rows.items():
            accs = [100 * r["test_accuracy"] for r in runs]
            acc, sd = _mean_sd(accs)
            steps = sum(r["steps"] for r in runs) / len(runs)
            wall = sum(r["wall_s"] for r in runs) / len(runs)
            finals = sorted({r["final_batch_size"] for r in runs})
            final = "/".join(str(f) for f in finals)
            lines.append(
                f"| {ds} | {name} | {acc:.2f}% | {sd:.2f} ({min(accs):.2f}-{max(accs):.2f}) "
                f"| {steps:.0f} | {wall:.0f} | {final} |"
            )
    lines += ["", f"Batch size against samples seen (first seed): `{plot_name}`.", ""]
    lines += [
        f"## Goal: within {report['args'].get('goal_points', 0.5)} points of the best fixed "
        f"small batch in at most 1/{report['args'].get('goal_step_ratio', 3.0):g} of its steps",
        "",
        *goal(report),
        "",
    ]
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
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")


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


def _batch_lr(text: str) -> tuple[int, float]:
    """``"B:LR"`` -> ``(B, LR)`` for ``--fixed-lr``."""
    try:
        b, lr = text.split(":")
        out = int(b), float(lr)
    except ValueError:
        out = (0, 0.0)
    if out[0] < 1 or not out[1] > 0:
        raise argparse.ArgumentTypeError(
            f"--fixed-lr takes BATCH:LR with BATCH >= 1 and LR > 0 (e.g. 32:0.02), got {text!r}"
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["fashion_mnist", "mnist"])
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--fixed", type=int, nargs="*", default=[32, 128, 1024])
    p.add_argument("--tests", nargs="*", default=["norm"], choices=TESTS)
    p.add_argument("--b0", type=int, default=32)
    p.add_argument("--b-max", type=int, default=128)
    p.add_argument("--eta", type=float, nargs="+", default=[1.0], help="norm test η values")
    p.add_argument("--theta", type=float, nargs="+", default=[0.5], help="inner-product test θ")
    p.add_argument("--nu", type=float, default=1.0, help="orthogonality ν of the augmented test")
    p.add_argument("--interval", type=int, default=2)
    p.add_argument(
        "--lr-scaling",
        nargs="+",
        default=["linear"],
        choices=LR_SCALINGS,
        help="lr rule when the batch grows (each one is a configuration)",
    )
    p.add_argument(
        "--fixed-lr",
        type=_batch_lr,
        nargs="*",
        default=[(32, 0.02)],
        metavar="B:LR",
        help="extra fixed-batch runs at batch B with lr LR (e.g. 32:0.02, a tuned baseline)",
    )
    p.add_argument("--optimizer", default="adagrad", choices=OPTIMIZERS)
    p.add_argument("--model", default="small_cnn", choices=sorted(MODELS))
    p.add_argument("--small-max", type=int, default=128, help="largest 'small' fixed batch (goal)")
    p.add_argument("--goal-points", type=float, default=0.5, help="accuracy tolerance (points)")
    p.add_argument("--goal-step-ratio", type=float, default=3.0, help="steps must be <= ref/this")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--quick",
        action="store_true",
        help="Fashion-MNIST, --quick-epochs of samples, fixed 32/128, one eta/theta, one seed",
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
        args.eta, args.theta, args.fixed_lr = args.eta[-1:], args.theta[-1:], []
        args.seeds = args.seeds[:1]
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
