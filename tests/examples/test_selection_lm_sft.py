"""examples/selection_lm_sft.py --quick: per-token SFT selection on a tiny random Llama.

The reported numbers are checked against independent recomputations: the step-0 held-out loss
from the model's own ``labels=`` loss, and UDS's first selection (empty memory, so utility only)
from ``torch.linalg.matrix_norm(ord="nuc")`` of the response rows of the logits.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load():
    spec = importlib.util.spec_from_file_location(
        "selection_lm_sft", EXAMPLES / "selection_lm_sft.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    module = _load()
    out = tmp_path_factory.mktemp("lm_sft")
    # float32 scoring, so the picks can be checked exactly against float32 recomputations
    argv = ["--quick", "--out", str(out), "--no-progress", "--seeds", "0"]
    result = module.main([*argv, "--score-dtype", "float32"])
    return module, out, result


def _tiny_model(module):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # --model-seed default
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def test_files_and_shapes(run):
    _, out, result = run
    saved = json.loads((out / "selection_lm_sft_quick.json").read_text())
    assert saved["runs"][0]["curve"] == result["runs"][0]["curve"]
    table = (out / "selection_lm_sft_quick.md").read_text()
    assert sum(line.startswith("| uds |") for line in table.splitlines()) == 1
    curve = result["runs"][0]["curve"]
    for method in ("uniform", "high_loss", "uds", "uds_seq"):
        assert [p["samples"] for p in curve[method]] == [0, 32, 64, 96], method
        assert all(math.isfinite(p["loss"]) for p in curve[method])
        assert curve[method][-1]["loss"] < curve[method][0]["loss"], method  # all learn
    p = result["runs"][0]["same_pass"]
    assert p["samples_passed"] == 2 * 16
    assert [u["keep"] for u in p["uds"]] == [4, 2]


def test_step0_heldout_loss_matches_hf_loss(run):
    """Step-0 held-out loss = token-weighted mean of HF's own shifted ``labels=`` loss."""
    module, _, result = run
    model = _tiny_model(module)
    held = module.synthetic_pairs(32 + 400, seed=1234)[:32]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for prompt, response in held:  # one unpadded sequence at a time
            ids = torch.tensor([prompt + response])
            labels = torch.tensor([[-100] * len(prompt) + response])
            total += float(model(input_ids=ids, labels=labels).loss) * len(response)
            tokens += len(response)
    reported = result["runs"][0]["curve"]["uniform"][0]["loss"]
    assert reported == pytest.approx(total / tokens, rel=1e-5)
    for method in ("high_loss", "uds", "uds_seq"):  # same start for every method
        assert result["runs"][0]["curve"][method][0]["loss"] == pytest.approx(reported, rel=1e-6)


def test_first_uds_selection_is_topk_nuclear_norm_of_response_rows(run):
    module, _, result = run
    model = _tiny_model(module)
    pool = module.synthetic_pairs(32 + 400, seed=1234)[32:]
    first = result["runs"][0]["first_super_batch"]
    norms = []
    with torch.no_grad():
        for i in first:
            prompt, response = pool[i]
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
            # rows predicting the response tokens: positions len(prompt)-1 .. end-1
            rows = logits[len(prompt) - 1 : len(prompt) + len(response) - 1]
            norms.append(torch.linalg.matrix_norm(rows, ord="nuc"))
    expected = torch.topk(torch.stack(norms), 4).indices.tolist()
    assert result["runs"][0]["first_selection"]["uds"] == expected
    # high loss: largest mean response-token cross-entropy, recomputed the same way
    losses = []
    with torch.no_grad():
        for i in first:
            prompt, response = pool[i]
            ids = torch.tensor([prompt + response])
            labels = torch.tensor([[-100] * len(prompt) + response])
            losses.append(model(input_ids=ids, labels=labels).loss)
    expected_hl = torch.topk(torch.stack(losses), 4).indices.tolist()
    assert result["runs"][0]["first_selection"]["high_loss"] == expected_hl


def test_bfloat16_scoring_forward_is_close_to_float32(run):
    """The default bfloat16 scoring forward (CPU autocast) gives float32 logits within bf16
    rounding of the float32 forward, and nuclear norms within 2%."""
    module, _, _ = run
    model = _tiny_model(module)
    pairs = module.synthetic_pairs(8, seed=3)
    ids, mask, labels = module.collate(pairs, 0)
    full = module.score_logits(model, ids, mask, torch.float32)
    half = module.score_logits(model, ids, mask, module.SCORE_DTYPES["bfloat16"])
    assert half.dtype == torch.float32 and half.shape == full.shape
    assert not torch.equal(half, full)  # autocast really ran in bfloat16
    rel = (half - full).norm() / full.norm()
    assert rel < 2e-2, float(rel)
    rows = module.response_rows(labels)
    for i in range(len(pairs)):
        want = torch.linalg.matrix_norm(full[i][rows[i].bool()], ord="nuc")
        got = torch.linalg.matrix_norm(half[i][rows[i].bool()], ord="nuc")
        assert got == pytest.approx(float(want), rel=2e-2)
