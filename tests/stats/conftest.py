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
        ids = torch.randint(0, 40, (b, 16), generator=g)  # 16 positions: the 16→16 projection fuses
        ids[:, :2] = torch.randint(1, 4, (b, 2), generator=g)  # repeated ids within a sample
        ids[0, -1] = 0  # a padding token
        return ids, torch.randint(0, 40, (b, 16), generator=g)
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


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4) -> None:
    got, want = got.double(), want.double()
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    assert err <= rtol, f"relative error {err:.2e}"


def _check_two_ranks(r0: dict, r1: dict, kind: str) -> None:
    """Two ranks that each captured 6 of the 12 samples of ``data_for(kind, 12, seed=4)`` (group
    ids ``arange(12) % 3``, two micro-batches of 3 per rank) against one process: the exact
    statistics equal torch.func per-sample gradients on the whole batch; the pooled inner-product
    estimates and group sums equal one process capturing the same four micro-batches; the reduced
    ``.grad`` (``res["grads"]``) is ḡ; every rank holds the same global numbers."""
    from adaptive.stats import GradientStatistics, per_sample_gradients, reference_statistics

    model, loss_fn = make_model(kind)
    x, y = data_for(kind, 12, seed=4)
    gids = torch.arange(12) % 3
    stats = GradientStatistics(model, num_groups=3, per_coordinate=True)
    for k in range(4):
        sl = slice(3 * k, 3 * k + 3)
        with stats.capture(group_ids=gids[sl]):
            (loss_fn(model(x[sl]), y[sl]) / 4).backward()
    single = stats.result()
    ref = reference_statistics(per_sample_gradients(model, loss_fn, x, y))
    for res in (r0, r1):
        assert res["batch_size"] == 12
        for n in ("sum_sq_norms", "grad_sq_norm", "variance", "noise_scale"):
            _close(res[n], ref[n])
        for n in (
            "inner_product_variance",
            "orthogonality_variance",
            "group_counts",
            "group_sum_sq_norms",
        ):
            _close(res[n], getattr(single, n))
        for n, v in res["coordinate_sq_sums"].items():
            _close(v, ref["coordinate_sq_sums"][n])
            _close(res["mean_grads"][n], ref["mean_grads"][n])
            _close(res["grads"][n], ref["mean_grads"][n])
    for n in ("variance", "inner_product_variance"):
        assert torch.equal(r0[n], r1[n])  # identical on every rank
    local = torch.cat([r0["per_sample_sq_norms"], r1["per_sample_sq_norms"]])
    _close(local, ref["per_sample_sq_norms"])
    if "norms_only" not in r0:
        return
    # the norm statistics alone (the DDP worker: the compiled kernel's path where it is built)
    a0, a1 = r0["norms_only"], r1["norms_only"]
    for res in (a0, a1):
        for n in ("sum_sq_norms", "grad_sq_norm", "variance", "noise_scale"):
            _close(res[n], ref[n])
        for n, g in res["grads"].items():
            _close(g, ref["mean_grads"][n])
    assert torch.equal(a0["variance"], a1["variance"])
    _close(
        torch.cat([a0["per_sample_sq_norms"], a1["per_sample_sq_norms"]]),
        ref["per_sample_sq_norms"],
    )


@pytest.fixture(scope="session")
def two_ranks(run_two_ranks):
    """(run_two_ranks(argv_for_rank), check_two_ranks(r0, r1, kind)) for the distributed tests."""
    return run_two_ranks, _check_two_ranks


# ---------------------------------------------------------------- exactness against torch.func
_SCALARS = (
    "sum_sq_norms",
    "grad_sq_norm",
    "variance",
    "noise_scale",
    "inner_product_variance",
    "orthogonality_variance",
)


def _rel_close(got: torch.Tensor, want: torch.Tensor, what: str = "", rtol: float = 1e-4) -> None:
    got, want = got.double().cpu(), want.double().cpu()
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    assert err <= rtol, f"{what}: relative error {err:.2e}"


def _check_every_statistic(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn=F.cross_entropy,
    before_reference=None,
    replayed: bool | None = None,
    **kwargs,
) -> None:
    """One capture with every option (per-coordinate sums, two groups, a target) against
    torch.func per-sample gradients of the whole model; ``replayed``: whether the module replay
    (last_resort) must have run (None: not checked)."""
    import warnings

    from adaptive.stats import GradientStatistics, per_sample_gradients, reference_statistics
    from adaptive.stats.last_resort import replay_seconds
    from adaptive.stats.ops import WATCH

    g = torch.Generator().manual_seed(3)
    target = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    groups = torch.arange(x.shape[0]) % 2
    stats = GradientStatistics(model, per_coordinate=True, num_groups=2, **kwargs)
    stats.set_target(target)
    before = replay_seconds()
    with warnings.catch_warnings():
        warnings.simplefilter("error" if replayed is False else "ignore")
        with stats.capture(group_ids=groups):
            loss_fn(model(x), y).backward()
    if replayed is not None:
        assert (replay_seconds() > before) == replayed
    assert not WATCH.calls and not WATCH.tracked  # nothing is left watched after a capture
    s = stats.result()
    if before_reference is not None:
        before_reference()
    ref = reference_statistics(
        per_sample_gradients(model, loss_fn, x, y), target=target, group_ids=groups, num_groups=2
    )
    _rel_close(s.per_sample_sq_norms, ref["per_sample_sq_norms"], "per_sample_sq_norms")
    for n in (*_SCALARS, "group_sum_sq_norms", "group_grad_dots"):
        _rel_close(getattr(s, n), ref[n], n)
    assert set(s.coordinate_sq_sums) == set(ref["coordinate_sq_sums"])
    for n in ref["coordinate_sq_sums"]:
        _rel_close(s.coordinate_sq_sums[n], ref["coordinate_sq_sums"][n], n)
        _rel_close(s.mean_grads[n], ref["mean_grads"][n], n)


@pytest.fixture(scope="session")
def exact():
    """``exact.check(model, x, y, ...)``: every statistic against torch.func;
    ``exact.close(got, want, what, rtol=1e-4)``: relative closeness at the scale of ``want``."""
    from types import SimpleNamespace

    return SimpleNamespace(check=_check_every_statistic, close=_rel_close)
