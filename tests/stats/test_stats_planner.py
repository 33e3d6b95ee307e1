"""The per-shape path choice (``adaptive.stats.planner``): it picks the fastest measured path,
the sensor then runs that path, every path gives the statistics of torch.func per-sample
gradients, and overrides are honoured or refused clearly."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from adaptive.stats import (
    GradientStatistics,
    PathPlanner,
    native,
    per_sample_gradients,
    planner,
    reference_statistics,
)


@pytest.fixture(autouse=True)
def fresh_cache():
    planner.clear_cache()
    yield
    planner.clear_cache()


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


def test_fastest_is_the_least_time_ties_in_path_order():
    assert planner.fastest({"native": 3.0, "materialise": 1.0, "torch": 2.0}) == "materialise"
    assert planner.fastest({"torch": 1.0, "native": 1.0}) == "native"
    with pytest.raises(ValueError, match="at least one"):
        planner.fastest({})


def test_a_fused_path_must_beat_autograds_by_the_margin():
    m = planner.FUSED_MARGIN
    assert planner.decide({"native": 0.95 * m, "torch": 1.0}) == "native"
    assert planner.decide({"native": 1.05 * m, "torch": 1.0}) == "torch"
    assert planner.decide({"native": 1.05 * m, "materialise": 0.5, "torch": 1.0}) == "materialise"
    assert planner.decide({"native": 2.0, "materialise": 1.0}) == "materialise"  # no torch path


class Clock:
    """A made-up clock: each run advances it by that path's made-up cost."""

    def __init__(self, costs: dict[str, float]) -> None:
        self.now, self.costs = 0.0, costs

    def __call__(self) -> float:
        return self.now

    def run(self, path: str):
        def go():
            self.now += self.costs[path]
            return path

        return go


def test_measure_picks_the_fastest_and_caches_it():
    clock = Clock({"native": 5e-3, "materialise": 2e-3, "torch": 3e-3})
    plan = PathPlanner(timer=clock, repeats=2)
    layer, a = torch.nn.Linear(4, 6), torch.zeros(2, 3, 4)
    path, key = plan.choose("fc", layer, a, ("native", "torch", "materialise"), ())
    assert path == "measure" and key is not None
    runs = {p: clock.run(p) for p in ("native", "torch", "materialise")}
    chosen, result = plan.measure("fc", layer, a, key, runs)
    assert chosen == result == "materialise"
    (entry,) = plan.plan()
    assert entry.path == "materialise" and entry.reason == "measured"
    assert entry.timings_ms == pytest.approx({"native": 5.0, "torch": 3.0, "materialise": 2.0})
    # the same shape later, in another planner: no new measurement, the same choice
    other = PathPlanner(timer=clock)
    assert other.choose("fc2", layer, a, ("native", "torch", "materialise"), ()) == (
        "materialise",
        None,
    )
    # a size in the same power-of-two bucket shares the measurement; another is measured anew
    every = ("native", "torch", "materialise")
    assert other.choose("fc2", layer, torch.zeros(2, 4, 4), every, ())[0] == "materialise"
    assert other.choose("fc2", layer, torch.zeros(2, 5, 4), every, ())[0] == "measure"
    # fewer candidates (the kernel switched off): the fastest of those measured
    assert other.choose("fc2", layer, a, ("torch", "materialise"), ())[0] == "materialise"
    assert other.choose("fc2", layer, a, ("native", "torch"), ())[0] == "torch"


def test_measured_again_later_each_path_keeping_its_best_time():
    clock = Clock({"native": 5e-3, "torch": 3e-3})
    plan = PathPlanner(timer=clock, repeats=1)
    layer, a = torch.nn.Linear(4, 6), torch.zeros(2, 3, 4)
    runs = {p: clock.run(p) for p in ("native", "torch")}
    calls, measured = 0, []
    for _ in range(planner.REMEASURE_AT[0] + 2):
        calls += 1
        path, key = plan.choose("fc", layer, a, ("native", "torch"), ())
        if path == "measure":
            measured.append(calls)
            plan.measure("fc", layer, a, key, runs)
            clock.costs = {"native": 1e-3, "torch": 4e-3}  # the machine was busy the first time
    assert measured == [1, planner.REMEASURE_AT[0]]
    assert plan.plan()[0].path == "native"
    assert plan.plan()[0].timings_ms == pytest.approx({"native": 1.0, "torch": 3.0})


