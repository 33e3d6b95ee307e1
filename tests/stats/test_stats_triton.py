"""The Triton kernels of adaptive.stats.triton_norms.

Without a GPU the kernels run under the Triton interpreter on tiny CPU tensors, against float64
torch references and torch.func per-sample gradients. Triton decides at import whether it
interprets, and other tests may import it first, so :func:`test_interpreted_kernels` runs this
file again in a child pytest with ``TRITON_INTERPRET=1`` set from the start; in this process the
interpreted tests are skipped (they ran in the child). The tests marked ``cuda`` run the compiled
kernels and the sensor on a GPU (``pytest -m cuda``) and are skipped without one.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaptive.stats import GradientStatistics, per_sample_gradients, reference_statistics
from adaptive.stats import triton_norms as tn

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
CHILD = os.environ.get("ADAPTIVE_TRITON_CHILD") == "1"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_interpreted_kernels(triton_child):
    triton_child[0](__file__, minimum=34)


@pytest.fixture
def interpret():
    if not CHILD or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreted kernels run in the child process (test_interpreted_kernels)")


@pytest.fixture
def kernels_on_cpu(interpret, monkeypatch):
    """Route the sensor's Linear/Conv rules to the (interpreted) kernels on CPU tensors; the
    compiled CPU kernel off, so every layer takes the ``sq_norms`` path."""
    monkeypatch.setenv("ADAPTIVE_NATIVE", "0")
    monkeypatch.setattr(tn, "applies", lambda t: t.dtype in tn._FLOATS)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _ref_grads(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Per-sample ``G_i = Σ_t δ_it x_itᵀ`` in float64, ``(B, O, N)``."""
    return torch.einsum("bto,btn->bon", d.double(), x.double())


def _ref_norms(x: torch.Tensor, d: torch.Tensor, bias: bool) -> torch.Tensor:
    out = _ref_grads(x, d).square().sum((1, 2))
    if bias:
        out = out + d.double().sum(1).square().sum(1)
    return out


