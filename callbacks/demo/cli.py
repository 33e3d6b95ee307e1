"""``adaptive``: the toolkit's command line (``adaptive demo``, ``adaptive runs``)."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import sys
import warnings
from pathlib import Path

import torch
from torch.utils.data import Subset

from adaptive.callbacks.demo.report import format_table, write_results
from adaptive.callbacks.demo.runs import RUNS
from adaptive.callbacks.demo.train import train_run, warm_up
from adaptive.data import DataNotFoundError, fashion_mnist


def _run_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"--runs got {text!r}; unknown {unknown}; valid runs: {', '.join(RUNS)}"
        )
    return names


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptive", description="adaptive training toolkit")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train the named runs on real Fashion-MNIST and compare")
    demo.add_argument("--runs", type=_run_names, default=list(RUNS), help="comma-separated names")
    demo.add_argument("--epochs", type=_positive, default=2)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--train-subset", type=_positive, default=None, help="use the first N training images"
    )
    demo.add_argument("--data-root", default=None, help="directory with the Fashion-MNIST files")
    demo.add_argument("--out", type=Path, default=Path("results/demo"))
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sub.add_parser("runs", help="list the demo's named runs")
    return parser


def demo(args: argparse.Namespace) -> int:
    try:
        train = fashion_mnist("train", root=args.data_root)
        test = fashion_mnist("test", root=args.data_root)
    except DataNotFoundError as err:
        print(err, file=sys.stderr)
        return 1
    if args.train_subset is not None:
        train = Subset(train, range(min(args.train_subset, len(train))))
    print(
        f"Fashion-MNIST: {len(train)} training / {len(test)} test images; "
        f"{args.epochs} epochs; runs: {', '.join(args.runs)}"
    )
    warm_up(train, test)
    results = []
    for name in args.runs:
        print(f"\n== {name}: {RUNS[name].description}")
        results.append(
            train_run(
                RUNS[name],
                train,
                test,
                epochs=args.epochs,
                seed=args.seed,
                progress=not args.no_progress,
            )
        )
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "epochs": args.epochs,
        "train images": len(train),
        "seed": args.seed,
    }
    paths = write_results(results, args.out, meta)
    print("\n" + format_table(results))
    print(f"\nplot: {paths['plot']}\ntable: {paths['markdown']}")
    return 0


def _quiet_lightning() -> None:
    """Keep the progress bar and the table; drop Lightning's start-up banners and tips."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_lightning()
    if args.command == "runs":
        for name, run in RUNS.items():
            print(f"{name:20s} {run.description}")
        return 0
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