def test_off_the_cpu_the_cost_model_decides_without_timing():
    plan = PathPlanner(timer=lambda: pytest.fail("timed off the CPU"))
    layer, a = torch.nn.Linear(4, 6), torch.zeros(2, 3, 4, device="meta")
    assert plan.choose("fc", layer, a, ("materialise", "torch"), ()) == ("materialise", None)
    assert "cost model" in plan.plan()[0].reason


def test_bad_overrides_are_refused_with_the_valid_values(models):
    make_model, data_for = models
    model, _ = make_model("cnn")
    with pytest.raises(ValueError, match="'fast' is not a path; valid: native, materialise, torch"):
        GradientStatistics(model, paths={"0": "fast"})
    with pytest.raises(ValueError, match=r"not Linear/Conv layers of the model; valid: \['0'"):
        GradientStatistics(model, paths={"conv9": "torch"})
    with pytest.raises(TypeError, match="path name or a mapping"):
        GradientStatistics(model, paths=["torch"])
    # the MLP's Linears see one position: only the product form applies
    mlp, loss = make_model("mlp")
    stats = GradientStatistics(mlp, paths={"1": "materialise"})
    x, y = data_for("mlp", 3)
    with pytest.raises(ValueError, match=r"paths\['1'\] = 'materialise' cannot take this call"):
        with stats.capture():
            loss(mlp(x), y).backward()


def _run(model, loss_fn, x, y, stats, steps=2):
    results = []
    for _ in range(steps):
        model.zero_grad()
        with stats.capture():
            loss_fn(model(x), y).backward()
        results.append(stats.result())
    return results


def _check(model, loss_fn, x, y, results, reference):
    ref = reference_statistics(per_sample_gradients(model, loss_fn, x, y))
    for s in results:
        assert rel(s.per_sample_sq_norms, ref["per_sample_sq_norms"]) < 1e-4
        assert rel(s.grad_sq_norm, ref["grad_sq_norm"]) < 1e-4
        assert rel(s.inner_product_variance, ref["inner_product_variance"]) < 1e-4
        for n, v in s.coordinate_sq_sums.items():
            assert rel(v, ref["coordinate_sq_sums"][n]) < 1e-4
    reference.zero_grad()
    loss_fn(reference(x), y).backward()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert rel(p.grad, q.grad) < 1e-5


@pytest.mark.parametrize("kind", ["cnn", "conv1d", "block"])
@pytest.mark.parametrize("path", ["native", "materialise", "torch"])
def test_every_path_gives_the_statistics_of_torch_func(models, kind, path):
    if path == "native" and not native.available():
        pytest.skip("the compiled kernel is not built")
    make_model, data_for = models
    model, loss_fn = make_model(kind)
    reference = copy.deepcopy(model)
    x, y = data_for(kind, 5, seed=2)
    stats = GradientStatistics(model, paths=path, per_coordinate=True)
    _check(model, loss_fn, x, y, _run(model, loss_fn, x, y, stats), reference)
    # the one path wherever it can take the call (a grouped convolution has no kernel path)
    entries = [e for e in stats.plan() if path in e.candidates and len(e.candidates) > 1]
    assert entries and all(e.path == path for e in entries)


@pytest.mark.parametrize("winner", ["native", "materialise", "torch"])
def test_the_sensor_runs_the_path_measured_fastest(models, monkeypatch, winner):
    if winner == "native" and not native.available():
        pytest.skip("the compiled kernel is not built")
    make_model, data_for = models
    model, loss_fn = make_model("cnn")
    reference = copy.deepcopy(model)
    x, y = data_for("cnn", 4, seed=1)
    costs = {p: (1e-3 if p == winner else 4e-3) for p in planner.PATHS}
    clock = Clock(costs)
    ran: list[str] = []
    original = GradientStatistics._fused_values

    def timed(self, path, *args):
        ran.append(path)
        clock.now += costs[path]
        return original(self, path, *args)

    monkeypatch.setattr(GradientStatistics, "_fused_values", timed)
    stats = GradientStatistics(model, per_coordinate=True)
    stats._planner.timer = clock
    results = _run(model, loss_fn, x, y, stats, steps=1)
    measured = {e.layer: e for e in stats.plan()}
    first = measured["0"]  # the 1→4 convolution: every path can take it
    assert first.path == winner and first.reason == "measured"
    assert set(first.candidates) == (
        set(planner.PATHS) if native.available() else {"materialise", "torch"}
    )
    ran.clear()
    results += _run(model, loss_fn, x, y, stats, steps=1)
    # every layer with a choice runs the cheapest of its own candidates (a grouped convolution
    # has no kernel path), and the second step runs it only: once per fused layer, nothing for
    # "torch" (autograd's gradient and the Gram form)
    want = {
        e.layer: planner.decide({p: costs[p] for p in e.candidates})
        for e in stats.plan()
        if len(e.candidates) > 1
    }
    assert {e.layer: e.path for e in stats.plan() if e.layer in want} == want
    assert sorted(ran) == sorted(p for p in want.values() if p != "torch")
    _check(model, loss_fn, x, y, results, reference)


