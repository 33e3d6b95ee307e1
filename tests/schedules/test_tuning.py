"""The optuna tuning helper on analytic objectives, the power-law fit, and the example."""

import importlib.util
import json
import math
from pathlib import Path

import optuna
import pytest

from adaptive.schedules import POWER_SPACE, fit_power_law, tune_power_scheduler, tune_schedule

optuna.logging.set_verbosity(optuna.logging.WARNING)
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tune_power_scheduler.py"


def bowl(config):
    """Analytic objective with its minimum at a = 0.5, b = -0.5, lr_max = 0.03."""
    return (
        (math.log10(config["a"]) - math.log10(0.5)) ** 2
        + (config["b"] + 0.5) ** 2
        + (math.log10(config["lr_max"]) - math.log10(0.03)) ** 2
    )


def test_finds_the_minimum_of_an_analytic_objective():
    study = tune_power_scheduler(lambda cfg, report: bowl(cfg), n_trials=80, seed=1)
    best = study.best_params
    assert study.best_value < 0.05
    assert abs(math.log10(best["a"] / 0.5)) < 0.2
    assert abs(best["b"] + 0.5) < 0.15
    assert abs(math.log10(best["lr_max"] / 0.03)) < 0.2
    for name, (low, high, _) in POWER_SPACE.items():
        assert all(low <= t.params[name] <= high for t in study.trials)


def test_pruning_stops_bad_trials_early():
    steps_run = {}

    def train(config, report):
        value = bowl(config)
        for step in range(6):
            steps_run[id(config)] = step
            report(value + 1.0 / (step + 1), step)  # a learning curve converging to `value`
        return value

    study = tune_power_scheduler(train, n_trials=30, seed=0)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert pruned and len(complete) >= 3
    for t in pruned:
        assert max(t.intermediate_values) < 5  # stopped before the last report
    # the pruner stops the worse configurations: the best one ran to the end
    assert min(bowl(t.params) for t in complete) < min(bowl(t.params) for t in pruned)
    assert study.best_trial.state == optuna.trial.TrialState.COMPLETE


def test_fit_power_law_recovers_constants():
    a, b = 0.3, -0.51
    betas, tokens, lrs = [], [], []
    for beta in (32, 64, 128):
        for n in (1e4, 1e5, 1e6, 1e7):
            betas.append(beta)
            tokens.append(n)
            lrs.append(beta * a * n**b)
    fa, fb = fit_power_law(betas, tokens, lrs)
    assert fa == pytest.approx(a, rel=1e-9) and fb == pytest.approx(b, rel=1e-9)


def test_bad_arguments():
    with pytest.raises(ValueError, match="needs low < high"):
        tune_schedule(lambda c, r: 0.0, {"a": (1.0, 1.0)})
    with pytest.raises(ValueError, match="log-uniform and needs low > 0"):
        tune_schedule(lambda c, r: 0.0, {"a": (0.0, 1.0, True)})
    with pytest.raises(ValueError, match="n_trials must be a positive int"):
        tune_schedule(lambda c, r: 0.0, {"a": (0.1, 1.0)}, n_trials=0)
    with pytest.raises(ValueError, match="direction='up'"):
        tune_schedule(lambda c, r: 0.0, {"a": (0.1, 1.0)}, direction="up")
    with pytest.raises(ValueError, match="2 distinct token counts"):
        fit_power_law([1, 2], [10, 10], [0.1, 0.2])
    with pytest.raises(ValueError, match="best_lrs must be finite and > 0"):
        fit_power_law([1, 2], [10, 20], [0.1, -0.2])


def _example():
    spec = importlib.util.spec_from_file_location("tune_power_scheduler_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_proxy_run_learns_with_a_sane_schedule():
    ex = _example()
    train = ex.make_objective(
        ex.synthetic_data(256, 0),
        ex.synthetic_data(128, 1),
        batch_size=16,
        epochs=2,
        evals=2,
        seed=0,
    )
    reports = []
    loss = train({"a": 0.1, "b": -0.5, "lr_max": 0.05}, lambda v, s: reports.append((s, v)))
    # chance level on 10 classes is ln 10 = 2.30
    assert loss < 0.5 * math.log(10)
    assert [s for s, _ in reports] == [16]  # one intermediate report, at half the 32 steps


def test_example_main_synthetic(tmp_path):
    out = tmp_path / "best.json"
    study = _example().main(
        [
            "--synthetic",
            "--trials",
            "2",
            "--train-samples",
            "256",
            "--val-samples",
            "128",
            "--batch-size",
            "16",
            "--out",
            str(out),
        ]
    )
    assert len(study.trials) == 2
    assert math.isfinite(study.best_value)
    saved = json.loads(out.read_text())
    assert saved["value"] == study.best_value and saved["a"] == study.best_params["a"]
