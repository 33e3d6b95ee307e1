import torch

from adaptive.models import small_cnn


def test_small_cnn_shape_and_parameter_count():
    model = small_cnn(num_classes=7)
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 7)
    # conv 1->16 (3x3) + conv 16->32 (3x3) + linear 32*7*7 -> 7, each with a bias
    expected = (1 * 16 * 9 + 16) + (16 * 32 * 9 + 32) + (32 * 7 * 7 * 7 + 7)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
