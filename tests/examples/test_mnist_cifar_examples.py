"""The MNIST and CIFAR reproductions run end to end in their tiny synthetic modes."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", ROOT / "examples" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mnist_logistic_adagrad_grows_the_batch(tmp_path):
    mnist = _load("mnist")
    out = tmp_path / "hist.json"
    summary = mnist.main(
        [
            "--synthetic",
            "--model",
            "logistic",
            "--b0",
            "4",
            "--eta",
            "0.3",
            "--max-steps",
            "30",
            "--history",
            str(out),
        ]
    )
    history = json.loads(out.read_text())["history"]
    assert summary["final_batch_size"] > 4
    # the batch follows min(b_max, ⌈max(b, b̂)⌉) (b_max = 512 synthetic samples; world 1)
    for h in history:
        want = min(512, max(h["batch_size"], -(-h["proposed"] // 1)))
        assert h["next_batch_size"] == want
    assert summary["samples_seen"] == 512  # one epoch of the synthetic set, whatever the sizes
    assert 0.0 <= summary["test_accuracy"] <= 1.0


def test_mnist_logistic_adagrad_norm_grows_the_batch():
    mnist = _load("mnist")
    summary = mnist.main(
        ["--synthetic", "--optimizer", "adagrad-norm", "--lr", "0.5", "--b0", "4", "--eta", "0.3"]
    )
    assert summary["final_batch_size"] > 4
    assert summary["optimizer_steps"] < 512 // 4
    assert summary["samples_seen"] == 512


def test_mnist_cnn_coordinate_test_runs():
    mnist = _load("mnist")
    summary = mnist.main(
        [
            "--synthetic",
            "--model",
            "cnn",
            "--test",
            "coordinate",
            "--eta",
            "0.5",
            "--max-steps",
            "6",
            "--max-micro-batch-size",
            "32",
        ]
    )
    assert summary["optimizer_steps"] >= 1
    assert summary["final_batch_size"] >= 8


def test_mnist_bad_optimizer_is_refused():
    mnist = _load("mnist")
    with pytest.raises(SystemExit):
        mnist.parse_args(["--optimizer", "sgd"])


def test_cifar_resnet18_groupnorm_grows_with_accumulation():
    cifar = _load("cifar")
    summary = cifar.main(
        [
            "--synthetic",
            "--max-steps",
            "3",
            "--b0",
            "4",
            "--max-micro-batch-size",
            "8",
            "--eta",
            "0.5",
        ]
    )
    assert summary["optimizer_steps"] == 3
    assert summary["final_batch_size"] > 4
    # the lr follows the samples seen, not the steps: synthetic mode warms up linearly over 32
    # samples to 5e-2, then decays by a cosine to 5e-3 at 256 samples
    n = summary["samples_seen"]
    assert n >= 12
    if n <= 32:
        want = 5e-2 * n / 32
    else:
        p = min((n - 32) / (256 - 32), 1.0)
        want = 5e-3 + (5e-2 - 5e-3) * (1 + math.cos(math.pi * p)) / 2
    assert summary["lr"] == pytest.approx(want)


def test_cifar_resnet18_model_variants():
    cifar = _load("cifar")
    import torch

    gn = cifar.resnet18(10, "group")
    bn = cifar.resnet18(100, "batch")
    assert gn.conv1.stride == (1, 1) and gn.conv1.kernel_size == (3, 3)
    assert isinstance(gn.layer1[0].bn1, torch.nn.GroupNorm)
    assert bn.layer1[0].bn1.track_running_stats is False
    assert bn(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    with pytest.raises(ValueError, match="--data-dir is required"):
        cifar.load_cifar(cifar.parse_args([]))
