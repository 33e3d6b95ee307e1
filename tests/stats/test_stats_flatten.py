"""Layers that see the samples flattened with the positions, ``(b·t, d)`` (OPT's feed-forward
block): the sample-major proof on the autograd graph (adaptive/stats/flatten.py), and the
statistics against torch.func per-sample gradients of the whole model (1e-4 relative)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive.stats import (
    GradientStatistics,
    UnsupportedModuleError,
    per_sample_gradients,
    reference_statistics,
)
from adaptive.stats.flatten import sample_major


class FlatFFN(nn.Module):
    """OPT's decoder-layer pattern: flatten, LayerNorm, fc1, ReLU, dropout(0), fc2, residual,
    view back; ``seq_first`` flattens (t, b, d) instead, which is not sample-major."""

    def __init__(self, seq_first: bool = False) -> None:
        super().__init__()
        self.emb = nn.Linear(3, 8)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 4)
        self.seq_first = seq_first

    def forward(self, x: Tensor) -> Tensor:  # (b, t, 3)
        h = self.emb(x)
        shape = h.shape
        if self.seq_first:
            h = h.transpose(0, 1).contiguous()
            shape = h.shape
        flat = h.reshape(-1, h.shape[-1])
        z = self.fc2(F.dropout(F.relu(self.fc1(self.norm(flat))), 0.0, self.training))
        h = (flat + z).view(shape)
        if self.seq_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(1))


@pytest.mark.parametrize("paths", [None, "materialise", "torch"])
def test_flattened_rows_are_exact(paths):
    torch.manual_seed(0)
    model = FlatFFN()
    x, y = torch.randn(4, 5, 3), torch.randint(0, 4, (4,))
    stats = GradientStatistics(model, per_coordinate=True, paths=paths)
    with stats.capture():
        F.cross_entropy(model(x), y).backward()
    s = stats.result()
    ref = reference_statistics(per_sample_gradients(model, F.cross_entropy, x, y))
    for key in ("per_sample_sq_norms", "variance", "inner_product_variance"):
        got, want = getattr(s, key).double(), ref[key].double()
        assert float((got - want).abs().max() / want.abs().max()) < 1e-4, key
    for n, c in ref["coordinate_sq_sums"].items():
        assert torch.allclose(s.coordinate_sq_sums[n].double(), c.double(), rtol=1e-4, atol=1e-9)


def test_rows_flattened_position_major_are_refused():
    torch.manual_seed(0)
    model = FlatFFN(seq_first=True)
    stats = GradientStatistics(model)
    with pytest.raises(
        UnsupportedModuleError, match=r"'norm' \(LayerNorm\) sees 20 rows .* 4 samples"
    ):
        with stats.capture():
            F.cross_entropy(model(torch.randn(4, 5, 3)), torch.randint(0, 4, (4,))).backward()


def test_sample_major_reads_the_graph():
    x = torch.randn(4, 5, 6, requires_grad=True)
    w = nn.Parameter(torch.randn(6))
    flat = x.reshape(-1, 6)
    assert sample_major(flat, 4) == 5
    assert sample_major(F.gelu(F.layer_norm(flat, (6,))) * w + flat, 4) == 5
    assert sample_major(x.reshape(4, 30), 4) is None  # no more rows than samples
    assert sample_major(x.transpose(0, 1).reshape(-1, 6), 4) is None  # (t, b) order
    assert sample_major(x.reshape(-1, 6), 3) is None  # 20 rows are not 3 samples' worth
    assert sample_major(flat.detach(), 4) is None  # nothing to read the order from
    assert sample_major(flat @ torch.randn(6, 6).T.T, 4) == 5  # mm keeps rows
    other = torch.randn(20, 6, requires_grad=True)
    assert sample_major(flat + other.exp(), 4) is None  # an operand of unknown order
