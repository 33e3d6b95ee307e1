import pytest
import torch

from adaptive.models import small_cnn


def test_small_cnn_shape_and_parameter_count():
    model = small_cnn(num_classes=7)
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 7)
    # conv 1->16 (3x3) + conv 16->32 (3x3) + linear 32*7*7 -> 7, each with a bias
    expected = (1 * 16 * 9 + 16) + (16 * 32 * 9 + 32) + (32 * 7 * 7 * 7 + 7)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_small_cnn_variants_kernel_and_hidden_layer():
    five = small_cnn(kernel_size=5)
    assert five(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    expected = (1 * 16 * 25 + 16) + (16 * 32 * 25 + 32) + (32 * 7 * 7 * 10 + 10)
    assert sum(p.numel() for p in five.parameters()) == expected
    fc = small_cnn(num_classes=3, hidden=128)
    assert fc(torch.zeros(2, 1, 28, 28)).shape == (2, 3)
    expected = (1 * 16 * 9 + 16) + (16 * 32 * 9 + 32) + (32 * 7 * 7 * 128 + 128) + (128 * 3 + 3)
    assert sum(p.numel() for p in fc.parameters()) == expected


def test_small_cnn_rejects_even_kernel():
    with pytest.raises(ValueError, match="kernel_size must be an odd positive int, got 4"):
        small_cnn(kernel_size=4)
