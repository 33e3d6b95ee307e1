"""Fast checks of the adaptive-batch benchmark's options (synthetic data, no files, no network)."""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tqdm import tqdm

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "adaptive_batch.py"
_SPEC = importlib.util.spec_from_file_location("bench_adaptive_batch", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def _data(n: int = 256, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    # class-dependent mean so the loss has a signal, plus noise
    x = 0.3 * torch.rand(n, 1, 28, 28, generator=g) + 0.05 * y.view(-1, 1, 1, 1).float()
    return {"xtr": x, "ytr": y, "xte": x[:64], "yte": y[:64]}


@pytest.mark.parametrize("rule", ["linear", "sqrt"])
def test_lr_factor_closed_forms(rule):
    expected = {"linear": 96 / 32, "sqrt": math.sqrt(96 / 32)}[rule]
    assert bench.lr_factor(rule, 96, 32, None) == pytest.approx(expected, rel=1e-12)


def test_lr_factor_adascale_matches_formula():
    # V = 3, ||g||^2 = 0.5, b = 64, b0 = 32, S = 128/32 = 4
    stats = SimpleNamespace(
        variance=torch.tensor(3.0), grad_sq_norm=torch.tensor(0.5), batch_size=64
    )
    sigma2, mu2, s = 3.0 / 32, 0.5 - 3.0 / 64, 4.0
    expected = (sigma2 + mu2) / (sigma2 / s + mu2)
    assert bench.lr_factor("adascale", 128, 32, stats) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("rule", ["none", "sqrt"])
def test_growing_run_applies_the_lr_rule(rule):
    """A norm test with a tiny eta grows the batch to b_max; the lr then follows the rule."""
    config = {
        "name": "x",
        "b0": 8,
        "test": "norm",
        "eta": 0.05,
        "nu": 1.0,
        "b_max": 64,
        "interval": 1,
        "lr_scaling": rule,
    }
    with tqdm(disable=True) as bar:
        out = bench.train(config, _data(), epochs=1.0, lr=0.01, seed=0, bar=bar)
    assert out["final_batch_size"] == 64
    assert out["samples"] >= 256
    factor = {"none": 1.0, "sqrt": math.sqrt(64 / 8)}[rule]
    assert out["final_lr"] == pytest.approx(0.01 * factor, rel=1e-12)
    # steps: the trajectory's sizes account for every sample seen
    traj = out["trajectory"]
    assert traj[0] == [0, 8] and traj[-1][1] == 64
    assert all(b2 >= b1 for (_, b1), (_, b2) in itertools.pairwise(traj))


def test_models_and_optimizers_build():
    x = torch.zeros(3, 1, 28, 28)
    for name, build in bench.MODELS.items():
        model = build()
        assert model(x).shape == (3, 10), name
        assert isinstance(bench.make_optimizer("adagrad_norm", model, 0.1), bench.AdaGradNorm)
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        bench.make_optimizer("sgd", bench.MODELS["small_cnn"](), 0.1)


def _run(acc: float, steps: int, b0: int, test: str | None = None) -> dict:
    return {"test_accuracy": acc, "steps": steps, "config": {"b0": b0, "test": test}}


def test_goal_line_uses_best_small_fixed_run():
    report = {
        "args": {"goal_points": 0.5, "goal_step_ratio": 3.0, "small_max": 128},
        "results": {
            "d": {
                "fixed 32": [_run(0.880, 5625, 32), _run(0.878, 5625, 32)],  # mean 87.9%
                "fixed 128": [_run(0.870, 1404, 128)],
                "fixed 1024": [_run(0.990, 174, 1024)],  # large: never the reference
                # 87.45% >= 87.40% and 1800 <= 1875: met
                "a": [_run(0.8745, 1800, 32, "norm")],
                # accurate enough, too many steps
                "b": [_run(0.8790, 1900, 32, "norm")],
                # few steps, 0.6 points short
                "c": [_run(0.8730, 500, 32, "inner_product")],
            }
        },
    }
    (line,) = bench.goal(report)
    assert "best fixed small batch is fixed 32 (87.90%, 5625 steps)" in line
    assert ">= 87.40% in <= 1875 steps" in line
    assert line.endswith("Goal met? yes: a (87.45%, 1800 steps)")
    report["results"]["d"].pop("a")
    assert bench.goal(report)[0].endswith("Goal met? no")


def test_config_names_carry_non_default_settings():
    args = argparse.Namespace(
        fixed=[32],
        fixed_lr=[(32, 0.02)],
        tests=["norm", "augmented"],
        eta=[1.5],
        theta=[0.5],
        nu=1.0,
        b0=32,
        b_max=256,
        interval=2,
        lr_scaling=["none", "sqrt"],
        model="small_cnn",
        optimizer="adagrad",
    )
    cfgs = bench.configs(args)
    names = [c["name"] for c in cfgs]
    assert cfgs[1]["lr"] == 0.02 and "lr" not in cfgs[0]
    assert names == [
        "fixed 32",
        "fixed 32 (lr 0.02)",
        "adaptive norm (eta=1.5, b_max=256, every 2, b0=32)",
        "adaptive norm (eta=1.5, b_max=256, every 2, b0=32, lr sqrt)",
        "adaptive augmented (theta=0.5, nu=1.0, b_max=256, every 2, b0=32)",
        "adaptive augmented (theta=0.5, nu=1.0, b_max=256, every 2, b0=32, lr sqrt)",
    ]


def test_fixed_lr_argument_parses_and_rejects():
    assert bench._batch_lr("32:0.02") == (32, 0.02)
    for bad in ("32", "0:0.1", "32:-1", "a:b"):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(bad)):
            bench._batch_lr(bad)
