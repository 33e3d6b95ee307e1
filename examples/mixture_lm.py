"""Dynamic data mixtures on six real text domains: a byte-level transformer LM trained from scratch.

Domains (``adaptive.data.text``): fiction (Austen), scripture (KJV), quotes (fortunes), dictionary
(GCIDE), computing (FOLDOC), code (Python standard library). Each domain's documents are shuffled
with a fixed seed and split into a training part and a held-out part; the held-out part is split
again into *target-dev* (what a rule that looks at the target may use) and *target-test* (only
for the report).

The target is a held-out mixture that is not the uniform one, a "technical writing" mix:

    fiction 0.05, scripture 0.05, quotes 0.15, dictionary 0.15, computing 0.30, code 0.30

Target loss = Σ_d t_d · (mean next-byte cross-entropy on domain d's target-test windows), in nats.

Methods, all at the same number of training tokens (steps × batch × context):

- ``uniform``: equal weights on the six domains throughout;
- ``doremi``: DoReMi's excess-loss rule (η = 1, c = 10⁻³) every 20 steps; the reference losses are
  the uniform run's final per-domain losses on held-out windows of the *training* documents (the
  uniform run of the same seed is DoReMi's reference model; DoReMi never sees the target). The
  paper updates every step; in a pilot (seed 0) that drove the weights to near one-hot and a
  worse target loss (2.793 against uniform's 2.744), the behaviour the authors' issue #5 reports;
- ``exp3``: ODM's EXP3 bandit on the per-domain training loss, every step as in ODM (does not see
  the target);
- ``influence``: group influence with the TiKMiX-D program (SLSQP) every 20 steps: at the start
  of the last ``--influence-capture`` steps of each interval the gradient of the target-dev loss
  becomes the statistics sensor's target ``d``, and those steps' ordinary backward passes give
  the per-domain ``Σ⟨g_i, d⟩`` (no extra per-domain backward passes);
- ``influence_exp``: the same alignment with the exponentiated update (η = 0.3, floor 0.02).

Run: ``python examples/mixture_lm.py`` (about 10-15 minutes on 2 CPU cores), or ``--quick`` for a
seconds-long smoke run. Writes ``<out>/mixture_lm.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from adaptive.data.text import TEXT_DOMAINS, text_domains
from adaptive.mixture import (
    DomainLossMeter,
    DoReMi,
    Exp3Mixture,
    GroupInfluence,
    MixtureDataset,
    MixtureSampler,
    MixtureSignals,
    alignment_from_statistics,
)
from adaptive.stats import GradientStatistics

TARGET_MIX = {
    "fiction": 0.05,
    "scripture": 0.05,
    "quotes": 0.15,
    "dictionary": 0.15,
    "computing": 0.30,
    "code": 0.30,
}
METHODS = ("uniform", "doremi", "exp3", "influence", "influence_exp")


# ----------------------------------------------------------------------------------- data
class Windows(Dataset):
    """Non-overlapping windows of ``context + 1`` bytes of one domain's byte stream."""

    def __init__(self, data: np.ndarray, context: int) -> None:
        self.data = torch.from_numpy(data.astype(np.int64))
        self.context = context
        self.n = (len(data) - 1) // context
        if self.n < 1:
            raise ValueError(f"a domain has {len(data)} bytes, fewer than one window of {context}")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Tensor:
        s = i * self.context
        return self.data[s : s + self.context + 1]


def _to_bytes(docs: list[str], limit: int) -> np.ndarray:
    out, total = [], 0
    for d in docs:
        b = (d + "\n\n").encode("utf-8", errors="replace")
        out.append(b)
        total += len(b)
        if total >= limit:
            break
    return np.frombuffer(b"".join(out)[:limit], dtype=np.uint8)


