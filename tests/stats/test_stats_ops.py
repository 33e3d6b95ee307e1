"""The op-level path (adaptive/stats/ops.py): parameters a module uses through tensor operations
get exact per-sample gradients without replaying the module. Every statistic is checked against
torch.func per-sample gradients of the whole model (1e-4 relative), and the replay is checked not
to run (or to run, where an operation cannot be followed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive.stats import GradientStatistics, UnsupportedModuleError, per_sample_gradients
from adaptive.stats.ops import WATCH


# ---------------------------------------------------------------- modules using parameters by ops
class Tokens(nn.Module):
    """ViT-style: cls_token expanded over the batch and concatenated, pos_embed sliced and added,
    layer scale in place, a register token added through a derived (1 + p) tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 6) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, 7, 6) * 0.5)
        self.proj = nn.Linear(6, 6)
        self.gamma = nn.Parameter(torch.full((6,), 0.7))
        self.shift = nn.Parameter(torch.randn(6) * 0.1)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed[:, : x.shape[1]]
        h = self.proj(torch.tanh(x))
        x = x + h.mul_(self.gamma)  # timm LayerScale(inplace=True)
        x = x * (1 + self.shift)  # a derived operand
        return self.head(x[:, 0])


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: a LayerNorm over the channels of an NCHW map (changes forward)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class RMSNormLike(nn.Module):
    """LlamaRMSNorm-style (weight * normalised x) and Gemma-style ((1 + weight) * normalised x)."""

    def __init__(self, dim: int, offset: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim) * 0.3 + (0.0 if offset else 1.0))
        self.offset = offset

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        w = 1.0 + self.weight if self.offset else self.weight
        return w * xf.to(x.dtype)


class FunctionalNorms(nn.Module):
    """F.rms_norm and F.group_norm with a module's own weights."""

    def __init__(self) -> None:
        super().__init__()
        self.rw = nn.Parameter(torch.randn(6) * 0.3 + 1)
        self.gw = nn.Parameter(torch.randn(4) * 0.3 + 1)
        self.gb = nn.Parameter(torch.randn(4) * 0.3)

    def forward(self, x: Tensor) -> Tensor:  # (b, 4, 6)
        x = F.rms_norm(x, (6,), self.rw, 1e-6)
        return F.group_norm(x, 2, self.gw, self.gb, 1e-5)


class ConvBlock(nn.Module):
    """ConvNeXt-style: depthwise conv, LayerNorm2d, pointwise convs, gamma reshaped to (1,C,1,1)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = LayerNorm2d(c)
        self.pw1 = nn.Conv2d(c, 2 * c, 1)
        self.pw2 = nn.Conv2d(2 * c, c, 1)
        self.gamma = nn.Parameter(torch.randn(c) * 0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.pw2(F.gelu(self.pw1(self.norm(self.conv_dw(x)))))
        return x + h.mul(self.gamma.reshape(1, -1, 1, 1))


def test_tokens_cls_pos_embed_and_layer_scale_by_ops(exact):
    torch.manual_seed(0)
    exact.check(Tokens(), torch.randn(5, 6, 6), torch.randint(0, 3, (5,)), replayed=False)


def test_norm_subclasses_by_ops(exact):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 6), RMSNormLike(6, offset=False), RMSNormLike(6, offset=True), nn.Flatten(),
        nn.Linear(6, 3),
    )  # fmt: skip
    exact.check(model, torch.randn(5, 6), torch.randint(0, 3, (5,)), replayed=False)


def test_functional_rms_and_group_norm_by_ops(exact):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), FunctionalNorms(), nn.Flatten(), nn.Linear(24, 3))
    exact.check(model, torch.randn(5, 4, 6), torch.randint(0, 3, (5,)), replayed=False)


def test_convnext_style_block_by_ops(exact):
    torch.manual_seed(0)
    model = nn.Sequential(ConvBlock(), ConvBlock(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    exact.check(model, torch.randn(6, 4, 5, 5), torch.randint(0, 3, (6,)), replayed=False)


class Twice(nn.Module):
    """One parameter in two operations of one call, and the module called twice: the per-sample
    gradient is the sum of the four uses (cross terms included)."""

    def __init__(self) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.randn(6) * 0.5 + 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x * self.g) + self.g


def test_parameter_in_several_operations_and_calls_sums_its_uses(exact):
    torch.manual_seed(0)
    twice = Twice()
    model = nn.Sequential(nn.Linear(6, 6), twice, twice, nn.Linear(6, 3))
    exact.check(model, torch.randn(5, 6), torch.randint(0, 3, (5,)), replayed=False)


class EinsumScale(nn.Module):
    """An einsum on its own parameter: no op-level path, so the module is replayed."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6) * 0.5 + 1)
        self.b = nn.Parameter(torch.randn(6) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bi,ij->bj", x, torch.diag(self.w)) + self.b


def test_an_operation_it_cannot_follow_falls_back_to_the_exact_replay(exact):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), EinsumScale(), nn.Linear(6, 3))
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    with pytest.warns(UserWarning, match=r"'1' \(EinsumScale\).*einsum.*one more forward"):
        stats = GradientStatistics(model)
        with stats.capture():
            F.cross_entropy(model(x), y).backward()
    assert "einsum" in stats._op_refused["1"]
    exact.check(model, x, y, replayed=True)