def test_plan_is_readable_and_logged(models, caplog):
    make_model, data_for = models
    model, loss_fn = make_model("block")
    stats = GradientStatistics(model, paths={"fc1": "torch"})
    x, y = data_for("block", 3)
    with caplog.at_level("DEBUG", logger="adaptive.stats.planner"):
        for _ in range(2):
            with stats.capture():
                loss_fn(model(x), y).backward()
    lines = {e.layer: str(e) for e in stats.plan()}
    # each choice logged once (the second step changes nothing)
    assert sorted(r.getMessage() for r in caplog.records) == sorted(lines.values())
    assert lines["fc1"].startswith("fc1 (Linear [3, 16, 16], ")
    assert "torch [override]" in lines["fc1"]
    assert "measured; " in lines["fc2"] and " ms" in lines["fc2"]


def test_plan_cache_file_is_reused_without_measuring(tmp_path, monkeypatch):
    path = tmp_path / "plans" / "cache.json"
    monkeypatch.setenv(planner.CACHE_ENV, str(path))
    clock = Clock({"native": 5e-3, "materialise": 2e-3, "torch": 3e-3})
    layer, a = torch.nn.Linear(4, 6), torch.zeros(2, 3, 4)
    every = ("native", "materialise", "torch")
    first = PathPlanner(timer=clock, repeats=1)
    _, key = first.choose("fc", layer, a, every, ())
    first.measure("fc", layer, a, key, {p: clock.run(p) for p in every})
    saved = json.loads(path.read_text())
    assert saved["header"]["cpu"] == native.machine()["cpu"]
    assert list(saved["plans"].values()) == [
        pytest.approx({"native": 5e-3, "materialise": 2e-3, "torch": 3e-3})
    ]
    # a new process (simulated: the in-memory measurements forgotten) reads the file and
    # neither measures now nor at the calls where a measured shape is measured again
    planner.clear_cache()
    later = PathPlanner(timer=lambda: pytest.fail("measured although the plan was cached"))
    for _ in range(planner.REMEASURE_AT[0] + 1):
        assert later.choose("fc", layer, a, every, ()) == ("materialise", None)
    assert later.plan()[0].reason == "plan cache"
    # a file from another machine or version is ignored
    saved["header"]["cpu"] = "another CPU"
    path.write_text(json.dumps(saved))
    planner.clear_cache()
    assert PathPlanner().choose("fc", layer, a, every, ())[0] == "measure"
    path.write_text("{not json")
    planner.clear_cache()
    with pytest.raises(ValueError, match=r"ADAPTIVE_PLAN_CACHE=.* is not a readable plan cache"):
        PathPlanner().choose("fc", layer, a, every, ())


