"""The callbacks install as ``adaptive.callbacks``; ``import callbacks`` is a deprecated alias.

The wheel puts nothing named ``callbacks`` at the top of site-packages (a project's own
``callbacks.py`` and the PyPI package ``callbacks`` would clash with it), its console script
points into ``adaptive.callbacks``, and the installed package imports from outside the repository.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "always::DeprecationWarning", "-c", code],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_adaptive_callbacks_imports_without_lightning_in_adaptive(tmp_path):
    code = (
        "import sys, adaptive\n"
        "assert 'lightning' not in sys.modules, 'adaptive imported Lightning'\n"
        "from adaptive.callbacks import AdaptiveBatchSize, SampleClock\n"
        "import adaptive.callbacks.demo.cli as cli\n"
        "print(AdaptiveBatchSize.__module__, callable(cli.main))\n"
    )
    done = _python(code, cwd=tmp_path)  # outside the repository: the installed package
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["adaptive.callbacks.adaptive_batch_size", "True"]
    assert "DeprecationWarning" not in done.stderr


def test_import_callbacks_in_a_checkout_is_a_deprecated_alias():
    code = (
        "import callbacks\n"
        "from callbacks.adaptive_batch_size import AdaptiveBatchSize as A\n"
        "from callbacks.demo.cli import main\n"
        "import callbacks.sample_clock\n"
        "import adaptive.callbacks as new, adaptive.callbacks.demo.cli as cli\n"
        "print(callbacks is new, A is new.AdaptiveBatchSize, main is cli.main,\n"
        "      sys.modules['callbacks.sample_clock'] is new.sample_clock)\n"
    )
    done = _python("import sys\n" + code, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"] * 4  # one copy of every module and class
    assert "DeprecationWarning: `import callbacks` is deprecated" in done.stderr
    assert "adaptive.callbacks" in done.stderr


def test_every_package_is_listed_in_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapped = {"adaptive.callbacks": "callbacks", **config.get("package-dir", {})}
    on_disk = set()
    for base, name in (
        ("adaptive", "adaptive"),
        (mapped["adaptive.callbacks"], "adaptive.callbacks"),
    ):
        for init in (ROOT / base).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / base).parts
            on_disk.add(".".join((name, *rel)))
    assert listed == on_disk
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["adaptive"] == "adaptive.callbacks.demo.cli:main"


@pytest.mark.slow
def test_the_wheel_has_no_top_level_callbacks_and_installs_cleanly(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation"]
        + ["-q", "-w", str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {
        "adaptive",
        wheel.name.split("-")[0] + "-0.1.0.dist-info",
    }
    assert "adaptive/callbacks/adaptive_batch_size.py" in names
    assert "adaptive/callbacks/demo/cli.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert (
        "adaptive = adaptive.callbacks.demo.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    )

    # a clean venv with only the wheel; torch and Lightning come from this interpreter's
    # site-packages on PYTHONPATH (no .pth files run from there, so no editable finder)
    venv = tmp_path / "clean"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    clean_python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(clean_python), "install", "-q"]
        + ["--no-deps", str(wheel)],
        check=True,
        timeout=300,
    )
    site = Path(
        subprocess.run(
            [str(clean_python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    assert (site / "adaptive" / "callbacks" / "__init__.py").is_file()
    assert not (site / "callbacks").exists() and not (site / "callbacks.py").exists()
    code = (
        "import adaptive, adaptive.callbacks as c\n"
        "from adaptive.callbacks import AdaptiveBatchSize\n"
        "print(c.__file__.startswith(sys.argv[1]))\n"
        "try:\n    import callbacks\nexcept ModuleNotFoundError:\n    print('no-callbacks')\n"
    )
    done = subprocess.run(
        [str(clean_python), "-c", "import sys\n" + code, str(site)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": sysconfig.get_path("purelib")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "no-callbacks"]
