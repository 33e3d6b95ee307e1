"""Which way the sensor computes a layer's per-sample norms and batch gradient, per shape.

A Linear layer on sequences or a convolution can be handled three ways, with the same results:

- ``"native"``: the compiled CPU kernel (:mod:`adaptive.stats.native`) builds each sample's
  weight gradient in registers and returns ``Σ_i G_i`` and ``‖G_i‖²`` in one pass; the sum
  replaces autograd's weight gradient;
- ``"materialise"``: the per-sample gradients ``G_i`` (a batched matmul, an im2col copy for a
  convolution) are written out, and their sum replaces autograd's weight gradient;
- ``"torch"``: autograd computes the weight gradient, and the norms come from the Gram form
  ``Σ_{s,t} (x_s·x_t)(δ_s·δ_t)`` or a grouped matmul (Goodfellow 2015; Li et al. 2022).

Which is fastest depends on the shape, the thread count and the machine (a kernel tuned on an
AVX-512 CPU lost 3-5x to torch on an AVX2 one), so on CPU the sensor does not guess: the first
time a shape is seen it runs every candidate on the real operands (one warm-up, then the best of
``repeats`` interleaved timings) and keeps the fastest for the process; it measures again at the
shape's 16th and 256th call, each path keeping its best time, so that a first measurement on a
busy machine does not decide for the whole run. With ``ADAPTIVE_PLAN_CACHE=<file.json>`` the
measurements are kept in that file and later processes on the same machine (a run resumed from
a checkpoint, a rerun) use them without measuring: the same paths, so the same bits. Without it,
two processes may choose differently where paths are close in time; their statistics and
gradients then agree to float32 rounding, not bit for bit (pin them with ``paths=`` for that).
On CUDA nothing is timed (timing needs a host synchronisation): the layer rule's cost model
(``materialising_pays``) decides. ``GradientStatistics(paths={layer: path})`` overrides the
choice per layer, and ``GradientStatistics.plan()`` shows every choice with its reason.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "CACHE_ENV",
    "FUSED_MARGIN",
    "PATHS",
    "PathPlanner",
    "PlanEntry",
    "clear_cache",
    "decide",
    "fastest",
]

PATHS = ("native", "materialise", "torch")
_log = logging.getLogger(__name__)

# What was measured in this process: shape key -> {path: seconds}. Shared by every sensor, so
# a second GradientStatistics on the same model measures nothing again.
_MEASURED: dict[tuple, dict[str, float]] = {}
# Calls per key; at these counts the key is measured again and each path keeps its best time,
# so one measurement taken while the machine was busy (the first step, data workers starting)
# does not decide for the whole run.
_USES: dict[tuple, int] = {}
REMEASURE_AT = (16, 256)


# ADAPTIVE_PLAN_CACHE=<file.json> keeps the measurements across processes: a later run on the
# same machine (a resumed one, a rerun) reads them and measures nothing, so it takes the same
# paths and computes the same bits. The file is tied to the CPU, the kernel builds and the
# library versions; a file written elsewhere is ignored (and replaced).
CACHE_ENV = "ADAPTIVE_PLAN_CACHE"
_FROM_DISK: set[tuple] = set()  # keys read from the file: final, never measured again
_loaded: str | None = None


def _cache_header() -> dict[str, object]:
    from adaptive import __version__
    from adaptive.stats import native

    m = native.machine()
    return {
        "adaptive": __version__,
        "torch": torch.__version__,
        **{k: m[k] for k in ("cpu", "arch", "instruction_sets", "kernel_builds")},
    }


def _load_disk_cache() -> None:
    """Read ``ADAPTIVE_PLAN_CACHE`` once per path (if set and written on this machine)."""
    global _loaded
    path = os.environ.get(CACHE_ENV)
    if not path or path == _loaded:
        return
    _loaded = path
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        raise ValueError(f"{CACHE_ENV}={path!r} is not a readable plan cache: {e}") from e
    if not isinstance(saved, dict) or saved.get("header") != _cache_header():
        _log.info("%s=%s was written on another machine or version: ignored", CACHE_ENV, path)
        return
    keys = {repr(k): k for k in _MEASURED}
    for text, timings in saved.get("plans", {}).items():
        key = keys.get(text, ("disk", text))
        _MEASURED[key] = {p: float(t) for p, t in timings.items() if p in PATHS}
        _FROM_DISK.add(key)


def _save_disk_cache() -> None:
    path = os.environ.get(CACHE_ENV)
    if not path:
        return
    plans = {(k[1] if k[0] == "disk" else repr(k)): v for k, v in _MEASURED.items()}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"header": _cache_header(), "plans": plans}, f, indent=1)
    os.replace(tmp, path)  # whole or not at all, for a reader in another process


def _lookup(key: tuple) -> tuple[dict[str, float], bool]:
    """(timings measured for ``key``, whether they came from the disk cache)."""
    _load_disk_cache()
    disk = ("disk", repr(key))
    if disk in _MEASURED:  # read before this process built the key: adopt it under its tuple
        _MEASURED[key] = _MEASURED.pop(disk)
        _FROM_DISK.discard(disk)
        _FROM_DISK.add(key)
    return _MEASURED.get(key, {}), key in _FROM_DISK


def clear_cache() -> None:
    """Forget every measurement (the next capture of each shape measures again; a plan cache
    file named by ``ADAPTIVE_PLAN_CACHE`` is read again)."""
    global _loaded
    _MEASURED.clear()
    _USES.clear()
    _FROM_DISK.clear()
    _loaded = None


def fastest(timings: Mapping[str, float]) -> str:
    """The path with the least time; ties go to the earlier path in ``PATHS`` order."""
    if not timings:
        raise ValueError("fastest() needs at least one timing")
    return min(timings, key=lambda p: (timings[p], PATHS.index(p)))


# A fused path ("native", "materialise") must beat autograd's own ("torch") by this factor to be
# chosen: timed inside backward it looks 15-25% cheaper against the torch path than whole steps
# show (costs outside the hook: the forward without weight gradients, the extra autograd node),
# which made a 256→256 3×3 convolution on 4×4 inputs take the kernel (13% faster in the hook) at
# 1.39× the torch path's step. Near-ties keep the plain path.
FUSED_MARGIN = 0.8
# Candidates whose warm-up run takes more than this many times the fastest one's are not
# timed again (see PathPlanner.measure).
WARM_CUTOFF = 3.0


def decide(timings: Mapping[str, float]) -> str:
    """The path to take: the fastest, but autograd's own (``"torch"``) unless a fused path is
    faster than it by more than ``1 - FUSED_MARGIN``."""
    best = fastest(timings)
    if best != "torch" and "torch" in timings and timings[best] > FUSED_MARGIN * timings["torch"]:
        return "torch"
    return best


@dataclass(frozen=True)
class PlanEntry:
    """One layer's choice: ``path`` for calls with input shape ``input_shape``, and why."""

    layer: str
    kind: str
    input_shape: tuple[int, ...]
    threads: int
    path: str
    reason: str
    candidates: tuple[str, ...]
    timings_ms: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        times = ", ".join(f"{p} {t:.3f} ms" for p, t in self.timings_ms.items())
        return (
            f"{self.layer} ({self.kind} {list(self.input_shape)}, {self.threads} threads): "
            f"{self.path} [{self.reason}{'; ' + times if times else ''}]"
        )


