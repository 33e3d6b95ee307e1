"""examples/lm_pretrain.py: exact resumption of growth + schedule + mixture in one Trainer (on
adaptive.mixture.GrowableMixtureSampler, tested alone in tests/mixture/test_mixture_growable.py),
and a --quick run on the real text domains."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
NEEDED = {
    "/usr/lib/R/site-library/janeaustenr/data/Rdata.rdx": "r-cran-janeaustenr",
    "/usr/lib/bible.data": "bible-kjv-text",
    "/usr/share/games/fortunes/people.dat": "fortunes",
    "/usr/share/dictd/gcide.index": "dict-gcide",
    "/usr/share/dictd/foldoc.index": "dict-foldoc",
}
MISSING = [pkg for path, pkg in NEEDED.items() if not Path(path).exists()]
needs_text = pytest.mark.skipif(
    bool(MISSING), reason=f"text packages missing: apt-get install -y {' '.join(MISSING)}"
)


def _load():
    name = "example_lm_pretrain"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "lm_pretrain.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


lm = _load()


# -------------------------------------------------------------- the whole toolkit in a Trainer
@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    pytest.importorskip("rdata", reason="pip install rdata")
    cache = tmp_path_factory.mktemp("lm") / "splits.npz"
    return lm.split_domains(**lm.QUICK_DATA, cache=cache)


def _cfg(**kw):
    cfg = lm.RunConfig(**{**lm.QUICK, "tokens": 40 * 8 * 32, **kw})
    cfg.check()
    return cfg


def _fit(cfg, splits, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning: resuming mid-epoch; the sensor's replay
        return lm.train(dataclasses.replace(cfg), splits, progress=False, **kw)


@needs_text
@pytest.mark.slow
@pytest.mark.parametrize(
    ("growth", "mixture", "stop"),
    # checkpoints between the mixture rule's capture windows (batches 2-3 of every 4): resuming
    # inside one is not exact (DynamicMixture does not checkpoint the sensor's target and partial
    # sums; see the README's subsection)
    [
        ("norm", "influence_exp", 6),
        ("noise_scale", "influence", 5),
        ("warmup", "influence_exp", 9),
    ],
)
def test_growth_schedule_and_mixture_resume_exactly(splits, tmp_path, growth, mixture, stop):
    # interval 1: the growth test's capture coincides with the mixture rule's target pass
    cfg = _cfg(growth=growth, mixture=mixture, lr_scaling="sqrt", optimizer="lamb", interval=1)
    if growth == "warmup":
        cfg.warmup_milestones = [0.05, 0.15, 0.4]
    full = _fit(cfg, splits)
    ckpt = tmp_path / "mid.ckpt"
    part = _fit(cfg, splits, stop_at=stop, save=ckpt)
    resumed = _fit(cfg, splits, ckpt_path=str(ckpt))
    assert part["steps"] == stop and resumed["steps"] == full["steps"]
    # the run grew its batch and moved its weights, before and after the checkpoint
    sizes = [r["batch_size"] for r in full["train"]]
    assert sizes[0] == cfg.batch_size and max(sizes) > cfg.batch_size
    w = full["weights_trajectory"]
    assert len(w) > 2 and max(w[-1]["weights"]) - min(w[-1]["weights"]) > 1e-3
    assert any(h["batch"] > stop for h in w[1:])
    # the same trajectory: every batch's size, loss and token count; weights; final losses
    assert [r["batch_size"] for r in resumed["train"]] == sizes
    assert [r["tokens"] for r in resumed["train"]] == [r["tokens"] for r in full["train"]]
    np.testing.assert_allclose(
        [r["loss"] for r in resumed["train"]], [r["loss"] for r in full["train"]], rtol=1e-5
    )
    assert [h["batch"] for h in resumed["weights_trajectory"]] == [h["batch"] for h in w]
    np.testing.assert_allclose(
        [h["weights"] for h in resumed["weights_trajectory"]],
        [h["weights"] for h in w],
        rtol=1e-5,
        atol=1e-7,
    )
    assert resumed["batch_size_trajectory"] == full["batch_size_trajectory"]
    assert math.isclose(resumed["test_loss"], full["test_loss"], rel_tol=1e-5)
    assert [e["tokens"] for e in resumed["evals"]] == [e["tokens"] for e in full["evals"]]
    # the schedule ran on the token clock: the budget is consumed exactly
    assert full["tokens"] == full["budget_tokens"] == (cfg.tokens // cfg.context) * cfg.context
    state = torch.load(ckpt, weights_only=False)
    assert any("SampleClock" in k for k in state["callbacks"])
    sched = state["lr_schedulers"][0]
    assert sched["tokens_seen"] == part["tokens"]


@needs_text
@pytest.mark.slow
def test_quick_cli_run_writes_a_consistent_record(splits, tmp_path):
    pytest.importorskip("rdata", reason="pip install rdata")
    out = tmp_path / "out"
    rec = lm.main(
        [
            "--quick",
            "--growth",
            "inner_product",
            "--mixture",
            "influence_exp",
            "--schedule",
            "power",
            "--out",
            str(out),
            "--cache",
            str(tmp_path / "c.npz"),
            "--no-progress",
        ]
    )
    saved = json.loads((out / f"{rec['name']}.json").read_text())
    assert (out / f"{rec['name']}.png").stat().st_size > 5000
    assert saved["kind"] == "adaptive" and saved["mixture"] == "influence_exp"
    train = saved["train"]
    # tokens: what the loader yielded, batch by batch, equals the budget
    ctx = saved["config"]["context"]
    assert sum(r["micro_batch"] * ctx for r in train) == saved["tokens"]
    assert saved["tokens"] == (saved["config"]["tokens"] // ctx) * ctx
    assert train[-1]["step"] == saved["steps"] == len(train)  # no accumulation at this size
    # the reported loss is the target mix of the per-domain losses
    for split in ("test", "val"):
        mix = sum(w * saved[f"{split}_domain"][d] for d, w in lm.TARGET_MIX.items())
        assert math.isclose(saved[f"{split}_loss"], mix, rel_tol=1e-12)
    assert saved["test_loss"] < saved["evals"][0]["test_loss"] < math.log(256) + 0.5
    for h in saved["weights_trajectory"]:
        assert math.isclose(sum(h["weights"]), 1.0, rel_tol=1e-9) and min(h["weights"]) >= 0
    assert 0 < saved["sensor_share"] < 1 and saved["sensor_batches"] > 0
    assert saved["tokens_per_second"] > 0


@needs_text
def test_bf16_mixed_precision_trains_with_growth_and_mixture(splits):
    """Lightning's bf16-mixed precision (autocast on CPU) with the sensor, growth and the
    mixture: the run is recorded as such, its loss falls, and float32 weights are kept."""
    cfg = _cfg(growth="inner_product", mixture="influence_exp", precision="bf16-mixed")
    rec = _fit(cfg, splits)
    assert rec["config"]["precision"] == "bf16-mixed"
    assert rec["test_loss"] < rec["evals"][0]["test_loss"]
    assert rec["sensor_batches"] > 0


def test_bad_arguments_name_the_argument():
    for kw, match in [
        ({"growth": "double"}, "growth='double'"),
        ({"mixture": "doremi"}, "mixture='doremi'"),
        ({"optimizer": "sgd"}, "optimizer='sgd'"),
        ({"schedule": "cosine"}, "schedule='cosine'"),
        ({"batch_size": 0}, "batch_size"),
        ({"tokens": 10}, "tokens=10"),
        ({"growth": "norm", "max_batch_size": 2}, "max_batch_size=2"),
        ({"growth": "warmup", "lr_scaling": "adascale"}, "adascale"),
        ({"growth": "warmup", "warmup_milestones": [0.5, 0.2]}, "warmup_milestones"),
        ({"mixture": "influence", "capture_steps": 9}, "capture_steps"),
        ({"precision": "16-mixed"}, "precision='16-mixed'"),
    ]:
        with pytest.raises(ValueError, match=match):
            _cfg(**kw)
    with pytest.raises(ValueError, match="beta"):
        lm.NoiseScaleGrowth(beta=1.0)
    with pytest.raises(ValueError, match="milestones"):
        lm.DoublingWarmup([0, 10], tokens_per_sample=4)
    with pytest.raises(SystemExit):
        lm.main(["--quick", "--growth", "bogus"])


@needs_text
@pytest.mark.slow
def test_a_fixed_batch_above_the_micro_batch_is_accumulated(splits):
    cfg = _cfg(batch_size=8, max_micro_batch_size=4, tokens=24 * 8 * 32)
    rec = _fit(cfg, splits)
    train = rec["train"]
    assert {r["micro_batch"] for r in train} == {4}
    assert {r["batch_size"] for r in train} == {8}
    assert rec["steps"] == len(train) // 2 == 24  # one optimizer step per two micro-batches
    assert rec["tokens"] == sum(r["micro_batch"] for r in train) * 32 == 24 * 8 * 32
    assert rec["batch_size_trajectory"] == [{"step": 0, "tokens": 0, "batch_size": 8}]


def test_loss_window_frames_the_late_part_of_training():
    def run(curve):
        return {"evals": [{"test_loss": t, "val_loss": v} for t, v in curve]}

    runs = [
        run([(5.6, 5.5), (2.0, 1.9), (1.50, 1.45)]),  # lowest point: validation 1.45
        run([(5.6, 5.6), (3.0, 3.1), (2.10, 2.05)]),  # highest final test loss 2.10
    ]
    # from 1.45 - 0.02 to 2.10 + max(0.5, 2.10 - 1.45)
    assert lm.loss_window(runs) == pytest.approx((1.43, 2.10 + 0.65))
    # one run: the spread is nil, so half a nat above its final loss
    assert lm.loss_window(runs[:1]) == pytest.approx((1.43, 2.00))
