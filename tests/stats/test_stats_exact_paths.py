"""Exactness beyond one rule per layer call: subclasses that change the computation, modules
without a rule (per-sample replay), parameters used several times, inputs broadcast over the
batch, several sensors on one model, the rule registry, and the refusals (every number checked
against torch.func per-sample gradients of the whole model, 1e-4 relative)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive.stats import (
    GradientStatistics,
    LayerRule,
    UnsupportedModuleError,
    per_sample_gradients,
    reference_statistics,
    register_rule,
    unregister_rule,
)
from adaptive.stats.registry import find_rule

pytestmark = pytest.mark.filterwarnings("ignore:GradientStatistics. no per-sample rule:UserWarning")


# ---------------------------------------------------------------- subclasses that change forward
class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm subclass whose forward adds the activation."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(super().forward(x)) * 1.5


class ScaledEmbedding(nn.Embedding):
    """Gemma's embedding: the lookup times sqrt(d)."""

    def forward(self, ids: Tensor) -> Tensor:
        return super().forward(ids) * self.embedding_dim**0.5 + 0.1


class PlainLinear(nn.Linear):
    """A subclass that changes nothing: it keeps the Linear rule."""


class ExtraParamLinear(nn.Linear):
    """A subclass with a parameter the Linear rule does not know (used by forward)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.full((self.out_features,), 1.3))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) * self.gain


def test_subclasses_keep_a_rule_only_where_they_compute_the_same():
    assert find_rule(BatchNormAct(3)) is None
    assert find_rule(ScaledEmbedding(5, 4)) is None
    assert find_rule(ExtraParamLinear(2, 2)) is None
    assert find_rule(PlainLinear(2, 2)) is find_rule(nn.Linear(2, 2)) is not None


def test_batchnorm_act_subclass_in_eval_mode_is_exact(exact):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), BatchNormAct(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    ).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(6, 3, 8, 8)
    exact.check(model, x, torch.randint(0, 5, (6,)))


def test_batchnorm_act_subclass_in_training_mode_is_refused_with_the_choices():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct(4), nn.BatchNorm2d(4))
    stats = GradientStatistics(model)
    with pytest.raises(UnsupportedModuleError) as err:
        stats.attach()
    msg = str(err.value)
    for part in ("'1' (BatchNormAct)", "'2' (BatchNorm2d)", "eval mode", "GroupNorm", "groups"):
        assert part in msg


def test_scaling_embedding_and_extra_parameter_subclasses_are_exact(exact):
    torch.manual_seed(0)

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = ScaledEmbedding(11, 6, padding_idx=0)
            self.mid = ExtraParamLinear(6, 6)
            self.head = PlainLinear(6, 11)

        def forward(self, ids: Tensor) -> Tensor:
            return self.head(torch.tanh(self.mid(self.emb(ids))))

    ids = torch.randint(0, 11, (5, 7))
    ids[:, :2] = ids[:, 2:4]

    def loss_fn(out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out.reshape(-1, 11), y.reshape(-1))

    exact.check(LM(), ids, torch.randint(0, 11, (5, 7)), loss_fn)


# ---------------------------------------------------------------- modules without a rule
class TokenModel(nn.Module):
    """A module owning cls_token and pos_embed (used by tensor ops), called with a keyword
    tensor by its parent; a child Linear inside it; layer scale; a functional use of a child's
    weight by the parent (MultiheadAttention-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 6) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 6) * 0.5)
        self.proj = nn.Linear(6, 6)
        self.gamma = nn.Parameter(torch.full((6,), 0.7))
        self.out = nn.Linear(6, 6)  # its weight is only used through F.linear below

    def forward(self, *, tokens: Tensor, scale: float = 1.0) -> Tensor:
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], 1)
        x = x + self.pos_embed
        x = x + self.gamma * torch.tanh(self.proj(x))
        return F.linear(x, self.out.weight, self.out.bias) * scale


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = TokenModel()
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.body(tokens=x, scale=2.0))[:, 0])