class PathPlanner:
    """Chooses a path per layer call (see the module docstring).

    Args:
        overrides: layer name -> path (one of ``PATHS``); a path the call cannot take raises at
            that layer's first capture. Or one path for every layer, used wherever it can take
            the call (the others are chosen as without an override).
        repeats: timed runs per candidate after one warm-up run.
        timer: the clock (seconds); tests feed made-up timings through it.
    """

    def __init__(
        self,
        overrides: Mapping[str, str] | str | None = None,
        repeats: int = 3,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.everywhere: str | None = None
        if isinstance(overrides, str):
            if overrides not in PATHS:
                raise ValueError(f"paths = {overrides!r} is not a path; valid: {', '.join(PATHS)}")
            self.everywhere, overrides = overrides, None
        if overrides is not None and not isinstance(overrides, Mapping):
            raise TypeError(
                "paths must be a path name or a mapping of layer names to path names, got "
                f"{type(overrides).__name__}"
            )
        overrides = dict(overrides or {})
        for name, path in overrides.items():
            if path not in PATHS:
                raise ValueError(
                    f"paths[{name!r}] = {path!r} is not a path; valid: {', '.join(PATHS)}"
                )
        if not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be a positive int, got {repeats!r}")
        self.overrides = overrides
        self.repeats = repeats
        self.timer = timer
        self.entries: dict[str, PlanEntry] = {}
        self._memo: dict[tuple, tuple[str, tuple | None]] = {}
        self._last_key: tuple | None = None

    @staticmethod
    def key(module: nn.Module, a: Tensor, options: tuple) -> tuple:
        """What the speed of a call depends on: the layer's kind and geometry, the input's
        shape (each size rounded up to a power of two, so a batch that grows or sequences of
        varying length are measured a few times, not at every new size), dtype and memory
        order, the thread count, the kernel build and what is computed."""
        from adaptive.stats import native

        return (
            type(module).__name__,
            module.extra_repr(),
            tuple(1 << max(0, n - 1).bit_length() for n in a.shape),
            a.is_contiguous(),
            a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last),
            a.dtype,
            torch.get_num_threads(),
            native.target(),
            options,
        )

    def choose(
        self, name: str, module: nn.Module, a: Tensor, candidates: tuple[str, ...], options: tuple
    ) -> tuple[str, tuple | None]:
        """``(path, key)``: the path for this call, or ``"measure"`` with the key to record the
        measurement under (the caller times the candidates in backward, where the operands are).

        Every layer asks at every step, so a call like the previous one of that layer is
        answered from a memo (a few µs, not the ~50 µs of building the key)."""
        fast = (
            name,
            a.shape,
            a.dtype,
            a.device.type,
            a.is_contiguous(),
            candidates,
            torch.get_num_threads(),
            os.environ.get("ADAPTIVE_NATIVE"),
            options,
        )
        hit = self._memo.get(fast)
        if hit is not None:
            path, key = hit
            if key is None:  # an override, the only path or the cost model: fixed
                return path, None
            uses = _USES[key] = _USES.get(key, 0) + 1
            if key in _MEASURED and (uses not in REMEASURE_AT or key in _FROM_DISK):
                return path, None
            del self._memo[fast]  # measured again, or the cache was cleared
            return "measure", key
        path, key = self._choose(name, module, a, candidates, options)
        if path != "measure":
            self._memo[fast] = (path, self._last_key)
        return path, key

    def _choose(
        self, name: str, module: nn.Module, a: Tensor, candidates: tuple[str, ...], options: tuple
    ) -> tuple[str, tuple | None]:
        self._last_key = None
        kind = type(module).__name__
        shape = tuple(a.shape)
        threads = torch.get_num_threads()

        def entry(path: str, reason: str, timings: Mapping[str, float] | None = None) -> str:
            ms = {p: t * 1e3 for p, t in (timings or {}).items()}
            self._record(PlanEntry(name, kind, shape, threads, path, reason, candidates, ms))
            return path

        wanted = self.overrides.get(name)
        if wanted is not None:
            if wanted not in candidates:
                raise ValueError(
                    f"paths[{name!r}] = {wanted!r} cannot take this call ({kind} on input "
                    f"{list(shape)}, {a.device.type}); valid here: {', '.join(candidates)}"
                )
            return entry(wanted, "override"), None
        if self.everywhere in candidates:
            return entry(self.everywhere, "override (every layer)"), None
        if len(candidates) == 1:
            return entry(candidates[0], "only path"), None
        if a.device.type != "cpu":
            return entry(candidates[0], "cost model (nothing is timed off the CPU)"), None
        key = self._last_key = self.key(module, a, options)
        known, from_disk = _lookup(key)
        timings = {p: t for p, t in known.items() if p in candidates}
        uses = _USES[key] = _USES.get(key, 0) + 1
        if set(timings) != set(candidates) or (uses in REMEASURE_AT and not from_disk):
            return "measure", key
        return entry(decide(timings), "plan cache" if from_disk else "measured", timings), None

    def measure(
        self,
        name: str,
        module: nn.Module,
        a: Tensor,
        key: tuple,
        runs: Mapping[str, Callable[[], object] | None],
    ) -> tuple[str, object]:
        """Time every candidate ``runs[path]()`` (interleaved, best of ``repeats`` after a
        warm-up), record the timings under ``key`` and return ``(fastest path, its result)``."""
        # warm-up (workspaces, caches), itself timed: a candidate more than WARM_CUTOFF times
        # slower than the fastest (twice) is not timed again (on a large network the repeats of hopeless
        # paths made the first step cost a minute); a run given as None is not worth trying
        # at all (a per-sample gradient too large for one chunk) and counts as infinitely slow
        results: dict[str, object] = {}
        best = dict.fromkeys(runs, float("inf"))
        for p, run in runs.items():
            if run is not None:
                t0 = self.timer()
                results[p] = run()
                best[p] = self.timer() - t0
        lo = min(best.values())
        # a first run past the cutoff may have paid a one-time cost (a workspace's pages, an
        # inner choice a rule measures once, e.g. ConvRule's grouped weight gradient): one more
        # run before the path is dropped
        for p, run in runs.items():
            if run is not None and best[p] > WARM_CUTOFF * lo:
                t0 = self.timer()
                results[p] = run()
                best[p] = min(best[p], self.timer() - t0)
        timed = [p for p, run in runs.items() if run is not None and best[p] <= WARM_CUTOFF * lo]
        for _ in range(self.repeats):
            for p in timed:
                t0 = self.timer()
                results[p] = runs[p]()
                best[p] = min(best[p], self.timer() - t0)
        before = _MEASURED.get(key, {})
        best = {p: min(t, before.get(p, t)) for p, t in best.items()}
        _MEASURED[key] = {**before, **best}
        _FROM_DISK.discard(key)
        _save_disk_cache()
        self._memo.clear()  # the choice for this shape may have changed
        path = decide(best)
        ms = {p: t * 1e3 for p, t in best.items()}
        self._record(
            PlanEntry(
                name,
                type(module).__name__,
                tuple(a.shape),
                torch.get_num_threads(),
                path,
                "measured",
                tuple(runs),
                ms,
            )
        )
        return path, results[path]

    def _record(self, entry: PlanEntry) -> None:
        """Keep a layer's latest choice; log it (``adaptive.stats.planner``, debug) when it is
        new or changed."""
        before = self.entries.get(entry.layer)
        if before is None or (before.path, before.input_shape) != (entry.path, entry.input_shape):
            _log.debug("%s", entry)
        self.entries[entry.layer] = entry

    def plan(self) -> list[PlanEntry]:
        return list(self.entries.values())
