"""Overhead of the per-step gradient statistics against a plain step and against peer libraries.

Times, in one process and interleaved round by round, one training step (forward, backward,
statistics) of:

- ``plain``: forward + backward;
- ``ours_norms``: the same inside ``GradientStatistics(inner_products=False).capture()`` plus
  ``result()`` (per-sample norms, ``‖ḡ‖²``, variance, noise scale);
- ``ours_norms_torch``: ``ours_norms`` with the compiled CPU kernel switched off
  (``ADAPTIVE_NATIVE=0``: Gram forms and batched matmuls in torch); only where the kernel is
  built and the device is the CPU;
- ``ours_norms_unfused``: the same with ``fuse_weight_grads=False`` (autograd computes every
  weight gradient; the sensor only adds its per-sample work);
- ``ours_all``: the same with inner-product and orthogonality variances;
- ``vmap``: torch.func per-sample gradients (functional_call + vmap(grad)), their norms, and ``.grad``
  set to their mean, the pattern of the AdAdaGrad reference code;
- ``opacus_hooks``, ``opacus_functorch``, ``opacus_ew``: Opacus ``GradSampleModule`` with
  ``grad_sample_mode`` ``"hooks"`` (its per-layer rule where it has one, torch.func on the
  module otherwise), ``"functorch"`` (torch.func for every trainable module) and ``"ew"``
  (torch's ExpandedWeights), each step then summing the squared per-sample gradients over the
  whole model, as ``ours_norms`` does; ``opacus_ghost``: its ghost clipping mode, which forms
  per-sample norms without per-sample gradients where it has a norm rule (Linear, Embedding).
  A mode that Opacus cannot run on a model (at wrapping or in a trial step) is a row saying
  ``refused: <its error>``; without Opacus installed, ``opacus not installed``. Once per model,
  untimed, each mode's per-sample squared norms are compared with ours
  (``StatisticsResult.per_sample_sq_norms``), and where they differ the parameters at fault are
  found against torch.func per parameter (see :func:`opacus_check`);
- ``backpack``: BackPACK ``BatchL2Grad`` (per-sample squared norms) during the backward.

Models: ``cnn`` (a small CNN on 28×28 inputs) and ``block`` (a small pre-norm transformer block
with Embedding, LayerNorm, attention and sequence-axis Linear layers; BackPACK has no LayerNorm,
so it is skipped there); ``resnet18gn`` (ResNet-18 with GroupNorm, 32×32 inputs) for a GPU.
``zoo`` (issue 17): tiny transformers Llama, timm ViT and ConvNeXt, whose steps take tens of
milliseconds; ``zoo-full``: the Llama of ``examples/lm_pretrain.py`` (width 256, 4 layers,
sequence 256), timm ``vit_tiny_patch16_224`` and ``convnext_atto`` at 224² (also channels-last).

Per round, each method runs ``--steps`` timed steps after a warm-up; the ratio to ``plain`` is
taken within the round, and the median over rounds is reported. On a CPU shared with other
jobs, wall time mostly measures the neighbours: the default clock there is this process's CPU
time (use ``--threads 1`` with it, so idle-spinning worker threads are not counted). On CUDA, one captured step runs
under ``torch.cuda.set_sync_debug_mode("error")`` to show the capture does not synchronise.

Every method's minor page faults per step are reported beside its time. On CPU, glibc hands large
freed blocks back to the OS and the next step faults them in again page by page (about 1 µs
each), which moves step times by milliseconds from run to run depending on the allocator's state.
``--keep-freed-memory`` tells glibc (``mallopt``) to keep freed memory for reuse, for every method
alike, so the ratios measure computation rather than that lottery; the default measures the
process as a user runs it.

Usage::

    python benchmarks/stats_overhead.py --device cpu --rounds 7 --steps 5
    python benchmarks/stats_overhead.py --models zoo-full --rounds 5 --steps 1 --threads 2 \
        --clock wall --keep-freed-memory --out benchmarks/results/stats_overhead_zoo_full
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from adaptive.stats import GradientStatistics, last_resort, native

RESULTS = Path(__file__).parent / "results"


# ----------------------------------------------------------------------------- models
def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


class Block(nn.Module):
    """Embedding, pre-norm causal attention from Linear layers, MLP, sequence-axis head."""

    def __init__(self, vocab: int = 512, dim: int = 128, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        h = self.emb(ids)
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(att.transpose(1, 2).reshape(b, t, -1))
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.head(h)


def resnet18_gn() -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(num_classes=10, norm_layer=lambda c: nn.GroupNorm(32, c))


def seq_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


class _Bf16(nn.Module):
    """Runs the wrapped model under bf16 autocast on CUDA (float32 elsewhere); float32 logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            return self.model(x).float()