def test_module_without_rule_called_with_keywords_is_replayed_exactly(exact):
    torch.manual_seed(0)
    exact.check(Wrapper(), torch.randn(6, 4, 6), torch.randint(0, 3, (6,)))


def test_replay_warns_once_naming_the_module_the_reason_and_the_cost():
    model = Wrapper()
    stats = GradientStatistics(model)
    x, y = torch.randn(6, 4, 6), torch.randint(0, 3, (6,))
    with pytest.warns(
        UserWarning, match=r"'body' \(TokenModel\).*did not run.*one more forward and backward"
    ):
        with stats.capture():
            F.cross_entropy(model(x), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second capture replays without a warning
        with stats.capture():
            F.cross_entropy(model(x), y).backward()


def test_dropout_inside_a_replayed_module_is_refused():
    class Drop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x: Tensor) -> Tensor:
            # an einsum on its parameter: no op-level path (ops.py), so the module is replayed
            return F.dropout(torch.einsum("bi,ij->bj", x, torch.diag(self.w)), 0.5, self.training)

    model = nn.Sequential(nn.Linear(4, 4), Drop())
    stats = GradientStatistics(model)
    with pytest.raises(UnsupportedModuleError, match=r"'1' .*random numbers"):
        with stats.capture():
            model(torch.randn(3, 4)).sum().backward()


class Outside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.inside = True  # b runs; else its weight is used directly (and b does not run)
        self.also = False  # b runs and its weight is used again outside it

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        if self.inside:
            out = self.b(h)
            return out + F.linear(h, self.b.weight) if self.also else out
        return F.linear(h, self.b.weight)


def test_parameter_used_outside_every_module_is_refused_by_name():
    model = Outside()
    stats = GradientStatistics(model)
    model.inside = False  # at the first capture: the check of the uses names the operation
    with pytest.raises(UnsupportedModuleError, match=r"'b\.weight' is used by linear outside"):
        with stats.capture():
            model(torch.randn(2, 3)).sum().backward()
    stats = GradientStatistics(model)
    model.inside = True
    with stats.capture():
        model(torch.randn(2, 3)).sum().backward()
    stats.result()
    model.inside = False  # later: the gradient hook finds no use by a module
    with pytest.raises(UnsupportedModuleError, match=r"'b\.weight' received a gradient"):
        with stats.capture():
            model(torch.randn(2, 3)).sum().backward()


def test_parameter_used_inside_and_outside_its_module_is_refused_at_the_first_capture(exact):
    """Silently wrong before: b's rule saw only its own call, autograd summed both uses."""
    model = Outside()
    model.also = True
    stats = GradientStatistics(model)
    with pytest.raises(UnsupportedModuleError, match=r"'b\.weight' is used by linear outside"):
        with stats.capture():
            model(torch.randn(2, 3)).sum().backward()
    assert not torch.overrides._is_torch_function_mode_enabled()
    model.also = False  # the same sensor, once the model uses it only inside: exact
    x = torch.randn(4, 3)
    with stats.capture():
        model(x).square().sum(1).mean().backward()
    got = stats.result().per_sample_sq_norms
    want = per_sample_gradients(model, lambda out, y: out.square().sum(), x, torch.zeros(4))
    exact.close(
        got, sum(g.flatten(1).square().sum(1) for g in want.values()), "per_sample_sq_norms"
    )


