"""Layer rules: the strided im2col against ``F.unfold``, the fusion cost rule written out, and the
per-sample convolution gradients of every code path against torch.func."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from adaptive.stats.rules import ConvRule, materialising_pays
from adaptive.stats.rules.conv import _im2col
from adaptive.stats.rules.grouped import _grouped_sq_norms


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


@pytest.mark.parametrize(
    ("conv", "channels_last"),
    [
        (nn.Conv2d(16, 4, 3), True),  # runs of kw·C = 48 beat output rows of 6
        (nn.Conv2d(16, 6, 3, stride=2, padding=1, padding_mode="reflect"), True),
        (nn.Conv2d(16, 4, (3, 2), stride=(1, 2), dilation=(2, 2), padding=(2, 1)), True),
        (nn.Conv1d(16, 5, 4, stride=2, dilation=2, padding=3), True),
        (nn.Conv2d(2, 4, 3, padding=2, padding_mode="replicate", dilation=2), False),
        (nn.Conv2d(1, 3, 3), False),  # one input channel: output rows of 6 beat runs of 3
        (nn.Conv2d(8, 4, 3, groups=2, padding="same"), False),  # groups: always rows
        (nn.Conv1d(4, 6, 3, groups=2, padding=1, padding_mode="circular"), False),
    ],
)
def test_conv_per_sample_weight_gradients_every_path(conv, channels_last):
    """Per-sample weight and bias gradients from the im2col matmul (both copy layouts, given a
    workspace) and from the convolution paths (no workspace), against torch.func."""
    torch.manual_seed(0)
    shape = (
        (5, conv.in_channels, 13) if isinstance(conv, nn.Conv1d) else (5, conv.in_channels, 9, 8)
    )
    a = torch.randn(shape)
    d = torch.randn_like(conv(a))
    params = {k: v.detach() for k, v in conv.named_parameters()}

    def pairing(p, ai, di):  # ⟨conv(a_i), δ_i⟩: its gradient is sample i's parameter gradient
        return (functional_call(conv, p, (ai.unsqueeze(0),)) * di.unsqueeze(0)).sum()

    want = vmap(grad(pairing), in_dims=(None, 0, 0))(params, a, d)
    slots: set[int] = set()
    buffers: dict[int, torch.Tensor] = {}

    def workspace(shape, slot=0):
        slots.add(slot)
        buffers[slot] = torch.full(shape, float("nan"))  # stale contents must not leak through
        return buffers[slot]

    rule = ConvRule()
    names = frozenset(["weight", "bias"])
    # the same input as a channel slice of a wider tensor (non-zero offset, gaps) and, in 2-D,
    # in channels-last memory order
    wide = torch.randn(a.shape[0], a.shape[1] + 2, *a.shape[2:])
    wide[:, 1:-1] = a
    inputs = [a, wide[:, 1:-1]]
    if a.dim() == 4:
        inputs.append(a.contiguous(memory_format=torch.channels_last))
    for x in inputs:
        for out in (workspace, None):
            got = rule.per_sample_params(conv, x, d, names, out)
            torch.testing.assert_close(got["weight"], want["weight"], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got["bias"], want["bias"], rtol=1e-4, atol=1e-5)
    assert (2 in slots) == channels_last


@pytest.mark.parametrize(
    ("t", "n_in", "n_out"),
    [(1, 5, 3), (4, 16, 12), (9, 3, 2)],  # one position, Gram form, materialised form
)
def test_grouped_sq_norms_with_and_without_bias_against_explicit_gradients(t, n_in, n_out):
    torch.manual_seed(0)
    x = torch.randn(6, 2, n_in, t, dtype=torch.float64)
    d = torch.randn(6, 2, n_out, t, dtype=torch.float64)
    weight = torch.einsum("bgot,bgit->bgoi", d, x)  # per-sample, per-group weight gradients
    bias = d.sum(-1)  # a bias sees input 1 at every position
    w_sq = weight.square().sum((1, 2, 3))
    b_sq = bias.square().sum((1, 2))
    torch.testing.assert_close(_grouped_sq_norms(x, d), w_sq)
    torch.testing.assert_close(_grouped_sq_norms(x, d, bias=True), w_sq + b_sq)


class _DepthwiseBlock(nn.Module):
    """ConvNeXt's pattern: a depthwise 7×7 convolution, then a grouped and a dense 1×1 one."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.grouped = nn.Conv2d(c, 2 * c, 1, groups=2)
        self.pw = nn.Conv2d(2 * c, 3, 1)

    def forward(self, x):
        return self.pw(torch.relu(self.grouped(self.dw(x)))).mean((2, 3))


