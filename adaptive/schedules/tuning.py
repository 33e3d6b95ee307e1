"""Search schedule hyperparameters on a small proxy run with optuna, with pruning.

The power-scheduler paper (Shen et al. 2024, arXiv 2408.13359) found its constants by running
many small proxy trainings, recording the best lr for each (batch size β, token count n), and
fitting ``η_opt ≈ β · a · n^b``. This module gives both routes:

- :func:`tune_schedule` / :func:`tune_power_scheduler`: search ``a``, ``b`` and the peak
  ``lr_max`` directly on a proxy objective;
- :func:`fit_power_law`: fit ``a`` and ``b`` to ``(β, n, best lr)`` triples by least squares in
  log space, ``log(η/β) = log a + b log n``.

The objective is framework-free: ``train(config, report) -> float`` where ``config`` maps the
searched names to values and ``report(value, step)`` records an intermediate value; when the
pruner decides the trial is hopeless, ``report`` raises ``optuna.TrialPruned``, which the
study catches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # optuna is imported when a search runs, not with adaptive.schedules
    import optuna

Report = Callable[[float, int], None]
Objective = Callable[[dict[str, float], Report], float]

#: name -> (low, high, log-uniform?) ; defaults bracket the paper's a = 4, b = -0.51, lr 0.02.
POWER_SPACE: dict[str, tuple[float, float, bool]] = {
    "a": (1e-3, 10.0, True),
    "b": (-1.0, -0.2, False),
    "lr_max": (1e-3, 0.5, True),
}


def _check_space(space: Mapping[str, Sequence[Any]]) -> dict[str, tuple[float, float, bool]]:
    if not space:
        raise ValueError("space must name at least one hyperparameter")
    out = {}
    for name, spec in space.items():
        if len(spec) not in (2, 3):
            raise ValueError(f"space[{name!r}]={spec!r} must be (low, high) or (low, high, log)")
        low, high = float(spec[0]), float(spec[1])
        log = bool(spec[2]) if len(spec) == 3 else False
        if not low < high:
            raise ValueError(f"space[{name!r}] needs low < high, got ({low}, {high})")
        if log and low <= 0:
            raise ValueError(f"space[{name!r}] is log-uniform and needs low > 0, got {low}")
        out[name] = (low, high, log)
    return out


def tune_schedule(
    train: Objective,
    space: Mapping[str, Sequence[Any]],
    n_trials: int = 20,
    *,
    direction: str = "minimize",
    seed: int | None = 0,
    pruner: optuna.pruners.BasePruner | None = None,
    timeout: float | None = None,
    study: optuna.Study | None = None,
) -> optuna.Study:
    """Search ``space`` for the config minimising (or maximising) ``train(config, report)``.

    Args:
        train: the proxy run; returns the final metric, calls ``report(value, step)`` on the way.
        space: ``name -> (low, high[, log])`` float ranges.
        n_trials: number of trials.
        direction: "minimize" or "maximize".
        seed: seed of the TPE sampler (reproducible searches).
        pruner: optuna pruner; default ``MedianPruner(n_startup_trials=3, n_warmup_steps=1)``.
        timeout: optional wall-clock limit in seconds.
        study: an existing study to continue (its sampler and pruner are kept).

    Returns the study; ``study.best_params`` is the best config.
    """
    import optuna

    ranges = _check_space(space)
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction={direction!r} must be 'minimize' or 'maximize'")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials must be a positive int, got {n_trials!r}")
    if study is None:
        study = optuna.create_study(
            direction=direction,
            sampler=optuna.samplers.TPESampler(seed=seed),
            pruner=pruner or optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
        )

    def objective(trial: optuna.Trial) -> float:
        config = {
            name: trial.suggest_float(name, low, high, log=log)
            for name, (low, high, log) in ranges.items()
        }

        def report(value: float, step: int) -> None:
            trial.report(float(value), int(step))
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} with value {value}")

        return float(train(config, report))

    study.optimize(objective, n_trials=n_trials, timeout=timeout)
    return study


def tune_power_scheduler(
    train: Objective,
    n_trials: int = 20,
    *,
    space: Mapping[str, Sequence[Any]] | None = None,
    **kwargs: Any,
) -> optuna.Study:
    """:func:`tune_schedule` over the power scheduler's ``a``, ``b`` and ``lr_max``
    (default ranges :data:`POWER_SPACE`); ``train`` builds a
    :class:`~adaptive.schedules.PowerScheduler` from ``config``."""
    return tune_schedule(train, dict(POWER_SPACE if space is None else space), n_trials, **kwargs)


def fit_power_law(
    batch_sizes: Sequence[float], tokens: Sequence[float], best_lrs: Sequence[float]
) -> tuple[float, float]:
    """Fit ``η_opt = β · a · n^b`` to proxy-run optima, the paper's route to its constants.

    Least squares on ``log(η/β) = log a + b · log n``; needs >= 2 distinct token counts.
    Returns ``(a, b)``.
    """
    beta = np.asarray(batch_sizes, dtype=np.float64)
    n = np.asarray(tokens, dtype=np.float64)
    lr = np.asarray(best_lrs, dtype=np.float64)
    if not (beta.shape == n.shape == lr.shape) or beta.ndim != 1:
        raise ValueError(
            f"batch_sizes, tokens and best_lrs must be 1-D of equal length, got shapes "
            f"{beta.shape}, {n.shape}, {lr.shape}"
        )
    for name, arr in (("batch_sizes", beta), ("tokens", n), ("best_lrs", lr)):
        if not (np.isfinite(arr).all() and (arr > 0).all()):
            raise ValueError(f"{name} must be finite and > 0, got {arr.tolist()}")
    if np.unique(n).size < 2:
        raise ValueError("fit_power_law needs at least 2 distinct token counts to fit b")
    design = np.stack([np.ones_like(n), np.log(n)], axis=1)
    (log_a, b), *_ = np.linalg.lstsq(design, np.log(lr / beta), rcond=None)
    return float(np.exp(log_a)), float(b)
