"""The demo end to end: a real Lightning Trainer on real Fashion-MNIST (a subset, one epoch)."""

import itertools
import json
import math

import pytest
import torch
from torch.utils.data import Subset

from adaptive.callbacks.demo import RUNS, RunConfig, train_run
from adaptive.callbacks.demo.cli import main
from adaptive.callbacks.demo.report import format_table
from adaptive.data import fashion_mnist


@pytest.fixture(scope="module")
def data():
    return Subset(fashion_mnist("train"), range(1536)), fashion_mnist("test")


@pytest.fixture(scope="module")
def adagrad_result(data):
    train, test = data
    return train_run(RUNS["adagrad"], train, test, epochs=1, seed=0, progress=False)


def test_counts_and_accuracy_match_an_independent_evaluation(adagrad_result, data):
    _, test = data
    r = adagrad_result
    assert r.optimizer_steps == math.ceil(1536 / 128) == 12
    assert r.samples_seen == 1536
    # the curves hold one entry per optimizer step, cumulative in samples
    assert r.curves["batch_size"] == [128] * 12
    assert r.curves["samples"] == [128 * (i + 1) for i in range(12)]
    assert len(r.curves["loss"]) == 12 and all(math.isfinite(v) for v in r.curves["loss"])
    # accuracy recomputed here with plain torch on all 10,000 test images
    model = r.model.eval()
    with torch.no_grad():
        x = test.images.unsqueeze(1).float() / 255
        correct = (model(x).argmax(1) == test.targets).sum().item()
    assert r.test_accuracy == pytest.approx(correct / 10000, abs=1e-6)
    assert r.test_accuracy > 0.5  # chance is 0.1; 12 AdaGrad steps learn well past it
    # the loss falls: the first steps are near log(10), the last far below
    assert r.curves["loss"][0] == pytest.approx(math.log(10), abs=0.3)
    assert r.curves["loss"][-1] < 0.75 * r.curves["loss"][0]


def test_same_seed_same_run(adagrad_result, data):
    train, test = data
    again = train_run(RUNS["adagrad"], train, test, epochs=1, seed=0, progress=False)
    assert again.curves["loss"] == pytest.approx(adagrad_result.curves["loss"], rel=1e-5)


def test_table_has_one_row_per_run(adagrad_result):
    table = format_table([adagrad_result, adagrad_result]).splitlines()
    assert len(table) == 4
    assert table[0].split("|")[1:-1] == [
        " run     ",
        " test acc ",
        " optimizer steps ",
        " samples seen ",
        " wall time (s) ",
    ]
    assert f"{adagrad_result.test_accuracy:.2%}" in table[2]


def test_cli_writes_table_json_and_plot(tmp_path, capsys):
    rc = main(
        ["demo", "--runs", "adagrad", "--epochs", "1", "--train-subset", "512", "--no-progress"]
        + ["--out", str(tmp_path)]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| adagrad" in printed and "training_curves.png" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    (run,) = summary["runs"]
    assert run["name"] == "adagrad" and run["samples_seen"] == 512 and run["optimizer_steps"] == 4
    assert (tmp_path / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| adagrad" in (tmp_path / "summary.md").read_text()


def test_cli_rejects_unknown_run(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--runs", "nope"])
    assert "valid runs: " + ", ".join(RUNS) in capsys.readouterr().err


def test_run_config_validation():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        RunConfig("x", "d", RUNS["adam"].optimizer, batch_size=0)
    with pytest.raises(ValueError, match="name must be a non-empty word"):
        RunConfig("two words", "d", RUNS["adam"].optimizer)


def test_adaptive_batch_row_grows_the_batch(data):
    train, test = data
    r = train_run(RUNS["adaptive-batch"], train, test, epochs=1, seed=0, progress=False)
    sizes = r.curves["batch_size"]
    assert r.samples_seen == sum(sizes) == 1536
    assert r.optimizer_steps == len(sizes)
    assert sizes[0] == 32 and max(sizes) > 32
    # the batch never shrinks, apart from the epoch's last, partial batch
    assert all(b2 >= b1 for b1, b2 in itertools.pairwise(sizes[:-1]))
    assert r.optimizer_steps < 1536 // 32
