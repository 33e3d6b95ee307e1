"""ResNet-50 on ImageNet (an ImageFolder tree) with LAMB, a sample-clocked schedule, and optional
adaptive batch growth and online batch selection; one GPU, many GPUs, many nodes.

Model: torchvision's ResNet-50 (He et al. 2016, arXiv 1512.03385), ``--norm batch`` (BatchNorm, the
standard recipe) or ``--norm group`` (GroupNorm with 32 groups, Wu & He 2018, arXiv 1803.08494).
Optimizer: LAMB (You et al. 2019, arXiv 1904.00962, Algorithm 2; ``adaptive.optim.Lamb``) with
``param_groups_for`` (no decay, no trust ratio for biases and normalisation weights), or LARS
(You, Gitman, Ginsburg 2017, arXiv 1708.03888). Defaults are of the order ResNet strikes back
(Wightman, Touvron, Jégou 2021, arXiv 2110.00476) uses for LAMB: lr 5e-3 at a global batch of
2048, weight decay 0.02, 5 warmup epochs.

Schedule, clocked in samples seen (``adaptive.callbacks.SampleClock``), so it stays right when the batch
grows or selection drops samples:

- ``--schedule wsd``: warmup (linear), constant, then a ``--decay-shape`` decay over the last
  ``--decay-fraction`` of the budget to ``--min-lr-ratio`` (MiniCPM's WSD, arXiv 2404.06395);
- ``--schedule power``: ``η(n) = min(η_max, β·a·n^b)`` with ``n`` the samples seen and ``β`` the
  global batch (Shen et al. 2024, arXiv 2408.13359), the same warmup and final decay.

Adaptive batch growth (``--adaptive-batch``; AdAdaGrad's rule, Lau, Liu, Kolar 2024, arXiv
2402.11215): ``b_{k+1} = min(b_max, ⌈max(b_k, b̂_k)⌉)`` from the norm or augmented test on the
per-sample gradient statistics; past ``--max-micro-batch-size`` per device it grows gradient
accumulation. BatchNorm in training mode couples the samples of a batch, so per-sample gradients
do not exist there: use ``--norm group``, or ``--stats-fallback groups`` (variance from the means
of micro-batches and ranks, law of total variance; needs at least two of them per step).

Online batch selection (``--select uds|high-loss``): the loader yields super-batches and each
device trains on ``--select-keep`` of its own (UDS, arXiv 2510.16882; high loss, Jiang et al.
2019, arXiv 1910.00762).

Precision ``--precision bf16-mixed`` (default on GPUs; autocast in bf16, fp32 weights).
Distribution: ``--devices N --num-nodes M --strategy ddp|fsdp``. The same command runs under
``torchrun`` or SLURM ``srun`` (Lightning reads the launcher's environment). ``fsdp`` shards with
``torch.distributed.fsdp.fully_shard`` (FSDP2: every bottleneck block, then the whole model)
through Lightning's ``ModelParallelStrategy``; parameters are then DTensors, so LAMB and LARS
compute each layer's trust ratio from the norms of the whole (unsharded) tensor (LAMB runs its
reference path there: its fast path does not handle DTensor shards yet), and the statistics
sensor hooks the whole parameters FSDP gathers for each forward, so adaptive batch growth makes
the same decisions as under ``ddp``. Lightning's ``FSDPStrategy`` (FSDP1) is not used: it
refuses CPUs, and its ``use_orig_params`` views hold arbitrary flat slices of several layers,
which would make per-layer trust ratios and per-parameter statistics wrong.

    python examples/imagenet.py --data-dir /data/imagenet                      # one GPU
    python examples/imagenet.py --data-dir /data/imagenet --devices 8 --batch-size 256
    torchrun --nnodes 4 --nproc-per-node 8 ... examples/imagenet.py --devices 8 --num-nodes 4 ...
    python examples/imagenet.py --synthetic --max-steps 3                      # tiny offline run
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader

from adaptive.callbacks.adaptive_batch_size import AdaptiveBatchSize
from adaptive.callbacks.online_batch_selection import OnlineBatchSelection
from adaptive.callbacks.sample_clock import SampleClock
from adaptive.optim import Lamb, Lars, param_groups_for
from adaptive.schedules import PowerScheduler, WSDScheduler
from adaptive.selection import HighLossSelector, UDSSelector

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def resnet(arch: str, num_classes: int, norm: str = "batch", groups: int = 32) -> nn.Module:
    """torchvision's ``arch`` (default ResNet-50) with BatchNorm or GroupNorm(``groups``)."""
    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r}: use one of {list(ARCHS)}")
    if norm == "group":

        def norm_layer(c: int) -> nn.Module:
            return nn.GroupNorm(math.gcd(groups, c), c)
    elif norm == "batch":
        norm_layer = nn.BatchNorm2d
    else:
        raise ValueError(f"--norm {norm!r}: use 'batch' or 'group'")
    return getattr(torchvision.models, arch)(num_classes=num_classes, norm_layer=norm_layer)


