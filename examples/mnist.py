"""AdAdaGrad on MNIST: logistic regression and a small CNN, AdaGrad or AdaGrad-Norm, norm test.

The MNIST settings of Lau, Liu, Kolar (arXiv 2402.11215; authors' ``expt.sh``): AdaGrad with a
constant lr 8e-3, the batch grown from ``b0`` (2 for logistic regression, 8 for the CNN) by the
norm test with η = 0.1 up to the whole training set (60000), the lr *not* rescaled with the batch.
Their budget is 6M samples (100 epochs); pass ``--epochs 100`` for that.

    python examples/mnist.py --model logistic --optimizer adagrad --epochs 5
    python examples/mnist.py --model cnn --optimizer adagrad-norm --b0 8 --epochs 5
    python examples/mnist.py --synthetic --max-steps 20        # tiny offline smoke run

Real MNIST comes from ``adaptive.data.mnist`` (``--data-dir`` or the offline copies it knows).
"""

from __future__ import annotations

import argparse
import json
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptive.callbacks.adaptive_batch_size import AdaptiveBatchSize
from adaptive.models import small_cnn
from adaptive.optim import AdaGradNorm


def logistic_regression(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, num_classes))


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    if name == "adagrad-norm":
        # one scalar accumulator (Ward, Wu, Bottou 2019), not the authors' per-row variant
        return AdaGradNorm(params, lr=lr)
    raise ValueError(f"--optimizer {name!r}: use 'adagrad' or 'adagrad-norm'")


class Classifier(pl.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        optimizer: str,
        lr: float,
        train,
        test,
        b0: int,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.model, self.optimizer_name, self.lr = model, optimizer, lr
        self.train_set, self.test_set, self.b0, self.num_workers = train, test, b0, num_workers

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/acc", (self.model(x).argmax(1) == y).float().mean(), on_epoch=True)

    def train_dataloader(self):
        return DataLoader(
            self.train_set, batch_size=self.b0, shuffle=True, num_workers=self.num_workers
        )

    def val_dataloader(self):
        return DataLoader(self.test_set, batch_size=1000)

    def configure_optimizers(self):
        return make_optimizer(self.optimizer_name, self.parameters(), self.lr)


def synthetic(n: int, seed: int) -> TensorDataset:
    """A learnable stand-in: labels from a fixed random linear teacher on random images."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    teacher = torch.randn(28 * 28, 10, generator=torch.Generator().manual_seed(1234))
    y = (x.reshape(n, -1) @ teacher).argmax(1)
    return TensorDataset(x, y)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=["logistic", "cnn"], default="logistic")
    p.add_argument("--optimizer", choices=["adagrad", "adagrad-norm"], default="adagrad")
    p.add_argument("--lr", type=float, default=8e-3)
    p.add_argument("--b0", type=int, default=None, help="initial batch (2 logistic, 8 CNN)")
    p.add_argument(
        "--test", choices=["norm", "coordinate", "inner_product", "augmented"], default="norm"
    )
    p.add_argument("--eta", type=float, default=0.1)
    p.add_argument("--max-batch-size", type=int, default=60000)
    p.add_argument("--max-micro-batch-size", type=int, default=None)
    p.add_argument("--interval", type=int, default=1, help="optimizer steps between tests")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--data-dir", default=None, help="directory with the MNIST IDX files")
    p.add_argument("--synthetic", action="store_true", help="tiny random data, no files needed")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--history", default=None, help="write the batch-size decisions to this JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    b0 = args.b0 if args.b0 is not None else (2 if args.model == "logistic" else 8)
    if args.synthetic:
        train, test = synthetic(512, args.seed), synthetic(256, args.seed + 1)
    else:
        from adaptive.data import mnist

        train, test = mnist("train", root=args.data_dir), mnist("test", root=args.data_dir)
    model = logistic_regression() if args.model == "logistic" else small_cnn(kernel_size=5)
    module = Classifier(model, args.optimizer, args.lr, train, test, b0, args.num_workers)
    grow = AdaptiveBatchSize(
        test=args.test,
        eta=args.eta,
        max_batch_size=min(args.max_batch_size, len(train)),
        interval=args.interval,
        max_micro_batch_size=args.max_micro_batch_size,
        seed=args.seed,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer = pl.Trainer(
            max_epochs=args.epochs,
            max_steps=args.max_steps,
            callbacks=[grow],
            accelerator="auto",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=not args.synthetic,
        )
        trainer.fit(module)
        metrics = trainer.validate(module, verbose=False)[0]
    summary = {
        "test_accuracy": float(metrics["test/acc"]),
        "optimizer_steps": trainer.global_step,
        "samples_seen": grow.samples_seen,
        "final_batch_size": grow.batch_size,
        "decisions": len(grow.history),
    }
    if args.history:
        with open(args.history, "w") as f:
            json.dump({"summary": summary, "history": grow.history}, f)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