class _DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(att.transpose(1, 2).reshape(b, t, -1))
        return h + self.fc2(F.gelu(self.fc1(self.ln2(h))))


class Decoder(nn.Module):
    """A GPT-2-shaped decoder from the sensor's layers (Embedding, LayerNorm, Linear; HF's GPT-2
    uses its own Conv1D): token and position embeddings, pre-norm blocks, an untied head."""

    def __init__(self, vocab: int, dim: int, heads: int, layers: int, seq: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.blocks = nn.Sequential(*(_DecoderBlock(dim, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        positions = torch.arange(t, device=ids.device).expand(b, t)  # per sample: axis 0 = batch
        return self.head(self.ln(self.blocks(self.tok(ids) + self.pos(positions))))


# name -> (vocab, dim, heads, layers, sequence)
GPT2_SHAPES = {"gpt2s": (50257, 768, 12, 12, 1024), "gpt2s-tiny": (128, 32, 2, 2, 16)}


def vit(tiny: bool) -> nn.Module:
    """timm's ViT-B/16 (224², 1000 classes), or a 2-block width-32 one on 32² for dry runs. The
    class token and position embedding are parameters of the top module, which has no
    per-sample rule: they are frozen (for every method alike)."""
    from timm.models.vision_transformer import VisionTransformer

    if tiny:
        m = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2)
    else:
        m = VisionTransformer(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
    m.cls_token.requires_grad_(False)
    m.pos_embed.requires_grad_(False)
    return m


class _HFLogits(nn.Module):
    """A transformers causal LM called as people call it (keyword tensors), returning logits."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits


def llama_tiny() -> nn.Module:
    """transformers ``LlamaForCausalLM``, tied embeddings (SmolLM2's layout), at a tiny width."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    return _HFLogits(LlamaForCausalLM(cfg))


def timm_vit_tiny() -> nn.Module:
    """timm ``vit_tiny_patch16_224`` at 32×32 (patch 8, width 64, depth 4), layer scale on."""
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=4,
        num_heads=4,
        num_classes=10,
        init_values=0.1,
    )


def timm_convnext_atto() -> nn.Module:
    """timm ``convnext_atto`` (LayerNorm2d, layer-scale gamma), 10 classes, for 32×32 inputs."""
    import timm

    return timm.create_model("convnext_atto", pretrained=False, num_classes=10)


def llama_lm_pretrain() -> nn.Module:
    """The causal LM of ``examples/lm_pretrain.py`` (issue 21), built by that example: transformers
    Llama, byte vocabulary, 4 layers, width 256, 4 heads, context 256, untied head."""
    import importlib.util
    import sys

    name = "example_lm_pretrain"
    example = sys.modules.get(name)
    if example is None:
        path = Path(__file__).resolve().parents[1] / "examples" / "lm_pretrain.py"
        spec = importlib.util.spec_from_file_location(name, path)
        example = importlib.util.module_from_spec(spec)
        sys.modules[name] = example  # its dataclasses look their module up while defined
        spec.loader.exec_module(example)
    return _HFLogits(example.build_model(layers=4, width=256, heads=4, context=256))


def timm_vit_tiny_224() -> nn.Module:
    """timm ``vit_tiny_patch16_224`` as published (224², patch 16, width 192, depth 12), 10 classes."""
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)


def timm_convnext_atto_cl() -> nn.Module:
    """``convnext_atto`` in channels-last memory order (what its CPU users run: oneDNN's
    depthwise convolutions are several times faster so)."""
    return timm_convnext_atto().to(memory_format=torch.channels_last)


# the --models zoo / zoo-full rows: name -> (factory, input kind, default batch, image side or
# vocabulary). The tiny rows' steps are mostly Python (hooks, small ops, tens of milliseconds);
# the full-size rows are the models as users train them (the LM of issue 21, timm's published
# configurations at 224²).
ZOO = {
    "llama-tiny-seq256": (llama_tiny, "tokens", 8, 512),
    "timm-vit-tiny": (timm_vit_tiny, "image", 32, 32),
    "timm-convnext-atto": (timm_convnext_atto, "image", 32, 32),
}
ZOO_FULL = {
    "llama-lm-pretrain-seq256": (llama_lm_pretrain, "tokens", 8, 256),
    "timm-vit-tiny-224": (timm_vit_tiny_224, "image", 32, 224),
    "timm-convnext-atto-224": (timm_convnext_atto, "image", 32, 224),
    "timm-convnext-atto-224-cl": (timm_convnext_atto_cl, "image-cl", 32, 224),
}


def make_case(name: str, batch: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    if name in ZOO or name in ZOO_FULL:
        factory, kind, _, size = {**ZOO, **ZOO_FULL}[name]
        if kind == "tokens":
            x = torch.randint(0, size, (batch, 256), generator=g)
            y = torch.randint(0, size, (batch, 256), generator=g)
            return factory, seq_loss, x.to(device), y.to(device)
        x = torch.randn(batch, 3, size, size, generator=g)
        if kind == "image-cl":
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,), generator=g)
        return factory, F.cross_entropy, x.to(device), y.to(device)
    if name == "cnn":
        x = torch.randn(batch, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        return small_cnn, F.cross_entropy, x.to(device), y.to(device)
    if name == "block":
        x = torch.randint(0, 512, (batch, 64), generator=g)
        y = torch.randint(0, 512, (batch, 64), generator=g)
        return Block, seq_loss, x.to(device), y.to(device)
    if name == "resnet18gn":
        x = torch.randn(batch, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        return resnet18_gn, F.cross_entropy, x.to(device), y.to(device)
    if name == "resnet18gn-tiny":
        x = torch.randn(batch, 3, 16, 16, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        return resnet18_gn, F.cross_entropy, x.to(device), y.to(device)
    if name in GPT2_SHAPES:
        vocab, dim, heads, layers, seq = GPT2_SHAPES[name]
        x = torch.randint(0, vocab, (batch, seq), generator=g)
        y = torch.randint(0, vocab, (batch, seq), generator=g)

        def gpt2() -> nn.Module:
            return _Bf16(Decoder(vocab, dim, heads, layers, seq))

        return gpt2, seq_loss, x.to(device), y.to(device)
    if name in ("vitb16", "vitb16-tiny"):
        tiny = name.endswith("tiny")
        size = 32 if tiny else 224
        x = torch.randn(batch, 3, size, size, generator=g)
        y = torch.randint(0, 1000, (batch,), generator=g)
        return (lambda: vit(tiny)), F.cross_entropy, x.to(device), y.to(device)
    raise ValueError(f"unknown model {name!r}")


# ----------------------------------------------------------------------------- methods
@contextlib.contextmanager
def kernel_switch(on: bool):
    """The compiled kernel on (as installed) or off (``ADAPTIVE_NATIVE=0``) for one step."""
    if on:
        yield
        return
    before = os.environ.get("ADAPTIVE_NATIVE")
    os.environ["ADAPTIVE_NATIVE"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["ADAPTIVE_NATIVE"]
        else:
            os.environ["ADAPTIVE_NATIVE"] = before


def build_methods(
    factory,
    loss_fn,
    x,
    y,
    device,
    refused: dict[str, str] | None = None,
    keep: set[str] | None = None,
) -> dict[str, Callable[[], object]]:
    """The timed methods on copies of one model. A peer that cannot run this model is left
    out and, where ``refused`` is given, named there with the reason (Opacus and BackPACK).
    ``keep``: build only the peers named there (the Opacus modes run a trial step here)."""
    if refused is None:
        refused = {}
    torch.manual_seed(0)
    base = factory().to(device)
    methods: dict[str, Callable[[], object]] = {}

    plain = copy.deepcopy(base)

    def run_plain():
        plain.zero_grad(set_to_none=True)
        loss_fn(plain(x), y).backward()

    methods["plain"] = run_plain

    variants = [
        ("ours_norms", False, True, True),
        ("ours_norms_torch", False, True, False),
        ("ours_norms_unfused", False, False, True),
        ("ours_all", True, True, True),
    ]
    if device.type != "cpu" or not native.available():
        variants = [v for v in variants if v[0] != "ours_norms_torch"]
    for label, inner, fuse, kernel in variants:
        model = copy.deepcopy(base)
        stats = GradientStatistics(model, inner_products=inner, fuse_weight_grads=fuse)

        def run_ours(model=model, stats=stats, kernel=kernel):
            model.zero_grad(set_to_none=True)
            with kernel_switch(kernel), stats.capture():
                loss_fn(model(x), y).backward()
            return stats.result().noise_scale

        run_ours.stats = stats  # its plan() is recorded with the results
        methods[label] = run_ours

    from torch.func import functional_call, grad, vmap

    vm = copy.deepcopy(base)
    buffers = dict(vm.named_buffers())

    def one(p, xi, yi):
        return loss_fn(functional_call(vm, (p, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample = vmap(grad(one), in_dims=(None, 0, 0))

    def run_vmap():
        params = {k: v.detach() for k, v in vm.named_parameters()}
        gs = per_sample(params, x, y)
        norms = sum(g.reshape(g.shape[0], -1).square().sum(1) for g in gs.values())
        for k, p in vm.named_parameters():
            p.grad = gs[k].mean(0)
        return norms

    methods["vmap"] = run_vmap

    opacus_labels = [k for k in OPACUS_MODES if keep is None or k in keep]
    methods.update(build_opacus(base, loss_fn, x, y, refused, opacus_labels))

    if keep is None or "backpack" in keep:
        try:
            from backpack import backpack, extend
            from backpack.extensions import BatchL2Grad

            if any(
                isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.Embedding)) for m in base.modules()
            ):
                raise TypeError("BackPACK BatchL2Grad has no LayerNorm/GroupNorm/Embedding support")
            bp = extend(copy.deepcopy(base))
            bp_loss = extend(nn.CrossEntropyLoss())

            def run_backpack():
                bp.zero_grad(set_to_none=True)
                with backpack(BatchL2Grad()):
                    bp_loss(bp(x), y).backward()
                return sum(p.batch_l2 for p in bp.parameters())

            methods["backpack"] = run_backpack
        except ImportError:
            refused["backpack"] = "backpack not installed"
        except Exception as err:
            refused["backpack"] = "refused: " + _reason(err)
    for label, why in refused.items():
        print(f"{label}: {why}", file=sys.stderr)
    return methods


# ----------------------------------------------------------------------------- Opacus
# Opacus's ways to per-sample gradients, one row each: method label -> grad_sample_mode
OPACUS_MODES = {
    "opacus_hooks": "hooks",
    "opacus_functorch": "functorch",
    "opacus_ew": "ew",
    "opacus_ghost": "ghost",
}


def _reason(err: BaseException) -> str:
    """The error's type and the first line of its message, for a table cell."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first[:200]}".rstrip(": ")


def opacus_sq_norms(op: nn.Module, params: list[nn.Parameter], mode: str) -> torch.Tensor:
    """Per-sample squared gradient norms of the whole model after an Opacus backward: from
    ``p.grad_sample`` of every trainable parameter, or ghost clipping's per-sample norms."""
    if mode == "ghost":
        return op.get_norm_sample().square()
    total = None
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            raise RuntimeError(f"no per-sample gradient for a parameter of shape {tuple(p.shape)}")
        if isinstance(gs, list):
            raise RuntimeError("per-sample gradients of several backward passes were stacked")
        sq = gs.reshape(gs.shape[0], -1).square().sum(1)
        total = sq if total is None else total + sq
    return total


def build_opacus(
    base: nn.Module, loss_fn, x, y, refused: dict[str, str], labels: list[str] | None = None
) -> dict[str, Callable]:
    """One step function per Opacus mode, each on its own copy of ``base``. Each runs one trial
    step here (some refusals come only in the forward or backward, e.g. ExpandedWeights meeting
    an operation it has no rule for); a mode that fails is put in ``refused`` with its error.
    Each step returns the per-sample squared norms; ``.model``, ``.op`` and ``.mode`` are kept on
    the function for :func:`opacus_check`. ``labels``: only these modes (default: all)."""
    labels = list(OPACUS_MODES) if labels is None else labels
    if not labels:
        return {}
    try:
        from opacus.grad_sample.utils import wrap_model
    except ImportError:
        refused.update(dict.fromkeys(labels, "opacus not installed"))
        return {}
    methods: dict[str, Callable] = {}
    for label in labels:
        mode = OPACUS_MODES[label]
        model = copy.deepcopy(base)
        params = [p for p in model.parameters() if p.requires_grad]  # tied weights once
        kwargs = {"max_grad_norm": 1.0} if mode == "ghost" else {}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                op = wrap_model(model, mode, loss_reduction="mean", **kwargs)
        except Exception as err:
            refused[label] = "refused: " + _reason(err)
            continue

        def step(op=op, params=params, mode=mode):
            for p in params:
                p.grad = None
                p.grad_sample = None
            loss_fn(op(x), y).backward()
            return opacus_sq_norms(op, params, mode)

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                step()
        except Exception as err:
            refused[label] = "refused: " + _reason(err)
            continue
        step.model, step.op, step.mode = model, op, mode
        methods[label] = step
    return methods


def opacus_coverage(op: nn.Module, model: nn.Module, mode: str) -> dict[str, list[str]]:
    """How Opacus handles each module it hooks: ``"norm rule"`` (ghost clipping's norm without
    per-sample gradients), ``"rule"`` (its per-layer per-sample gradient) or ``"functorch"``
    (torch.func on that module and everything under it: Opacus does not look inside a module
    that owns a trainable parameter it has no rule for). Modules by name, ``""`` the top."""
    out: dict[str, list[str]] = {}
    if mode == "ew" or not hasattr(op, "iterate_submodules"):
        return out
    names = {id(m): n for n, m in model.named_modules()}
    for m in op.iterate_submodules(model):
        if mode == "ghost" and type(m) in getattr(op, "NORM_SAMPLERS", {}):
            how = "norm rule"
        elif mode != "functorch" and type(m) in op.GRAD_SAMPLERS:
            how = "rule"
        else:
            how = "functorch"
        name = names.get(id(m), "?") or "<model>"
        out.setdefault(how, []).append(f"{name} ({type(m).__name__})")
    return out


def _per_param_sq_norms(step: Callable) -> dict[str, torch.Tensor]:
    """After an Opacus step: each trainable parameter's per-sample squared norms, by name."""
    out = {}
    for name, p in step.model.named_parameters():
        if not p.requires_grad:
            continue
        if step.mode == "ghost":
            ns = getattr(p, "_norm_sample", None)
            out[name] = None if ns is None else ns.square()
        else:
            gs = getattr(p, "grad_sample", None)
            out[name] = None if gs is None else gs.reshape(gs.shape[0], -1).square().sum(1)
    return out


def opacus_check(
    factory, loss_fn, x, y, device, labels: list[str] | None = None, rtol: float = 1e-4
) -> dict[str, dict]:
    """Untimed, once per model: does each Opacus mode compute the per-sample squared gradient
    norms that ``ours_norms`` computes? Each mode runs one step on the model the timed methods
    use (same seed, same batch); its norms are compared with ``per_sample_sq_norms`` of
    :class:`GradientStatistics`. Where they differ, each parameter's per-sample squared norm is
    compared with torch.func's (vmap of grad, exact up to rounding) to name the parameters at
    fault, with the module that owns each and, for a convolution whose input is not contiguous
    (channels-last strides, as after timm's LayerNorm2d), that cause: Opacus's conv rule
    unfolds its input with ``as_strided`` as if it were contiguous. Returns, per method label,
    ``{"refused": why}`` or ``max_rel_diff``, ``agrees``, ``differing``, ``coverage``."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    base = factory().to(device)
    refused: dict[str, str] = {}
    steps = build_opacus(base, loss_fn, x, y, refused, labels)
    out: dict[str, dict] = {k: {"refused": v} for k, v in refused.items()}
    if not steps:
        return out

    ours_model = copy.deepcopy(base)
    stats = GradientStatistics(ours_model, inner_products=False)
    with stats.capture():
        loss_fn(ours_model(x), y).backward()
    ours = stats.result().per_sample_sq_norms.detach()
    stats.reset()

    ref_model = copy.deepcopy(base)
    params = {k: v.detach() for k, v in ref_model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in ref_model.named_parameters() if not v.requires_grad}
    buffers = dict(ref_model.named_buffers())

    def one(p, xi, yi):
        out = functional_call(ref_model, (p, frozen, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    per = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    ref = {k: g.reshape(g.shape[0], -1).square().sum(1).detach() for k, g in per.items()}
    del per
    scale = float(ours.max())

    for label, step in steps.items():
        contiguous: dict[str, bool] = {}
        handles = []
        for mname, m in step.model.named_modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):

                def pre(_m, args, mname=mname, seen=contiguous):
                    seen[mname] = args[0].is_contiguous()

                handles.append(m.register_forward_pre_hook(pre))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs = step().detach()
            per_param = _per_param_sq_norms(step)
        finally:
            for h in handles:
                h.remove()
        rel = float(((theirs - ours).abs() / ours.abs().clamp_min(1e-30)).max())
        owners: dict[str, tuple[str, nn.Module]] = {}
        for mname, m in step.model.named_modules():
            for pname, _ in m.named_parameters(recurse=False):
                owners.setdefault(f"{mname}.{pname}" if mname else pname, (mname, m))
        differing = []
        for name, want in ref.items():
            got = per_param.get(name)
            if got is not None and torch.allclose(got, want, rtol=rtol, atol=rtol * 1e-2 * scale):
                continue
            mname, m = owners.get(name, ("?", None))
            if got is None:
                why = "Opacus gave no per-sample gradient"
            elif (
                step.mode in ("hooks", "ghost")
                and type(m) in getattr(step.op, "GRAD_SAMPLERS", {})
                and contiguous.get(mname) is False
            ):
                why = (
                    "input not contiguous (channels-last strides); Opacus's conv rule "
                    "(unfold2d, as_strided) reads it as contiguous"
                )
            else:
                err = float(((got - want).abs() / want.abs().clamp_min(1e-30)).max())
                why = f"max rel. difference {err:.1e} from torch.func"
            differing.append({"param": name, "module": type(m).__name__, "why": why})
        out[label] = {
            "max_rel_diff": rel,
            "agrees": rel <= rtol,
            "differing": differing,
            "coverage": opacus_coverage(step.op, step.model, step.mode),
        }
    return out


def sync_free_capture(factory, loss_fn, x, y, device) -> bool | None:
    """Run one capture under torch.cuda.set_sync_debug_mode('error'); None off CUDA."""
    if device.type != "cuda":
        return None
    torch.manual_seed(0)
    model = factory().to(device)
    stats = GradientStatistics(model)
    loss_fn(model(x), y).backward()  # warm-up outside the check (lazy init may sync)
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with stats.capture():
            loss_fn(model(x), y).backward()
        ok = True
    except RuntimeError as err:
        print(f"sync inside capture: {err}", file=sys.stderr)
        ok = False
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stats.reset()
    return ok


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process (no trimming, no per-block mmap): later
    allocations reuse pages that are already mapped. Returns False where that is not glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(name)
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # from glibc's malloc.h
    big = 1 << 30
    return all(
        libc.mallopt(opt, val) == 1
        for opt, val in ((m_trim_threshold, big), (m_top_pad, 256 << 20), (m_mmap_threshold, big))
    )


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is unavailable)."""
    try:
        import resource
    except ImportError:  # not on Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_steps(
    fn: Callable[[], object], steps: int, device: torch.device, clock: str
) -> tuple[float, float]:
    """Seconds per step (wall time, or this process's CPU time, robust on a shared CPU) and minor
    page faults per step: on CPU, memory the allocator handed back to the OS and takes again
    faults in page by page, which moves step times by milliseconds from run to run."""
    now = time.process_time if clock == "process" else time.perf_counter
    if device.type == "cuda":
        torch.cuda.synchronize()
    f0 = _minor_faults()
    t0 = now()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (now() - t0) / steps, (_minor_faults() - f0) / steps


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    out: dict = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "note": args.note,
            **native.machine(),
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "settings": {
            "rounds": args.rounds,
            "steps": args.steps,
            "warmup": args.warmup,
            "clock": args.clock,
            "keep_freed_memory": bool(getattr(args, "keep_freed_memory", False)),
            "cpu_kernel": native.available(),
        },
        "models": {},
    }
    for pkg in ("opacus", "backpack"):
        with contextlib.suppress(Exception):
            out["versions"][pkg] = __import__(pkg).__version__
    for name, batch in zip(args.models, args.batches, strict=True):
        factory, loss_fn, x, y = make_case(name, batch, device)
        keep = None
        if getattr(args, "methods", None):  # plain (the reference) and ours_norms always run
            keep = {"plain", "ours_norms", *args.methods}
        refused: dict[str, str] = {}
        methods = build_methods(factory, loss_fn, x, y, device, refused, keep)
        if keep is not None:
            methods = {k: f for k, f in methods.items() if k in keep}
            refused = {k: v for k, v in refused.items() if k in keep}
        for fn in methods.values():
            for _ in range(args.warmup):
                fn()
        times: dict[str, list[float]] = {k: [] for k in methods}
        ratios: dict[str, list[float]] = {k: [] for k in methods}
        faults: dict[str, list[float]] = {k: [] for k in methods}
        order = list(methods)
        for r in tqdm(range(args.rounds), desc=f"{name} b={batch}"):
            rot = order[r % len(order) :] + order[: r % len(order)]  # rotate who goes first
            this = {k: time_steps(methods[k], args.steps, device, args.clock) for k in rot}
            for k, (v, f) in this.items():
                times[k].append(v)
                ratios[k].append(v / this["plain"][0])
                faults[k].append(f)
        replay0, t0 = last_resort.replay_seconds(), time.perf_counter()
        for _ in range(args.steps):
            methods["ours_norms"]()
        if device.type == "cuda":
            torch.cuda.synchronize()
        replay_share = (last_resort.replay_seconds() - replay0) / (time.perf_counter() - t0)
        # untimed: do Opacus's per-sample norms equal ours on this model (and if not, why)?
        wanted = [k for k in OPACUS_MODES if k in methods or k in refused]
        check = opacus_check(factory, loss_fn, x, y, device, wanted) if wanted else {}
        out["models"][name] = {
            "batch": batch,
            # methods that could not run on this model: label -> why
            "refused": refused,
            "opacus_check": {k: check[k] for k in wanted if k in check},
            # share of ours_norms' wall time spent replaying modules without a rule (torch.func)
            "replay_share": replay_share if device.type == "cpu" else None,
            "sync_free_capture": sync_free_capture(factory, loss_fn, x, y, device),
            # how ours_norms handled each Linear/Conv layer (adaptive.stats.planner)
            "plan": [
                {
                    "layer": e.layer,
                    "kind": e.kind,
                    "input_shape": list(e.input_shape),
                    "path": e.path,
                    "reason": e.reason,
                    "timings_ms": e.timings_ms,
                }
                for e in methods["ours_norms"].stats.plan()
            ],
            "methods": {
                k: {
                    "median_step_ms": 1e3 * statistics.median(times[k]),
                    "ratio_to_plain_median": statistics.median(ratios[k]),
                    "ratio_to_plain_min": min(ratios[k]),
                    "ratio_to_plain_max": max(ratios[k]),
                    "median_page_faults_per_step": statistics.median(faults[k]),
                }
                for k in methods
            },
        }
    return out


def machine_lines(m: dict) -> list[str]:
    """The CPU, its instruction sets and the kernel build, as Markdown list items."""
    if "cpu" not in m:
        return []
    caps = ", ".join(f"{k}={v}" for k, v in m.get("isa_caps", {}).items())
    return [
        f"- CPU: {m['cpu']} ({m['arch']}); instruction sets: {', '.join(m['instruction_sets'])}; "
        f"torch CPU capability {m['torch_cpu_capability']}",
        f"- compiled kernel builds: {', '.join(m['kernel_builds']) or 'none'}; "
        f"in use: {m['kernel_build_used'] or 'none'}"
        + (f"; instruction sets capped by {caps}" if caps else ""),
    ]


# An AVX2-only machine, emulated on a larger one: torch's ATen, MKL and oneDNN and the kernel
# all limited to AVX2 (each variable is read when its library starts, so the process re-runs).
ISA_ENV = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "ADAPTIVE_NATIVE": "avx2",
    },
}


def reexec_with_isa(isa: str | None) -> None:
    """Re-run this script with the instruction sets of ``isa`` capped (no-op where they are)."""
    if isa is None:
        return
    env = ISA_ENV[isa]
    if all(os.environ.get(k) == v for k, v in env.items()):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})


def per_shape_cli(
    p: argparse.ArgumentParser,
    argv: list[str] | None,
    run_all: Callable[[argparse.Namespace], dict],
    markdown: Callable[[dict], str],
    out: Path,
) -> dict:
    """The command line the per-shape benchmarks share (stats_paths.py, stats_kernel.py): adds
    ``--threads --isa --quick --note --out`` to ``p``, runs ``run_all`` under them (``--isa``
    re-runs the process with the instruction sets capped) and writes ``<out>.json`` and
    ``<out>.md``."""
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--isa", choices=sorted(ISA_ENV), default=None)
    p.add_argument("--quick", action="store_true", help="tiny shapes (the test's dry run)")
    p.add_argument("--note", default="")
    p.add_argument("--out", default=str(out), help="path without suffix")
    args = p.parse_args(argv)
    if argv is None:
        reexec_with_isa(args.isa)
    elif args.isa:
        p.error("--isa re-runs the process: use it from the command line")
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run_all(args)
    write_results(Path(args.out), res, markdown)
    return res


def write_results(out: Path, res: dict, markdown: Callable[[dict], str]) -> None:
    """``<out>.json`` and ``<out>.md`` of a benchmark's results; the Markdown also printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


def _cell(text: str) -> str:
    """Text for a Markdown table cell (no pipes, no line breaks)."""
    return text.replace("|", "/").replace("\n", " ")


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# Gradient statistics overhead",
        "",
        f"- date: {res['date']}",
        f"- machine: {m['platform']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), "
        f"device {m['device']}{' (' + m['gpu'] + ')' if m['gpu'] else ''}",
        *machine_lines(m),
        f"- versions: {', '.join(f'{k} {v}' for k, v in res['versions'].items())}",
        f"- {res['settings']['rounds']} interleaved rounds × {res['settings']['steps']} steps, "
        f"{res['settings']['clock']} clock; "
        "ratio = step time / plain forward+backward in the same round, median (min–max) over rounds",
        "- allocator: "
        + (
            "glibc told to keep freed memory (`--keep-freed-memory`)"
            if res["settings"].get("keep_freed_memory")
            else "glibc defaults (freed memory goes back to the OS)"
        ),
    ]
    if "cpu_kernel" in res["settings"]:
        lines.append(
            "- compiled CPU kernel (`adaptive/stats/_kernels.c`): "
            + ("built, used by `ours_*` on CPU" if res["settings"]["cpu_kernel"] else "not built")
        )
    if m.get("note"):
        lines.append(f"- note: {m['note']}")
    for name, r in res["models"].items():
        lines += [
            "",
            f"## {name}, batch {r['batch']}",
            "",
            "| method | step (ms) | × plain (median) | min–max | page faults / step |",
            "|---|---:|---:|---:|---:|",
        ]
        for k, v in r["methods"].items():
            pf = v.get("median_page_faults_per_step")
            lines.append(
                f"| {k} | {v['median_step_ms']:.2f} | {v['ratio_to_plain_median']:.2f} | "
                f"{v['ratio_to_plain_min']:.2f}–{v['ratio_to_plain_max']:.2f} | "
                f"{'-' if pf is None else f'{pf:.0f}'} |"
            )
        for k, why in r.get("refused", {}).items():
            lines.append(f"| {k} | {_cell(why)} | - | - | - |")
        if r.get("opacus_check"):
            lines += [
                "",
                "Opacus's per-sample squared norms against ours (`per_sample_sq_norms`), one "
                "untimed step; where they differ, the parameters whose norms differ from "
                "torch.func's:",
                "",
                "| method | max rel. difference | same as ours | differing parameters | "
                "modules Opacus hands to torch.func (with all inside them) |",
                "|---|---:|---|---|---|",
            ]
            for k, c in r["opacus_check"].items():
                if "refused" in c:
                    lines.append(f"| {k} | - | {_cell(c['refused'])} | - | - |")
                    continue
                ft = c["coverage"].get("functorch", [])
                ft_text = ", ".join(ft[:6]) + (f" and {len(ft) - 6} more" if len(ft) > 6 else "")
                if OPACUS_MODES.get(k) == "functorch":
                    ft_text = "every trainable module"
                groups: dict[tuple[str, str], list[str]] = {}
                for d in c["differing"]:
                    groups.setdefault((d["module"], d["why"]), []).append(d["param"])
                diff_text = "; ".join(
                    f"{', '.join(names)} ({module}): {why}"
                    for (module, why), names in groups.items()
                )
                lines.append(
                    f"| {k} | {c['max_rel_diff']:.1e} | {'yes' if c['agrees'] else 'no'} | "
                    f"{_cell(diff_text) or '-'} | {_cell(ft_text) or '-'} |"
                )
        if r.get("replay_share") is not None:
            lines.append(
                f"\nTime in last-resort replays (modules without a rule, torch.func): "
                f"{100 * r['replay_share']:.0f}% of an `ours_norms` step (wall clock)."
            )
        if r.get("plan"):
            lines += [
                "",
                "Path per layer (`ours_norms`, `GradientStatistics.plan()`):",
                "",
                "| layer | input | path | why | measured (ms) |",
                "|---|---|---|---|---|",
            ]
            for e in r["plan"]:
                ms = ", ".join(f"{k} {v:.3f}" for k, v in e["timings_ms"].items())
                lines.append(
                    f"| {e['layer']} ({e['kind']}) | {e['input_shape']} | {e['path']} | "
                    f"{e['reason']} | {ms or '-'} |"
                )
        if r["sync_free_capture"] is not None:
            lines.append(
                f"\nsync-free capture (set_sync_debug_mode='error'): {r['sync_free_capture']}"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--models",
        nargs="+",
        default=["cnn", "block"],
        help="model names; 'zoo' stands for "
        + ", ".join(ZOO)
        + "; 'zoo-full' for "
        + ", ".join(ZOO_FULL),
    )
    p.add_argument("--batches", nargs="+", type=int, default=None, help="one per model")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--clock",
        choices=["wall", "process"],
        default=None,
        help="wall time, or process CPU time (default: process on CPU, wall on CUDA)",
    )
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc keeps freed memory (mallopt) for every method: no page-fault lottery",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="only these methods (plain and ours_norms always run); default: all",
    )
    p.add_argument("--note", default="", help="free text stored with the results")
    p.add_argument(
        "--isa",
        choices=sorted(ISA_ENV),
        default=None,
        help="measure as on a CPU with only these instruction sets (torch and the kernel capped)",
    )
    p.add_argument("--out", default=str(RESULTS / "stats_overhead"), help="path without suffix")
    args = p.parse_args()
    reexec_with_isa(args.isa)
    for alias, rows in (("zoo", ZOO), ("zoo-full", ZOO_FULL)):
        if alias in args.models:
            i = args.models.index(alias)
            args.models[i : i + 1] = list(rows)
    defaults = {"cnn": 128, "block": 32, "resnet18gn": 256, "gpt2s": 8, "vitb16": 128}
    defaults.update({k: v[2] for k, v in {**ZOO, **ZOO_FULL}.items()})
    if args.batches is None:
        args.batches = [defaults[m] for m in args.models]
    if len(args.batches) != len(args.models):
        p.error("--batches needs one value per model")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory and not keep_freed_memory():
        p.error("--keep-freed-memory needs glibc")
    if args.clock is None:
        args.clock = "wall" if args.device.startswith("cuda") else "process"
    res = run(args)
    write_results(Path(args.out), res, markdown)


if __name__ == "__main__":
    main()