# (B, T, N, O): one position, a ragged single tile, several tiles of 16 on every axis
SHAPES = [(3, 1, 5, 6), (3, 5, 7, 9), (2, 37, 20, 33)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("form", ["gram", "materialised"])
@pytest.mark.parametrize("bias", [False, True])
def test_sq_norms_both_forms_match_reference(interpret, shape, form, bias):
    b, t, n, o = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(b, t, n, generator=g)
    d = torch.randn(b, t, o, generator=g)
    got = tn.sq_norms(x, d, bias=bias, form=form, block_t=16, block_k=16)
    assert got.dtype == torch.float32 and got.shape == (b,)
    assert _rel(got, _ref_norms(x, d, bias)) < 1e-5


def test_sq_norms_strided_operands(interpret):
    """Transposed views (the im2col layout ``(B, N, T)`` read as ``(B, T, N)``) need no copy."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 20, 18, generator=g).transpose(1, 2)  # (3, 18, 20): T = 18
    d = torch.randn(3, 17, 18, generator=g).transpose(1, 2)[:, :, ::2]  # (3, 18, 9)
    assert not x.is_contiguous() and not d.is_contiguous()
    for form in ("gram", "materialised"):
        got = tn.sq_norms(x, d, form=form, block_t=16, block_k=16)
        assert _rel(got, _ref_norms(x, d, False)) < 1e-5


def test_auto_form_follows_the_cost_rule():
    assert tn.gram_pays(4, 64, 64)  # 4·128 < 4096
    assert not tn.gram_pays(64, 64, 64)  # 64·128 >= 4096
    assert not tn.gram_pays(1024, 768, 2304)  # GPT-2's c_attn at sequence 1024


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_operands(interpret, dtype):
    """Half-precision gradients (autocast): the products take both operands rounded to the
    gradient's dtype (a float32 input is rounded as autocast rounds it) and sum in float32."""
    g = torch.Generator().manual_seed(2)
    x32 = torch.randn(2, 20, 18, generator=g)
    d = torch.randn(2, 20, 24, generator=g).to(dtype)
    for x in (x32, x32.to(dtype)):
        want = _ref_norms(x.to(dtype).float(), d.float(), True)
        # the interpreter's float32 -> bfloat16 conversion may round differently from torch's
        tol = 1e-2 if x.dtype == torch.float32 and dtype == torch.bfloat16 else 1e-5
        for form in ("gram", "materialised"):
            got = tn.sq_norms(x, d, bias=True, form=form, block_t=16, block_k=16)
            assert got.dtype == torch.float32
            assert _rel(got, want) < tol, (x.dtype, form)


@pytest.mark.parametrize("b", [1, 5])
def test_sums_and_norms_one_pass(interpret, b):
    """Batch sum, norms and per-coordinate squares from one pass, with the batch split across
    programs (atomic sums) where there are few tiles."""
    g = torch.Generator().manual_seed(3 + b)
    x = torch.randn(b, 19, 21, generator=g)
    d = torch.randn(b, 19, 35, generator=g)
    s, sq, q = tn.sums_and_sq_norms(x, d, coordinates=True, block=16)
    grads = _ref_grads(x, d)
    assert s.shape == (35, 21) and q is not None and q.shape == (35, 21)
    assert _rel(s, grads.sum(0)) < 1e-5
    assert _rel(sq, grads.square().sum((1, 2))) < 1e-5
    assert _rel(q, grads.square().sum(0)) < 1e-5
    s2, sq2, q2 = tn.sums_and_sq_norms(x, d, block=16)
    assert q2 is None and torch.allclose(s2, s) and torch.allclose(sq2, sq)


def test_bad_input_is_refused(interpret, monkeypatch):
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="same B and T"):
        tn.sq_norms(x, torch.randn(2, 4, 5))
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        tn.sq_norms(x.double(), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="form must be"):
        tn.sq_norms(x, torch.randn(2, 3, 5), form="ghost")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        tn.sq_norms(x, torch.randn(2, 3, 5))
    assert not tn.applies(x)  # CPU tensors never take the kernels in the sensor


def _layer_case(module: nn.Module, x: torch.Tensor) -> None:
    """layer_sq_norms (the rules' CUDA branch) against torch.func per-sample gradients."""
    out = module(x)
    d = torch.randn_like(out)

    def loss_fn(y, target):
        return (y * target).sum()

    ref = per_sample_gradients(module, loss_fn, x, d)
    for names in ({"weight", "bias"}, {"weight"}, {"bias"}):
        names = frozenset(n for n in names if getattr(module, n, None) is not None)
        if not names:
            continue
        want = sum(ref[n].double().flatten(1).square().sum(1) for n in names)
        got = tn.layer_sq_norms(module, x, d, names)
        assert _rel(got, want) < 1e-5, (module, names)