class InPlaceScale(nn.Module):
    """A sequence Linear's output (a view) scaled in place, as timm's LayerScale(inplace=True)
    does after attention: the layer's output hook must still see the output gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        self.register_buffer("g", torch.linspace(0.5, 2.0, 6))

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x).mul_(self.g)
        return self.head((x + h)[:, 0])


@pytest.mark.parametrize("paths", [None, "materialise", "torch"])
def test_a_layer_output_modified_in_place_is_exact_on_every_path(paths, exact):
    torch.manual_seed(0)  # silently wrong before on the torch path (the hook never fired)
    exact.check(InPlaceScale(), torch.randn(5, 7, 6), torch.randint(0, 3, (5,)), paths=paths)


# ---------------------------------------------------------------- several uses, broadcast inputs
@pytest.mark.parametrize("paths", [None, "materialise", "torch"])
def test_layers_applied_twice_and_tied_weights_on_every_path(paths, exact):
    torch.manual_seed(0)

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(9, 8)
            self.conv = nn.Conv1d(8, 8, 3, padding=1)
            self.mix = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)
            self.head = nn.Linear(8, 9, bias=False)
            self.head.weight = self.emb.weight  # tied input and output embeddings

        def forward(self, ids: Tensor) -> Tensor:
            h = self.emb(ids)
            for _ in range(2):  # the convolution, the Linear and the norm each run twice
                h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
                h = self.norm(h + torch.tanh(self.mix(h)))
            return self.head(h)

    def loss_fn(out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out.reshape(-1, 9), y.reshape(-1))

    ids = torch.randint(0, 9, (5, 16))
    exact.check(Shared(), ids, torch.randint(0, 9, (5, 16)), loss_fn, paths=paths)


def test_position_embedding_with_broadcast_ids(exact):
    torch.manual_seed(0)

    class Pos(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(7, 4)
            self.pos = nn.Embedding(6, 4)
            self.head = nn.Linear(4, 7)

        def forward(self, ids: Tensor) -> Tensor:
            where = torch.arange(ids.shape[1]).unsqueeze(0)  # (1, T): broadcast over the batch
            h = self.tok(ids)
            h += self.pos(where)
            return self.head(h)

    def loss_fn(out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out.reshape(-1, 7), y.reshape(-1))

    exact.check(Pos(), torch.randint(0, 7, (4, 6)), torch.randint(0, 7, (4, 6)), loss_fn)


def test_broadcast_output_used_otherwise_is_refused():
    class SumPos(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Embedding(6, 4)

        def forward(self, x: Tensor) -> Tensor:
            p = self.pos(torch.arange(x.shape[1]).unsqueeze(0))
            return x + p.sum(0)  # a reduction over the broadcast axis: not splittable

    model = SumPos()
    stats = GradientStatistics(model)
    with pytest.raises(UnsupportedModuleError, match=r"'pos' ran once for the whole batch.*sum"):
        with stats.capture():
            model(torch.randn(3, 6, 4)).sum().backward()


# ---------------------------------------------------------------- several sensors
@pytest.mark.parametrize("order", ["first", "second"])
@pytest.mark.parametrize("kind", ["cnn", "block", "conv1d"])
def test_two_sensors_on_one_model_are_both_exact(models, kind, order, exact):
    make_model, data_for = models
    model, loss_fn = make_model(kind)
    x, y = data_for(kind, 6)
    ref = reference_statistics(per_sample_gradients(model, loss_fn, x, y))
    a = GradientStatistics(model, per_coordinate=True)
    b = GradientStatistics(model, inner_products=False)
    first, second = (a, b) if order == "first" else (b, a)
    with first.capture(), second.capture():
        loss_fn(model(x), y).backward()
    sa, sb = a.result(), b.result()
    for s in (sa, sb):
        exact.close(s.per_sample_sq_norms, ref["per_sample_sq_norms"])
        for n in ("sum_sq_norms", "grad_sq_norm", "variance", "noise_scale"):
            exact.close(getattr(s, n), ref[n], n)
    exact.close(sa.inner_product_variance, ref["inner_product_variance"])
    for n, v in sa.coordinate_sq_sums.items():
        exact.close(v, ref["coordinate_sq_sums"][n], n)
    for n, p in model.named_parameters():  # autograd's .grad is still the plain mean gradient
        exact.close(p.grad, ref["mean_grads"][n], n)


# ---------------------------------------------------------------- registry
class Scale(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.w


class ScaleRule(LayerRule):
    """The README's worked example."""

    param_names = frozenset({"w"})

    def per_sample(self, module, a, d):
        x, dd = a.float(), d.float()
        return (x * dd).reshape(x.shape[0], -1, x.shape[-1]).sum(1)

    def sq_norms(self, module, a, d, names):
        return self.per_sample(module, a, d).square().sum(1)

    def coordinate_sq(self, module, a, d, names):
        return {"w": self.per_sample(module, a, d).square().sum(0)}

    def dot(self, module, a, d, directions):
        return self.per_sample(module, a, d) @ directions["w"].float()

    def per_sample_params(self, module, a, d, names, out=None):
        return {"w": self.per_sample(module, a, d)}


