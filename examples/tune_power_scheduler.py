"""Tune the power scheduler's a, b and peak lr on a small Fashion-MNIST proxy run with optuna.

The power-scheduler paper (Shen et al. 2024, arXiv 2408.13359) found its constants on small
proxy runs; this script does the same search for a small CNN: each optuna trial trains on a
subset of Fashion-MNIST for a short budget with ``PowerScheduler(a, b, lr_max)`` (clocked in
samples, linear warmup over the first 10% and exponential decay over the last 10%), reports the
validation loss a few times so hopeless trials are pruned, and returns the final one.

    python examples/tune_power_scheduler.py --trials 20
    python examples/tune_power_scheduler.py --synthetic --trials 3   # tiny, no data needed

Data come from ``adaptive.data.fashion_mnist`` (--data-dir, else the offline copy under
/usr/share/datasets/fashion-mnist). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import optuna
import torch
import torch.nn.functional as F
from torch import nn

from adaptive.data import fashion_mnist
from adaptive.schedules import PowerScheduler, tune_power_scheduler


def load_fashion_mnist(root: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training images as float (n, 1, 28, 28) in [0, 1] and int64 labels (offline copy first)."""
    ds = fashion_mnist("train", root=root)
    return ds.images.unsqueeze(1).float().div_(255.0), ds.targets


def synthetic_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten classes, each a fixed blocky random pattern (7x7 cells of 4x4 pixels) plus noise:
    coarse enough for a small CNN to tell apart within a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.rand(10, 1, 7, 7, generator=torch.Generator().manual_seed(1234))
    patterns = cells.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    y = torch.randint(0, 10, (n,), generator=g)
    x = (0.6 * patterns[y] + 0.4 * torch.rand(n, 1, 28, 28, generator=g)).clamp(0, 1)
    return x, y


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 10),
    )  # fmt: skip


def make_objective(train_set, val_set, batch_size: int, epochs: int, evals: int, seed: int):
    """The proxy run: ``train(config, report) -> final validation loss``."""
    x_train, y_train = train_set
    x_val, y_val = val_set
    total = epochs * len(x_train)

    @torch.no_grad()
    def val_loss(model: nn.Module) -> float:
        model.eval()
        losses = [
            F.cross_entropy(model(x_val[i : i + 1000]), y_val[i : i + 1000], reduction="sum")
            for i in range(0, len(x_val), 1000)
        ]
        model.train()
        return float(torch.stack(losses).sum()) / len(x_val)  # read once per evaluation

    def train(config: dict[str, float], report) -> float:
        torch.manual_seed(seed)
        model = small_cnn()
        opt = torch.optim.SGD(model.parameters(), lr=config["lr_max"], momentum=0.9)
        sched = PowerScheduler(
            opt, a=config["a"], b=config["b"], warmup_tokens=0.1 * total,
            decay_tokens=0.1 * total, total_tokens=total,
        )  # fmt: skip
        g = torch.Generator().manual_seed(seed)
        steps_per_epoch = math.ceil(len(x_train) / batch_size)
        eval_every = max(1, (epochs * steps_per_epoch) // evals)
        step = 0
        for _ in range(epochs):
            order = torch.randperm(len(x_train), generator=g)
            for i in range(0, len(x_train), batch_size):
                idx = order[i : i + batch_size]
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step(samples=len(idx))
                step += 1
                if step % eval_every == 0 and step < epochs * steps_per_epoch:
                    value = val_loss(model)
                    if not math.isfinite(value):
                        return float("nan")  # diverged: optuna records a failed trial
                    report(value, step)
        return val_loss(model)

    return train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=None, help="IDX files (default: offline copy)")
    p.add_argument("--synthetic", action="store_true", help="tiny synthetic data (tests)")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--train-samples", type=int, default=6000)
    p.add_argument("--val-samples", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--evals", type=int, default=4, help="intermediate reports per trial")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the best config as JSON")
    return p


def main(argv: list[str] | None = None) -> optuna.Study:
    args = build_parser().parse_args(argv)
    if args.synthetic:
        train_set = synthetic_data(min(args.train_samples, 512), args.seed)
        val_set = synthetic_data(min(args.val_samples, 256), args.seed + 1)
    else:
        x, y = load_fashion_mnist(args.data_dir)
        g = torch.Generator().manual_seed(args.seed)
        order = torch.randperm(len(x), generator=g)
        tr = order[: args.train_samples]
        va = order[args.train_samples : args.train_samples + args.val_samples]
        train_set, val_set = (x[tr], y[tr]), (x[va], y[va])
    objective = make_objective(
        train_set, val_set, args.batch_size, args.epochs, args.evals, args.seed
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = tune_power_scheduler(objective, n_trials=args.trials, seed=args.seed)
    best = study.best_trial
    states = [t.state.name for t in study.trials]
    print(
        f"best validation loss {best.value:.4f} with a={best.params['a']:.4g}, "
        f"b={best.params['b']:.3f}, lr_max={best.params['lr_max']:.4g} "
        f"({states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned, "
        f"{states.count('FAIL')} failed of {len(states)})"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"value": best.value, **best.params}, indent=2))
    return study


if __name__ == "__main__":
    main()
