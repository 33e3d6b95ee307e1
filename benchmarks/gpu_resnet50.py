"""ResNet-50 images/s with the whole adaptive stack against plain training, side by side.

- ``plain``: forward, backward, ``torch.optim.AdamW`` (fused on CUDA), constant learning rate;
- ``stack``: the same model under ``GradientStatistics`` every step (norm statistics: per-sample
  norms, ``‖ḡ‖²``, variance), the norm test's proposal (a device tensor) every step, the
  adaptive batch-size decision (``next_batch_size``, one host read) every ``--interval`` steps,
  ``adaptive.optim.Lamb`` and a sample-clocked ``PowerScheduler``. The batch cap is the batch
  itself, so both loops run the same batch and the difference is the stack's cost.

Both use GroupNorm (the sensor needs per-sample layers; BatchNorm in training couples samples)
and bf16 autocast on CUDA. Rounds are interleaved; the median of each loop's images/s over rounds
and the ratio within a round are reported. Writes ``<out>.json`` and ``<out>.md``.

    python benchmarks/gpu_resnet50.py --device cuda --out benchmarks/results/gpu/resnet50
    python benchmarks/gpu_resnet50.py --smoke      # CPU, tiny shapes: checks the script runs
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adaptive.batching import next_batch_size, norm_test
from adaptive.optim import Lamb
from adaptive.schedules import PowerScheduler
from adaptive.stats import GradientStatistics


def resnet_gn(arch: str = "resnet50", num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet with GroupNorm(32) in place of BatchNorm."""
    import torchvision.models

    build = getattr(torchvision.models, arch)
    return build(num_classes=num_classes, norm_layer=lambda c: nn.GroupNorm(32, c))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Loop:
    """One training loop; ``run(steps)`` returns images/s over those steps."""

    def __init__(self, model, x, y, device, stack: bool, interval: int) -> None:
        self.model, self.x, self.y, self.device = model, x, y, device
        self.stack = stack
        self.interval = interval
        self.batch = x.shape[0]
        self.steps_done = 0
        self.decisions: list[int] = []
        params = list(model.parameters())
        if stack:
            self.stats = GradientStatistics(model, inner_products=False)
            self.opt: torch.optim.Optimizer = Lamb(params, lr=1e-3, weight_decay=0.01)
            self.sched = PowerScheduler(self.opt, warmup_tokens=10 * self.batch)
        else:
            fused = device.type == "cuda"
            self.opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=fused)

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        if not self.stack:
            with self._autocast():
                loss = F.cross_entropy(self.model(self.x).float(), self.y)
            loss.backward()
            self.opt.step()
            return
        with self.stats.capture():
            with self._autocast():
                loss = F.cross_entropy(self.model(self.x).float(), self.y)
            loss.backward()
        res = self.stats.result()
        proposal = norm_test(res, eta=0.5)
        self.steps_done += 1
        if self.steps_done % self.interval == 0:  # the one host read, once per decision
            self.batch = next_batch_size(self.batch, proposal, max_batch_size=self.x.shape[0])
            self.decisions.append(self.batch)
        self.opt.step()
        self.sched.step(samples=self.x.shape[0])

    def run(self, steps: int) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return steps * self.x.shape[0] / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="timed steps per loop per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--interval", type=int, default=4, help="steps between batch-size decisions")
    p.add_argument("--arch", default="resnet50", choices=["resnet50", "resnet18"])
    p.add_argument(
        "--smoke", action="store_true", help="CPU, ResNet-18, tiny shapes, one round: a dry run"
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu" / "resnet50"))
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.arch, args.batch, args.image_size = "cpu", "resnet18", 2, 16
        args.rounds, args.steps, args.warmup, args.interval = 1, 1, 1, 1
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    torch.manual_seed(0)
    classes = 10 if args.smoke else 1000
    base = resnet_gn(args.arch, classes).to(device)
    if device.type == "cuda":
        base = base.to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (args.batch,), device=device)
    loops = {
        "plain": Loop(copy.deepcopy(base), x, y, device, False, args.interval),
        "stack": Loop(copy.deepcopy(base), x, y, device, True, args.interval),
    }
    for loop in loops.values():
        loop.run(args.warmup)
    rates: dict[str, list[float]] = {k: [] for k in loops}
    ratios: list[float] = []
    for r in range(args.rounds):
        order = list(loops) if r % 2 == 0 else list(loops)[::-1]
        this = {k: loops[k].run(args.steps) for k in order}
        for k, v in this.items():
            rates[k].append(v)
        ratios.append(this["stack"] / this["plain"])
    res = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "images_per_s": {k: statistics.median(v) for k, v in rates.items()},
        "images_per_s_all": rates,
        "stack_over_plain_median": statistics.median(ratios),
        "stack_over_plain_all": ratios,
        "batch_decisions": loops["stack"].decisions,
        "goal": "stack >= 0.90 x plain images/s",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    md = [
        f"# {args.arch} (GroupNorm): whole stack against plain training",
        "",
        f"- date {res['date']}, device {res['device']} {res['gpu'] or ''}, torch {torch.__version__}",
        f"- batch {args.batch}, {args.image_size}², {args.rounds} rounds × {args.steps} steps"
        + (", bf16 autocast, channels_last" if device.type == "cuda" else "")
        + (" (smoke run: tiny shapes, not a measurement)" if args.smoke else ""),
        "",
        "| loop | images/s (median) |",
        "|---|---:|",
        *(f"| {k} | {v:.1f} |" for k, v in res["images_per_s"].items()),
        "",
        f"stack / plain: {res['stack_over_plain_median']:.3f} (goal >= 0.90)",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return res


if __name__ == "__main__":
    main()
