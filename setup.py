"""Build of the optional CPU kernel (``adaptive/stats/_kernels.c``); everything else is in
``pyproject.toml``. Without a C compiler the install goes on and the statistics use torch code.

The kernel is built once per instruction set, each a separate extension with its own register
blocking (``ADAPTIVE_TARGET_*`` in the C file), never with ``-march=native``: a build is then the
same on every machine of an architecture and can ship in a wheel, and
``adaptive/stats/native.py`` loads, at run time, the best build this CPU runs (AVX-512, AVX2 or
the baseline on x86-64; the baseline, which is NEON, on 64-bit Arm). Each build is optional: a
compiler that lacks a target's flags skips that target only.
"""

import platform

from setuptools import Extension, setup

COMMON = ["-O3", "-fopenmp", "-ffp-contract=fast"]
MACHINE = platform.machine().lower()

# Flags per build (tests/stats/test_stats_native_targets.py builds a test harness with each)
X86_TARGETS = {
    "avx512": [
        "-mavx512f",
        "-mavx512vl",
        "-mavx512bw",
        "-mavx512dq",
        "-mavx2",
        "-mfma",
        "-mprefer-vector-width=512",
        "-DADAPTIVE_TARGET_AVX512",
    ],
    "avx2": ["-mavx2", "-mfma", "-DADAPTIVE_TARGET_AVX2"],
    "generic": [],  # x86-64 baseline (SSE2)
}
ARM_TARGETS = {"generic": []}  # aarch64: NEON is part of the baseline
TARGETS = X86_TARGETS if MACHINE in ("x86_64", "amd64") else ARM_TARGETS

setup(
    ext_modules=[
        Extension(
            f"adaptive.stats._kernels_{name}",
            sources=["adaptive/stats/_kernels.c"],
            extra_compile_args=COMMON + flags,
            extra_link_args=["-fopenmp"],
            libraries=["m"],  # sqrtf
            optional=True,
        )
        for name, flags in TARGETS.items()
    ]
)