def domain_bytes(train_bytes: int, heldout_bytes: int, seed: int = 1234, cache: Path | None = None):
    """Per domain: (training byte stream, held-out byte stream) from disjoint documents.

    Documents are shuffled with ``seed``; the first 10% are held out. ``cache``: an ``.npz`` file
    that stores the streams after the first call (the corpora take a while to parse).
    """
    if cache is not None and cache.exists():
        with np.load(cache) as z:
            if int(z["train_bytes"]) == train_bytes and int(z["heldout_bytes"]) == heldout_bytes:
                return {n: (z[f"{n}_train"], z[f"{n}_heldout"]) for n in TEXT_DOMAINS}
    domains = text_domains()
    out = {}
    for name in TEXT_DOMAINS:
        docs = list(domains[name])
        random.Random(seed).shuffle(docs)
        n_hold = max(4, len(docs) // 10)
        out[name] = (
            _to_bytes(docs[n_hold:], train_bytes + heldout_bytes // 2),
            _to_bytes(docs[:n_hold], heldout_bytes),
        )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            f"{n}_{part}": a
            for n, (tr, ho) in out.items()
            for part, a in (("train", tr), ("heldout", ho))
        }
        np.savez(cache, train_bytes=train_bytes, heldout_bytes=heldout_bytes, **arrays)
    return out


def build_data(train_bytes: int, heldout_bytes: int, context: int, cache: Path | None = None):
    """Per domain: training windows, train-dev, target-dev and target-test windows."""
    splits = {}
    for name, (tr, ho) in domain_bytes(train_bytes, heldout_bytes, cache=cache).items():
        half = len(ho) // 2
        splits[name] = {
            "train": Windows(tr[:train_bytes], context),
            # held-out windows of the training documents: DoReMi's reference and proxy losses
            "train_dev": Windows(tr[train_bytes:], context),
            # held-out documents: the target; dev for rules that may look, test for the report
            "target_dev": Windows(ho[:half], context),
            "target_test": Windows(ho[half:], context),
        }
    return splits


def stack_windows(ds: Windows, count: int) -> Tensor:
    idx = np.linspace(0, len(ds) - 1, num=min(count, len(ds))).astype(int)
    return torch.stack([ds[int(i)] for i in idx])


# ---------------------------------------------------------------------------------- model
class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class ByteLM(nn.Module):
    """A small GPT-style byte-level LM built only from Linear, Embedding and LayerNorm."""

    def __init__(self, context: int, d: int = 128, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(256, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256)

    def forward(self, x: Tensor) -> Tensor:
        # positions expanded to (b, t) so that axis 0 is the sample axis for the sensor's hooks
        pos = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        h = self.tok(x) + self.pos(pos)
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln(h))


def sample_losses(model: nn.Module, windows: Tensor) -> Tensor:
    """Mean next-byte cross-entropy of each window, shape (b,)."""
    x, y = windows[:, :-1], windows[:, 1:]
    logits = model(x)
    ce = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1), reduction="none")
    return ce.view(y.shape).mean(dim=1)


@torch.no_grad()
def domain_losses(model: nn.Module, sets: dict[str, Tensor]) -> dict[str, float]:
    model.eval()
    out = {name: float(sample_losses(model, w).mean()) for name, w in sets.items()}
    model.train()
    return out


def collate(batch):
    windows = torch.stack([w for w, _ in batch])
    return windows, torch.tensor([s for _, s in batch], dtype=torch.long)


