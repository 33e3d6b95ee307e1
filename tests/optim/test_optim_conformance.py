"""torch.optim's contract, checked generically for Lamb, Lars and AdaGradNorm on every path.

In the spirit of the ``OptimizerInfo`` checks torch runs on its own optimizers
(``torch/testing/_internal/common_optimizers.py``, ``test/test_optim.py``): state_dict round trips
and resumption, load/step/state_dict hooks, ``add_param_group``, closures, dtypes (fp64, fp32,
bf16, fp16 against a float64 run), sparse and complex errors, deepcopy and pickle, ``zero_grad``,
LR schedulers and tensor learning rates, ``torch.distributed.checkpoint``. Tiny tensors; the
parameter set mixes a matrix, a vector, a 0-dim scalar, a non-contiguous and an empty tensor.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from adaptive.optim import AdaGradNorm, Lamb, Lars

# name -> (class, constructor options); every path of every optimizer
CONFIGS = {
    "lamb-fast": (Lamb, {"lr": 0.05, "weight_decay": 0.01}),
    "lamb-fast-pieces": (Lamb, {"lr": 0.05, "weight_decay": 0.01, "cpu_block": 4}),
    "lamb-foreach": (Lamb, {"lr": 0.05, "weight_decay": 0.01, "cpu_block": 0}),
    "lamb-reference": (Lamb, {"lr": 0.05, "weight_decay": 0.01, "foreach": False}),
    "lars-fast": (Lars, {"lr": 0.5, "weight_decay": 0.01, "trust_coefficient": 0.1}),
    "lars-reference": (
        Lars,
        {"lr": 0.5, "weight_decay": 0.01, "trust_coefficient": 0.1, "foreach": False},
    ),
    "adagrad_norm-fast": (AdaGradNorm, {"lr": 0.2}),
    "adagrad_norm-reference": (AdaGradNorm, {"lr": 0.2, "foreach": False}),
}
# the state each optimizer keeps per parameter (AdaGradNorm: one accumulator, first parameter)
STATE_KEYS = {Lamb: ("step", "exp_avg", "exp_avg_sq"), Lars: ("momentum_buffer",), AdaGradNorm: ()}

configs = pytest.mark.parametrize("config", sorted(CONFIGS))


def build(config, params, **over):
    cls, kw = CONFIGS[config]
    return cls(params, **{**kw, **over})


def make_params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = [
        torch.randn(6, 4, generator=gen, dtype=torch.float64),
        torch.randn(4, generator=gen, dtype=torch.float64),
        torch.randn((), generator=gen, dtype=torch.float64),
        torch.randn(3, 5, generator=gen, dtype=torch.float64).t(),  # non-contiguous
        torch.zeros(0, 3, dtype=torch.float64),  # empty
    ]
    return [b.to(dtype).clone().requires_grad_() for b in base]


def grads_for(params, step, dtype=None):
    gen = torch.Generator().manual_seed(1000 + step)
    return [
        torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype or p.dtype)
        for p in params
    ]


def run(opt, params, steps, start=0):
    for s in range(start, start + steps):
        for p, g in zip(params, grads_for(params, s), strict=True):
            p.grad = g
        opt.step()
    return opt


def assert_same(xs, ys):
    for x, y in zip(xs, ys, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def assert_same_state(a, b):
    """Two optimizers' state_dicts hold equal values (tensors bit for bit, same dtypes)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert sa["state"][k].keys() == sb["state"][k].keys()
        for key, v in sa["state"][k].items():
            w = sb["state"][k][key]
            if isinstance(v, torch.Tensor):
                assert v.dtype == w.dtype, (k, key)
                torch.testing.assert_close(v, w, rtol=0, atol=0)
            else:
                assert v == w


def moved(params, start):
    return max(
        (p.detach().double() - s.detach().double()).abs().max().item()
        for p, s in zip(params, start, strict=True)
        if p.numel()
    )


# -- state_dict ---------------------------------------------------------------------------