def test_registered_rule_is_used_and_exact(recwarn, exact):
    torch.manual_seed(0)
    register_rule(Scale, ScaleRule())
    try:
        model = nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Tanh(), Scale(5), nn.Linear(5, 3))
        model[3] = model[1]  # the same Scale twice: its per_sample_params sums the uses
        assert isinstance(find_rule(model[1]), ScaleRule)
        exact.check(model, torch.randn(6, 3, 4), torch.randint(0, 3, (6, 3)), loss_fn=_seq_ce)
        assert not [w for w in recwarn if "no per-sample rule" in str(w.message)]
    finally:
        unregister_rule(Scale)
    assert find_rule(Scale(2)) is None


def _seq_ce(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def test_register_rule_rejects_bad_arguments():
    with pytest.raises(TypeError, match=r"nn\.Module subclass"):
        register_rule(int, ScaleRule())
    with pytest.raises(TypeError, match="LayerRule"):
        register_rule(Scale, object())
    with pytest.raises(ValueError, match="no method"):
        register_rule(Scale, ScaleRule(), methods=("forward", "nope"))


# ---------------------------------------------------------------- fallback with keyword inputs
def test_group_fallback_with_keyword_inputs(exact):
    class KW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, *, x: Tensor) -> Tensor:
            return self.bn(self.fc(x))

    # the sensor is given a holder whose own forward never runs (a LightningModule whose
    # training_step calls its network): the size comes from the first module called
    holder = nn.Module()
    holder.net = KW()
    reference = copy.deepcopy(holder.net)
    stats = GradientStatistics(holder, fallback="groups")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    parts = list(zip(x.split((2, 4)), t.split((2, 4)), strict=True))
    for part, tp in parts:
        with stats.capture():
            ((holder.net(x=part) - tp).square().mean() / 2).backward()
    s = stats.result()
    assert s.method == "groups" and s.batch_size == 6
    means = []  # each micro-batch's mean gradient by plain autograd
    for part, tp in parts:
        reference.zero_grad()
        (reference(x=part) - tp).square().mean().backward()
        means.append(torch.cat([p.grad.reshape(-1) for p in reference.parameters()]).double())
    m = torch.tensor([2.0, 4.0], dtype=torch.float64)
    gbar = (m[0] * means[0] + m[1] * means[1]) / 6
    want = (
        m[0] * means[0].square().sum() + m[1] * means[1].square().sum()
    ) - 6 * gbar.square().sum()
    exact.close(s.grad_sq_norm, gbar.square().sum(), "grad_sq_norm")
    exact.close(s.variance, want, "variance")  # K - 1 = 1


class Ckpt(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.on = True
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        from torch.utils.checkpoint import checkpoint

        h = checkpoint(self.a, x, use_reentrant=self.reentrant) if self.on else self.a(x)
        return self.b(torch.tanh(h))


def test_activation_checkpointing_without_reentrance_is_exact(exact):
    torch.manual_seed(0)
    model = Ckpt(reentrant=False)

    def off() -> None:  # torch.func does not run under checkpointing's saved-tensor hooks
        model.on = False

    exact.check(model, torch.randn(5, 4), torch.randint(0, 3, (5,)), before_reference=off)


def test_reentrant_activation_checkpointing_is_refused():
    model = Ckpt(reentrant=True)
    stats = GradientStatistics(model)
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(UnsupportedModuleError, match=r"'a' ran its forward during backward"):
        with stats.capture():
            model(x).sum().backward()
