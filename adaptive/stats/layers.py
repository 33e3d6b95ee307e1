"""Per-layer rules for per-sample gradient quantities from a layer's input and output gradient.

For a layer with input ``a`` (saved by a forward hook) and output gradient ``δ`` (seen by a hook on
the output tensor), the per-sample gradient of every parameter is a function of ``a_i`` and ``δ_i``
alone (Goodfellow 2015, "Efficient per-example gradient computations", arXiv 1510.01799). Each rule
here returns, per sample, quantities of those gradients without forming them where a cheaper
contraction exists:

- ``sq_norms``: ``Σ_p ‖∂ℓ/∂p‖²_i``, shape ``(b,)``;
- ``coordinate_sq``: ``Σ_i (∂ℓ/∂p)_i²`` per parameter (parameter-shaped);
- ``dot``: ``⟨(∂ℓ/∂p)_i, D_p⟩`` summed over the given parameters, shape ``(b,)``.

All quantities are in the units of the gradients autograd produces for the loss as written (the
caller rescales for mean-reduced losses and loss scaling) and are computed in float32.

Linear and convolution layers are written as one "grouped matmul": input ``X`` of shape
``(b, g, n_in, T)`` and output gradient ``Δ`` of shape ``(b, g, n_out, T)``, where ``T`` is the
number of positions sharing the weight (sequence positions, or output pixels after im2col) and
``g`` the convolution groups. The per-sample weight gradient is ``G_i = Δ_i X_iᵀ`` and

- ``T = 1``: ``‖G_i‖² = ‖x_i‖²‖δ_i‖²``;
- Gram form: ``‖G_i‖² = Σ_{s,t} (x_is·x_it)(δ_is·δ_it)``, cost ``T²(n_in + n_out)`` per sample;
- materialised form: ``‖Δ_i X_iᵀ‖²``, cost ``T·n_in·n_out`` per sample;

whichever is cheaper is used (the choice Opacus' ghost clipping and BackPACK make for sequences).

On CPU, where the compiled kernel of :mod:`adaptive.stats.native` is installed, Linear layers on
sequences and ``groups == 1`` convolutions take a fourth form (``native_sums``): the kernel builds
each ``G_i`` block by block in registers and keeps only ``‖G_i‖²`` and ``Σ_i G_i``, which then
serves as the layer's batch gradient in place of autograd's (about the cost of that gradient).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive.stats import native, triton_norms

__all__ = [
    "SUPPORTED_MODULES",
    "LayerRule",
    "UnsupportedModuleError",
    "find_rule",
]

_NormBatch = nn.modules.batchnorm._BatchNorm

# Hands out a float32 buffer of the given shape (contents undefined); buffers with different
# ``slot`` numbers do not overlap. Slot 0 holds the per-sample gradients, others scratch operands.
Workspace = Callable[..., Tensor]


class UnsupportedModuleError(TypeError):
    """A module has no per-sample rule, or couples the samples of a batch (BatchNorm in training)."""


def _grouped_sq_norms(x: Tensor, d: Tensor, bias: bool = False) -> Tensor:
    """Σ_g ‖Δ_ig X_igᵀ‖² for x (b,g,n_in,T), d (b,g,n_out,T), plus the bias gradients'
    ``Σ_g ‖Δ_ig 1‖²`` where ``bias``; picks the cheaper contraction.

    The bias rides along for free in the Gram and one-position forms: a bias is a weight column
    whose input is 1 at every position, so it adds 1 to every input inner product
    (``‖G_i‖² + ‖b_i‖² = Σ_{s,t} (x_is·x_it + 1)(δ_is·δ_it)``), with no extra pass over Δ.
    """
    b, _, n_in, t = x.shape
    n_out = d.shape[2]
    if t == 1:
        xx = x.square().sum(2)
        if bias:
            xx = xx + 1
        return (xx * d.square().sum(2)).reshape(b, -1).sum(1)
    if t * (n_in + n_out) < n_in * n_out:
        xt = x.transpose(-1, -2)
        dt = d.transpose(-1, -2)
        gram_x = xt @ x  # (b,g,T,T)
        if bias:
            gram_x += 1
        gram_d = dt @ d
        return (gram_x * gram_d).reshape(b, -1).sum(1)
    g = d @ x.transpose(-1, -2)  # (b,g,n_out,n_in)
    out = g.square().reshape(b, -1).sum(1)
    if bias:
        out = out + d.sum(-1).square().reshape(b, -1).sum(1)
    return out


def materialising_pays(t: int, n_in: int, n_out: int) -> bool:
    """Whether to materialise the per-sample weight gradients ``(b, n_out, n_in)`` of a layer with
    ``t`` positions and hand their sum to autograd as the batch gradient ("fusing"), where the
    compiled kernel does not take the call (on CUDA, or without it; with it every ``t > 1``
    call fuses).

    Fused, the per-sample contraction replaces autograd's own weight gradient (same MACs), but on
    CPU it costs about as much again (``t·n_in·n_out``: a batch of small matmuls runs well below
    one large one's speed, and the per-sample result, with a convolution's im2col operand, goes
    through memory rather than cache), plus two passes over the ``n_in·n_out`` result (norm and
    batch sum, about 8 MAC-equivalents per element); the Gram form
    adds ``t²(n_in + n_out)`` MACs per sample on top of autograd. Measured with
    ``benchmarks/stats_overhead.py`` (2 threads): the transformer block's 64-position Linears
    stay on the Gram form (1.25× a plain step; fusing them gave 1.36×), the small CNN's
    convolutions fuse.
    """
    return t > 1 and t * t * (n_in + n_out) >= n_in * n_out * (8 + t)


def _with_bias(
    module: nn.Module, s: Tensor, sq: Tensor, q: Tensor | None, bias: Tensor | None
) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor] | None]:
    """The kernel's weight sums, shaped like the weight, with the per-sample bias gradients
    ``bias`` (b, O) folded in."""
    sums = {"weight": s.reshape(module.weight.shape)}
    coords = None if q is None else {"weight": q.reshape(module.weight.shape)}
    if bias is not None:
        sums["bias"] = bias.sum(0)
        sq = sq + bias.square().sum(1)
        if coords is not None:
            coords["bias"] = bias.square().sum(0)
    return sums, sq, coords


def _native_applies(a: Tensor) -> bool:
    """Whether the compiled kernel takes this call: a CPU tensor, and the kernel installed."""
    return a.device.type == "cpu" and native.available()


def _with_kernel(a: Tensor, order: tuple[str, ...], eligible: bool) -> tuple[str, ...]:
    """The cost model's ``order`` of paths with the one-pass kernel's ``"native"`` path where it
    takes the call (``eligible``): first on CPU (the C kernel; the planner times every candidate
    there anyway); last on CUDA (the Triton kernels of :mod:`adaptive.stats.triton_norms`: not
    timed there, so used only when asked for, ``paths="native"``, until measured on a GPU)."""
    if not eligible:
        return order
    if _native_applies(a):
        return ("native", *order)
    if triton_norms.applies(a):
        return (*order, "native")
    return order


def _grouped_coordinate_sq(x: Tensor, d: Tensor) -> Tensor:
    """Σ_i (Δ_i X_iᵀ)² elementwise, shape (g, n_out, n_in)."""
    if x.shape[-1] == 1:
        # (δ²)ᵀ(x²): one matmul over the batch instead of b outer products.
        return torch.einsum("bgo,bgi->goi", d[..., 0].square(), x[..., 0].square())
    return (d @ x.transpose(-1, -2)).square().sum(0)


def _conv_bias_grads(d: Tensor) -> Tensor:
    """Per-sample conv bias gradients ``(b, C_out)``: the output gradient summed over positions."""
    return d.float().reshape(d.shape[0], d.shape[1], -1).sum(-1)


def _padded_2d(conv: nn.Module, a: Tensor) -> tuple[Tensor, tuple, tuple, tuple]:
    """The layer's input with its padding applied, as 4-D ``(b, C, H, W)`` (Conv1d gets H = 1),
    and the kernel size, dilation and stride as pairs."""
    a = a.float()
    pads = conv._reversed_padding_repeated_twice
    if any(p != 0 for p in pads):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        a = F.pad(a, pads, mode=mode)
    if isinstance(conv, nn.Conv1d):
        return (
            a.unsqueeze(2),
            (1, *conv.kernel_size),
            (1, *conv.dilation),
            (1, *conv.stride),
        )
    return a, conv.kernel_size, conv.dilation, conv.stride


def _im2col(conv: nn.Module, a: Tensor) -> Tensor:
    """``F.unfold`` of the padded input, ``(b, C·kh·kw, L)``, by one strided copy.

    The windows are a strided view of the input (offset ``h·s + u·r`` along each spatial axis for
    output position h, kernel offset u, stride s, dilation r); reshaping it copies once, several
    times faster on CPU than ``F.unfold``, which loops over the samples.
    """
    x, (kh, kw), (rh, rw), (sh, sw) = _padded_2d(conv, a)
    b, c, h, w = x.shape
    ho = (h - rh * (kh - 1) - 1) // sh + 1
    wo = (w - rw * (kw - 1) - 1) // sw + 1
    st = x.stride()
    windows = x.as_strided(
        (b, c, kh, kw, ho, wo),
        (st[0], st[1], st[2] * rh, st[3] * rw, st[2] * sh, st[3] * sw),
        x.storage_offset(),
    )
    return windows.reshape(b, c * kh * kw, ho * wo)


class LayerRule:
    """Per-sample quantities for one module type (see the module docstring for the meaning)."""

    def sq_norms(self, module: nn.Module, a: Tensor, d: Tensor, names: frozenset[str]) -> Tensor:
        raise NotImplementedError

    def coordinate_sq(
        self, module: nn.Module, a: Tensor, d: Tensor, names: frozenset[str]
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def dot(
        self, module: nn.Module, a: Tensor, d: Tensor, directions: Mapping[str, Tensor]
    ) -> Tensor:
        raise NotImplementedError

    def check(self, name: str, module: nn.Module) -> None:
        """Raise UnsupportedModuleError where this module instance cannot be handled."""

    def elements_per_sample(
        self, module: nn.Module, a: Tensor, d: Tensor, names: frozenset[str], workspace: bool
    ) -> int:
        """About how many float32 elements ``per_sample_params`` materialises per sample (the
        caller chunks the batch to bound them); ``workspace``: whether it gets an ``out``."""
        return sum(p.numel() for n, p in module.named_parameters(recurse=False) if n in names)

    def fusable(self, module: nn.Module, a: Tensor) -> bool:
        """True where, by the cost model, this call materialises per-sample weight gradients (or
        runs the compiled kernel) and hands their sum to autograd as the batch gradient."""
        return self.paths(module, a)[0] != "torch"

    def paths(
        self, module: nn.Module, a: Tensor, names: frozenset[str] = frozenset({"weight", "bias"})
    ) -> tuple[str, ...]:
        """The ways this call can be handled (:mod:`adaptive.stats.planner`), the cost model's
        choice first: ``"native"`` (compiled kernel), ``"materialise"`` (per-sample gradients
        written out), ``"torch"`` (autograd's gradient and ``sq_norms``)."""
        return ("torch",)

    def batch_grads(
        self, module: nn.Module, a: Tensor, d: Tensor, names: frozenset[str]
    ) -> dict[str, Tensor]:
        """Autograd's batch gradients ``Σ_i g_i`` of the parameters in ``names``, computed as
        autograd computes them (for timing the ``"torch"`` path against the fused ones)."""
        raise NotImplementedError

    def native_sums(
        self,
        module: nn.Module,
        a: Tensor,
        d: Tensor,
        names: frozenset[str],
        out: Workspace,
        coordinates: bool = False,
    ) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor] | None] | None:
        """``(Σ_i g_i per parameter, Σ_p ‖g_i‖², Σ_i g_i² per parameter or None)`` from the
        compiled kernel, without per-sample gradients in memory (the squares only with
        ``coordinates``); None where it does not apply (the caller then uses
        ``per_sample_params``)."""
        return None

    def per_sample_params(
        self,
        module: nn.Module,
        a: Tensor,
        d: Tensor,
        names: frozenset[str],
        out: Workspace | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample gradients ``name -> (b, *param.shape)`` (only for fusable calls); the weight's
        may be written into ``out(shape)`` (a reused buffer) and may be a permuted view."""
        raise NotImplementedError


class _GroupedMatmulRule(LayerRule):
    """Shared code for Linear and Conv: subclasses build X (b,g,n_in,T) and Δ (b,g,n_out,T)."""

    def operands(self, module: nn.Module, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def sq_norms(self, module, a, d, names):
        if triton_norms.applies(d):  # CUDA: Triton kernels, half-precision operands read as is
            return triton_norms.layer_sq_norms(module, a, d, names)
        x, dd = self.operands(module, a, d)
        if "weight" in names:
            return _grouped_sq_norms(x, dd, bias="bias" in names)
        b = x.shape[0]
        out = torch.zeros(b, device=d.device, dtype=torch.float32)
        if "bias" in names:
            out = out + dd.sum(-1).square().reshape(b, -1).sum(1)
        return out

    def coordinate_sq(self, module, a, d, names):
        x, dd = self.operands(module, a, d)
        res: dict[str, Tensor] = {}
        if "weight" in names:
            res["weight"] = _grouped_coordinate_sq(x, dd).reshape(module.weight.shape)
        if "bias" in names:
            res["bias"] = dd.sum(-1).reshape(dd.shape[0], -1).square().sum(0)
        return res


class LinearRule(_GroupedMatmulRule):
    """``nn.Linear`` on inputs ``(b, in)`` or ``(b, *seq, in)``: the sequence axes share the weight."""

    def operands(self, module, a, d):
        b = d.shape[0]
        if a.dim() < 2:
            raise ValueError(
                f"Linear input must have a batch axis, got shape {tuple(a.shape)}; "
                "GradientStatistics reads axis 0 as the sample axis"
            )
        x = a.float().reshape(b, -1, a.shape[-1]).transpose(1, 2).unsqueeze(1)
        dd = d.float().reshape(b, -1, d.shape[-1]).transpose(1, 2).unsqueeze(1)
        return x, dd

    def dot(self, module, a, d, directions):
        """``⟨G_i, W⟩ = Σ_t δ_it·(W x_it)``: one matmul over all samples' positions (the layer is
        linear in its weight), then a per-sample sum."""
        b = d.shape[0]
        if a.dim() < 2:
            self.operands(module, a, d)  # raises with the message about the batch axis
        x = a.float().reshape(b, -1, a.shape[-1])
        dd = d.float().reshape(b, -1, d.shape[-1])
        out = torch.zeros(b, device=d.device, dtype=torch.float32)
        if "weight" in directions:
            y = x @ directions["weight"].float().t()
            out = out + (y * dd).reshape(b, -1).sum(1)
        if "bias" in directions:
            out = out + dd.sum(1) @ directions["bias"].float()
        return out

    def paths(self, module, a, names=frozenset({"weight", "bias"})):
        n_in, n_out = module.in_features, module.out_features
        t = a.numel() // max(1, a.shape[0] * n_in) if a.dim() >= 2 else 1
        if t <= 1 or "weight" not in names:
            return ("torch",)  # one position: ‖a_i‖²‖δ_i‖², nothing to choose
        order = ("materialise", "torch")
        return _with_kernel(a, order if materialising_pays(t, n_in, n_out) else order[::-1], True)

    def batch_grads(self, module, a, d, names):
        dd = d.float().reshape(-1, d.shape[-1])
        out = {}
        if "weight" in names:
            out["weight"] = dd.t() @ a.float().reshape(-1, a.shape[-1])
        if "bias" in names:
            out["bias"] = dd.sum(0)
        return out

    def native_sums(self, module, a, d, names, out, coordinates=False):
        if triton_norms.applies(a):
            return triton_norms.layer_sums_and_sq_norms(module, a, d, names, coordinates)
        if "weight" not in names or a.dim() < 3 or not _native_applies(a):
            return None
        b = d.shape[0]
        dd = d.float()
        s, sq, q = native.linear_sums_and_norms(a.float(), dd, out, coordinates)
        per = dd.reshape(b, -1, dd.shape[-1]).sum(1) if "bias" in names else None
        return _with_bias(module, s, sq, q, per)

    def per_sample_params(self, module, a, d, names, out=None):
        b = d.shape[0]
        x = a.float().reshape(b, -1, a.shape[-1])
        dd = d.float().reshape(b, -1, d.shape[-1])
        res: dict[str, Tensor] = {}
        if "weight" in names:
            shape = (b, dd.shape[-1], x.shape[-1])
            res["weight"] = torch.bmm(
                dd.transpose(1, 2), x, out=None if out is None else out(shape)
            )
        if "bias" in names:
            res["bias"] = dd.sum(1)
        return res


class ConvRule(_GroupedMatmulRule):
    """``nn.Conv1d``/``nn.Conv2d`` (any stride, padding, padding mode, dilation, groups) by im2col."""

    def operands(self, module, a, d):
        cols = _im2col(module, a)  # (b, C_in·k, L)
        b, g = cols.shape[0], module.groups
        x = cols.reshape(b, g, -1, cols.shape[-1])
        dd = d.float().reshape(b, g, module.out_channels // g, -1)
        return x, dd

    @staticmethod
    def _as_2d(conv: nn.Module, a: Tensor, d: Tensor):
        x, kernel, dilation, stride = _padded_2d(conv, a)
        d = d.float()
        return x, d.unsqueeze(2) if isinstance(conv, nn.Conv1d) else d, kernel, dilation, stride

    def _use_direct(self, module: nn.Module, d: Tensor) -> bool:
        """groups == 1 and the materialised form is cheaper than the Gram form."""
        if module.groups != 1:
            return False
        positions = d[0, 0].numel()
        n_in = module.in_channels * math.prod(module.kernel_size)
        return positions * (n_in + module.out_channels) >= n_in * module.out_channels

    def _direct(self, module: nn.Module, a: Tensor, d: Tensor) -> Tensor:
        """Per-sample weight gradients as one grouped convolution, shape (C_in, b, C_out, kh, kw).

        ``G_i[o,c,u,v] = Σ_{p,q} δ_i[o,p,q]·a_i[c, p·s + u·r, q·s + v·r]`` (stride s, dilation r)
        is a cross-correlation of sample i's input channels with its own output gradient used as
        a kernel dilated by s, evaluated with stride r; putting the samples on the channel axis
        with ``groups=b`` does all samples in one call, without the im2col copy.
        """
        a4, d4, kernel, dilation, stride = self._as_2d(module, a, d)
        b, c = a4.shape[:2]
        o = d4.shape[1]
        g = F.conv2d(
            a4.transpose(0, 1),
            d4.reshape(b * o, 1, *d4.shape[2:]),
            groups=b,
            dilation=stride,
            stride=dilation,
        )
        return g[..., : kernel[0], : kernel[1]].reshape(c, b, o, kernel[0], kernel[1])

    def batch_grads(self, module, a, d, names):
        pads = module._reversed_padding_repeated_twice  # (left, right) per dim, last dim first
        if module.padding_mode == "zeros" and pads[::2] == pads[1::2]:
            # as autograd calls it: the input unpadded, the padding an argument (an explicitly
            # padded copy costs the weight gradient about 20% more, which would bias the choice)
            x, dd = a.float(), d.float()
            stride, dilation = list(module.stride), list(module.dilation)
            padding = list(pads[::2])[::-1]
        else:
            x, dd, _, dilation, stride = self._as_2d(module, a, d)
            stride, dilation, padding = list(stride), list(dilation), [0] * len(stride)
        weight = x.new_empty(()).expand(*module.weight.shape)
        _, w, bias = torch.ops.aten.convolution_backward(
            dd,
            x,
            weight if weight.dim() == x.dim() else weight.unsqueeze(2),
            [dd.shape[1]] if "bias" in names else None,
            stride,
            padding,
            dilation,
            False,
            [0] * len(stride),
            module.groups,
            [False, "weight" in names, "bias" in names],
        )
        out = {}
        if "weight" in names:
            out["weight"] = w.reshape(module.weight.shape)
        if "bias" in names:
            out["bias"] = bias
        return out

    def paths(self, module, a, names=frozenset({"weight", "bias"})):
        if "weight" not in names:
            return ("torch",)
        spatial = a.shape[2:]
        pads = module._reversed_padding_repeated_twice
        positions = 1
        for i, size in enumerate(spatial):
            j = len(spatial) - 1 - i  # pads are listed last dimension first
            padded = size + pads[2 * j] + pads[2 * j + 1]
            span = module.dilation[i] * (module.kernel_size[i] - 1) + 1
            positions *= max(0, (padded - span) // module.stride[i] + 1)
        n_in = module.in_channels // module.groups * math.prod(module.kernel_size)
        n_out = module.out_channels // module.groups
        order = ("materialise", "torch")
        if not materialising_pays(positions, n_in, n_out):
            order = order[::-1]
        return _with_kernel(a, order, module.groups == 1)

    def native_sums(self, module, a, d, names, out, coordinates=False):
        if triton_norms.applies(a):
            return triton_norms.layer_sums_and_sq_norms(module, a, d, names, coordinates)
        if "weight" not in names or module.groups != 1 or not _native_applies(a):
            return None
        x, d4, kernel, dilation, stride = self._as_2d(module, a, d)
        s, sq, q = native.conv2d_sums_and_norms(x, d4, kernel, dilation, stride, out, coordinates)
        per = _conv_bias_grads(d) if "bias" in names else None
        return _with_bias(module, s, sq, q, per)

    def elements_per_sample(self, module, a, d, names, workspace):
        n = super().elements_per_sample(module, a, d, names, workspace)
        if workspace and "weight" in names:  # the im2col operand and a channels-last input copy
            n += d[0, 0].numel() * module.weight[0].numel() * module.groups + a[0].numel()
        return n

    # Without a workspace (CUDA), below this many inputs per output channel (C_in·kh·kw / groups)
    # the grouped convolution of ``_direct`` beats the grouped weight gradient (measured on CPU,
    # before the workspace path: 1 input channel, 5×5 kernel).
    _DIRECT_MAX_INPUTS = 64

    @staticmethod
    def _im2col_bmm(module: nn.Module, a: Tensor, d: Tensor, out: Workspace) -> Tensor:
        """Per-sample weight gradients ``G_i = Δ_i X_iᵀ`` as one batched matmul over an im2col
        copy made into the workspace, shape ``(b, *weight.shape)`` (may be a permuted view).

        On CPU every operand lives in reused buffers, so no call faults in fresh pages, where the
        convolution library's grouped weight gradient allocates its output and a blocked copy of
        it each call. Per-sample gradients with their norms and batch sum, batch 128, two threads:
        the small CNN's 16→32 5×5 layer takes 3.8 against 8.4–10.1 ms with glibc's defaults; with
        freed memory kept mapped the two paths cost the same (3.6 ms; the 1→16 layer 1.4 ms
        either way), so the gain is the page faults. The copy reads whichever layout has
        the longer contiguous runs: output rows (``(b, C, kh, kw, ho, wo)``, runs of ``wo`` at
        stride 1) or, for ``groups == 1``, a channels-last copy of the input (``(b, ho, wo, kh,
        kw, C)``, runs of ``kw·C`` at dilation 1).
        """
        x, d, (kh, kw), (rh, rw), (sh, sw) = ConvRule._as_2d(module, a, d)
        b, c, h, w = x.shape
        o, ho, wo = d.shape[1:]
        g = module.groups
        run_rows = wo if sw == 1 else 1
        run_channels = c * kw if rw == 1 else c
        if g == 1 and run_channels > run_rows:
            xc = out((b, h, w, c), slot=2)
            xc.copy_(x.permute(0, 2, 3, 1))
            st = xc.stride()
            cols = out((b, ho, wo, kh, kw, c), slot=1)
            cols.copy_(
                xc.as_strided(
                    cols.shape, (st[0], st[1] * sh, st[2] * sw, st[1] * rh, st[2] * rw, 1)
                )
            )
            # Gᵢᵀ = Xᵢ Δᵢᵀ: MKL runs this orientation faster for these shapes
            gt = out((b, kh * kw * c, o))
            torch.bmm(cols.view(b, ho * wo, -1).transpose(1, 2), d.reshape(b, o, -1).mT, out=gt)
            return gt.view(b, kh, kw, c, o).permute(0, 4, 3, 1, 2).reshape(b, *module.weight.shape)
        st = x.stride()
        cols = out((b, c, kh, kw, ho, wo), slot=1)
        cols.copy_(
            x.as_strided(cols.shape, (st[0], st[1], st[2] * rh, st[3] * rw, st[2] * sh, st[3] * sw))
        )
        per = out((b * g, o // g, c // g * kh * kw))
        torch.bmm(d.reshape(b * g, o // g, ho * wo), cols.view(b * g, -1, ho * wo).mT, out=per)
        return per.view(b, *module.weight.shape)

    @staticmethod
    def _grouped_wgrad(module: nn.Module, a: Tensor, d: Tensor) -> Tensor:
        """Per-sample weight gradients ``(b, *weight.shape)`` as the weight gradient of one
        convolution over a batch of one, with the samples stacked on the channel axis and
        ``groups = b·groups`` (sample i's output channels see only sample i's input channels), so
        the convolution library's own weight-gradient kernel does all samples in one call."""
        x, d, kernel, dilation, stride = ConvRule._as_2d(module, a, d)
        b, c = x.shape[:2]
        o = d.shape[1]
        # only the weight's shape is read: a broadcast scalar stands in for it
        weight = x.new_empty(()).expand(b * o, c // module.groups, *kernel)
        grads = torch.ops.aten.convolution_backward(
            d.reshape(1, b * o, *d.shape[2:]),
            x.reshape(1, b * c, *x.shape[2:]),
            weight,
            None,
            list(stride),
            [0, 0],
            list(dilation),
            False,
            [0, 0],
            b * module.groups,
            [False, True, False],
        )[1]
        return grads.reshape(b, *module.weight.shape)

    def per_sample_params(self, module, a, d, names, out=None):
        b = d.shape[0]
        res: dict[str, Tensor] = {}
        if "weight" in names:
            n_in = module.in_channels // module.groups * math.prod(module.kernel_size)
            if out is not None:
                w = self._im2col_bmm(module, a, d, out)
            elif module.groups == 1 and n_in < self._DIRECT_MAX_INPUTS:
                w = self._direct(module, a, d)  # (C_in, b, C_out, kh, kw)
                w = w.permute(1, 2, 0, 3, 4)  # (b, C_out, C_in, kh, kw), a view
                if w.shape[2:] != module.weight.shape[1:]:  # Conv1d: drop the unit height
                    w = w.reshape(b, *module.weight.shape)
            else:
                w = self._grouped_wgrad(module, a, d)
            res["weight"] = w
        if "bias" in names:
            res["bias"] = _conv_bias_grads(d)
        return res

    def sq_norms(self, module, a, d, names):
        if not self._use_direct(module, d) or triton_norms.applies(d):
            return super().sq_norms(module, a, d, names)
        b = d.shape[0]
        out = torch.zeros(b, device=d.device, dtype=torch.float32)
        if "weight" in names:
            out = out + self._direct(module, a, d).square().transpose(0, 1).reshape(b, -1).sum(1)
        if "bias" in names:
            out = out + _conv_bias_grads(d).square().sum(1)
        return out

    def coordinate_sq(self, module, a, d, names):
        if not self._use_direct(module, d):
            return super().coordinate_sq(module, a, d, names)
        res: dict[str, Tensor] = {}
        if "weight" in names:
            sq = self._direct(module, a, d).square().sum(1)  # (C_in, C_out, kh, kw)
            res["weight"] = sq.transpose(0, 1).reshape(module.weight.shape)
        if "bias" in names:
            res["bias"] = _conv_bias_grads(d).square().sum(0)
        return res

    def dot(self, module, a, d, directions):
        """``⟨G_i, W⟩ = ⟨δ_i, conv(a_i; W)⟩``: the layer is linear in its weight, so the pairing
        with a direction is one forward convolution with the direction as the kernel (no
        per-sample gradients, no im2col copy)."""
        b = d.shape[0]
        out = torch.zeros(b, device=d.device, dtype=torch.float32)
        if "weight" in directions:
            x, d4, kernel, dilation, stride = self._as_2d(module, a, d)
            w = directions["weight"].float().reshape(module.out_channels, -1, *kernel)
            y = F.conv2d(x, w, stride=stride, dilation=dilation, groups=module.groups)
            out = out + (y * d4).reshape(b, -1).sum(1)
        if "bias" in directions:
            out = out + _conv_bias_grads(d) @ directions["bias"].float()
        return out

    def check(self, name, module):
        if not isinstance(module.padding, str) and len(
            module._reversed_padding_repeated_twice
        ) != 2 * (module.weight.dim() - 2):
            raise UnsupportedModuleError(f"module '{name}': unexpected padding layout")


class EmbeddingRule(LayerRule):
    """``nn.Embedding``: the per-sample gradient of row v is ``Σ_{t: id_t = v} δ_t``.

    ``‖g_i‖² = Σ_{s,t} [id_s = id_t] δ_s·δ_t`` (a masked Gram matrix over the sample's tokens), so
    no vocabulary-sized tensor is formed per sample. Tokens equal to ``padding_idx`` get no gradient.
    """

    def _prepare(self, module: nn.Embedding, ids: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        b = d.shape[0]
        ids = ids.reshape(b, -1)
        dd = d.float().reshape(b, ids.shape[1], -1)
        if module.padding_idx is not None:
            dd = dd * (ids != module.padding_idx).unsqueeze(-1)
        return ids, dd

    def sq_norms(self, module, a, d, names):
        ids, dd = self._prepare(module, a, d)
        if ids.shape[1] == 1:
            return dd.square().sum((1, 2))
        same = (ids.unsqueeze(2) == ids.unsqueeze(1)).float()
        return ((dd @ dd.transpose(1, 2)) * same).sum((1, 2))

    def coordinate_sq(self, module, a, d, names):
        ids, dd = self._prepare(module, a, d)
        same = (ids.unsqueeze(2) == ids.unsqueeze(1)).float()
        # Row sum S_t of sample i's gradient at token t's row, shared by the `count_t` positions
        # holding the same id: Σ over distinct rows of S² = Σ_t S_t² / count_t.
        rows = same @ dd
        share = rows.square() / same.sum(2, keepdim=True)
        out = torch.zeros_like(module.weight, dtype=torch.float32)
        out.index_add_(0, ids.reshape(-1), share.reshape(-1, share.shape[-1]))
        return {"weight": out}

    def dot(self, module, a, d, directions):
        ids, dd = self._prepare(module, a, d)
        w = directions["weight"].float()
        return (w[ids] * dd).sum((1, 2))

    def check(self, name, module):
        if module.sparse:
            raise UnsupportedModuleError(
                f"module '{name}' (Embedding) uses sparse gradients; use sparse=False or "
                "fallback='groups'"
            )
        if module.scale_grad_by_freq:
            raise UnsupportedModuleError(
                f"module '{name}' (Embedding) has scale_grad_by_freq=True, which scales each "
                "row by its frequency in the whole batch and so couples the samples; set it to "
                "False or pass fallback='groups'"
            )


class _AffineNormRule(LayerRule):
    """Normalisation layers ``y = x̂·w + β``: per-sample ``∂w = Σ δ·x̂``, ``∂β = Σ δ`` (materialised:
    the parameters are small)."""

    def normalized(self, module: nn.Module, a: Tensor) -> Tensor:
        raise NotImplementedError

    def reduce_to_param(self, module: nn.Module, t: Tensor) -> Tensor:
        """Sum a (b, *input) tensor to (b, *param_shape)."""
        raise NotImplementedError

    def per_sample(self, module, a, d, names) -> dict[str, Tensor]:
        dd = d.float()
        res: dict[str, Tensor] = {}
        if "weight" in names:
            res["weight"] = self.reduce_to_param(module, dd * self.normalized(module, a))
        if "bias" in names:
            res["bias"] = self.reduce_to_param(module, dd)
        return res

    def sq_norms(self, module, a, d, names):
        out = torch.zeros(d.shape[0], device=d.device, dtype=torch.float32)
        for g in self.per_sample(module, a, d, names).values():
            out = out + g.reshape(g.shape[0], -1).square().sum(1)
        return out

    def coordinate_sq(self, module, a, d, names):
        return {k: g.square().sum(0) for k, g in self.per_sample(module, a, d, names).items()}

    def dot(self, module, a, d, directions):
        out = torch.zeros(d.shape[0], device=d.device, dtype=torch.float32)
        for k, g in self.per_sample(module, a, d, frozenset(directions)).items():
            out = out + (g * directions[k].float()).reshape(g.shape[0], -1).sum(1)
        return out


class _LastDimsNormRule(_AffineNormRule):
    """Norms over the trailing ``normalized_shape`` dims (LayerNorm, RMSNorm)."""

    def reduce_to_param(self, module, t):
        k = len(module.normalized_shape)
        lead = tuple(range(1, t.dim() - k))
        return t.sum(lead) if lead else t


class LayerNormRule(_LastDimsNormRule):
    def normalized(self, module, a):
        # a unit weight gives the same x̂ bit for bit; torch 2.14's CPU kernel without a weight
        # takes a path about twice as slow
        ones = torch.ones(module.normalized_shape, device=a.device)
        return F.layer_norm(a.float(), module.normalized_shape, ones, eps=module.eps)


class RMSNormRule(_LastDimsNormRule):
    def normalized(self, module, a):
        eps = module.eps if module.eps is not None else torch.finfo(a.dtype).eps
        return F.rms_norm(a.float(), module.normalized_shape, eps=eps)


class _ChannelNormRule(_AffineNormRule):
    """Per-channel affine on axis 1 (GroupNorm, BatchNorm in eval mode)."""

    def reduce_to_param(self, module, t):
        return t.sum(tuple(range(2, t.dim()))) if t.dim() > 2 else t


class GroupNormRule(_ChannelNormRule):
    def normalized(self, module, a):
        return F.group_norm(a.float(), module.num_groups, eps=module.eps)


class BatchNormEvalRule(_ChannelNormRule):
    """BatchNorm in eval mode normalises with running statistics, so it acts per sample."""

    def normalized(self, module, a):
        x = a.float()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = module.running_mean.float().reshape(shape)
        var = module.running_var.float().reshape(shape)
        return (x - mean) * torch.rsqrt(var + module.eps)

    def check(self, name, module):
        if module.training or module.running_mean is None:
            raise UnsupportedModuleError(
                f"module '{name}' ({type(module).__name__}) normalises with batch statistics "
                "(training mode or track_running_stats=False), which couples the samples of a "
                "batch: per-sample gradients are not defined. Use GroupNorm or LayerNorm, put "
                "the layer in eval mode, or pass fallback='groups'"
            )


# Order matters: the first isinstance match wins.
_RULES: tuple[tuple[type[nn.Module], LayerRule], ...] = (
    (nn.Linear, LinearRule()),
    (nn.Conv1d, ConvRule()),
    (nn.Conv2d, ConvRule()),
    (nn.Embedding, EmbeddingRule()),
    (nn.LayerNorm, LayerNormRule()),
    (nn.GroupNorm, GroupNormRule()),
    (nn.RMSNorm, RMSNormRule()),
    (_NormBatch, BatchNormEvalRule()),
)

SUPPORTED_MODULES: tuple[str, ...] = (
    "Linear",
    "Conv1d",
    "Conv2d",
    "Embedding",
    "LayerNorm",
    "GroupNorm",
    "RMSNorm",
    "BatchNorm (eval mode)",
)


def find_rule(module: nn.Module) -> LayerRule | None:
    """The rule for ``module``'s type, or None."""
    for cls, rule in _RULES:
        if isinstance(module, cls):
            return rule
    return None
