"""Which response lengths UDS keeps: mean response tokens of the kept samples against all
candidates, from the starting model's scores (examples/selection_lm_sft.py's task and selector).

The nuclear norm of an ``n × V`` logits matrix grows with the row count ``n`` (between ``r√n``
and ``n·r`` for rows of norm ``r``), so the paper's utility favours long responses;
``UDSSelector(per_row_utility=True)`` divides it by ``n``. For each of the first ``--batches``
super-batches of seed ``--seed``, this scores the candidates with the untrained model (bfloat16
scoring forward, as in the example) and records the response lengths UDS keeps, with and
without the per-row utility. No training: the memory of selected sketches still fills as it would.

    python benchmarks/selection_length_bias.py              # SmolLM2-135M, about 1 min
    python benchmarks/selection_length_bias.py --quick      # tiny random Llama, seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "selection_lm_sft.py"


def _example():
    spec = importlib.util.spec_from_file_location("selection_lm_sft", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args: argparse.Namespace) -> dict:
    ex = _example()
    task_args = argparse.Namespace(
        quick=args.quick,
        gcide_root=None,
        held_out=32 if args.quick else 64,
        pool=400 if args.quick else 2000,
        max_response=24,
        model_seed=0,
    )
    task = ex.build(task_args)
    model = task.make_model()
    dtype = ex.SCORE_DTYPES[args.score_dtype]
    batches = ex.super_batches(len(task.pool), args.super_batch, args.batches, args.seed)
    lengths_all = [len(task.pool[i][1]) for idx in batches for i in idx]
    out = {"all": statistics.mean(lengths_all), "kept": {}, "kept_lengths": {}}
    for per_row in (False, True):
        sel_args = argparse.Namespace(
            alpha=args.alpha,
            memory=1024,
            max_length_sketch=64,
            seed=args.seed,
            uds_per_row=per_row,
        )
        selector = ex.make_selectors(sel_args, ["uds"], args.keep)["uds"]
        kept = []
        for idx in batches:
            pairs = [task.pool[i] for i in idx]
            ids, mask, labels = ex.collate(pairs, task.pad_id)
            keep = ex.choose("uds", selector, model, ids, mask, labels, dtype)
            kept += [len(pairs[k][1]) for k in keep.tolist()]
        name = "per_row" if per_row else "paper"
        out["kept"][name] = statistics.mean(kept)
        out["kept_lengths"][name] = kept
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, synthetic pairs")
    ap.add_argument("--batches", type=int, default=24, help="super-batches scored")
    ap.add_argument("--super-batch", type=int, default=16)
    ap.add_argument("--keep", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--score-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="json path for the result")
    args = ap.parse_args(argv)
    for name in ("batches", "super_batch", "keep", "threads"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.keep > args.super_batch:
        ap.error(f"--keep {args.keep} exceeds --super-batch {args.super_batch}")
    torch.set_num_threads(args.threads)
    res = run(args)
    print(
        f"mean response tokens: all candidates {res['all']:.2f}, UDS keeps "
        f"{res['kept']['paper']:.2f} (paper's utility), {res['kept']['per_row']:.2f} (per row)"
    )
    if args.out:
        Path(args.out).write_text(json.dumps({"config": vars(args)} | res, indent=2))
    return res


if __name__ == "__main__":
    main()
