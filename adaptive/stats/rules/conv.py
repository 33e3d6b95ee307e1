"""``nn.Conv1d``/``nn.Conv2d`` (any stride, padding, padding mode, dilation, groups) by im2col.

After im2col the layer is a grouped matmul (:mod:`adaptive.stats.rules.grouped`): ``X`` holds the
``C_in·kh·kw / g`` inputs of each of the ``T`` output pixels, and ``G_i = Δ_i X_iᵀ`` (Goodfellow
2015, arXiv 1510.01799), its norm by the Gram or the materialised form, whichever is cheaper.
The per-sample weight gradients can also be formed without the im2col copy:

``G_i[o,c,u,v] = Σ_{p,q} δ_i[o,p,q]·a_i[c, p·s + u·r, q·s + v·r]`` (stride s, dilation r)

is a cross-correlation of sample i's input channels with its own output gradient used as a
kernel dilated by s, evaluated with stride r; putting the samples on the channel axis with
``groups=b`` does all samples in one call. The pairing with a direction ``W`` is
``⟨G_i, W⟩ = ⟨δ_i, conv(a_i; W)⟩``, one forward convolution; the bias gradient is the output
gradient summed over positions.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive.stats import native, triton_norms
from adaptive.stats.rules.base import UnsupportedModuleError, Workspace
from adaptive.stats.rules.grouped import (
    _GroupedMatmulRule,
    _native_applies,
    _with_bias,
    _with_kernel,
    materialising_pays,
)

__all__ = ["ConvRule"]

# ConvRule._grouped_wgrad's measured choice per call signature, for the process
_WGRAD_WAY: dict[tuple, str] = {}


def _wgrad_ways():
    return {
        "correlate": ConvRule._correlate_wgrad,
        "stacked": ConvRule._stacked_wgrad,
        "per_sample": ConvRule._per_sample_wgrad,
    }


def _conv_bias_grads(d: Tensor) -> Tensor:
    """Per-sample conv bias gradients ``(b, C_out)``: the output gradient summed over positions."""
    return d.float().reshape(d.shape[0], d.shape[1], -1).sum(-1)


def _batch_grads(
    module: nn.Module, a: Tensor, d: Tensor, names: frozenset[str]
) -> dict[str, Tensor]:
    """The batch gradients of ``names`` as autograd computes them (``convolution_backward``)."""
    pads = module._reversed_padding_repeated_twice  # (left, right) per dim, last dim first
    if module.padding_mode == "zeros" and pads[::2] == pads[1::2]:
        # as autograd calls it: the input unpadded, the padding an argument (an explicitly
        # padded copy costs the weight gradient about 20% more, which would bias the choice)
        x, dd = a.float(), d.float()
        stride, dilation = list(module.stride), list(module.dilation)
        padding = list(pads[::2])[::-1]
    else:
        x, dd, _, dilation, stride = ConvRule._as_2d(module, a, d)
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

    @staticmethod
    def _materialised_cheaper(module: nn.Module, d: Tensor) -> bool:
        """The materialised form costs less than the Gram form (per group: ``T·n_in·n_out``
        against ``T²(n_in + n_out)``)."""
        positions = d[0, 0].numel()
        n_in = module.in_channels // module.groups * math.prod(module.kernel_size)
        n_out = module.out_channels // module.groups
        return positions * (n_in + n_out) >= n_in * n_out

    def _use_direct(self, module: nn.Module, d: Tensor) -> bool:
        """groups == 1 and the materialised form is cheaper than the Gram form."""
        return module.groups == 1 and self._materialised_cheaper(module, d)

    def _use_grouped_wgrad(self, module: nn.Module, d: Tensor) -> bool:
        """groups > 1 and the materialised form is cheaper: the convolution library's weight
        gradient over ``b·groups`` groups, rather than the im2col operands of the grouped-matmul
        form (a depthwise 7×7 layer's im2col copy is 49 times its input)."""
        return module.groups != 1 and self._materialised_cheaper(module, d)

    @staticmethod
    def _correlate(module: nn.Module, a: Tensor, d: Tensor) -> Tensor:
        """Per-sample weight gradients as one forward convolution, shape
        ``(C_in / groups, b, C_out, kh, kw)``.

        ``G_i[o,c,u,v] = Σ_{p,q} δ_i[o,p,q]·a_i[c, p·s + u·r, q·s + v·r]`` (stride s, dilation r)
        is a cross-correlation of sample i's input channels with its own output gradient used as
        a kernel dilated by s, evaluated with stride r. With the samples on the channel axis and
        ``b·groups`` groups (sample i's group j sees only its own channels), and a group's
        ``C_in / groups`` input channels on the batch axis, one call does every sample, without
        an im2col copy. For a depthwise layer it is a depthwise forward convolution, which the
        convolution library runs several times faster than its own depthwise weight gradient.
        """
        x, d4, (kh, kw), dilation, stride = ConvRule._as_2d(module, a, d)
        b, c = x.shape[:2]
        o, g = d4.shape[1], module.groups
        inputs = x.reshape(b * g, c // g, *x.shape[2:]).transpose(0, 1)
        kernels = d4.reshape(b * o, 1, *d4.shape[2:])
        out = F.conv2d(inputs, kernels, groups=b * g, dilation=stride, stride=dilation)
        return out[..., :kh, :kw].reshape(c // g, b, o, kh, kw)

    def batch_grads(self, module, a, d, names):
        return _batch_grads(module, a, d, names)

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
        pointwise = math.prod(module.kernel_size) == 1 and math.prod(module.stride) == 1
        if workspace and "weight" in names and module.groups == 1 and not pointwise:
            # the im2col operand and a channels-last input copy
            n += d[0, 0].numel() * module.weight[0].numel() * module.groups + a[0].numel()
        return n

    # Without a workspace (CUDA), below this many inputs per output channel (C_in·kh·kw / groups)
    # the forward convolution of ``_correlate`` beats the grouped weight gradient (measured on CPU,
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
        if (kh, kw, sh, sw, g) == (1, 1, 1, 1, 1):
            # a 1×1 convolution is a Linear over positions: the input is its own im2col, and
            # (b, C, h·w) is a view of it in either memory order (NCHW or channels-last)
            per = out((b, o, c))
            torch.bmm(d.reshape(b, o, ho * wo), x.reshape(b, c, h * w).mT, out=per)
            return per.view(b, *module.weight.shape)
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
        """Per-sample weight gradients ``(b, *weight.shape)`` from the convolution library, in
        one of three ways, whichever was measured fastest for this call's shapes, memory layout
        and thread count (timed once per process on CPU; on CUDA, ``"stacked"``):

        - ``"correlate"``: one forward convolution of the inputs with the output gradients as
          kernels (:meth:`_correlate`);
        - ``"stacked"``: one weight gradient over a batch of one, the samples stacked on the
          channel axis, ``groups = b·groups`` (sample i's output channels see only its inputs);
        - ``"per_sample"``: the layer's weight gradient for each sample alone, ``b`` calls.

        Which wins depends on the library's kernels. A ConvNeXt depthwise 7×7 layer at 56²,
        batch 32, two threads, AVX-512 (oneDNN): correlate 8 ms, stacked 97 ms, the layer's own
        batch weight gradient 98 ms in NCHW order; in channels-last order per sample 34 ms against
        112 ms stacked (the library's depthwise weight gradient on a batch of one is slow), while
        small layers lose ``b`` calls' overhead per sample."""
        if a.device.type != "cpu":
            return ConvRule._stacked_wgrad(module, a, d)
        # as the planner's key: sizes rounded up to powers of two (inputs of varying size are
        # measured a few times, not at every size) and the memory order
        key = (
            tuple(1 << max(0, n - 1).bit_length() for n in (*a.shape, *d.shape)),
            a.is_contiguous(),
            a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last),
            d.is_contiguous(),
            module.kernel_size,
            module.stride,
            module.dilation,
            tuple(module._reversed_padding_repeated_twice),
            module.padding_mode,
            module.groups,
            torch.get_num_threads(),
        )
        way = _WGRAD_WAY.get(key)
        if way is not None:
            return _wgrad_ways()[way](module, a, d)
        timings: dict[str, float] = {}
        results: dict[str, Tensor] = {}
        for _ in range(2):  # the first round warms caches and workspaces
            for name, fn in _wgrad_ways().items():
                t0 = time.perf_counter()
                results[name] = fn(module, a, d)
                timings[name] = time.perf_counter() - t0
        way = _WGRAD_WAY[key] = min(timings, key=timings.__getitem__)
        return results[way]

    @staticmethod
    def _correlate_wgrad(module: nn.Module, a: Tensor, d: Tensor) -> Tensor:
        """:meth:`_correlate` as ``(b, *weight.shape)``."""
        g = ConvRule._correlate(module, a, d)
        return g.permute(1, 2, 0, 3, 4).reshape(d.shape[0], *module.weight.shape)

    @staticmethod
    def _per_sample_wgrad(module: nn.Module, a: Tensor, d: Tensor) -> Tensor:
        """Each sample's weight gradient by its own ``convolution_backward`` call, stacked."""
        names = frozenset(["weight"])
        return torch.stack(
            [
                _batch_grads(module, a[i : i + 1], d[i : i + 1], names)["weight"]
                for i in range(len(d))
            ]
        )

    @staticmethod
    def _stacked_wgrad(module: nn.Module, a: Tensor, d: Tensor) -> Tensor:
        """Per-sample weight gradients ``(b, *weight.shape)`` as the weight gradient of one
        convolution over a batch of one, with the samples stacked on the channel axis and
        ``groups = b·groups``."""
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
            if module.groups != 1:
                # e.g. depthwise 7×7 at 56² (ConvNeXt): an im2col copy would hold 49 values per
                # input value (0.8 GB at batch 32), the convolution library reads the input as is
                w = self._grouped_wgrad(module, a, d)
            elif out is not None:
                w = self._im2col_bmm(module, a, d, out)
            elif n_in < self._DIRECT_MAX_INPUTS:
                w = self._correlate(module, a, d)  # (C_in, b, C_out, kh, kw)
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
        if triton_norms.applies(d) or not (
            self._use_direct(module, d) or self._use_grouped_wgrad(module, d)
        ):
            return super().sq_norms(module, a, d, names)
        b = d.shape[0]
        out = torch.zeros(b, device=d.device, dtype=torch.float32)
        if "weight" in names and module.groups != 1:
            out = out + self._grouped_wgrad(module, a, d).square().reshape(b, -1).sum(1)
        elif "weight" in names:
            out = out + self._correlate(module, a, d).square().transpose(0, 1).reshape(b, -1).sum(1)
        if "bias" in names:
            out = out + _conv_bias_grads(d).square().sum(1)
        return out

    def coordinate_sq(self, module, a, d, names):
        if self._use_grouped_wgrad(module, d):
            res = {}
            if "weight" in names:
                res["weight"] = self._grouped_wgrad(module, a, d).square().sum(0)
            if "bias" in names:
                res["bias"] = _conv_bias_grads(d).square().sum(0)
            return res
        if not self._use_direct(module, d):
            return super().coordinate_sq(module, a, d, names)
        res: dict[str, Tensor] = {}
        if "weight" in names:
            sq = self._correlate(module, a, d).square().sum(1)  # (C_in, C_out, kh, kw)
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
