"""Layer rules: the strided im2col against ``F.unfold``, and the fusion cost rule written out."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaptive.stats.layers import _im2col, materialising_pays


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3),
        nn.Conv2d(3, 4, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(1, 2)),
        nn.Conv2d(2, 4, 3, padding=2, padding_mode="replicate", dilation=2),
        nn.Conv2d(2, 2, 5, padding=1, padding_mode="circular", stride=3),
        nn.Conv2d(4, 4, 3, groups=2, padding="same"),
        nn.Conv1d(3, 5, 4, stride=2, dilation=2, padding=3),
    ],
)
def test_im2col_equals_unfold_of_the_padded_input(conv):
    torch.manual_seed(0)
    shape = (
        (5, conv.in_channels, 11) if isinstance(conv, nn.Conv1d) else (5, conv.in_channels, 9, 8)
    )
    a = torch.randn(shape)
    pads = conv._reversed_padding_repeated_twice
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = F.pad(a, pads, mode=mode) if any(pads) else a
    if isinstance(conv, nn.Conv1d):
        padded = padded.unsqueeze(2)
        kernel, dilation, stride = (1, *conv.kernel_size), (1, *conv.dilation), (1, *conv.stride)
    else:
        kernel, dilation, stride = conv.kernel_size, conv.dilation, conv.stride
    want = F.unfold(padded, kernel, dilation=dilation, stride=stride)
    got = _im2col(conv, a)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # a non-contiguous input (a channel slice) reads the same windows
    wide = torch.randn(shape[0], conv.in_channels + 2, *shape[2:])
    torch.testing.assert_close(_im2col(conv, wide[:, 1:-1]), _im2col(conv, wide[:, 1:-1].clone()))


@pytest.mark.parametrize(
    ("t", "n_in", "n_out", "fuse"),
    [
        (1, 8, 8, False),  # one position: ‖x‖²‖δ‖² is cheaper than anything
        (64, 128, 512, False),  # the benchmark block's MLP: Gram
        (64, 512, 128, False),
        (64, 400, 32, True),  # the benchmark CNN's second convolution (16→32, 5×5, 8×8 out)
        (8, 512, 512, False),  # short sequence, wide layer
        (16, 4608, 512, False),  # ResNet's last 3×3 convolutions at 4×4
        (576, 25, 16, True),  # the benchmark CNN's first convolution
    ],
)
def test_fusion_rule_compares_gram_macs_with_materialising_cost(t, n_in, n_out, fuse):
    gram = t * t * (n_in + n_out)  # Gram form: two T×T Gram matrices per sample
    fused = n_in * n_out * (8 + t)  # two passes over the result + a second weight gradient
    assert (t > 1 and gram >= fused) == fuse
    assert materialising_pays(t, n_in, n_out) == fuse