# ------------------------------------------------------------------------------- training
def train_run(method: str, seed: int, splits, args, reference: dict[str, float] | None) -> dict:
    k = len(TEXT_DOMAINS)
    torch.manual_seed(seed)
    model = ByteLM(args.context, d=args.width, layers=args.layers)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
    )
    sources = [splits[n]["train"] for n in TEXT_DOMAINS]
    sampler = MixtureSampler(
        [len(s) for s in sources],
        [1.0] * k,
        batch_size=args.batch_size,
        seed=seed,
        num_batches=args.steps,
    )
    loader = DataLoader(
        MixtureDataset(sources, list(TEXT_DOMAINS)), batch_sampler=sampler, collate_fn=collate
    )
    target_dev = torch.cat(
        [
            stack_windows(splits[n]["target_dev"], max(1, round(args.target_batch * TARGET_MIX[n])))
            for n in TEXT_DOMAINS
        ]
    )
    dev_mix = torch.cat(
        [
            torch.full(
                (max(1, round(args.target_batch * TARGET_MIX[n])),),
                TARGET_MIX[n] / max(1, round(args.target_batch * TARGET_MIX[n])),
            )
            for n in TEXT_DOMAINS
        ]
    )
    rule = None
    if method == "doremi":
        ref = torch.tensor([reference[n] for n in TEXT_DOMAINS])
        rule = DoReMi(k, eta=args.doremi_eta, smoothing=1e-3, reference_losses=ref)
    elif method == "exp3":
        rule = Exp3Mixture(k)
    elif method.startswith("influence"):
        rule = GroupInfluence(
            k,
            method="tikmix" if method == "influence" else "exponentiated",
            eta=args.influence_eta,
            smoothing=args.influence_smoothing,
            floor=args.influence_floor,
        )
        stats = GradientStatistics(model, num_groups=k, inner_products=False)
    meter = DomainLossMeter(k)
    history = [{"step": 0, "weights": sampler.weights.tolist()}]
    influence = method.startswith("influence")
    every = args.exp3_update_every if method == "exp3" else args.update_every
    capture_from = every - args.influence_capture
    t0 = time.perf_counter()
    for step, (windows, src) in enumerate(loader):
        capturing = influence and step % every >= capture_from
        if capturing and step % every == capture_from:
            # target direction d = ∇ of the target-dev loss (mix-weighted), at current θ
            model.zero_grad(set_to_none=True)
            (sample_losses(model, target_dev) * dev_mix).sum().backward()
            stats.set_target({n: p.grad.detach().clone() for n, p in model.named_parameters()})
            model.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
        if capturing:  # the sensor hooks the forward and the backward of this step
            with stats.capture(group_ids=src):
                losses = sample_losses(model, windows)
                losses.mean().backward()
        else:
            losses = sample_losses(model, windows)
            losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        meter.add(losses.detach(), src)
        if rule is not None and (step + 1) % every == 0:
            signals = meter.signals()
            if influence:
                # each capture is its own step (its loss divided by nothing more than its mean),
                # not a share of an accumulated batch: without this the group dots come out
                # multiplied by the number of captures
                res = stats.result(loss_divisor=1)
                signals = MixtureSignals(
                    signals.losses,
                    signals.counts,
                    alignment=alignment_from_statistics(res.group_grad_dots, res.group_counts),
                )
            sampler.set_weights(rule.update(signals))
            history.append({"step": step + 1, "weights": sampler.weights.tolist()})
        if (step + 1) % every == 0:
            meter.reset()
    seconds = time.perf_counter() - t0
    test_sets = {
        n: stack_windows(splits[n]["target_test"], args.eval_windows) for n in TEXT_DOMAINS
    }
    dev_sets = {n: stack_windows(splits[n]["train_dev"], args.eval_windows) for n in TEXT_DOMAINS}
    per_domain = domain_losses(model, test_sets)
    out = {
        "method": method,
        "seed": seed,
        "seconds": seconds,
        "target_loss": sum(TARGET_MIX[n] * per_domain[n] for n in TEXT_DOMAINS),
        "domain_loss": per_domain,
        "train_dev_loss": domain_losses(model, dev_sets),
        "weights": history,
        "final_weights": sampler.weights.tolist(),
    }
    if method == "doremi":
        out["average_weights"] = rule.average_weights.tolist()
    return out


