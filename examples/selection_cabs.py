"""Concept-aware batch sampling (CABS) on real text: Debian fortunes with content-word concepts.

Data: the Debian ``fortunes`` package (short texts filed under labelled categories). We use the
categories with at least ``--min-per-class`` entries, at most ``--per-class`` of each, split
80/20 into a training pool and a held-out set.

Concepts, derived transparently: the concept vocabulary is the ``--concepts`` most frequent
*content words* of the training pool by document frequency, where a word is a lower-cased run of
letters of length ≥ 4 that is not in the small stop-word list below; a text's concept list is
the set of vocabulary words it contains (no model, no tagger). Texts may have no concept.

Compared, at the same number of trained samples (``--steps`` batches of ``--batch-size``):
uniform random batches, CABS-DM (diversity) and CABS-FM (frequency), each from super-batches of
``batch_size / (1 − f)`` candidates. Reported per kept batch: distinct concepts, concept-count
entropy (normalised by log of the distinct count) and the largest count of one concept; and the
downstream metric: held-out accuracy, class-balanced accuracy and loss of a bag-of-words
classifier (``EmbeddingBag`` + linear) trained on those batches, over ``--seeds`` seeds.

    python examples/selection_cabs.py                      # ~1 min of CPU on 2 idle cores
    python examples/selection_cabs.py --quick --out /tmp/x # synthetic texts, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adaptive.selection import CABSSampler

FORTUNES = Path("/usr/share/games/fortunes")
SKIP_FILES = {"ascii-art", "translate-me", "pratchett"}
STOP = set(
    """about above after again against also been before being below between both came come
    could does doing down during each else even ever every from further have having here hers
    herself himself into itself just like made make many more most much must myself never only
    other ought ours ourselves over said same shall should some such than that their theirs them
    themselves then there these they this those through under until upon very want well were
    what when where which while whom whose will with would your yours yourself yourselves
    because cannot isn't it's don't didn't doesn't can't won't i'm you're that's""".split()
)
WORD = re.compile(r"[a-z]+")
MODES = ("uniform", "diversity", "frequency")


def load_fortunes(root: Path, min_per_class: int, per_class: int, seed: int):
    if not root.is_dir():
        raise SystemExit(f"{root} not found: apt-get install -y fortunes, or pass --fortunes DIR")
    g = torch.Generator().manual_seed(seed)
    texts, labels, names = [], [], []
    for path in sorted(root.iterdir()):
        if path.suffix or path.is_symlink() or path.name in SKIP_FILES or not path.is_file():
            continue
        raw = path.read_text(encoding="utf-8", errors="replace").split("\n%\n")
        entries = [" ".join(e.split()) for e in raw if len(e.split()) >= 3]
        if len(entries) < min_per_class:
            continue
        order = torch.randperm(len(entries), generator=g)[:per_class].tolist()
        texts += [entries[i] for i in order]
        labels += [len(names)] * len(order)
        names.append(path.name)
    return texts, torch.tensor(labels), names


def synthetic_texts(seed: int):
    """Texts over 6 classes; each class favours its own 10 content words (--quick)."""
    g = torch.Generator().manual_seed(seed)
    words = [f"word{chr(97 + i)}{chr(97 + j)}" for i in range(8) for j in range(10)]
    texts, labels = [], []
    for _ in range(1500):
        c = int(torch.randint(0, 6, (1,), generator=g))
        own = torch.randint(0, 10, (3,), generator=g) + 10 * c
        noise = torch.randint(
            0, len(words), (int(torch.randint(1, 6, (1,), generator=g)),), generator=g
        )
        texts.append(" ".join(words[int(i)] for i in torch.cat([own, noise])))
        labels.append(c)
    return texts, torch.tensor(labels), [f"class{c}" for c in range(6)]


def words(text: str) -> list[str]:
    return [w for w in WORD.findall(text.lower()) if len(w) >= 4 and w not in STOP]


def concept_lists(train_texts, all_texts, size: int):
    df = Counter(w for t in train_texts for w in set(words(t)))
    vocab = [w for w, _ in df.most_common(size)]
    keep = set(vocab)
    return [sorted(set(words(t)) & keep) for t in all_texts], vocab


class BagOfWords(nn.Module):
    def __init__(self, vocab: int, classes: int, dim: int = 64):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.out = nn.Linear(dim, classes)

    def forward(self, flat, offsets):
        return self.out(self.bag(flat, offsets))


def encode(texts, vocab_size: int, train_texts):
    counts = Counter(w for t in train_texts for w in WORD.findall(t.lower()))
    index = {w: i + 1 for i, (w, _) in enumerate(counts.most_common(vocab_size - 1))}
    return [[index.get(w, 0) for w in WORD.findall(t.lower())] or [0] for t in texts]


def collate(tokens, rows):
    seqs = [tokens[i] for i in rows]
    offsets = torch.tensor([0] + [len(s) for s in seqs[:-1]]).cumsum(0)
    return torch.tensor([w for s in seqs for w in s]), offsets


def coverage(batch, concepts):
    hist = Counter(c for i in batch for c in concepts[i])
    total = sum(hist.values())
    distinct = len(hist)
    entropy = -sum(n / total * math.log(n / total) for n in hist.values()) if total else 0.0
    return {
        "distinct": distinct,
        "entropy_norm": entropy / math.log(distinct) if distinct > 1 else 0.0,
        "max_count": max(hist.values()) if hist else 0,
        "with_no_concept": sum(1 for i in batch if not concepts[i]),
    }


def batches_for(mode, concepts_train, args, seed):
    if mode == "uniform":
        g = torch.Generator().manual_seed(seed)
        out, order = [], []
        while len(out) < args.steps:
            if len(order) < args.batch_size:
                order = torch.randperm(len(concepts_train), generator=g).tolist()
            out.append(order[: args.batch_size])
            order = order[args.batch_size :]
        return out
    sampler = CABSSampler(concepts_train, args.batch_size, args.filter_ratio, mode, seed=seed)
    out = []
    while len(out) < args.steps:
        out += list(sampler)
    return out[: args.steps]


def run(mode, seed, data, args):
    tokens, labels, concepts, n_train, classes = data
    torch.manual_seed(seed)
    model = BagOfWords(args.vocab, classes)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    batches = batches_for(mode, concepts[:n_train], args, seed)
    cov = [coverage(b, concepts) for b in batches]
    for rows in batches:
        flat, off = collate(tokens, rows)
        loss = F.cross_entropy(model(flat, off), labels[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    test = list(range(n_train, len(labels)))
    with torch.no_grad():
        logits = model(*collate(tokens, test))
    y = labels[test]
    pred = logits.argmax(1)
    per_class = [
        float((pred[y == c] == c).float().mean()) for c in range(classes) if (y == c).any()
    ]
    return {
        "distinct_concepts": sum(c["distinct"] for c in cov) / len(cov),
        "entropy_norm": sum(c["entropy_norm"] for c in cov) / len(cov),
        "max_count": sum(c["max_count"] for c in cov) / len(cov),
        "no_concept_per_batch": sum(c["with_no_concept"] for c in cov) / len(cov),
        "accuracy": float((pred == y).float().mean()),
        "balanced_accuracy": sum(per_class) / len(per_class),
        "loss": float(F.cross_entropy(logits, y)),
    }


def write_results(out: Path, stem: str, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    cfg, summary = result["config"], result["summary"]
    lines = [
        "# CABS on Debian fortunes: concept coverage of kept batches and a downstream classifier",
        "",
        f"{result['setup']['data']}. Concepts: the {cfg['concepts']} most frequent content "
        "words (letters only, length ≥ 4, stop words removed) of the training pool; a text's "
        f"concepts are those it contains (mean {result['setup']['mean_concepts']:.2f} per text, "
        f"{result['setup']['no_concept_fraction']:.1%} of texts have none). Batch "
        f"{cfg['batch_size']}, filter ratio {cfg['filter_ratio']} (super-batch "
        f"{result['setup']['super_batch']}), {cfg['steps']} steps, mean ± std over "
        f"{len(cfg['seed_list'])} seeds. Bag-of-words classifier (EmbeddingBag {cfg['vocab']} "
        f"words + linear). {result['machine']['platform']}, {result['machine']['cpus']} CPUs, "
        f"torch {result['machine']['torch']}, {result['date']}.",
        "",
        "| batches | distinct concepts / batch | normalised entropy | max count of a concept "
        "| concept-less texts / batch | held-out accuracy | balanced accuracy | held-out loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in MODES:
        s = summary[m]
        cells = [
            f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}"
            for k in (
                "distinct_concepts",
                "entropy_norm",
                "max_count",
                "no_concept_per_batch",
                "accuracy",
                "balanced_accuracy",
                "loss",
            )
        ]
        name = {"uniform": "uniform", "diversity": "CABS-DM", "frequency": "CABS-FM"}[m]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    names = ["uniform", "CABS-DM", "CABS-FM"]
    for ax, key, label in (
        (axes[0], "distinct_concepts", "distinct concepts per kept batch"),
        (axes[1], "balanced_accuracy", "held-out balanced accuracy"),
    ):
        ax.bar(
            names,
            [summary[m][key]["mean"] for m in MODES],
            yerr=[summary[m][key]["std"] for m in MODES],
            color=["grey", "C0", "C1"],
        )
        ax.set_title(label, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="synthetic texts, few steps")
    ap.add_argument("--fortunes", default=str(FORTUNES))
    ap.add_argument("--min-per-class", type=int, default=200)
    ap.add_argument("--per-class", type=int, default=400)
    ap.add_argument("--concepts", type=int, default=300, help="concept vocabulary size")
    ap.add_argument("--vocab", type=int, default=8000, help="classifier word vocabulary")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--filter-ratio", type=float, default=0.8)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.concepts, args.vocab = 30, 2, 40, 200
        args.batch_size = 16
        texts, labels, names = synthetic_texts(0)
    else:
        texts, labels, names = load_fortunes(
            Path(args.fortunes), args.min_per_class, args.per_class, 0
        )
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(1)).tolist()
    texts, labels = [texts[i] for i in perm], labels[perm]
    n_train = int(0.8 * len(texts))
    concepts, vocab = concept_lists(texts[:n_train], texts, args.concepts)
    tokens = encode(texts, args.vocab, texts[:n_train])
    data = (tokens, labels, concepts, n_train, len(names))
    seeds = list(range(args.seeds))
    jobs = [(m, s) for s in seeds for m in MODES]
    if not args.no_progress:
        try:
            from tqdm import tqdm

            jobs = tqdm(jobs, desc="CABS runs", file=sys.stderr)
        except ImportError:
            pass
    runs = {m: [] for m in MODES}
    for mode, seed in jobs:
        runs[mode].append(run(mode, seed, data, args))
    summary = {}
    for m in MODES:
        summary[m] = {}
        for key in runs[m][0]:
            vals = torch.tensor([r[key] for r in runs[m]], dtype=torch.float64)
            summary[m][key] = {"mean": float(vals.mean()), "std": float(vals.std(correction=0))}
    train_concepts = concepts[:n_train]
    result = {
        "setup": {
            "data": (
                "synthetic texts (--quick)"
                if args.quick
                else f"Debian fortunes: {len(names)} categories with ≥ {args.min_per_class} texts, "
                f"≤ {args.per_class} each, {n_train} training / {len(texts) - n_train} held-out"
            ),
            "categories": names,
            "concept_vocabulary": vocab,
            "mean_concepts": sum(map(len, train_concepts)) / n_train,
            "no_concept_fraction": sum(1 for c in train_concepts if not c) / n_train,
            "super_batch": round(args.batch_size / (1 - args.filter_ratio)),
        },
        "config": {k: v for k, v in vars(args).items() if k not in ("no_progress", "out")}
        | {"seed_list": seeds},
        "runs": runs,
        "summary": summary,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "note": "machine shared with other jobs",
        },
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_results(
        Path(args.out), "selection_cabs_quick" if args.quick else "selection_cabs", result
    )
    return result


if __name__ == "__main__":
    main()
