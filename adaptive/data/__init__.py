"""Real data sets (images, text domains) for the demo, examples, benchmarks and tests, offline first."""

from adaptive.data.idx import read_idx
from adaptive.data.images import (
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    DataNotFoundError,
    ImageClassificationDataset,
    fashion_mnist,
    mnist,
)
from adaptive.data.text import (
    TEXT_DOMAINS,
    austen_novels,
    dictd_entries,
    foldoc,
    fortunes,
    gcide,
    kjv_verses,
    python_sources,
    text_domains,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "TEXT_DOMAINS",
    "DataNotFoundError",
    "ImageClassificationDataset",
    "austen_novels",
    "dictd_entries",
    "fashion_mnist",
    "foldoc",
    "fortunes",
    "gcide",
    "kjv_verses",
    "mnist",
    "python_sources",
    "read_idx",
    "text_domains",
]
