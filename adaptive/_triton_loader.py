"""Lazy loading of the package's Triton kernel modules (the core never imports triton itself).

Triton decides when a kernel is defined whether it is compiled or interpreted
(``TRITON_INTERPRET=1``), so a kernels module is imported on first use, and a separate copy of
it while the interpreter is on (tests run the kernels on CPU tensors that way).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

_modules: dict[tuple[str, bool], ModuleType | None] = {}


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` is on."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def installed() -> bool:
    """Whether triton is installed (found without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def available(switch: str) -> bool:
    """Triton installed and the environment variable ``switch`` not ``0``."""
    return os.environ.get(switch, "1") != "0" and installed()


def load(package: str, name: str) -> ModuleType | None:
    """The kernels module ``package.name`` (a file beside the package's modules), imported on
    first use; None without triton."""
    interp = interpreting()
    key = (f"{package}.{name}", interp)
    if key in _modules:
        return _modules[key]
    if not installed():
        _modules[key] = None
        return None
    qual = key[0] + ("_interpreted" if interp else "")
    folder = Path(__file__).parent.joinpath(*package.split(".")[1:])
    spec = importlib.util.spec_from_file_location(qual, folder / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[qual] = mod
    spec.loader.exec_module(mod)
    _modules[key] = mod
    return mod