@configs
def test_state_dict_round_trip_and_identical_resumption(config):
    a = make_params()
    opt_a = run(build(config, a), a, 6)
    b = make_params()
    opt_b = run(build(config, b), b, 3)
    buf = io.BytesIO()
    torch.save({"opt": opt_b.state_dict(), "params": [p.detach() for p in b]}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # plain tensors and numbers only
    c = make_params(seed=1)
    with torch.no_grad():
        for p, saved in zip(c, ckpt["params"], strict=True):
            p.copy_(saved)
    opt_c = build(config, c, lr=0.9)  # the loaded groups' hyperparameters win
    opt_c.load_state_dict(ckpt["opt"])
    assert opt_c.param_groups[0]["lr"] == CONFIGS[config][1]["lr"]
    assert_same_state(opt_c, opt_b)  # state_dict after load_state_dict is what was saved
    run(opt_c, c, 3, start=3)
    assert_same(a, c)
    assert_same_state(opt_a, opt_c)
    assert moved(a, make_params()) > 1e-3


@configs
def test_can_load_older_state_dict(config):
    """A checkpoint saved before a group option existed (here: without any option but lr, and
    with plain-number step counts) loads and steps with this optimizer's options."""
    a = make_params()
    opt = run(build(config, a), a, 2)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for key in [k for k in group if k not in ("params", "lr")]:
            del group[key]
    for st in old["state"].values():
        if "step" in st:
            st["step"] = st["step"].item()
    b = [p.detach().clone().requires_grad_() for p in a]
    opt_b = build(config, b)
    opt_b.load_state_dict(old)
    assert opt_b.param_groups[0].keys() == opt.param_groups[0].keys()
    run(opt, a, 2, start=2)
    run(opt_b, b, 2, start=2)
    assert_same(a, b)


@configs
def test_loaded_state_does_not_alias_the_source(config):
    a = make_params()
    opt = run(build(config, a), a, 2)
    saved = copy.deepcopy(opt.state_dict())
    b = make_params()
    opt_b = build(config, b)
    opt_b.load_state_dict(saved)
    before = copy.deepcopy(saved)
    run(opt_b, b, 2, start=2)
    for k, st in saved["state"].items():
        for key, v in st.items():
            torch.testing.assert_close(v, before["state"][k][key], rtol=0, atol=0)


@configs
def test_state_dict_hooks(config):
    a = make_params()
    opt = run(build(config, a), a, 1)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))

    def post(o, sd):
        calls.append("post")
        sd["extra"] = 1
        return sd

    opt.register_state_dict_post_hook(post)
    assert opt.state_dict()["extra"] == 1 and calls == ["pre", "post"]


@configs
def test_load_state_dict_hooks_order_and_effects(config):
    cls = CONFIGS[config][0]
    a = make_params(torch.bfloat16)  # so that the optimizer's own dtype handling is involved
    saved = run(build(config, a), a, 2).state_dict()
    b = [p.detach().clone().requires_grad_() for p in a]
    opt = build(config, b)
    calls = []

    def pre_a(o, sd):
        calls.append("pre_a")
        sd = copy.deepcopy(sd)
        sd["param_groups"][0]["lr"] = 0.0125  # a remapped dict is what gets loaded
        return sd

    def pre_b(o, sd):
        calls.append("pre_b")
        assert sd["param_groups"][0]["lr"] == 0.0125  # the dict returned by pre_a

    def post(o):
        calls.append("post")
        # the optimizer's dtypes are already restored when user post-hooks run
        for p in o.param_groups[0]["params"]:
            for key in STATE_KEYS[cls]:
                if key != "step" and key in o.state[p]:
                    assert o.state[p][key].dtype == torch.float32
            if cls is Lamb and o.state[p]:
                o.state[p]["exp_avg"].zero_()

    opt.register_load_state_dict_pre_hook(pre_b)
    opt.register_load_state_dict_pre_hook(pre_a, prepend=True)
    opt.register_load_state_dict_post_hook(post)
    opt.load_state_dict(saved)
    assert calls == ["pre_a", "pre_b", "post"]
    assert opt.param_groups[0]["lr"] == 0.0125
    if cls is Lamb:
        assert all(not opt.state[p]["exp_avg"].any() for p in b if opt.state[p])
    # our temporary hooks are gone again
    assert len(opt._optimizer_load_state_dict_pre_hooks) == 2
    assert len(opt._optimizer_load_state_dict_post_hooks) == 1