def test_dropout_after_an_op_level_use_is_exact(exact):
    """Dropout scales each sample's own positions: the per-sample gradient of ``w`` in
    ``dropout(x * w)`` summed to a scalar loss is ``Σ_positions mask/(1-p) · x`` per sample."""

    class Drop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x: Tensor) -> Tensor:
            return F.dropout(x * self.w, 0.5, self.training)

    model = nn.Sequential(Drop())
    x = torch.randn(3, 5, 4)
    stats = GradientStatistics(model, loss_reduction="sum")
    torch.manual_seed(11)
    with stats.capture():
        model(x).sum().backward()
    s = stats.result()
    torch.manual_seed(11)
    mask = F.dropout(torch.ones(3, 5, 4), 0.5, True)  # the same draw: same shape, same seed
    want = (mask * x).sum(1).square().sum(1)
    exact.close(s.per_sample_sq_norms, want, "per_sample_sq_norms")


class PositionTable(nn.Module):
    """Returns a slice of its parameter: no samples in its output."""

    def __init__(self) -> None:
        super().__init__()
        self.pe = nn.Parameter(torch.randn(1, 8, 6))

    def forward(self, t: int) -> Tensor:
        return self.pe[:, :t]


class UsesTable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = PositionTable()
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head((x + self.table(x.shape[1])).mean(1))


def test_a_parameter_derived_output_is_followed_after_its_module_returns(exact):
    torch.manual_seed(0)
    exact.check(UsesTable(), torch.randn(5, 7, 6), torch.randint(0, 3, (5,)), replayed=False)


class ReturnsTable(UsesTable):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pe = self.table(x.shape[1])
        return self.head((x + pe).mean(1)), pe


def test_a_parameter_derived_model_output_is_refused():
    model = ReturnsTable()
    stats = GradientStatistics(model)
    with pytest.raises(UnsupportedModuleError, match=r"'table'.*returns a tensor computed"):
        with stats.capture():
            logits, pe = model(torch.randn(4, 5, 6))
            (F.cross_entropy(logits, torch.randint(0, 3, (4,))) + pe.square().sum()).backward()
    assert not WATCH.calls and not WATCH.tracked


class SideChannel(UsesTable):
    """Keeps the table's slice and the loss reads it after the forward returned."""

    def forward(self, x: Tensor) -> Tensor:
        self.kept = self.table(x.shape[1])
        return self.head((x + self.kept).mean(1))


def test_a_use_after_the_forward_is_caught_by_the_first_capture():
    model = SideChannel()
    stats = GradientStatistics(model)
    with pytest.raises(UnsupportedModuleError, match=r"'table\.pe'.*off autograd"):
        with stats.capture():
            out = model(torch.randn(4, 5, 6))
            (F.cross_entropy(out, torch.randint(0, 3, (4,))) + model.kept.square().sum()).backward()


