"""Time one LAMB ``step()``: adaptive.optim.Lamb against timm's and pytorch-optimizer's Lamb.

All optimizers run side by side in one process on the parameter set of torchvision's ResNet-18
(11.7M parameters in 62 tensors) and of a small transformer, each on its own copy of the
parameters and gradients. Repetitions are interleaved (the order rotates every round) and the
median is reported, so a neighbour's load on a shared machine hits every optimizer alike.

Optimizer traffic per step is counted as the bytes of parameters (read + write), gradients
(read) and both moments (read + write): 28 bytes per fp32 parameter. The achieved GB/s is set
against the machine's copy bandwidth, measured in the same rounds by copying a large tensor
(bytes read + bytes written per second).

    python benchmarks/optim_speed.py                  # CPU
    python benchmarks/optim_speed.py --device cuda    # GPU, with torch.cuda.synchronize
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn
from tqdm import tqdm

from adaptive.optim import Lamb

BYTES_PER_PARAM = 4 * (2 + 1 + 2 + 2)  # fp32: param r/w, grad r, exp_avg r/w, exp_avg_sq r/w


def resnet18_params() -> list[torch.Tensor]:
    return [p.detach() for p in torchvision.models.resnet18(weights=None).parameters()]


def transformer_params() -> list[torch.Tensor]:
    """A small pre-norm transformer LM: 6 layers, width 384, vocabulary 8192."""
    layer = nn.TransformerEncoderLayer(384, 6, 1536, batch_first=True, norm_first=True)
    model = nn.ModuleDict(
        {
            "emb": nn.Embedding(8192, 384),
            "enc": nn.TransformerEncoder(layer, 6, enable_nested_tensor=False),
            "norm": nn.LayerNorm(384),
            "head": nn.Linear(384, 8192),
        }
    )
    return [p.detach() for p in model.parameters()]


# peers that could not be imported here: name -> reason (reported, not fatal)
MISSING: dict[str, str] = {}


class _LambForeach(Lamb):
    """``Lamb`` with its CUDA Triton kernels switched off (``ADAPTIVE_TRITON=0``): the foreach
    path, for comparison on a GPU."""

    def step(self, closure=None):
        before = os.environ.get("ADAPTIVE_TRITON")
        os.environ["ADAPTIVE_TRITON"] = "0"
        try:
            return super().step(closure)
        finally:
            if before is None:
                del os.environ["ADAPTIVE_TRITON"]
            else:
                os.environ["ADAPTIVE_TRITON"] = before


def make_optimizers(
    device: str,
) -> dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]]:
    same = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    opts: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
        "ours": lambda ps: Lamb(ps, **same),
        "ours_cpu_block0": lambda ps: Lamb(ps, **same, cpu_block=0),
    }
    try:
        from timm.optim import Lamb as TimmLamb

        opts["timm"] = lambda ps: TimmLamb(ps, **same, max_grad_norm=None, always_adapt=True)
        opts["timm_foreach"] = lambda ps: TimmLamb(
            ps, **same, max_grad_norm=None, always_adapt=True, foreach=True
        )
    except ImportError as err:
        MISSING["timm"] = str(err)
    try:
        from pytorch_optimizer import Lamb as KozistrLamb

        # kozistr's defaults (its own mathematics: no v bias correction, decoupled decay, clip 1)
        opts["pytorch_optimizer"] = lambda ps: KozistrLamb(ps, **same)
    except ImportError as err:
        MISSING["pytorch_optimizer"] = str(err)
    if device != "cpu":
        del opts["ours_cpu_block0"]  # identical to "ours" off the CPU
        opts["ours_foreach"] = lambda ps: _LambForeach(ps, **same)  # Triton kernels off
        # the same traffic per parameter as LAMB (param r/w, grad r, two moments r/w)
        opts["adamw_fused"] = lambda ps: torch.optim.AdamW(ps, **same, fused=True)
    return opts


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(src: torch.Tensor, dst: torch.Tensor, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    dst.copy_(src)
    sync(device)
    return 2 * src.numel() * src.element_size() / (time.perf_counter() - t0) / 1e9


def bench_param_set(name: str, base: list[torch.Tensor], args: argparse.Namespace) -> dict:
    device = args.device
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen).mul_(0.01) for p in base]
    runs = {}
    for key, make in make_optimizers(device).items():
        params = [nn.Parameter(p.clone().to(device)) for p in base]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(device).clone()
        runs[key] = make(params)
    copy_src = torch.randn(args.copy_mib * (1 << 20) // 4, device=device)
    copy_dst = torch.empty_like(copy_src)
    for _ in range(args.warmup):
        for opt in runs.values():
            opt.step()
    times: dict[str, list[float]] = {k: [] for k in runs}
    copies: list[float] = []
    keys = list(runs)
    for rep in tqdm(range(args.reps), desc=name, leave=False):
        order = keys[rep % len(keys) :] + keys[: rep % len(keys)]
        for key in order:
            sync(device)
            t0 = time.perf_counter()
            runs[key].step()
            sync(device)
            times[key].append(time.perf_counter() - t0)
        copies.append(copy_bandwidth(copy_src, copy_dst, device))
    numel = sum(p.numel() for p in base)
    traffic = numel * BYTES_PER_PARAM
    copy_gbs = statistics.median(copies)
    rows = {}
    for key, ts in times.items():
        med = statistics.median(ts)
        gbs = traffic / med / 1e9
        rows[key] = {
            "ms_per_step": 1e3 * med,
            "ms_min": 1e3 * min(ts),
            "gb_per_s": gbs,
            "fraction_of_copy_bw": gbs / copy_gbs,
        }
    ours = rows["ours"]["ms_per_step"]
    return {
        "params": numel,
        "tensors": len(base),
        "traffic_mb_per_step": traffic / 1e6,
        "copy_gb_per_s": copy_gbs,
        "results": rows,
        **{
            f"ours_over_{k}": ours / rows[k]["ms_per_step"]
            for k in ("timm", "timm_foreach", "pytorch_optimizer", "ours_foreach", "adamw_fused")
            if k in rows
        },
    }


def write_markdown(path: Path, report: dict) -> None:
    m = report["machine"]
    lines = [
        "# LAMB step time (benchmarks/optim_speed.py)",
        "",
        f"{report['date']} · device `{report['device']}` ({m['device_name']}) · {m['platform']} · "
        f"{m['cpu_count']} CPUs · torch {m['torch']} · python {m['python']} · "
        f"{m['threads']} torch threads · {report['reps']} interleaved rounds, median",
        "",
        f"Load average before / after: {m['loadavg_before']} / {m['loadavg_after']}. "
        "The machine was shared with other jobs while this ran; absolute times are noisy, the "
        "ratios (same rounds, same process) are the figures to read.",
        "",
        "Traffic = 28 bytes per fp32 parameter (param r+w, grad r, both moments r+w). Copy "
        "bandwidth = bytes read + written per second by a large `copy_` in the same rounds.",
        "",
    ]
    for name, r in report["param_sets"].items():
        lines += [
            f"## {name}: {r['params'] / 1e6:.2f}M parameters in {r['tensors']} tensors, "
            f"{r['traffic_mb_per_step']:.0f} MB of traffic per step, "
            f"copy {r['copy_gb_per_s']:.1f} GB/s",
            "",
            "| optimizer | ms/step (median) | ms/step (min) | GB/s | fraction of copy bandwidth |",
            "|---|---:|---:|---:|---:|",
        ]
        for key, row in r["results"].items():
            lines.append(
                f"| {key} | {row['ms_per_step']:.1f} | {row['ms_min']:.1f} | "
                f"{row['gb_per_s']:.2f} | {row['fraction_of_copy_bw']:.2f} |"
            )
        ratios = [
            f"ours / {k.removeprefix('ours_over_')} = **{v:.2f}**"
            for k, v in r.items()
            if k.startswith("ours_over_")
        ]
        lines += ["", " · ".join(ratios), ""]
    lines += [
        "Configurations: ours = `Lamb(lr=1e-3, eps=1e-6, weight_decay=0.01)` (paper defaults, "
        "cache-blocked CPU path); `ours_cpu_block0` = plain foreach over whole tensors; timm = "
        "`timm.optim.Lamb(..., max_grad_norm=None, always_adapt=True)` (its default path: "
        "single-tensor on CPU, foreach on CUDA); pytorch_optimizer = `pytorch_optimizer.Lamb` with "
        "its defaults (different mathematics: global clip 1.0, no second-moment bias correction). "
        "On CUDA: ours = the two-pass Triton kernels (`adaptive/optim/lamb_triton.py`), "
        "ours_foreach = the same with `ADAPTIVE_TRITON=0`, adamw_fused = "
        "`torch.optim.AdamW(fused=True)` (the same 28 bytes per parameter).",
        "",
    ]
    if report.get("missing"):
        lines += [f"Not installed here, skipped: {', '.join(report['missing'])}.", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--reps", type=int, default=15, help="interleaved rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument(
        "--copy-mib", type=int, default=256, help="size of the bandwidth probe tensor"
    )
    parser.add_argument(
        "--sets", default="resnet18,transformer", help="comma list of parameter sets"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "optim_speed"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda given but torch.cuda.is_available() is False")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    loadavg_before = [round(x, 2) for x in os.getloadavg()]
    builders = {"resnet18": resnet18_params, "transformer": transformer_params}
    sets = {}
    for name in args.sets.split(","):
        torch.manual_seed(0)
        sets[name] = bench_param_set(name, builders[name](), args)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "reps": args.reps,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "device_name": torch.cuda.get_device_name()
            if args.device == "cuda"
            else platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "loadavg_before": loadavg_before,
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "shared": "yes: other jobs ran on this machine during the benchmark",
        },
        "param_sets": sets,
        "missing": MISSING,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    write_markdown(out.with_suffix(".md"), report)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