# -- step -----------------------------------------------------------------------------------


@configs
def test_step_hooks(config):
    a = make_params()
    opt = build(config, a)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    h1 = register_optimizer_step_pre_hook(lambda o, args, kwargs: calls.append("global_pre"))
    h2 = register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append("global_post"))
    try:
        run(opt, a, 2)
    finally:
        h1.remove()
        h2.remove()
    assert calls == ["global_pre", "pre", "post", "global_post"] * 2


@configs
def test_closure_returns_loss_and_runs_with_grad(config):
    a = make_params()
    opt = build(config, a)
    targets = grads_for(a, 7)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = sum(((p - t) ** 2).sum() for p, t in zip(a, targets, strict=True))
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(15)]
    assert calls == [True] * 15
    assert losses[-1] < losses[0]  # it goes the right way
    assert opt.step() is None  # no closure, no loss


@configs
def test_no_grad_no_step_and_frozen_params_untouched(config):
    a = make_params()
    start = [p.detach().clone() for p in a]
    opt = build(config, a)
    opt.step()  # no gradients at all: nothing happens, no state
    assert_same(a, start)
    assert not any(opt.state.values())
    a[0].grad = torch.ones_like(a[0])
    opt.step()
    assert_same(a[1:], start[1:])  # parameters without a gradient are untouched
    assert not opt.state.get(a[1])
    assert all(isinstance(k, torch.Tensor) for k in opt.state)  # keyed by parameters only
    st = opt.state[a[0]]
    for key in STATE_KEYS[CONFIGS[config][0]]:
        assert key in st


@configs
def test_non_empty_state_after_a_step(config):
    """As torch checks for its own optimizers: every state entry holds something; AdaGradNorm's
    entries all refer to its one accumulator, also after a load, a deepcopy and a pickle."""
    a = make_params()
    opt = run(build(config, a), a, 2)
    assert len(opt.state) == len(a)
    assert all(len(st) > 0 for st in opt.state.values())
    if isinstance(opt, AdaGradNorm):
        b = [p.detach().clone().requires_grad_() for p in a]
        loaded = build(config, b)
        loaded.load_state_dict(opt.state_dict())
        for o in (opt, loaded, copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
            shared = {id(st["b_squared"]) for st in o.state.values()}
            assert len(shared) == 1 and o.b_squared.dtype == torch.float32


@configs
def test_zero_gradients_with_no_decay_leave_params(config):
    cls = CONFIGS[config][0]
    a = make_params()
    start = [p.detach().clone() for p in a]
    opt = build(config, a, **({} if cls is AdaGradNorm else {"weight_decay": 0.0}))
    for _ in range(2):
        for p in a:
            p.grad = torch.zeros_like(p)
        opt.step()
    assert_same(a, start)


@configs
def test_zero_grad(config):
    a = make_params()
    opt = build(config, a)
    for p in a:
        p.grad = torch.ones_like(p)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in a)
    opt.zero_grad()
    assert all(p.grad is None for p in a)


@configs
def test_add_param_group_rejects_then_accepts(config):
    a = make_params()
    opt = build(config, a[:2])
    cls = CONFIGS[config][0]
    q = torch.randn(3, 2, requires_grad=True)
    bad = [
        ({"params": [q], "lr": -0.5}, ValueError),
        ({"params": [q], "lr": float("nan")}, ValueError),
        ({"params": [q, torch.zeros(2, dtype=torch.int32)]}, ValueError),
        ({"params": [q], "lr": "0.1"}, TypeError),
        ({"params": [a[0]]}, ValueError),  # already in a group
        ({"params": {q}}, TypeError),  # a set: no stable order
    ]
    if cls is Lamb:
        bad.append(({"params": [q], "betas": (0.9, 1.5)}, ValueError))
    if cls is Lars:
        bad.append(({"params": [q], "momentum": 0.0, "nesterov": True}, ValueError))
    for group, error in bad:
        with pytest.raises(error):
            opt.add_param_group(group)
        assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [q], "lr": 0.1})
    opt.add_param_group({"params": a[2:]})  # takes the defaults
    assert len(opt.param_groups) == 3
    assert opt.param_groups[2]["lr"] == CONFIGS[config][1]["lr"]
    start = q.detach().clone()
    run(opt, [*a, q], 2)
    assert (q - start).abs().max() > 0