def test_a_second_process_takes_the_cached_paths(tmp_path):
    """Two real processes with the same ADAPTIVE_PLAN_CACHE: the second measures nothing and
    takes the first one's paths, so its gradients are the same bits."""
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, torch
            from torch import nn
            from adaptive.stats import GradientStatistics
            torch.manual_seed(0)
            model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                                  nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
            x = torch.randn(16, 1, 12, 12)
            stats = GradientStatistics(model)
            with stats.capture():
                model(x).square().mean().backward()
            stats.result()
            print(";".join(f"{e.layer}={e.path}/{e.reason}" for e in stats.plan()))
            torch.save([p.grad for p in model.parameters()], sys.argv[1])
            """
        )
    )
    env = {**os.environ, planner.CACHE_ENV: str(tmp_path / "cache.json")}

    def run(out):
        res = subprocess.run(
            [sys.executable, str(script), str(out)], env=env, capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr
        return dict(item.split("=") for item in res.stdout.strip().split(";"))

    first, second = run(tmp_path / "g1.pt"), run(tmp_path / "g2.pt")
    assert {k: v.split("/")[0] for k, v in first.items()} == {
        k: v.split("/")[0] for k, v in second.items()
    }
    assert all(v.endswith("/plan cache") for k, v in second.items() if k in ("0", "2"))
    g1 = torch.load(tmp_path / "g1.pt", weights_only=True)
    g2 = torch.load(tmp_path / "g2.pt", weights_only=True)
    assert all(torch.equal(p, q) for p, q in zip(g1, g2, strict=True))


@pytest.mark.parametrize(
    "layer",
    [
        torch.nn.Linear(5, 7),
        torch.nn.Conv2d(3, 4, 3, stride=2, padding=1),
        torch.nn.Conv2d(3, 4, 2, padding="same"),  # asymmetric zero padding
        torch.nn.Conv2d(3, 4, 3, dilation=2, padding=2, padding_mode="reflect"),
        torch.nn.Conv2d(4, 6, 3, groups=2, bias=False),
        torch.nn.Conv1d(3, 4, 3, stride=2, padding=1),
        torch.nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular"),
    ],
    ids=["linear", "conv", "conv-same", "conv-reflect", "conv-groups", "conv1d", "conv1d-circ"],
)
def test_the_torch_path_timing_computes_autograds_gradients(layer):
    """``batch_grads``, which stands for autograd's weight gradient when the paths are timed,
    computes exactly that gradient."""
    from adaptive.stats.rules import find_rule

    torch.manual_seed(0)
    x = torch.randn(3, 6, 5) if isinstance(layer, torch.nn.Linear) else None
    if x is None:
        x = torch.randn(3, layer.in_channels, *([9] * (layer.weight.dim() - 2)))
    out = layer(x)
    d = torch.randn_like(out)
    out.backward(d)
    names = frozenset(n for n, _ in layer.named_parameters())
    got = find_rule(layer).batch_grads(layer, x, d, names)
    assert set(got) == names
    for n, p in layer.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-6)


def test_hopeless_and_untried_candidates_cost_two_runs_or_none():
    clock = Clock({"native": 1e-3, "torch": 1.5e-3, "materialise": 10e-3})
    calls: list[str] = []

    def counted(p):
        run = clock.run(p)

        def go():
            calls.append(p)
            return run()

        return go

    plan = PathPlanner(timer=clock, repeats=3)
    layer, a = torch.nn.Linear(4, 6), torch.zeros(2, 3, 4)
    _, key = plan.choose("fc", layer, a, ("native", "torch", "materialise"), ())
    path, _ = plan.measure(
        "fc", layer, a, key, {p: counted(p) for p in ("native", "torch", "materialise")}
    )
    assert path == "native"
    # materialise (10× the fastest warm-up, twice) ran twice; the others 1 + repeats times
    assert calls.count("materialise") == 2 and calls.count("native") == calls.count("torch") == 4
    # a candidate not worth trying (None) counts as infinitely slow, and is not measured again
    _, key = plan.choose("fc", layer, torch.zeros(2, 9, 4), ("native", "torch", "materialise"), ())
    runs = {"native": counted("native"), "torch": counted("torch"), "materialise": None}
    assert plan.measure("fc", layer, torch.zeros(2, 9, 4), key, runs)[0] == "native"
    assert plan.plan()[0].timings_ms["materialise"] == float("inf")
    assert plan.choose(
        "fc", layer, torch.zeros(2, 9, 4), ("native", "torch", "materialise"), ()
    ) == (
        "native",
        None,
    )


def test_a_one_time_cost_in_the_first_run_does_not_drop_the_fastest_path():
    """A path whose first run paid a one-time cost (an inner choice measured once, a workspace)
    gets a second run before the warm-up cutoff drops it, and wins on its real time."""
    clock = Clock({"torch": 2e-3, "materialise": 1e-3})
    first = [True]

    def materialise():
        clock.now += 20e-3 if first[0] else 1e-3  # 20× torch once, then the faster path
        first[0] = False
        return "materialise"

    plan = PathPlanner(timer=clock, repeats=2)
    layer, a = torch.nn.Conv2d(4, 4, 3, groups=4), torch.zeros(2, 4, 6, 6)
    _, key = plan.choose("dw", layer, a, ("materialise", "torch"), ())
    path, result = plan.measure(
        "dw", layer, a, key, {"materialise": materialise, "torch": clock.run("torch")}
    )
    assert path == result == "materialise"
    got = plan.plan()[0].timings_ms
    assert got == pytest.approx({"materialise": 1.0, "torch": 2.0})
