"""The ImageNet script end to end on a tiny synthetic ImageFolder tree (seconds, CPU only)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "imagenet.py"
TRAIN = 4 * 12  # synthetic tree: 4 classes x 12 training images


def _load():
    spec = importlib.util.spec_from_file_location("example_imagenet", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_tree_and_resnet50_variants(tmp_path):
    imagenet = _load()
    args = imagenet.parse_args(["--synthetic"])
    assert args.arch == "resnet50" and args.norm == "batch" and args.optimizer == "lamb"
    assert (args.batch_size, args.image_size, args.num_workers) == (8, 16, 0)
    imagenet.write_synthetic_imagefolder(tmp_path)
    args.data_dir = str(tmp_path)
    train, val = imagenet.image_folders(args)
    assert (len(train), len(val)) == (TRAIN, 16)
    assert train.classes == [f"class_{k}" for k in range(4)]
    x, y = train[0]
    assert x.shape == (3, 16, 16) and y == 0
    gn = imagenet.resnet("resnet50", 4, "group")
    bn = imagenet.resnet("resnet50", 1000, "batch")
    assert isinstance(gn.layer4[2].bn3, torch.nn.GroupNorm) and gn.layer4[2].bn3.num_groups == 32
    assert isinstance(bn.layer1[0].bn1, torch.nn.BatchNorm2d)
    # torchvision's ResNet-50 has 25,557,032 parameters with 1000 classes
    assert sum(p.numel() for p in bn.parameters()) == 25_557_032
    assert gn(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    (tmp_path / "val").rename(tmp_path / "valid")
    with pytest.raises(ValueError, match="has no 'val/' folder"):
        imagenet.image_folders(args)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--data-dir is required"),
        (["--synthetic", "--adaptive-batch"], "BatchNorm in training mode"),
        (
            ["--synthetic", "--adaptive-batch", "--select", "uds", "--norm", "group"],
            "one of the two",
        ),
        (["--synthetic", "--select-keep", "1.5"], "--select-keep 1.5"),
        (
            ["--synthetic", "--adaptive-batch", "--stats-fallback", "groups", "--devices", "1"],
            "one",
        ),
        (["--synthetic", "--devices", "two"], "--devices 'two'"),
    ],
)
def test_bad_arguments_are_refused_with_the_reason(argv, message, capsys):
    imagenet = _load()
    with pytest.raises(SystemExit):
        imagenet.parse_args(argv)
    assert message in capsys.readouterr().err


def test_resnet50_lamb_wsd_bf16_runs(tmp_path):
    """Default model (ResNet-50, BatchNorm), LAMB, WSD, bf16 autocast: one step."""
    imagenet = _load()
    s = imagenet.main(
        ["--synthetic", "--max-steps", "1", "--batch-size", "4", "--precision", "bf16-mixed"]
    )
    assert s["arch"] == "resnet50" and s["precision"] == "bf16-mixed"
    assert s["optimizer_steps"] == 1 and s["samples_seen"] == 4
    # linear warmup over 5 epochs of the 48 synthetic samples: lr = 5e-3 · n / 240
    assert s["lr"] == pytest.approx(5e-3 * 4 / (5 * TRAIN))


def test_adaptive_batch_groupnorm_power_schedule(tmp_path):
    """Growth by gradient accumulation; the power schedule follows samples and the batch."""
    imagenet = _load()
    out = tmp_path / "run.json"
    a, b, lr = 1e-4, -0.51, 5e-3
    argv = ["--synthetic", "--arch", "resnet18", "--norm", "group", "--adaptive-batch"]
    argv += ["--batch-size", "4", "--max-micro-batch-size", "4", "--interval", "1"]
    argv += ["--eta", "0.7", "--schedule", "power", "--power-a", str(a), "--max-steps", "6"]
    argv += ["--warmup-epochs", "1", "--epochs", "4", "--output", str(out)]
    s = imagenet.main(argv)
    history = json.loads(out.read_text())["history"]
    assert 1 <= len(history) <= s["optimizer_steps"] == 6
    for h in history:  # b_{k+1} = min(b_max, ⌈max(b_k, b̂_k)⌉ to a multiple of 4 per step)
        want = min(TRAIN, max(h["batch_size"], 4 * math.ceil(h["proposed"] / 4)))
        assert h["next_batch_size"] == want
    final, last = s["final_batch_size"], s["last_step_batch"]
    assert final == history[-1]["next_batch_size"]
    # the growth took effect: the last step accumulated several micro-batches of 4
    assert 4 < last == 4 * s["accumulation"] <= final
    assert 6 * 4 < s["samples_seen"] <= 6 * final
    # lr = min(lr_max, β·a·n^b) at n samples seen, β the last step's global batch
    n = s["samples_seen"]
    want_lr = n / TRAIN * min(lr, last * a * TRAIN**b) if n < TRAIN else min(lr, last * a * n**b)
    assert s["lr"] == pytest.approx(want_lr)


def test_high_loss_selection_trains_on_the_kept_half():
    imagenet = _load()
    argv = ["--synthetic", "--arch", "resnet18", "--select", "high-loss", "--batch-size", "8"]
    s = imagenet.main([*argv, "--max-steps", "3", "--warmup-epochs", "1"])
    assert s["samples_scored"] == 3 * 8 and s["samples_trained"] == 3 * 4
    assert s["samples_seen"] == 12  # the schedule counts trained samples
    assert s["lr"] == pytest.approx(5e-3 * 12 / TRAIN)


def _two_processes(tmp_path, strategy: str) -> dict:
    out = tmp_path / f"{strategy}.json"
    cmd = [sys.executable, str(SCRIPT), "--synthetic", "--arch", "resnet18", "--norm", "group"]
    cmd += ["--strategy", strategy, "--devices", "2", "--accelerator", "cpu"]
    cmd += ["--adaptive-batch", "--batch-size", "4", "--max-micro-batch-size", "4"]
    cmd += ["--interval", "1", "--eta", "0.7", "--max-steps", "4", "--output", str(out)]
    # a launcher's variables left by an earlier in-process run would make Lightning think the
    # processes are already started
    launcher = (
        "LOCAL_RANK",
        "NODE_RANK",
        "GLOBAL_RANK",
        "WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    )
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.ddp
def test_fsdp2_adaptive_batch_equals_ddp(tmp_path):
    """--strategy fsdp (FSDP2 through ModelParallelStrategy, gloo, CPU) against --strategy ddp.

    Same seed, same global batches: the sensor reads the whole gradients under both, so the
    statistics, the batch-size decisions, the clock and the lr must agree."""
    fsdp, ddp = _two_processes(tmp_path, "fsdp"), _two_processes(tmp_path, "ddp")
    assert fsdp["sharded"] is True and ddp["sharded"] is False
    assert fsdp["world_size"] == ddp["world_size"] == 2
    assert len(fsdp["history"]) == len(ddp["history"]) >= 2
    for f, d in zip(fsdp["history"], ddp["history"], strict=True):
        assert (f["step"], f["batch_size"], f["next_batch_size"]) == (
            d["step"],
            d["batch_size"],
            d["next_batch_size"],
        )
        assert f["variance"] == pytest.approx(d["variance"], rel=1e-4)
        assert f["grad_sq_norm"] == pytest.approx(d["grad_sq_norm"], rel=1e-4)
    assert fsdp["final_batch_size"] == ddp["final_batch_size"] > 8
    for key in ("optimizer_steps", "samples_seen", "last_step_batch"):
        assert fsdp[key] == ddp[key], key
    assert fsdp["lr"] == pytest.approx(ddp["lr"], rel=1e-12)
    assert fsdp["lr"] == pytest.approx(5e-3 * fsdp["samples_seen"] / (5 * TRAIN))