def write_synthetic_imagefolder(
    root: str | Path, classes: int = 4, per_class: int = 12, val_per_class: int = 4, size: int = 24
) -> Path:
    """A tiny ImageFolder tree ``root/{train,val}/class_k/*.png`` of learnable RGB images.

    Class ``k`` has its own mean colour; every image adds uniform noise and a random bright
    square, so the classes overlap a little. Returns ``root``.
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(0)
    colours = rng.uniform(40, 215, size=(classes, 3))
    for split, n in (("train", per_class), ("val", val_per_class)):
        for k in range(classes):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = colours[k] + rng.uniform(-40, 40, size=(size, size, 3))
                r, c = rng.integers(0, size - 6, size=2)
                img[r : r + 6, c : c + 6] = 255
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def image_folders(args: argparse.Namespace):
    """``(train, val)`` ImageFolder datasets under ``args.data_dir`` with the usual transforms."""
    t = torchvision.transforms
    normal = t.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    size = args.image_size
    train_tf = t.Compose(
        [t.RandomResizedCrop(size), t.RandomHorizontalFlip(), t.ToTensor(), normal]
    )
    val_tf = t.Compose(
        [t.Resize(round(size * 256 / 224)), t.CenterCrop(size), t.ToTensor(), normal]
    )
    root = Path(args.data_dir)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ValueError(
                f"--data-dir {args.data_dir!r} has no '{split}/' folder; ImageFolder layout "
                f"expected: {root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG"
            )
    train = torchvision.datasets.ImageFolder(str(root / "train"), transform=train_tf)
    val = torchvision.datasets.ImageFolder(str(root / "val"), transform=val_tf)
    if train.classes != val.classes:
        raise ValueError(
            f"train/ has {len(train.classes)} classes and val/ has {len(val.classes)}; the class "
            "folders must match"
        )
    return train, val


class ImageNetModule(pl.LightningModule):
    def __init__(self, args: argparse.Namespace, train, val, num_classes: int) -> None:
        super().__init__()
        self.args, self.train_set, self.val_set = args, train, val
        self.model = resnet(args.arch, num_classes, args.norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def configure_model(self) -> None:
        """FSDP2 (ModelParallelStrategy): shard every residual block, then the whole model."""
        mesh = getattr(self, "device_mesh", None)
        if mesh is None or self.args.strategy != "fsdp":
            return
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dp = mesh["data_parallel"]
        policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
        blocks = (torchvision.models.resnet.Bottleneck, torchvision.models.resnet.BasicBlock)
        for module in self.model.modules():
            if isinstance(module, blocks):
                fully_shard(module, mesh=dp, mp_policy=policy)
        fully_shard(self.model, mesh=dp, mp_policy=policy)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y, label_smoothing=self.args.label_smoothing)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        acc = (self(x).argmax(1) == y).float().mean()
        self.log("val/acc", acc, on_epoch=True, sync_dist=True)

    def train_dataloader(self):
        a = self.args
        return DataLoader(
            self.train_set,
            batch_size=a.batch_size,
            shuffle=True,
            num_workers=a.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=a.num_workers > 0,
            drop_last=True,
        )

    def val_dataloader(self):
        a = self.args
        return DataLoader(self.val_set, batch_size=a.batch_size, num_workers=a.num_workers)

    def configure_optimizers(self):
        a = self.args
        groups = param_groups_for(self.model, weight_decay=a.weight_decay)
        if a.optimizer == "lamb":
            # under FSDP2 (DTensor shards) Lamb takes its reference path by itself
            opt = Lamb(groups, lr=a.lr, weight_decay=a.weight_decay)
        else:
            opt = Lars(groups, lr=a.lr, momentum=0.9, weight_decay=a.weight_decay)
        total = a.total_samples
        warmup = a.warmup_epochs * a.train_size
        decay = a.decay_fraction * total
        if warmup + decay > total:
            raise ValueError(
                f"--warmup-epochs {a.warmup_epochs} ({warmup} samples) plus the decay "
                f"({decay:.0f} samples) exceed the budget of {total} samples"
            )
        if a.schedule == "wsd":
            sched = WSDScheduler(
                opt,
                warmup_tokens=warmup,
                decay_tokens=decay,
                total_tokens=total,
                warmup_shape="linear",
                decay_shape=a.decay_shape,
                min_lr_ratio=a.min_lr_ratio,
            )
        else:
            sched = PowerScheduler(
                opt,
                a=a.power_a,
                b=a.power_b,
                lr_max=a.lr,
                warmup_tokens=warmup,
                decay_tokens=decay,
                total_tokens=total,
                decay_shape=a.decay_shape,
                min_lr_ratio=a.min_lr_ratio,
            )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", default=None, help="ImageFolder root with train/ and val/")
    p.add_argument("--synthetic", action="store_true", help="write and train on a tiny tree")
    p.add_argument("--arch", choices=ARCHS, default="resnet50")
    p.add_argument("--norm", choices=["batch", "group"], default="batch")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=None, help="per device; 256 (8 synthetic)")
    p.add_argument("--optimizer", choices=["lamb", "lars"], default="lamb")
    p.add_argument("--lr", type=float, default=5e-3, help="peak lr")
    p.add_argument("--weight-decay", type=float, default=0.02)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--schedule", choices=["wsd", "power"], default="wsd")
    p.add_argument("--power-a", type=float, default=4.0, help="power schedule a")
    p.add_argument("--power-b", type=float, default=-0.51, help="power schedule b")
    p.add_argument("--decay-shape", choices=["linear", "cosine", "1-sqrt", "exponential"])
    p.add_argument("--decay-fraction", type=float, default=0.2, help="share of the budget")
    p.add_argument("--min-lr-ratio", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=100, help="budget in epochs of samples")
    p.add_argument("--warmup-epochs", type=float, default=5.0)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--adaptive-batch", action="store_true", help="grow the batch (AdAdaGrad rule)")
    p.add_argument("--test", choices=["norm", "augmented"], default="norm")
    p.add_argument("--eta", type=float, default=0.1, help="norm test η (θ for augmented)")
    p.add_argument("--max-batch-size", type=int, default=65536, help="global b_max")
    p.add_argument("--max-micro-batch-size", type=int, default=None, help="per device")
    p.add_argument("--interval", type=int, default=10, help="optimizer steps between tests")
    p.add_argument("--stats-fallback", choices=["groups"], default=None)
    p.add_argument("--select", choices=["none", "uds", "high-loss"], default="none")
    p.add_argument("--select-keep", type=float, default=0.5, help="fraction of each batch kept")
    p.add_argument("--uds-alpha", type=float, default=1.0)
    p.add_argument("--devices", default="auto", help="devices per node (int or 'auto')")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--precision", default=None, help="default bf16-mixed on GPU, 32 on CPU")
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the run summary (JSON) here")
    args = p.parse_args(argv)
    if args.decay_shape is None:
        args.decay_shape = "1-sqrt" if args.schedule == "wsd" else "exponential"
    if args.synthetic:
        args.num_workers = 0
        if args.image_size == 224:
            args.image_size = 16
    elif args.data_dir is None:
        p.error("--data-dir is required for real ImageNet (or pass --synthetic)")
    if args.batch_size is None:
        args.batch_size = 8 if args.synthetic else 256
    for name in ("batch_size", "image_size", "epochs", "num_nodes", "interval"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if not 0 < args.select_keep <= 1:
        p.error(f"--select-keep {args.select_keep} must be in (0, 1]")
    if not 0 <= args.decay_fraction <= 1:
        p.error(f"--decay-fraction {args.decay_fraction} must be in [0, 1]")
    if args.devices != "auto":
        try:
            args.devices = int(args.devices)
        except ValueError:
            p.error(f"--devices {args.devices!r} must be an int or 'auto'")
    if args.adaptive_batch and args.norm == "batch" and args.stats_fallback is None:
        p.error(
            "--adaptive-batch with --norm batch: BatchNorm in training mode couples the samples "
            "of a batch, so per-sample gradients (and the batch-size test built on them) do not "
            "exist. Use --norm group, or --stats-fallback groups (variance from micro-batch and "
            "rank means; needs several devices)"
        )
    if args.adaptive_batch and args.stats_fallback and _devices_per_node(args) * args.num_nodes < 2:
        p.error(
            "--stats-fallback groups estimates the variance from the gradient means of several "
            "ranks (or micro-batches), and one device without accumulation gives one group per "
            "step: run on several devices, or use --norm group"
        )
    if args.adaptive_batch and args.select != "none":
        p.error(
            "--adaptive-batch with --select: the batch-size test measures the kept samples while "
            "the sampler grows the super-batch; use one of the two"
        )
    return args


def _devices_per_node(args: argparse.Namespace) -> int:
    if args.devices != "auto":
        return args.devices
    gpus = torch.cuda.device_count() if args.accelerator in ("auto", "gpu", "cuda") else 0
    return max(gpus, 1)


def _strategy(args: argparse.Namespace):
    world = _devices_per_node(args) * args.num_nodes
    if args.strategy == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        # every rank is one data-parallel shard (Lightning's "auto" would count nodes instead)
        return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    if world == 1:
        return "auto"  # one device: no process group
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    tmp = None
    try:
        if args.synthetic:
            tmp = tempfile.mkdtemp(prefix="imagenet_synthetic_")
            write_synthetic_imagefolder(tmp)
            args.data_dir = tmp
        train, val = image_folders(args)
        args.train_size = len(train)
        args.total_samples = args.epochs * len(train)
        module = ImageNetModule(args, train, val, len(train.classes))
        callbacks: list[pl.Callback] = [SampleClock()]
        grow = None
        if args.adaptive_batch:
            grow = AdaptiveBatchSize(
                test=args.test,
                eta=args.eta,
                max_batch_size=min(args.max_batch_size, len(train)),
                interval=args.interval,
                max_micro_batch_size=args.max_micro_batch_size,
                seed=args.seed,
                stats_fallback=args.stats_fallback,
            )
            callbacks.append(grow)
        select = None
        if args.select != "none":
            k = max(1, round(args.select_keep * args.batch_size))
            selector = (
                UDSSelector(k=k, alpha=args.uds_alpha, seed=args.seed)
                if args.select == "uds"
                else HighLossSelector(k=k)
            )
            select = OnlineBatchSelection(selector)
            callbacks.append(select)
        cuda = torch.cuda.is_available() and args.accelerator in ("auto", "gpu", "cuda")
        precision = args.precision or ("bf16-mixed" if cuda else "32-true")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            trainer = pl.Trainer(
                max_epochs=args.epochs,
                max_steps=args.max_steps,
                accelerator=args.accelerator,
                devices=args.devices,
                num_nodes=args.num_nodes,
                strategy=_strategy(args),
                precision=precision,
                callbacks=callbacks,
                # the adaptive sampler shards each global batch itself
                use_distributed_sampler=not args.adaptive_batch,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=not args.synthetic,
                enable_model_summary=not args.synthetic,
                num_sanity_val_steps=0,
                limit_val_batches=0 if args.max_steps > 0 else 1.0,
            )
            trainer.fit(module)
        opt = trainer.optimizers[0]
        sched = trainer.lr_scheduler_configs[0].scheduler
        summary: dict[str, Any] = {
            "arch": args.arch,
            "norm": args.norm,
            "strategy": args.strategy,
            "world_size": trainer.world_size,
            "precision": precision,
            "optimizer_steps": trainer.global_step,
            "samples_seen": sched.samples_seen,
            "last_step_batch": sched.last_batch_samples,
            "lr": opt.param_groups[0]["lr"],
            "sharded": any(
                type(p).__name__ == "DTensor" for p in trainer.lightning_module.parameters()
            ),
        }
        if grow is not None:
            summary.update(
                final_batch_size=grow.batch_size,
                accumulation=grow.accumulation,
                history=[dict(h) for h in grow.history],
            )
        if select is not None:
            summary.update(
                samples_scored=select.samples_scored, samples_trained=select.samples_trained
            )
        if args.output and trainer.is_global_zero:
            Path(args.output).write_text(json.dumps(summary))
        if trainer.is_global_zero:
            print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
        return summary
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
