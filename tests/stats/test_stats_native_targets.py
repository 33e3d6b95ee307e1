"""Every build of the compiled kernel (one per instruction set) against a float64 einsum
reference, and the run-time choice among the builds."""

from __future__ import annotations

import ast
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adaptive.stats import native

X86 = platform.machine().lower() in ("x86_64", "amd64")
EXPECTED = list(native.TARGETS) if X86 else ["generic"]
ROOT = Path(__file__).parents[2]
HARNESS = Path(__file__).with_name("kernel_harness.c")
KERNEL = ROOT / "adaptive" / "stats" / "_kernels.c"


def setup_flags() -> dict[str, object]:
    """COMMON, X86_TARGETS and ARM_TARGETS as setup.py defines them (read, not run)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    names = ("COMMON", "X86_TARGETS", "ARM_TARGETS")
    return {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id in names
    }


def build_and_run(compiler: str, flags: list[str], out: Path, runner: list[str], env=None):
    """Compile the harness with the kernel and run it; (blocking it reports, its output)."""
    subprocess.run(
        [compiler, *flags, "-o", str(out), str(HARNESS), str(KERNEL), "-lm"],
        check=True,
        capture_output=True,
        text=True,
    )
    res = subprocess.run([*runner, str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and res.stdout.rstrip().endswith("ok"), res.stdout + res.stderr
    return int(res.stdout.split()[1]), res.stdout


def workspace():
    def out(shape, slot=0):
        return torch.full(shape, float("nan"))  # stale contents would show as NaN

    return out


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.skipif(
    shutil.which("cc") is None, reason="no C compiler: the install skips the kernel"
)
def test_every_target_of_this_architecture_is_built():
    assert native.targets_built() == EXPECTED


def test_the_build_is_portable():
    # a build for the installing machine only could not ship in a wheel: no flag names it
    setup = (Path(__file__).parents[2] / "setup.py").read_text()
    assert '"-march=native"' not in setup and "'-march=native'" not in setup
    assert '"-mtune=native"' not in setup


@pytest.mark.parametrize("name", EXPECTED)
@pytest.mark.parametrize("shared", [False, True], ids=["sums-per-thread", "shared-sums"])
def test_target_linear_against_einsum(name, shared, threads, monkeypatch):
    if name not in native.targets_built():
        pytest.skip(f"build {name!r} is not installed (no compiler that accepts its flags)")
    if not native.supported(name):
        pytest.skip(f"this CPU lacks {sorted(native.TARGETS[name])} for build {name!r}")
    if shared:
        monkeypatch.setattr(native, "_PER_THREAD_SUMS_BYTES", 0)
    g = torch.Generator().manual_seed(0)
    # o_len and n off every blocking (6 rows; 2 or 4 vectors of 4, 8 or 16 floats)
    # and positions in tiles: the sums whole in the tiles' buffer, or too large for it
    shapes = [(5, 7, 37, 13), (3, 1, 16, 8), (4, 9, 70, 50), (3, 150, 37, 13), (2, 70, 128, 2100)]
    for b, t, n, o in shapes:
        a = torch.randn(b, t, n, generator=g)
        d = torch.randn(b, t, o, generator=g)
        per = torch.einsum("bto,btn->bon", d.double(), a.double())
        beta = d.double().sum(1)  # per-sample bias gradients
        with native.using(name):
            s, sq, q, bs, bq = native.linear_sums_and_norms(a, d, workspace(), True, True)
        assert rel(s, per.sum(0)) < 1e-5
        assert rel(sq, per.square().sum((1, 2)) + beta.square().sum(1)) < 1e-5
        assert rel(q, per.square().sum(0)) < 1e-5
        assert rel(bs, beta.sum(0)) < 1e-5 and rel(bq, beta.square().sum(0)) < 1e-5


@pytest.mark.parametrize("name", EXPECTED)
@pytest.mark.parametrize("shared", [False, True], ids=["sums-per-thread", "shared-sums"])
def test_target_conv_against_unfold(name, shared, threads, monkeypatch):
    if name not in native.targets_built():
        pytest.skip(f"build {name!r} is not installed (no compiler that accepts its flags)")
    if not native.supported(name):
        pytest.skip(f"this CPU lacks {sorted(native.TARGETS[name])} for build {name!r}")
    if shared:
        monkeypatch.setattr(native, "_PER_THREAD_SUMS_BYTES", 0)
    g = torch.Generator().manual_seed(1)
    # channels 20 and 40: a main block and a tail of channels on every blocking
    for b, c, o, k, stride, dil, hw in [
        (3, 3, 20, (3, 2), (2, 1), (1, 2), 9),
        (2, 5, 40, (1, 1), (1, 1), (1, 1), 6),
    ]:
        x = torch.randn(b, c, hw, hw + 1, generator=g)
        ho = (hw - dil[0] * (k[0] - 1) - 1) // stride[0] + 1
        wo = (hw + 1 - dil[1] * (k[1] - 1) - 1) // stride[1] + 1
        d = torch.randn(b, o, ho, wo, generator=g)
        cols = F.unfold(x.double(), k, dilation=dil, stride=stride)  # (b, c·kh·kw, T)
        per = torch.einsum("bot,bnt->bon", d.double().reshape(b, o, -1), cols)
        with native.using(name):
            s, sq, q = native.conv2d_sums_and_norms(x, d, k, dil, stride, workspace(), True)
        assert rel(s, per.sum(0)) < 1e-5
        assert rel(sq, per.square().sum((1, 2))) < 1e-5
        assert rel(q, per.square().sum(0)) < 1e-5


@pytest.mark.parametrize("name", EXPECTED)
def test_target_small_layers_against_formulas(name, threads):
    """Norm layers and embeddings (vector-wide row sums: per-target code) against the formulas
    in float64."""
    if name not in native.targets_built():
        pytest.skip(f"build {name!r} is not installed (no compiler that accepts its flags)")
    if not native.supported(name):
        pytest.skip(f"this CPU lacks {sorted(native.TARGETS[name])} for build {name!r}")
    g = torch.Generator().manual_seed(2)
    b, t = 3, 5
    for c in (37, 64):  # a tail of values and whole vectors on every build
        a = torch.randn(b, t, c, generator=g) * 2 + 1
        d = torch.randn(b, t, c, generator=g)
        x, dd = a.double(), d.double()
        for rms in (False, True):
            m = 0 if rms else x.mean(-1, keepdim=True)
            xhat = (x - m) / ((x - m).square().mean(-1, keepdim=True) + 1e-5).sqrt()
            want = (dd * xhat).sum(1).square().sum(1) + dd.sum(1).square().sum(1)
            with native.using(name):
                got = native.rownorm_sq_norms(a, d, c, 1e-5, rms, True, True)
            assert rel(got, want) < 1e-5
        ids = torch.randint(0, 4, (b, t), generator=g)
        onehot = F.one_hot(ids, 4).double()  # (b, t, v): g_i = onehotᵀ δ_i
        want = torch.einsum("btv,btc->bvc", onehot, dd)[:, 1:].square().sum((1, 2))
        with native.using(name):
            got = native.embedding_sq_norms(ids, d, padding_idx=0)
        assert rel(got, want) < 1e-5


@pytest.mark.skipif(not X86 or shutil.which("cc") is None, reason="x86-64 with a C compiler")
@pytest.mark.parametrize("name", list(native.TARGETS))
def test_each_x86_build_of_setup_py_passes_the_harness(name, tmp_path):
    """The C file itself, built with exactly setup.py's flags for the target, against naive
    double-precision loops (tests/stats/kernel_harness.c)."""
    if not native.supported(name):
        pytest.skip(f"this CPU lacks {sorted(native.TARGETS[name])} for build {name!r}")
    flags = setup_flags()
    blocking, _ = build_and_run(
        "cc", flags["COMMON"] + flags["X86_TARGETS"][name], tmp_path / name, []
    )
    assert blocking == native._BLOCKING.get(name, blocking)


@pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None,
    reason="64-bit Arm needs a cross compiler and qemu-user "
    "(apt-get install gcc-aarch64-linux-gnu libgomp1-arm64-cross qemu-user)",
)
def test_the_arm_build_passes_the_harness_under_qemu(tmp_path):
    flags = setup_flags()
    env = {**os.environ, "QEMU_LD_PREFIX": "/usr/aarch64-linux-gnu"}
    blocking, out = build_and_run(
        "aarch64-linux-gnu-gcc",
        flags["COMMON"] + flags["ARM_TARGETS"]["generic"],
        tmp_path / "arm",
        ["qemu-aarch64"],
        env,
    )
    assert blocking // 10000 == 4  # NEON: 4 floats a vector
    assert out.count("\n") >= 6


def _fresh_choice(monkeypatch, features: frozenset[str], env: str | None = None) -> str | None:
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_lib_target", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "cpu_features", lambda: features)
    if env is None:
        monkeypatch.delenv("ADAPTIVE_NATIVE", raising=False)
    else:
        monkeypatch.setenv("ADAPTIVE_NATIVE", env)
    native._load()
    return native.target()


@pytest.mark.skipif(not X86 or native.targets_built() != EXPECTED, reason="x86-64 builds")
def test_the_best_build_the_cpu_runs_is_loaded(monkeypatch):
    avx512 = native.TARGETS["avx512"]
    assert _fresh_choice(monkeypatch, avx512 | {"sse2"}) == "avx512"
    assert _fresh_choice(monkeypatch, frozenset({"avx2", "fma", "sse2"})) == "avx2"
    assert _fresh_choice(monkeypatch, frozenset({"avx2"})) == "generic"  # AVX2 without FMA
    assert _fresh_choice(monkeypatch, frozenset({"sse2"})) == "generic"
    # a named build is loaded where the CPU runs it, refused where it does not
    assert _fresh_choice(monkeypatch, avx512, env="avx2") == "avx2"
    with pytest.raises(ValueError, match="cannot run the kernel build 'avx512'"):
        _fresh_choice(monkeypatch, frozenset({"avx2", "fma"}), env="avx512")
    assert _fresh_choice(monkeypatch, avx512, env="0") is None


def test_a_bad_environment_value_is_refused(monkeypatch):
    with pytest.raises(ValueError, match=r"ADAPTIVE_NATIVE='yes': valid are 0 \(off\), 1"):
        _fresh_choice(monkeypatch, frozenset(), env="yes")


def test_unknown_target_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid: avx512, avx2, generic"):
        native.supported("sve9")