# ------------------------------------------------------------------------------- reporting
def summarise(runs: list[dict], methods: list[str]) -> dict:
    summary = {}
    for m in methods:
        vals = np.array([r["target_loss"] for r in runs if r["method"] == m])
        doms = {
            n: float(np.mean([r["domain_loss"][n] for r in runs if r["method"] == m]))
            for n in TEXT_DOMAINS
        }
        summary[m] = {
            "target_loss_mean": float(vals.mean()),
            "target_loss_std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
            "target_loss_spread": float(vals.max() - vals.min()),
            "target_losses": vals.tolist(),
            "domain_loss_mean": doms,
            "seconds_mean": float(np.mean([r["seconds"] for r in runs if r["method"] == m])),
        }
    if "uniform" in summary:
        u = summary["uniform"]
        for m in methods:
            s = summary[m]
            s["gain_vs_uniform"] = u["target_loss_mean"] - s["target_loss_mean"]
            # with one seed there is no spread to beat
            s["beats_uniform_beyond_spread"] = (
                bool(s["gain_vs_uniform"] > max(u["target_loss_spread"], s["target_loss_spread"]))
                if len(s["target_losses"]) > 1
                else None
            )
    return summary


def write_markdown(path: Path, meta: dict, summary: dict, methods: list[str]) -> None:
    lines = [
        "# Dynamic data mixtures: byte-level LM on six real text domains",
        "",
        f"Machine: {meta['machine']}, {meta['cpus']} CPUs (shared with other jobs), torch "
        f"{meta['torch']}, Python {meta['python']}, {meta['date']}.",
        f"Model: {meta['model']}. {meta['steps']} steps × batch {meta['batch_size']} × context "
        f"{meta['context']} = {meta['tokens']:,} training tokens per run (equal for every method), "
        f"seeds {meta['seeds']}.",
        "Target mix (held-out documents): "
        + ", ".join(f"{n} {w}" for n, w in TARGET_MIX.items())
        + ". Loss = next-byte cross-entropy in nats on target-test windows.",
        "",
        "| method | target loss (mean ± sd) | spread | gain vs uniform "
        "| beats uniform beyond spread | " + " | ".join(TEXT_DOMAINS) + " | s/run |",
        "|---|---|---|---|---|" + "---|" * len(TEXT_DOMAINS) + "---|",
    ]
    for m in methods:
        s = summary[m]
        lines.append(
            f"| {m} | {s['target_loss_mean']:.4f} ± {s['target_loss_std']:.4f} | "
            f"{s['target_loss_spread']:.4f} | {s.get('gain_vs_uniform', 0.0):+.4f} | "
            f"{ {True: 'yes', False: 'no'}.get(s.get('beats_uniform_beyond_spread'), 'n/a') } | "
            + " | ".join(f"{s['domain_loss_mean'][n]:.3f}" for n in TEXT_DOMAINS)
            + f" | {s['seconds_mean']:.0f} |"
        )
    lines += [
        "",
        'Spread = max − min of the target loss over the seeds. "Beats uniform beyond spread": the '
        "mean gain over uniform exceeds both methods' spreads. Time per run includes the rule's "
        "own cost (for influence: one target-gradient pass and sensor hooks per update).",
        "",
        f"Final weights (seed {meta['seeds'][0]}): see `mixture_lm.json`; weights over time: "
        "`mixture_lm.png`.",
    ]
    path.write_text("\n".join(lines) + "\n")


