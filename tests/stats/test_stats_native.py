"""The compiled kernel (``adaptive/stats/_kernels.c``) against torch.func per-sample gradients."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap

from adaptive.stats import GradientStatistics, native, per_sample_gradients, reference_statistics
from adaptive.stats.rules import (
    ConvRule,
    EmbeddingRule,
    LayerNormRule,
    LinearRule,
    RMSNormRule,
    materialising_pays,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
    pytest.mark.skipif(not native.available(), reason="the compiled kernel is not built"),
]


def workspace_with_nan():
    """A workspace whose buffers start as NaN, so a read of stale contents shows."""
    buffers: dict[int, torch.Tensor] = {}

    def out(shape, slot=0):
        buffers[slot] = torch.full(shape, float("nan"))
        return buffers[slot]

    return out


def per_sample(module: nn.Module, a: torch.Tensor, d: torch.Tensor) -> dict[str, torch.Tensor]:
    """torch.func per-sample parameter gradients of ⟨module(a_i), δ_i⟩, in float64."""
    module = copy.deepcopy(module).double()
    params = {k: v.detach() for k, v in module.named_parameters()}

    def pairing(p, ai, di):
        return (functional_call(module, p, (ai.unsqueeze(0),)) * di.unsqueeze(0)).sum()

    return vmap(grad(pairing), in_dims=(None, 0, 0))(params, a.double(), d.double())


def assert_rel(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert err <= rtol, f"relative error {err:.2e}"


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(params=[False, True], ids=["sums-per-thread", "shared-sums"])
def shared(request, monkeypatch):
    """With a zero budget for per-thread sums, two or more threads share one sum by rows."""
    if request.param:
        monkeypatch.setattr(native, "_PER_THREAD_SUMS_BYTES", 0)
    return request.param


@pytest.mark.skipif(
    shutil.which("cc") is None, reason="no C compiler: the install skips the kernel"
)
def test_kernel_is_built_where_a_compiler_exists():
    # the package install builds it; without this a broken build would skip the tests below
    assert native._load() is not None


def test_environment_switch_turns_it_off(monkeypatch):
    layer, a = nn.Linear(4, 4), torch.zeros(2, 3, 4)
    assert LinearRule().fusable(layer, a)  # with the kernel every sequence Linear fuses
    monkeypatch.setenv("ADAPTIVE_NATIVE", "0")
    assert not native.available()
    assert LinearRule().fusable(layer, a) == materialising_pays(3, 4, 4)
    assert LinearRule().native_sums(layer, a, a, frozenset({"weight"}), None) is None


@pytest.mark.parametrize(
    ("b", "t", "n_in", "n_out"),
    [
        (5, 7, 13, 11),  # tails: 13 input columns (one padded block), 11 rows (8 + 3)
        (9, 4, 64, 16),  # whole 8×32 blocks
        (1, 6, 40, 9),  # fewer samples than threads
        (4, 1, 20, 3),  # one position; shared sums: fewer row blocks than threads
        (3, 150, 37, 13),  # three tiles of positions (64, 64, 22), the sums whole in the buffer
        (2, 70, 128, 2100),  # two tiles; the sums too large for the buffer: tiles per row block
    ],
)
def test_linear_sums_and_norms_against_torch_func(threads, shared, b, t, n_in, n_out):
    torch.manual_seed(0)
    layer = nn.Linear(n_in, n_out, bias=False)
    a = torch.randn(b, t, n_in)
    d = torch.randn(b, t, n_out)
    want = per_sample(layer, a, d)["weight"]
    # contiguous; input with a column stride (transposed storage); output gradient sliced
    wide = torch.randn(b, t, n_out + 3)
    wide[..., 1:-2] = d
    for x, dd in ((a, d), (a.mT.contiguous().mT, wide[..., 1:-2])):
        s, sq, none, no_bias, no_bias_sq = native.linear_sums_and_norms(x, dd, workspace_with_nan())
        assert s.shape == (n_out, n_in) and sq.shape == (b,)
        assert none is None and no_bias is None and no_bias_sq is None
        assert_rel(s, want.sum(0))
        assert_rel(sq, want.square().sum((1, 2)))
        s2, sq2, q, _, _ = native.linear_sums_and_norms(
            x, dd, workspace_with_nan(), coordinates=True
        )
        # the same sums; the norms may differ in the last bit (a fused multiply-add or not)
        assert torch.equal(s2, s)
        assert_rel(sq2, sq.double(), rtol=1e-6)
        assert_rel(q, want.square().sum(0))  # Σ_i G_i², elementwise
        # with the bias: β_i = Σ_t δ_it joins the norms, and its sums come back
        beta = d.double().sum(1)
        s3, sq3, q3, bs, bq = native.linear_sums_and_norms(
            x, dd, workspace_with_nan(), coordinates=True, bias=True
        )
        assert torch.equal(s3, s) and torch.equal(q3, q)
        assert_rel(sq3, want.square().sum((1, 2)) + beta.square().sum(1))
        assert_rel(bs, beta.sum(0))
        assert_rel(bq, beta.square().sum(0))


CONVS = [
    nn.Conv2d(16, 4, 3),
    nn.Conv2d(16, 6, 3, stride=2, padding=1, padding_mode="reflect"),
    nn.Conv2d(16, 4, (3, 2), stride=(1, 2), dilation=(2, 2), padding=(2, 1)),
    nn.Conv1d(16, 5, 4, stride=2, dilation=2, padding=3),
    nn.Conv2d(2, 4, 3, padding=2, padding_mode="replicate", dilation=2),
    nn.Conv2d(1, 17, 5),  # 25 columns, 17 rows: both tails
    nn.Conv1d(4, 6, 3, padding=1, padding_mode="circular", bias=False),
]


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: repr(c))
def test_conv_native_sums_against_torch_func(threads, shared, conv):
    torch.manual_seed(0)
    shape = (
        (5, conv.in_channels, 13) if isinstance(conv, nn.Conv1d) else (5, conv.in_channels, 9, 8)
    )
    a = torch.randn(shape)
    d = torch.randn_like(conv(a))
    want = per_sample(conv, a, d)
    names = frozenset(want)
    sq_want = sum(g.reshape(g.shape[0], -1).square().sum(1) for g in want.values())
    wide = torch.randn(a.shape[0], a.shape[1] + 2, *a.shape[2:])
    wide[:, 1:-1] = a
    inputs = [a, wide[:, 1:-1]]  # and a channel slice of a wider tensor
    if a.dim() == 4:
        inputs.append(a.contiguous(memory_format=torch.channels_last))
    for x, coordinates in zip(inputs, (True, False, True), strict=False):
        got = ConvRule().native_sums(conv, x, d, names, workspace_with_nan(), coordinates)
        assert got is not None
        sums, sq, coords = got
        for k, g in want.items():
            assert sums[k].shape == g.shape[1:]
            assert_rel(sums[k], g.sum(0))
            if coordinates:
                assert_rel(coords[k], g.square().sum(0))
        assert coordinates or coords is None
        assert_rel(sq, sq_want)


def test_grouped_convolutions_are_left_to_torch():
    conv = nn.Conv2d(4, 4, 3, groups=2)
    a = torch.randn(2, 4, 6, 6)
    assert ConvRule().native_sums(conv, a, conv(a).detach(), frozenset({"weight"}), None) is None


@pytest.mark.parametrize("kind", ["mlp", "cnn", "conv1d", "block"])
@pytest.mark.parametrize("inner", [False, True])
@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_statistics_through_the_kernel_match_torch_func(models, monkeypatch, kind, inner, backend):
    """End to end: the sensor (norm statistics, and the inner products from the kernel's sums)
    and the gradients autograd leaves in .grad, with the fused layers going through the kernel,
    and the same with it switched off (the torch code: Gram forms, batched matmuls)."""
    if backend == "torch":
        monkeypatch.setenv("ADAPTIVE_NATIVE", "0")
    calls: list[str] = []
    for name in ("linear_sums_and_norms", "conv2d_sums_and_norms"):
        original = getattr(native, name)

        def counted(*args, original=original, name=name, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(native, name, counted)
    make_model, data_for = models
    model, loss_fn = make_model(kind)
    reference = copy.deepcopy(model)
    x, y = data_for(kind, 6, seed=3)
    stats = GradientStatistics(model, inner_products=inner, paths="native")
    parts = list(zip(x.split((2, 4)), y.split((2, 4)), strict=True))
    for xb, yb in parts:  # two micro-batches: the accumulation convention holds too
        with stats.capture():
            (loss_fn(model(xb), yb) / 2).backward()
    s = stats.result()
    if backend == "torch" or kind == "mlp":  # the MLP's Linears see one position each
        assert not calls
    else:
        assert calls
    ref = reference_statistics(per_sample_gradients(model, loss_fn, x, y))
    for n in ("sum_sq_norms", "grad_sq_norm", "variance", "noise_scale"):
        assert_rel(getattr(s, n), ref[n], rtol=1e-4)
    assert_rel(s.per_sample_sq_norms, ref["per_sample_sq_norms"], rtol=1e-4)
    if inner:
        assert s.inner_product_variance is not None and s.orthogonality_variance is not None
    for xb, yb in parts:
        (loss_fn(reference(xb), yb) / 2).backward()
    for (n, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert_rel(p.grad, q.grad.double(), rtol=1e-5)
        assert p.requires_grad, n


@pytest.mark.parametrize("kind", ["cnn", "block"])
def test_inner_products_through_the_kernel_one_batch(models, kind):
    """With one micro-batch the inner-product and orthogonality variances are exact."""
    make_model, data_for = models
    model, loss_fn = make_model(kind)
    x, y = data_for(kind, 6, seed=5)
    stats = GradientStatistics(model, paths="native")
    with stats.capture():
        loss_fn(model(x), y).backward()
    s = stats.result()
    ref = reference_statistics(per_sample_gradients(model, loss_fn, x, y))
    for n in ("inner_product_variance", "orthogonality_variance"):
        assert_rel(getattr(s, n), ref[n], rtol=1e-4)


def test_same_statistics_with_the_kernel_switched_off(models, monkeypatch):
    make_model, data_for = models
    x, y = data_for("block", 5, seed=6)
    results = []
    for switch in ("1", "0"):
        monkeypatch.setenv("ADAPTIVE_NATIVE", switch)
        model, loss_fn = make_model("block")
        stats = GradientStatistics(model, inner_products=False, paths="native")
        with stats.capture():
            loss_fn(model(x), y).backward()
        results.append(stats.result())
    assert_rel(results[0].per_sample_sq_norms, results[1].per_sample_sq_norms.double(), 1e-5)
    assert_rel(results[0].grad_sq_norm, results[1].grad_sq_norm.double(), 1e-5)


def test_bf16_autocast_through_the_kernel(models):
    """Under bf16 autocast the output gradients reach the kernel in bf16: the statistics are
    float32 and close to the float32 reference, the gradients close to autograd's."""
    make_model, data_for = models
    model, loss_fn = make_model("cnn")
    reference = copy.deepcopy(model)
    x, y = data_for("cnn", 4, seed=7)
    stats = GradientStatistics(model, inner_products=False, paths="native")
    with stats.capture():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
    s = stats.result()
    assert s.per_sample_sq_norms.dtype == torch.float32
    ref = reference_statistics(per_sample_gradients(reference, loss_fn, x, y))
    assert_rel(s.per_sample_sq_norms, ref["per_sample_sq_norms"], rtol=5e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss = loss_fn(reference(x), y)
    ref_loss.backward()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert_rel(p.grad, q.grad.double(), rtol=5e-2)


def test_float64_layers_keep_autograd_gradients(models):
    """The sensor works in float32: a double model's layers do not fuse, so .grad stays
    autograd's double gradient, bit for bit."""
    make_model, data_for = models
    model, loss_fn = make_model("block")
    model = model.double()
    reference = copy.deepcopy(model)
    x, y = data_for("block", 4, seed=8)
    stats = GradientStatistics(model, inner_products=False, paths="native")
    with stats.capture():
        loss_fn(model(x), y).backward()
    s = stats.result()
    loss_fn(reference(x), y).backward()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert p.grad.dtype == torch.float64 and torch.equal(p.grad, q.grad)
    ref = reference_statistics(per_sample_gradients(reference, loss_fn, x, y))
    assert_rel(s.per_sample_sq_norms, ref["per_sample_sq_norms"], rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 5),
    t=st.one_of(st.integers(1, 9), st.integers(60, 200)),  # one tile of positions, or several
    n_in=st.integers(1, 40),
    n_out=st.integers(1, 20),
    threads=st.sampled_from([1, 2]),
    shared=st.booleans(),
    coordinates=st.booleans(),
    bias=st.booleans(),
)
def test_linear_kernel_on_random_shapes(b, t, n_in, n_out, threads, shared, coordinates, bias):
    """Against the per-sample gradients written out (einsum in float64)."""
    g = torch.Generator().manual_seed(b * 1000 + t * 100 + n_in * 10 + n_out)
    a = torch.randn(b, t, n_in, generator=g)
    d = torch.randn(b, t, n_out, generator=g)
    want = torch.einsum("bto,btn->bon", d.double(), a.double())
    before, budget = torch.get_num_threads(), native._PER_THREAD_SUMS_BYTES
    torch.set_num_threads(threads)
    native._PER_THREAD_SUMS_BYTES = 0 if shared else budget
    try:
        s, sq, q, bs, bq = native.linear_sums_and_norms(
            a, d, workspace_with_nan(), coordinates, bias
        )
    finally:
        torch.set_num_threads(before)
        native._PER_THREAD_SUMS_BYTES = budget
    beta = d.double().sum(1)  # per-sample bias gradients
    assert_rel(s, want.sum(0))
    assert_rel(sq, want.square().sum((1, 2)) + (beta.square().sum(1) if bias else 0))
    if coordinates:
        assert_rel(q, want.square().sum(0))
    assert (bs is None) == (not bias) and (bq is None) == (not (bias and coordinates))
    if bias:
        assert_rel(bs, beta.sum(0))
    if bias and coordinates:
        assert_rel(bq, beta.square().sum(0))


@settings(max_examples=25, deadline=None)
@given(
    c=st.integers(1, 6),
    o=st.integers(1, 40),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    threads=st.sampled_from([1, 2]),
    shared=st.booleans(),
)
def test_conv_kernel_on_random_geometry(c, o, kernel, stride, dilation, threads, shared):
    """Against torch.func per-sample gradients, over kernel sizes, strides and dilations."""
    torch.manual_seed(c * 100 + o)
    conv = nn.Conv2d(c, o, kernel, stride=stride, dilation=dilation)
    a = torch.randn(3, c, 11, 10)
    d = torch.randn_like(conv(a))
    want = per_sample(conv, a, d)
    before, budget = torch.get_num_threads(), native._PER_THREAD_SUMS_BYTES
    torch.set_num_threads(threads)
    native._PER_THREAD_SUMS_BYTES = 0 if shared else budget
    try:
        got = ConvRule().native_sums(conv, a, d, frozenset(want), workspace_with_nan(), True)
    finally:
        torch.set_num_threads(before)
        native._PER_THREAD_SUMS_BYTES = budget
    sums, sq, coords = got
    for k, g in want.items():
        assert_rel(sums[k], g.sum(0))
        assert_rel(coords[k], g.square().sum(0))
    assert_rel(sq, sum(g.reshape(3, -1).square().sum(1) for g in want.values()))


NORM_LAYERS = [
    nn.LayerNorm(24),
    nn.LayerNorm(7, bias=False),  # weight only; 7 values: no whole vector
    nn.LayerNorm((3, 10), eps=1e-3),  # normalised over two trailing dims
    nn.RMSNorm(37),  # eps None: the input dtype's machine epsilon
    nn.RMSNorm((2, 16), eps=1e-4),
]


@pytest.mark.parametrize("layer", NORM_LAYERS, ids=lambda m: repr(m))
def test_norm_layer_kernel_against_torch_func(layer, threads):
    """‖w_i‖² + ‖β_i‖² of LayerNorm/RMSNorm from the kernel (one pass) against per-sample
    gradients from torch.func, with every subset of the parameters."""
    torch.manual_seed(1)
    with torch.no_grad():  # parameters away from their initial ones and zeros
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    b = 5
    a = 2 * torch.randn(b, 6, *layer.normalized_shape) + 0.5
    d = torch.randn(b, 6, *layer.normalized_shape)
    want = per_sample(layer, a, d)
    rule = RMSNormRule() if isinstance(layer, nn.RMSNorm) else LayerNormRule()
    assert native.takes_small_layer(a)
    names = [n for n, _ in layer.named_parameters()]
    for subset in ({*names}, {names[0]}, {names[-1]}):
        ref = sum(want[n].reshape(b, -1).square().sum(1) for n in subset)
        assert_rel(rule.sq_norms(layer, a, d, frozenset(subset)), ref)
        with pytest.MonkeyPatch.context() as mp:  # the torch path the kernel replaces
            mp.setattr(native, "takes_small_layer", lambda a: False)
            assert_rel(rule.sq_norms(layer, a, d, frozenset(subset)), ref)


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_kernel_against_torch_func(padding_idx, threads):
    """Repeated ids (a vocabulary of 5 over 40 positions), the padding id, and ids with two
    sequence axes."""
    torch.manual_seed(2)
    layer = nn.Embedding(5, 9, padding_idx=padding_idx)
    for shape in ((4, 40), (3, 2, 7), (4, 1)):
        ids = torch.randint(0, 5, shape)
        d = torch.randn(*shape, 9)

        def pairing(w, ids_i, d_i):
            return (F.embedding(ids_i, w, padding_idx) * d_i).sum()

        # torch.func per-sample gradients; the padding row gets none
        want = vmap(grad(pairing), in_dims=(None, 0, 0))(
            layer.weight.detach().double(), ids, d.double()
        )
        ref = want.reshape(shape[0], -1).square().sum(1)
        assert_rel(native.embedding_sq_norms(ids, d, padding_idx), ref)
        # the rule's two paths: the kernel, and the masked Gram matrix (fewer samples than
        # threads, CUDA, or no kernel)
        rule = EmbeddingRule()
        assert_rel(rule.sq_norms(layer, ids, d, frozenset({"weight"})), ref)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(native, "takes_small_layer", lambda a: False)
            assert_rel(rule.sq_norms(layer, ids, d, frozenset({"weight"})), ref)


def test_small_layer_kernels_leave_fewer_samples_than_threads_to_torch():
    # they split the samples: with fewer samples than threads, torch's operations are faster
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert not native.takes_small_layer(torch.zeros(1, 4, 8))
        assert native.takes_small_layer(torch.zeros(2, 4, 8))
    finally:
        torch.set_num_threads(before)
