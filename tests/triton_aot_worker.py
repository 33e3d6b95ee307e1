"""Compile the package's Triton kernels for a Hopper GPU (sm_90) without one: Triton's front end,
its MLIR passes and the bundled ptxas run on the CPU. The interpreter tests check the kernels'
arithmetic; this checks that the compiled form builds (and that bf16 products use wgmma).

    python tests/triton_aot_worker.py stats|lamb
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)


def compile_one(fn, signature: dict, constexprs: dict) -> str:
    sig = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=TARGET)
    return kernel.asm["ptx"]


def stats() -> None:
    from adaptive.stats import _triton_kernels as k

    strides = {"sxb": "i64", "sxt": "i32", "sxn": "i32", "sdb": "i64", "sdt": "i32", "sdo": "i32"}
    for dt, c in (("bf16", tl.bfloat16), ("fp16", tl.float16), ("fp32", tl.float32)):
        prec = {"COMPUTE": c, "DOT": c, "PREC": "ieee"}
        ops = {"x_ptr": "*fp32", "d_ptr": f"*{dt}"}
        ptx = compile_one(
            k.gram_sq_norms_kernel,
            {**ops, "out_ptr": "*fp32", "T": "i32", "N": "i32", "O": "i32", **strides},
            {"BIAS": True, "BT": 64, "BK": 32, **prec},
        )
        assert ("wgmma" in ptx) == (dt != "fp32"), f"gram {dt}: tensor-core use unexpected"
        sizes = {"B": "i32", "T": "i32", "N": "i32", "O": "i32", "per_split": "i32"}
        outs = {"norms_ptr": "*fp32", "sums_ptr": "*fp32", "coord_ptr": "*fp32"}
        for sums in (False, True):
            ptx = compile_one(
                k.materialised_kernel,
                {**ops, **outs, **sizes, **strides},
                {"SUMS": sums, "COORD": sums, "BO": 64, "BN": 64, "BT": 32, **prec},
            )
            assert ("wgmma" in ptx) == (dt != "fp32"), f"materialised {dt}"
        print("stats kernels compiled for sm_90:", dt)


def lamb() -> None:
    from adaptive.optim import _lamb_kernels as k

    tables = {
        "table_ptr": "*i64",
        "owner_ptr": "*i32",
        "start_ptr": "*i64",
        "numel_ptr": "*i64",
        "bc1_ptr": "*fp32",
        "bc2_ptr": "*fp32",
    }
    for x in (tl.float32, tl.bfloat16, tl.float16):
        for clip in (False, True):
            for adapt in (False, True):
                compile_one(
                    k.lamb_pass1_kernel,
                    {
                        **tables,
                        "clip_ptr": "*fp32",
                        "norms_ptr": "*fp32",
                        **dict.fromkeys(("lr", "beta1", "beta2", "eps", "wd_in", "shrink"), "fp32"),
                    },
                    {"X": x, "G": x, "HAS_CLIP": clip, "ADAPT": adapt, "BLOCK": 4096},
                )
        names = ("lr", "eps", "wd_in", "shrink", "phi_lo", "phi_hi", "ratio_lo", "ratio_hi")
        compile_one(
            k.lamb_pass2_kernel,
            {**tables, "norms_ptr": "*fp32", **dict.fromkeys(names, "fp32")},
            {"X": x, "G": x, "BLOCK": 4096},
        )
        print("LAMB kernels compiled for sm_90:", x)


if __name__ == "__main__":
    {"stats": stats, "lamb": lamb}[sys.argv[1]]()