def plot_weights(path: Path, runs: list[dict], methods: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adaptive = [m for m in methods if m != "uniform"] or methods
    fig, axes = plt.subplots(1, len(adaptive), figsize=(4.2 * len(adaptive), 3.4), squeeze=False)
    seed0 = min(r["seed"] for r in runs)
    for ax, m in zip(axes[0], adaptive, strict=True):
        run = next(r for r in runs if r["method"] == m and r["seed"] == seed0)
        steps = [h["step"] for h in run["weights"]]
        w = np.array([h["weights"] for h in run["weights"]])
        ax.stackplot(steps, w.T, labels=TEXT_DOMAINS, step="post")
        ax.set_title(f"{m} (seed {seed0})")
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("sampling weight")
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--update-every",
        type=int,
        default=20,
        help="steps between DoReMi and group-influence updates",
    )
    p.add_argument(
        "--exp3-update-every",
        type=int,
        default=1,
        help="steps between EXP3 updates (ODM: every step)",
    )
    p.add_argument(
        "--influence-capture",
        type=int,
        default=4,
        help="steps per interval whose backward the sensor captures (at its end)",
    )
    p.add_argument(
        "--influence-eta", type=float, default=0.3, help="step of the exponentiated update"
    )
    p.add_argument("--influence-smoothing", type=float, default=0.0)
    p.add_argument("--influence-floor", type=float, default=0.02)
    p.add_argument("--doremi-eta", type=float, default=1.0)
    p.add_argument("--target-batch", type=int, default=64)
    p.add_argument("--eval-windows", type=int, default=256)
    p.add_argument("--train-bytes", type=int, default=1_500_000)
    p.add_argument("--heldout-bytes", type=int, default=80_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="an .npz file to keep the parsed byte streams in between runs",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the finished runs in <out>/mixture_lm.partial.json (same settings assumed)",
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 1 seed, 24 steps, tiny model and data"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.width, args.layers = args.seeds[:1], 24, 32, 1
        args.update_every, args.influence_capture = 6, 2
        args.train_bytes, args.heldout_bytes, args.eval_windows = 60_000, 16_000, 16
        args.target_batch, args.batch_size, args.context = 24, 16, 32
    if "doremi" in args.methods and "uniform" not in args.methods:
        p.error("doremi needs the uniform run as its reference model: include 'uniform'")
    if not 1 <= args.influence_capture <= args.update_every:
        p.error("--influence-capture must lie in [1, --update-every]")
    torch.set_num_threads(args.threads)
    methods = [m for m in METHODS if m in args.methods]
    try:
        from tqdm import tqdm
    except ImportError:  # progress bar is optional

        def tqdm(x, **_):
            return x

    splits = build_data(args.train_bytes, args.heldout_bytes, args.context, args.cache)
    runs = []
    partial_file = args.out / "mixture_lm.partial.json"
    if args.resume and partial_file.exists():
        done = json.loads(partial_file.read_text())["runs"]
        runs = [r for r in done if r["seed"] in args.seeds and r["method"] in methods]
    finished = {(r["seed"], r["method"]) for r in runs}
    jobs = [(s, m) for s in args.seeds for m in methods if (s, m) not in finished]
    reference = {r["seed"]: r["train_dev_loss"] for r in runs if r["method"] == "uniform"}
    for seed, method in tqdm(jobs, desc="runs"):
        run = train_run(method, seed, splits, args, reference.get(seed))
        if method == "uniform":
            reference[seed] = run["train_dev_loss"]
        runs.append(run)
        partial = {"runs": runs, "args": {k: str(v) for k, v in vars(args).items()}}
        args.out.mkdir(parents=True, exist_ok=True)
        partial_file.write_text(json.dumps(partial))
        print(
            f"{method:10s} seed {seed}: target loss {run['target_loss']:.4f} "
            f"({run['seconds']:.0f} s)",
            file=sys.stderr,
        )
    runs.sort(key=lambda r: (r["seed"], methods.index(r["method"])))
    methods = [m for m in methods if any(r["method"] == m for r in runs)]
    summary = summarise(runs, methods)
    meta = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": f"byte-level transformer, {args.layers} layers, width {args.width}, "
        f"context {args.context}",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "context": args.context,
        "tokens": args.steps * args.batch_size * args.context,
        "seeds": args.seeds,
        "target_mix": TARGET_MIX,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "shared_machine": True,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "summary": summary, "runs": runs}
    (args.out / "mixture_lm.json").write_text(json.dumps(result, indent=1))
    (args.out / "mixture_lm.partial.json").unlink(missing_ok=True)
    write_markdown(args.out / "mixture_lm.md", meta, summary, methods)
    plot_weights(args.out / "mixture_lm.png", runs, methods)
    print((args.out / "mixture_lm.md").read_text())
    return result


if __name__ == "__main__":
    main()