@pytest.mark.parametrize("path", ["materialise", "torch"])
def test_depthwise_and_grouped_convs_are_exact_without_im2col(path, exact, monkeypatch):
    """Grouped convolutions whose materialised form is the cheaper one take their per-sample
    gradients from the convolution library's weight gradient over ``b·groups`` groups, on every
    path: exact, and no im2col copy (49 values per input value for a 7×7 kernel) is made."""
    assert ConvRule()._use_grouped_wgrad(nn.Conv2d(4, 4, 7, groups=4), torch.zeros(1, 4, 12, 12))

    def dense_only(name):  # the dense 1×1 layer may use them
        original = getattr(ConvRule, name)

        def run(*args):
            module = next(a for a in args if isinstance(a, nn.Module))
            assert module.groups == 1, f"{name} (im2col) for a grouped convolution"
            return original(*args)

        return run

    for name in ("_im2col_bmm", "operands"):
        static = isinstance(ConvRule.__dict__[name], staticmethod)
        monkeypatch.setattr(
            ConvRule, name, staticmethod(dense_only(name)) if static else dense_only(name)
        )
    torch.manual_seed(0)
    exact.check(_DepthwiseBlock(), torch.randn(5, 4, 12, 12), torch.randint(0, 3, (5,)), paths=path)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(6, 6, 5, padding=2, groups=6),
        nn.Conv2d(4, 6, 3, stride=2, dilation=2, groups=2, padding=2, padding_mode="reflect"),
        nn.Conv1d(4, 4, 3, groups=4, padding=1),
        nn.Conv2d(6, 4, (3, 2), stride=(2, 1), dilation=(1, 2), groups=2, padding=(1, 2)),
        nn.Conv1d(6, 9, 4, stride=3, groups=3, padding=2, padding_mode="circular"),
    ],
)
def test_grouped_weight_gradient_ways_match_torch_func(conv):
    """Every way of the per-sample weight gradient (a forward correlation with the output
    gradients as kernels; the library's weight gradient with the samples stacked on the channels
    of a batch of one; one call per sample), in both memory orders."""
    torch.manual_seed(0)
    a = torch.randn(4, conv.in_channels, *((11,) if isinstance(conv, nn.Conv1d) else (10, 9)))
    d = torch.randn_like(conv(a))
    params = {k: v.detach() for k, v in conv.named_parameters()}
    want = vmap(
        grad(lambda p, ai, di: (functional_call(conv, p, (ai[None],)) * di[None]).sum()),
        in_dims=(None, 0, 0),
    )(params, a, d)["weight"]
    layouts = [(a, d)]
    if a.dim() == 4:
        layouts.append(tuple(t.contiguous(memory_format=torch.channels_last) for t in (a, d)))
    for x, dd in layouts:
        for way in (
            ConvRule._correlate_wgrad,
            ConvRule._stacked_wgrad,
            ConvRule._per_sample_wgrad,
            ConvRule._grouped_wgrad,
        ):
            torch.testing.assert_close(way(conv, x, dd), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("faster", ["correlate", "stacked", "per_sample"])
def test_grouped_weight_gradient_takes_the_way_measured_faster(faster, monkeypatch):
    """Fed made-up timings, the choice is the faster way, kept for later calls of that shape."""
    from adaptive.stats.rules import conv as conv_mod

    clock = [0.0]
    ran: list[str] = []

    def fake(name, fn):
        def run(module, a, d):
            ran.append(name)
            clock[0] += 1.0 if name == faster else 3.0
            return fn(module, a, d)

        return run

    ways = {
        "correlate": ConvRule._correlate_wgrad,
        "stacked": ConvRule._stacked_wgrad,
        "per_sample": ConvRule._per_sample_wgrad,
    }
    monkeypatch.setattr(conv_mod, "_wgrad_ways", lambda: {n: fake(n, f) for n, f in ways.items()})
    monkeypatch.setattr(conv_mod.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(conv_mod, "_WGRAD_WAY", {})
    layer = nn.Conv2d(4, 4, 3, groups=4)
    a, d = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 4, 4)
    ConvRule._grouped_wgrad(layer, a, d)
    assert list(conv_mod._WGRAD_WAY.values()) == [faster]
    ran.clear()
    ConvRule._grouped_wgrad(layer, a, d)
    assert ran == [faster]
    ran.clear()  # sizes that round up to the same powers of two: not measured again
    ConvRule._grouped_wgrad(layer, torch.randn(4, 4, 5, 5), torch.randn(4, 4, 3, 3))
    assert ran == [faster] and len(conv_mod._WGRAD_WAY) == 1


@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_conv_per_sample_gradients_read_the_input_in_place(channels_last):
    """A 1×1 stride-1 convolution is a Linear over positions: its per-sample gradients come from
    one batched matmul on views of the input, without an im2col copy (no scratch slot is asked
    for), in either memory order, and equal torch.func's."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 1)
    a = torch.randn(4, 6, 7, 5)
    d = torch.randn(4, 5, 7, 5)
    if channels_last:
        a, d = (t.contiguous(memory_format=torch.channels_last) for t in (a, d))
    params = {k: v.detach() for k, v in conv.named_parameters()}
    want = vmap(
        grad(lambda p, ai, di: (functional_call(conv, p, (ai[None],)) * di[None]).sum()),
        in_dims=(None, 0, 0),
    )(params, a, d)["weight"]
    slots: list[int] = []

    def workspace(shape, slot=0):
        slots.append(slot)
        return torch.full(shape, float("nan"))

    got = ConvRule().per_sample_params(conv, a, d, frozenset(["weight"]), workspace)["weight"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert slots == [0]
    per = ConvRule().elements_per_sample(conv, a, d, frozenset(["weight"]), True)
    assert per == conv.weight.numel()
