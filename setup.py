"""Build of the optional CPU kernel (``adaptive/stats/_kernels.c``); everything else is in
``pyproject.toml``. Without a C compiler the install goes on and the statistics use torch code.

``-march=native`` targets the installing machine (this is a source install); the kernel is
plain C with vector extensions, so it also builds where that flag means no wide vectors.
"""

import platform

from setuptools import Extension, setup

flags = ["-O3", "-fopenmp", "-ffp-contract=fast"]
if platform.machine() in ("x86_64", "AMD64"):
    flags.append("-march=native")

setup(
    ext_modules=[
        Extension(
            "adaptive.stats._kernels",
            sources=["adaptive/stats/_kernels.c"],
            extra_compile_args=flags,
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
)
