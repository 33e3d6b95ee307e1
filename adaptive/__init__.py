"""adaptive: make the PyTorch training loop adapt as it runs (framework-free core)."""

from adaptive.data import DataNotFoundError, ImageClassificationDataset, fashion_mnist, mnist

__version__ = "0.1.0"

__all__ = [
    "DataNotFoundError",
    "ImageClassificationDataset",
    "__version__",
    "fashion_mnist",
    "mnist",
]
