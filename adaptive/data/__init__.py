"""Real data sets for the demo, examples, benchmarks and tests, found offline first."""

from adaptive.data.idx import read_idx
from adaptive.data.images import (
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    DataNotFoundError,
    ImageClassificationDataset,
    fashion_mnist,
    mnist,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "DataNotFoundError",
    "ImageClassificationDataset",
    "fashion_mnist",
    "mnist",
    "read_idx",
]