class RelativeBias(nn.Module):
    """T5-style: an Embedding looked up with (q, k) bucket ids (no sample axis), permuted to a
    (1, heads, q, k) bias and passed as the attention mask of every sample (and added to a
    batched padding mask in the decoder variant)."""

    def __init__(self, padded: bool) -> None:
        super().__init__()
        self.bias = nn.Embedding(9, 2)
        self.qkv = nn.Linear(6, 18)
        self.head = nn.Linear(6, 3)
        self.padded = padded

    def forward(self, x: Tensor) -> Tensor:  # (b, t, 6)
        b, t, _ = x.shape
        pos = torch.arange(t)
        buckets = (pos[None, :] - pos[:, None]).clamp(-4, 4) + 4  # (t, t)
        bias = self.bias(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, 2, t, t)
        if self.padded:
            keep = (x[..., 0] > -0.5).float()[:, None, None, :]  # (b, 1, 1, t), per sample
            bias = bias + (keep - 1) * 1e4
        q, k, v = (z.reshape(b, t, 2, 3).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.head(att.transpose(1, 2).reshape(b, t, 6).mean(1))


@pytest.mark.parametrize("padded", [False, True])
def test_a_layer_without_samples_in_its_input_is_followed_to_the_attention(padded, exact):
    torch.manual_seed(0)
    exact.check(
        RelativeBias(padded), torch.randn(5, 7, 6), torch.randint(0, 3, (5,)), replayed=False
    )


def test_two_sensors_share_the_watch_and_equal_a_lone_one(exact):
    torch.manual_seed(0)
    model = Tokens()
    x, y = torch.randn(5, 6, 6), torch.randint(0, 3, (5,))
    lone = GradientStatistics(model)
    with lone.capture():
        F.cross_entropy(model(x), y).backward()
    want = lone.result().per_sample_sq_norms
    a, b = GradientStatistics(model), GradientStatistics(model, inner_products=False)
    with a.capture(), b.capture():
        F.cross_entropy(model(x), y).backward()
    exact.close(a.result().per_sample_sq_norms, want, "first sensor")
    exact.close(b.result().per_sample_sq_norms, want, "second sensor")


def test_a_forward_that_raises_leaves_nothing_watched():
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.g = nn.Parameter(torch.ones(6))

        def forward(self, x: Tensor) -> Tensor:
            x = x * self.g
            raise ValueError("boom")

    model = nn.Sequential(nn.Linear(6, 6), Boom())
    stats = GradientStatistics(model)
    with pytest.raises(ValueError, match="boom"), stats.capture():
        model(torch.randn(3, 6))
    assert not WATCH.calls and not WATCH.tracked
    assert not torch.overrides._is_torch_function_mode_enabled()


class Conv1DLike(nn.Module):
    """transformers Conv1D: ``addmm(bias, x.view(-1, nx), weight)`` with weight (in, out)."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], -1)


class OwnLinear(nn.Module):
    """F.linear with the module's own weight (a custom projection)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6) * 0.3)
        self.b = nn.Parameter(torch.randn(6) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.w, self.b)


class OffsetEmbedding(nn.Embedding):
    """OPT's learned positions: an Embedding subclass that offsets its ids (changes forward)."""

    def forward(self, ids: Tensor) -> Tensor:
        return super().forward(ids + 2)


class Products(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = OffsetEmbedding(12, 6, padding_idx=3)
        self.c1 = Conv1DLike(6, 6)
        self.own = OwnLinear()
        self.head = nn.Linear(6, 3)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids)
        h = h + torch.tanh(self.c1(h))
        return self.head(self.own(h).mean(1))


def test_products_and_lookups_with_the_modules_own_weights_by_ops(exact):
    torch.manual_seed(0)
    ids = torch.randint(0, 10, (5, 7))
    ids[0, :3] = 1  # id 1 + 2 = the padding row: no gradient for it
    exact.check(Products(), ids, torch.randint(0, 3, (5,)), replayed=False)


def test_op_level_paths_under_bf16_autocast(exact):
    """Under CPU bf16 autocast the operations run in bfloat16 (a derived operand cast to it,
    products in it): the per-sample gradients are summed in float32 and match the float32
    reference to bfloat16's precision."""

    class Cast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.g = nn.Parameter(torch.randn(6) * 0.3 + 1)

        def forward(self, x: Tensor) -> Tensor:
            return x * self.g.to(torch.bfloat16)  # a derived operand in bfloat16

    torch.manual_seed(0)
    model = nn.Sequential(Products(), nn.Unflatten(1, (3, 1)), nn.Flatten(), nn.Linear(3, 6))
    model = nn.Sequential(model, Cast(), nn.Linear(6, 3))
    ids, y = torch.randint(0, 10, (5, 7)), torch.randint(0, 3, (5,))
    stats = GradientStatistics(model)
    with stats.capture():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(ids).float(), y)
        loss.backward()
    got = stats.result().per_sample_sq_norms
    ref = per_sample_gradients(model, F.cross_entropy, ids, y)
    want = sum(g.flatten(1).square().sum(1) for g in ref.values())
    exact.close(got, want, "per_sample_sq_norms under bf16 autocast", rtol=5e-2)
