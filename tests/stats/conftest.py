"""Small models shared by the gradient-statistics tests (fixtures, so importlib mode needs no imports)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class TinyBlock(nn.Module):
    """A pre-norm transformer block: Embedding, LayerNorm, causal attention from Linear layers,
    RMSNorm, MLP, and a sequence-axis Linear head."""

    def __init__(self, vocab: int = 40, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.RMSNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        h = self.emb(ids)
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(att.transpose(1, 2).reshape(b, t, -1))
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.head(h)


def seq_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 20), nn.Tanh(), nn.Linear(20, 5))


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.GroupNorm(2, 4),
        nn.Conv2d(4, 6, 3, stride=2, dilation=2, groups=2, padding=2, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(6, 6, 2, padding="same", bias=False),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 5),
    )


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv1d(4, 4, 3, dilation=2, groups=4, padding="same", padding_mode="circular")
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(torch.relu(self.c2(torch.relu(self.c1(x))))).flatten(1))


def data_for(kind: str, b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return torch.randn(b, 1, 6, 6, generator=g), torch.randint(0, 5, (b,), generator=g)
    if kind == "cnn":
        return torch.randn(b, 1, 6, 6, generator=g), torch.randint(0, 5, (b,), generator=g)
    if kind == "conv1d":
        return torch.randn(b, 2, 12, generator=g), torch.randint(0, 3, (b,), generator=g)
    if kind == "block":
        ids = torch.randint(0, 40, (b, 8), generator=g)
        ids[:, :2] = torch.randint(1, 4, (b, 2), generator=g)  # repeated ids within a sample
        ids[0, -1] = 0  # a padding token
        return ids, torch.randint(0, 40, (b, 8), generator=g)
    raise KeyError(kind)


def make_model(kind: str, seed: int = 0) -> tuple[nn.Module, object]:
    torch.manual_seed(seed)
    if kind == "mlp":
        return make_mlp(), F.cross_entropy
    if kind == "cnn":
        return make_cnn(), F.cross_entropy
    if kind == "conv1d":
        m = Conv1dNet()
        with torch.no_grad():
            m.bn.running_mean.uniform_(-0.5, 0.5)
            m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.eval()
        return m, F.cross_entropy
    if kind == "block":
        return TinyBlock(), seq_loss
    raise KeyError(kind)


@pytest.fixture
def models():
    """(make_model, data_for) factories."""
    return make_model, data_for
