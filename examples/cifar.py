"""AdAdaGrad on CIFAR-10/100 with ResNet-18: AdaGrad, norm or augmented inner-product test.

The CIFAR-10 setting of Lau, Liu, Kolar (arXiv 2402.11215; authors' ``expt.sh``): ResNet-18 with
the CIFAR stem (3x3 stride-1 first convolution, no max-pool), AdaGrad, ``b0 = 8`` grown by the
norm test with η = 0.5 up to 50000 (micro-batches of at most 128 per device, then gradient
accumulation), lr 5e-2 with a linear warmup over 1M samples and a cosine decay to 5e-3 at 9M
samples, budget 10M samples (200 epochs). The schedule is indexed by samples seen, so it is
unaffected by the batch growing (``adaptive.schedules.WSDScheduler`` + ``adaptive.callbacks.SampleClock``).

Normalisation: ``--norm group`` (GroupNorm, per-sample statistics exact) or ``--norm batch``
(BatchNorm without running statistics, as the authors; BatchNorm couples the samples of a batch,
so the gradient statistics then use the micro-batch group estimator ``fallback="groups"``).

    python examples/cifar.py --data-dir ~/data --dataset cifar10 --download
    python examples/cifar.py --test augmented --eta 0.5 --nu 1.0 --dataset cifar100
    python examples/cifar.py --synthetic --max-steps 3        # tiny offline smoke run
"""

from __future__ import annotations

import argparse
import json
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptive.callbacks.adaptive_batch_size import AdaptiveBatchSize
from adaptive.callbacks.sample_clock import SampleClock
from adaptive.schedules import WSDScheduler

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def resnet18(num_classes: int, norm: str = "group", groups: int = 32) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem and the chosen normalisation."""
    if norm == "group":

        def norm_layer(c: int) -> nn.Module:
            return nn.GroupNorm(min(groups, c), c)
    elif norm == "batch":

        def norm_layer(c: int) -> nn.Module:
            return nn.BatchNorm2d(c, track_running_stats=False)
    else:
        raise ValueError(f"--norm {norm!r}: use 'group' or 'batch'")
    model = torchvision.models.resnet18(num_classes=num_classes, norm_layer=norm_layer)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class CifarModule(pl.LightningModule):
    def __init__(self, args: argparse.Namespace, train, test, num_classes: int) -> None:
        super().__init__()
        self.args, self.train_set, self.test_set = args, train, test
        self.model = resnet18(num_classes, args.norm)

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
            self.train_set, batch_size=self.args.b0, shuffle=True, num_workers=self.args.num_workers
        )

    def val_dataloader(self):
        return DataLoader(self.test_set, batch_size=256, num_workers=self.args.num_workers)

    def configure_optimizers(self):
        a = self.args
        opt = torch.optim.Adagrad(self.parameters(), lr=a.lr)
        sched = WSDScheduler(
            opt,
            warmup_tokens=a.warmup_samples,
            decay_tokens=a.decay_samples - a.warmup_samples,
            total_tokens=a.decay_samples,
            warmup_shape="linear",
            decay_shape="cosine",
            min_lr_ratio=a.min_lr / a.lr,
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def load_cifar(args: argparse.Namespace):
    if args.synthetic:
        g = torch.Generator().manual_seed(args.seed)
        n, size = 64, 8
        x = torch.randn(n + 32, 3, size, size, generator=g)
        y = torch.randint(0, 10, (n + 32,), generator=g)
        return TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:]), 10
    if args.data_dir is None:
        raise ValueError("--data-dir is required for real CIFAR (or pass --synthetic)")
    t = torchvision.transforms
    normal = t.Normalize(CIFAR_MEAN, CIFAR_STD)
    train_tf = t.Compose(
        [t.RandomCrop(32, padding=4), t.RandomHorizontalFlip(), t.ToTensor(), normal]
    )
    test_tf = t.Compose([t.ToTensor(), normal])
    cls = (
        torchvision.datasets.CIFAR10 if args.dataset == "cifar10" else torchvision.datasets.CIFAR100
    )
    try:
        train = cls(args.data_dir, train=True, transform=train_tf, download=args.download)
        test = cls(args.data_dir, train=False, transform=test_tf, download=args.download)
    except RuntimeError as exc:
        raise ValueError(
            f"{args.dataset} not found under --data-dir {args.data_dir!r}; pass --download where "
            "the network allows, or put torchvision's extracted archive there"
        ) from exc
    return train, test, 10 if args.dataset == "cifar10" else 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", choices=["cifar10", "cifar100"], default="cifar10")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--download", action="store_true")
    p.add_argument("--norm", choices=["group", "batch"], default="group")
    p.add_argument("--test", choices=["norm", "augmented"], default="norm")
    p.add_argument("--eta", type=float, default=0.5, help="norm test η (θ for augmented)")
    p.add_argument("--nu", type=float, default=1.0, help="orthogonality ν (augmented test)")
    p.add_argument("--b0", type=int, default=8)
    p.add_argument("--max-batch-size", type=int, default=50000)
    p.add_argument("--max-micro-batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-2)
    p.add_argument("--min-lr", type=float, default=5e-3)
    p.add_argument("--warmup-samples", type=int, default=1_000_000)
    p.add_argument("--decay-samples", type=int, default=9_000_000)
    p.add_argument("--samples", type=int, default=10_000_000, help="training budget")
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--interval", type=int, default=1)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--synthetic", action="store_true", help="tiny random data, no files needed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--history", default=None, help="write the batch-size decisions to this JSON")
    args = p.parse_args(argv)
    if args.synthetic:
        args.num_workers = 0
        args.warmup_samples, args.decay_samples = 32, 256
    if not 0 < args.min_lr <= args.lr:
        raise ValueError(f"--min-lr {args.min_lr} must be in (0, --lr {args.lr}]")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    train, test, num_classes = load_cifar(args)
    module = CifarModule(args, train, test, num_classes)
    grow = AdaptiveBatchSize(
        test=args.test,
        eta=args.eta,
        nu=args.nu,
        max_batch_size=min(args.max_batch_size, len(train)),
        interval=args.interval,
        max_micro_batch_size=args.max_micro_batch_size,
        seed=args.seed,
        stats_fallback="groups" if args.norm == "batch" else None,
    )
    epochs = max(1, -(-args.samples // len(train)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer = pl.Trainer(
            max_epochs=epochs,
            max_steps=args.max_steps,
            callbacks=[grow, SampleClock()],
            accelerator="auto",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=not args.synthetic,
            num_sanity_val_steps=0,
            limit_val_batches=0 if args.synthetic else 1.0,
        )
        trainer.fit(module)
    summary = {
        "optimizer_steps": trainer.global_step,
        "samples_seen": grow.samples_seen,
        "final_batch_size": grow.batch_size,
        "accumulation": grow.accumulation,
        "lr": trainer.optimizers[0].param_groups[0]["lr"],
        "decisions": len(grow.history),
    }
    if args.history:
        with open(args.history, "w") as f:
            json.dump({"summary": summary, "history": grow.history}, f)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