@pytest.mark.parametrize(
    "module,shape",
    [
        (nn.Linear(7, 9), (3, 7)),
        (nn.Linear(12, 10), (2, 5, 4, 12)),
        (nn.Linear(40, 3, bias=False), (2, 20, 40)),
        (nn.Conv2d(3, 5, 3, padding=1), (2, 3, 6, 6)),
        (nn.Conv2d(4, 6, 3, stride=2, dilation=2, groups=2, padding=2), (2, 4, 9, 9)),
        (nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect", bias=False), (2, 2, 5, 5)),
        (nn.Conv1d(2, 4, 3, stride=2, padding=1), (3, 2, 12)),
        (nn.Conv1d(4, 4, 3, groups=4, padding="same", padding_mode="circular"), (2, 4, 10)),
    ],
)
def test_layer_sq_norms_match_torch_func(interpret, module, shape):
    torch.manual_seed(0)
    _layer_case(module, torch.randn(shape))


@pytest.mark.parametrize(
    "module,shape",
    [
        (nn.Linear(12, 10), (3, 5, 12)),
        (nn.Linear(7, 40, bias=False), (2, 3, 7)),
        (nn.Conv2d(3, 5, 3, stride=2, padding=1), (2, 3, 7, 7)),
        (nn.Conv1d(2, 4, 3, dilation=2, padding=2, padding_mode="reflect"), (3, 2, 9)),
    ],
)
def test_layer_sums_match_torch_func(interpret, module, shape):
    """The fused contract (the CPU kernel's ``native_sums``): batch gradient, norms and
    per-coordinate squares of every parameter from one pass."""
    torch.manual_seed(1)
    x = torch.randn(shape)
    out = module(x)
    d = torch.randn_like(out)
    ref = per_sample_gradients(module, lambda y, t: (y * t).sum(), x, d)
    names = frozenset(n for n, _ in module.named_parameters())
    got = tn.layer_sums_and_sq_norms(module, x, d, names, coordinates=True)
    assert got is not None
    sums, sq, coords = got
    assert set(sums) == set(coords) == names
    want_sq = sum(g.double().flatten(1).square().sum(1) for g in ref.values())
    assert _rel(sq, want_sq) < 1e-5
    for n in names:
        assert sums[n].shape == ref[n].shape[1:]
        assert _rel(sums[n], ref[n].sum(0)) < 1e-5
        assert _rel(coords[n], ref[n].square().sum(0)) < 1e-5
    assert tn.layer_sums_and_sq_norms(module, x, d, frozenset({"bias"})) is None
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    z = torch.randn(2, 4, 5, 5)
    assert tn.layer_sums_and_sq_norms(grouped, z, grouped(z), names) is None


@pytest.mark.parametrize("kind", ["cnn", "conv1d", "block"])
def test_sensor_through_the_kernels_matches_torch_func(kernels_on_cpu, models, kind):
    """The whole sensor with its Linear/Conv rules on the kernels (interpreted) against
    torch.func per-sample gradients."""
    make_model, data_for = models
    model, loss_fn = make_model(kind)
    x, y = data_for(kind, 4)
    stats = GradientStatistics(model, fuse_weight_grads=False)
    with stats.capture():
        loss_fn(model(x), y).backward()
    res = stats.result()
    ref = reference_statistics(per_sample_gradients(model, loss_fn, x, y))
    assert _rel(res.per_sample_sq_norms, ref["per_sample_sq_norms"]) < 1e-4
    assert _rel(res.variance, ref["variance"]) < 1e-4


@pytest.mark.parametrize("kind", ["cnn", "block"])
def test_sensor_fused_through_the_kernels_matches_torch_func(kernels_on_cpu, models, kind):
    """``paths="native"`` where the Triton kernels take the layer (CUDA; here interpreted on
    CPU): one pass gives the norms, the per-coordinate squares and the batch gradient, which
    replaces autograd's: statistics and ``.grad`` against torch.func and autograd."""
    import copy

    make_model, data_for = models
    model, loss_fn = make_model(kind)
    reference = copy.deepcopy(model)
    x, y = data_for(kind, 4)
    stats = GradientStatistics(model, paths="native", per_coordinate=True)
    with stats.capture():
        loss_fn(model(x), y).backward()
    res = stats.result()
    assert any(e.path == "native" for e in stats.plan())
    ref = reference_statistics(per_sample_gradients(model, loss_fn, x, y))
    assert _rel(res.per_sample_sq_norms, ref["per_sample_sq_norms"]) < 1e-4
    assert _rel(res.variance, ref["variance"]) < 1e-4
    for n, v in res.coordinate_sq_sums.items():
        assert _rel(v, ref["coordinate_sq_sums"][n]) < 1e-4
    loss_fn(reference(x), y).backward()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert _rel(p.grad, q.grad) < 1e-5


def test_core_imports_without_triton():
    """adaptive.stats and adaptive.optim import no triton, and the sensor works where it is
    missing (the kernels report themselves unavailable)."""
    if CHILD:
        pytest.skip("runs in the parent process")
    code = (
        "import sys, importlib.abc\n"
        "import torch\n"
        "import adaptive.stats, adaptive.optim\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'triton':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from adaptive.stats import triton_norms, GradientStatistics\n"
        "from adaptive.optim import lamb_triton\n"
        "assert not triton_norms.available() and not lamb_triton.available()\n"
        "m = torch.nn.Linear(3, 2)\n"
        "s = GradientStatistics(m)\n"
        "with s.capture():\n"
        "    m(torch.randn(4, 5, 3)).sum().backward()\n"
        "assert s.result().per_sample_sq_norms.shape == (4,)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_kernels_compile_for_hopper(triton_child):
    """The compiled form (not the interpreter's) builds for sm_90 on this CPU: Triton's front end,
    MLIR passes and bundled ptxas (tests/triton_aot_worker.py; bf16/fp16 products on wgmma)."""
    triton_child[1]("stats")


# ------------------------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("form", ["gram", "materialised"])
def test_cuda_kernels_fp32(form):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 100, 96, device="cuda", generator=g)
    d = torch.randn(8, 100, 130, device="cuda", generator=g)
    assert _rel(tn.sq_norms(x, d, bias=True, form=form), _ref_norms(x, d, True)) < 1e-4
    s, sq, q = tn.sums_and_sq_norms(x, d, coordinates=True)
    grads = _ref_grads(x, d)
    assert _rel(s, grads.sum(0)) < 1e-4
    assert _rel(sq, grads.square().sum((1, 2))) < 1e-4
    assert _rel(q, grads.square().sum(0)) < 1e-4


@pytest.mark.cuda
@needs_cuda
def test_cuda_kernels_bf16():
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(4, 64, 48, device="cuda", generator=g)
    d = torch.randn(4, 64, 80, device="cuda", generator=g).bfloat16()
    want = _ref_norms(x.bfloat16().float(), d.float(), False)
    for form in ("gram", "materialised"):
        assert _rel(tn.sq_norms(x, d, form=form), want) < 1e-3


class _SuiteNet(nn.Module):
    """Convolutions with GroupNorm, then the 16 pixels as a sequence through Linears that take
    the Gram form (``seq``, ``seq2``) and the materialised form (``proj``), and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=2),
            nn.ReLU(),
        )
        self.seq = nn.Linear(32, 64)
        self.seq2 = nn.Linear(64, 256)
        self.ln = nn.LayerNorm(256)
        self.proj = nn.Linear(256, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        h = self.conv(x).flatten(2).transpose(1, 2)  # (b, 16, 32)
        h = self.proj(self.ln(self.seq2(F.gelu(self.seq(h)))))
        return self.head(h.mean(1))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_sensor_matches_torch_func(autocast, fuse):
    """Statistics on CUDA against torch.func: 1e-4 relative in float32; under bf16 autocast
    against the float32 reference at a bf16 tolerance."""
    torch.manual_seed(0)
    model = _SuiteNet().cuda()
    x = torch.randn(16, 3, 8, 8, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    stats = GradientStatistics(model, fuse_weight_grads=fuse)
    with stats.capture(), torch.autocast("cuda", torch.bfloat16, enabled=autocast):
        F.cross_entropy(model(x), y).backward()
    res = stats.result()
    ref = reference_statistics(per_sample_gradients(model, F.cross_entropy, x, y))
    tol = 5e-2 if autocast else 1e-4
    assert _rel(res.per_sample_sq_norms, ref["per_sample_sq_norms"]) < tol
    assert _rel(res.grad_sq_norm, ref["grad_sq_norm"]) < tol


@pytest.mark.cuda
@needs_cuda
def test_cuda_capture_and_result_never_sync():
    torch.manual_seed(0)
    model = _SuiteNet().cuda()
    x = torch.randn(8, 3, 8, 8, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    stats = GradientStatistics(model, per_coordinate=True)
    with stats.capture():  # warm-up: kernels compiled, allocator primed
        F.cross_entropy(model(x), y).backward()
    stats.result()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            with stats.capture():
                F.cross_entropy(model(x), y).backward()
            res = stats.result()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(res.noise_scale)