@configs
def test_named_parameters(config):
    model = nn.Linear(3, 2)
    opt = build(config, model.named_parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == ["weight", "bias"]
    model2 = nn.Linear(3, 2)
    opt2 = build(config, model2.named_parameters())
    opt2.load_state_dict(sd)
    assert_same_state(opt2, opt)


# -- dtypes ---------------------------------------------------------------------------------

# against the float64 run after 5 steps (bf16/fp16: the parameter is rounded once per step)
DTYPE_TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2e-2, "atol": 3e-2},
    torch.float16: {"rtol": 3e-3, "atol": 3e-3},
}


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str
)
@configs
def test_dtypes_against_float64(config, dtype):
    ref = make_params(torch.float64)
    run(build(config, ref), ref, 5)
    a = make_params(dtype)
    opt = build(config, a)
    for s in range(5):
        # the same float64 gradients, rounded to the parameter dtype
        for p, g in zip(a, grads_for(a, s, torch.float64), strict=True):
            p.grad = g.to(dtype)
        opt.step()
    want_state = torch.float64 if dtype == torch.float64 else torch.float32
    for p, r in zip(a, ref, strict=True):
        assert p.dtype == dtype and p.is_contiguous() == r.is_contiguous()
        for key in STATE_KEYS[CONFIGS[config][0]]:
            t = opt.state[p][key]
            assert t.dtype == (torch.float32 if key == "step" else want_state), key
            assert t.device == p.device
        if dtype != torch.float64:
            torch.testing.assert_close(p.detach().double(), r.detach(), **DTYPE_TOL[dtype])
    if isinstance(opt, AdaGradNorm):
        assert opt.b_squared.dtype == want_state
    if dtype == torch.float64:  # the fast and reference paths agree in float64 to round-off
        other = config.replace("fast-pieces", "reference").replace("foreach", "reference")
        other = other.replace("fast", "reference")
        b = make_params(torch.float64)
        run(build(other, b), b, 5)
        for p, q in zip(a, b, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert moved(a, make_params(dtype)) > 1e-2


@configs
def test_mixed_dtypes_in_one_group_match_separate_runs(config):
    """fp64, fp32 and bf16 tensors side by side: each as if it were alone (no global coupling
    except AdaGradNorm's shared accumulator, which is skipped here)."""
    if CONFIGS[config][0] is AdaGradNorm:
        pytest.skip("AdaGradNorm couples every tensor through one accumulator")
    dtypes = [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.float32]
    mixed = [p.to(d).detach().requires_grad_() for p, d in zip(make_params(), dtypes, strict=True)]
    alone = [p.detach().clone().requires_grad_() for p in mixed]
    opt = build(config, mixed)
    opts = [build(config, [p]) for p in alone]
    for s in range(3):
        gs = grads_for(mixed, s)
        for p, q, g in zip(mixed, alone, gs, strict=True):
            p.grad, q.grad = g, g.clone()
        opt.step()
        for o in opts:
            o.step()
    assert_same(mixed, alone)


# -- errors ---------------------------------------------------------------------------------


@configs
def test_sparse_gradient_raises_before_any_update(config):
    emb = nn.Embedding(6, 3, sparse=True)
    dense = torch.randn(4, 3, requires_grad=True)
    opt = build(config, [dense, *emb.parameters()])
    dense.grad = torch.ones_like(dense)
    emb(torch.tensor([1, 2])).sum().backward()
    start = dense.detach().clone()
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step()
    assert_same([dense], [start])


@configs
def test_complex_parameters_rejected(config):
    z = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match=r"floating-point parameters, got dtype torch.complex64"):
        build(config, [z])
    opt = build(config, make_params()[:1])
    with pytest.raises(ValueError, match="complex64"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1


# -- copies ---------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@configs
def test_deepcopy_and_pickle_continue_identically(config, how):
    a = make_params()
    opt = run(build(config, a), a, 2)
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    public = {k: v for k, v in vars(opt).items() if not k.startswith("_")}
    for k in ("defaults", *[k for k in public if k not in ("state", "param_groups")]):
        assert getattr(clone, k) == getattr(opt, k), k
    b = clone.param_groups[0]["params"]
    assert all(p is not q for p, q in zip(a, b, strict=True))
    run(opt, a, 2, start=2)
    run(clone, b, 2, start=2)
    assert_same(a, b)
    assert_same_state(opt, clone)
    assert "Parameter Group 0" in repr(clone) and type(opt).__name__ in repr(clone)


# -- learning rates -------------------------------------------------------------------------


@configs
def test_tensor_lr_equals_float_lr(config):
    lr = CONFIGS[config][1]["lr"]
    a, b = make_params(), make_params()
    run(build(config, a), a, 3)
    lr_t = torch.tensor(lr, dtype=torch.float64)
    opt = run(build(config, b, lr=lr_t), b, 3)
    assert opt.param_groups[0]["lr"] is lr_t
    assert_same(a, b)


@pytest.mark.parametrize("tensor_lr", [False, True])
@configs
def test_lr_scheduler_drives_the_step(config, tensor_lr):
    lr = CONFIGS[config][1]["lr"]
    a = make_params()
    opt = build(config, a, lr=torch.tensor(lr) if tensor_lr else lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)
    run(opt, a, 1)
    sched.step()  # lr 0 from here on
    assert float(opt.param_groups[0]["lr"]) == 0.0
    after_one = [p.detach().clone() for p in a]
    run(opt, a, 2, start=1)
    assert_same(a, after_one)  # lr 0: no movement


# -- torch.distributed.checkpoint -----------------------------------------------------------


class _Holder(nn.Module):
    def __init__(self, params):
        super().__init__()
        for i, p in enumerate(params):
            self.register_parameter(f"p{i}", nn.Parameter(p.detach().clone()))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@configs
def test_distributed_checkpoint_round_trip(config, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    params = make_params()[:4]  # DCP stores no empty tensors
    ref = _Holder(params)
    run(build(config, ref.parameters()), list(ref.parameters()), 4)
    model = _Holder(params)
    opt = run(build(config, model.parameters()), list(model.parameters()), 2)
    osd = get_optimizer_state_dict(model, opt)
    assert all(isinstance(k, str) for k in osd["state"])  # parameter names, nothing else
    dcp.save({"model": model.state_dict(), "optim": osd}, checkpoint_id=tmp_path)

    model2 = _Holder(make_params(seed=3)[:4])
    opt2 = build(config, model2.parameters())
    target = {"model": model2.state_dict(), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(target, checkpoint_id=tmp_path)
    model2.load_state_dict(target["model"])
    set_optimizer_state_dict(model2, opt2, target["optim"])
    assert_same_state(opt2, opt)
    run(opt2, list(model2.parameters()), 2, start=2)
    assert_same(list(ref.parameters()), list(model2.parameters()))


# -- devices --------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@configs
def test_cuda_and_mixed_devices_match_cpu(config):
    cpu = make_params()
    run(build(config, cpu), cpu, 3)
    mixed = [
        p.detach().to("cuda" if i % 2 == 0 else "cpu").requires_grad_()
        for i, p in enumerate(make_params())
    ]
    opt = build(config, mixed)
    for s in range(3):
        for p, g in zip(mixed, grads_for(mixed, s, torch.float32), strict=True):
            p.grad = g.to(p.device)
        opt.step()
    for p, q in zip(mixed, cpu, strict=True):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-5, atol=1e-6)
    # state follows each parameter's device; a CUDA state dict loads onto CPU parameters
    for p in mixed:
        for key in STATE_KEYS[CONFIGS[config][0]]:
            if p.numel():
                assert opt.state[p][key].device == p.device
    back = make_params()
    opt_cpu = build(config, back)
    opt_cpu.load_state_dict(opt.state_dict())
    for p in back:
        for key in STATE_KEYS[CONFIGS[config][0]]:
            if key in opt_cpu.state[p]:
                assert opt_cpu.state[p][key].device.type == "cpu"
