"""The demo: named training runs of a small CNN on real Fashion-MNIST, one table row per run.

``adaptive demo`` (``make demo``) trains every run in :data:`RUNS` with a Lightning ``Trainer`` and
prints test accuracy, optimizer steps, samples seen and wall time, and plots the training curves.
A method joins the demo by adding a :class:`RunConfig` to :data:`RUNS`.
"""

from adaptive.callbacks.demo.runs import RUNS, RunConfig, RunContext
from adaptive.callbacks.demo.train import RunResult, train_run

__all__ = ["RUNS", "RunConfig", "RunContext", "RunResult", "train_run"]
