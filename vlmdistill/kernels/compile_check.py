"""Compile the Triton kernels for a CUDA architecture without a GPU (ahead-of-time, to PTX and cubin).

The interpreter that runs the kernels on a CPU is more permissive than the compiler (it accepts, for example,
non-constexpr globals); this check catches what only the compiler rejects, and reports whether the loops' loads
were software-pipelined (async copies in the compiled IR). It needs TRITON_INTERPRET unset:

    python -m vlmdistill.kernels.compile_check --arch 90
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
_FLOAT_ARGS = ("qk_scale", "sm_scale")
_INT_POINTERS = ("TileStats", "PosQ", "PosS", "PosO", "PosK", "SegQ", "SegS", "SegO", "SegK")
_FLAG_POINTERS = ("ValidS", "ValidO", "ValidK")
_FP32_POINTERS = ("Lse", "Delta")


def _signature(fn, constexprs: dict, dtype: str) -> dict:
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _INT_POINTERS:
            signature[name] = "*i32"
        elif name in _FLAG_POINTERS:
            signature[name] = "*i1"
        elif name in _FP32_POINTERS:
            signature[name] = "*fp32"
        elif name[0].isupper():
            signature[name] = f"*{_TRITON_TYPES[dtype]}"
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def variants():
    """(kernel name, dtype, constexprs, num_warps, num_stages) covering dtypes, head dims and mask flags."""
    import torch

    from .triton_kv_share import default_backward_config, default_forward_config, forward_config_candidates

    for dtype, head_dim, group, has_seg, has_valid in (
            ("bfloat16", 64, 3, False, True), ("bfloat16", 64, 3, True, False), ("float16", 32, 1, True, True),
            ("float32", 128, 4, False, False), ("bfloat16", 128, 2, True, True), ("float32", 16, 2, True, True)):
        precision = "ieee" if dtype == "float32" else "tf32"
        common = dict(GROUP=group, HEAD_DIM=head_dim, HAS_SEG=has_seg, CAST_FP32=False, DOT_PRECISION=precision)
        torch_dtype = getattr(torch, dtype)
        fwd = default_forward_config(head_dim, torch_dtype)
        bwd = default_backward_config(head_dim, torch_dtype)
        yield ("_two_source_fwd_kernel", dtype, dict(common, BLOCK_M=fwd.block_m, BLOCK_N=fwd.block_n,
               HAS_VALID_SHARED=has_valid, HAS_VALID_OWN=has_valid, COUNT_TILES=False), fwd.num_warps,
               fwd.num_stages)
        yield ("_two_source_bwd_dkv_kernel", dtype, dict(common, BLOCK_M=bwd.block_m, BLOCK_N=bwd.block_n,
               HAS_VALID=has_valid), bwd.num_warps, bwd.num_stages)
        yield ("_two_source_bwd_dq_kernel", dtype, dict(common, BLOCK_M=bwd.block_m, BLOCK_N=bwd.block_n,
               HAS_VALID_SHARED=has_valid, HAS_VALID_OWN=has_valid), bwd.num_warps, bwd.num_stages)
    for config in forward_config_candidates(64):
        yield ("_two_source_fwd_kernel", "bfloat16", dict(
            GROUP=3, HEAD_DIM=64, HAS_SEG=False, CAST_FP32=False, DOT_PRECISION="tf32", BLOCK_M=config.block_m,
            BLOCK_N=config.block_n, HAS_VALID_SHARED=True, HAS_VALID_OWN=True, COUNT_TILES=True),
            config.num_warps, config.num_stages)


def compile_all(arch: int, quick: bool = False) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels this check compiles")
    import triton
    from triton.backends.compiler import GPUTarget

    from . import triton_kv_share

    results = []
    todo = list(variants())
    for name, dtype, constexprs, num_warps, num_stages in (todo[:3] if quick else todo):
        fn = getattr(triton_kv_share, name)
        start = time.perf_counter()
        source = triton.compiler.ASTSource(fn=fn, signature=_signature(fn, constexprs, dtype), constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
        results.append({"kernel": name, "dtype": dtype, "head_dim": constexprs["HEAD_DIM"],
                        "block_m": constexprs["BLOCK_M"], "block_n": constexprs["BLOCK_N"], "num_warps": num_warps,
                        "num_stages": num_stages, "shared_bytes": compiled.metadata.shared,
                        "cubin_bytes": len(compiled.asm["cubin"]),
                        # > 0 when the software pipeliner turned the loop's K/V (or Q/dO) loads into async copies
                        "async_copies": compiled.asm["ttgir"].count("async_copy_global_to_local"),
                        "seconds": round(time.perf_counter() - start, 2)})
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an integer (90 = H100)")
    parser.add_argument("--quick", action="store_true", help="only the first dtype/head-dim variant")
    args = parser.parse_args(argv)
    for row in compile_all(args.arch, args.quick):
        print(" ".join(f"{k}={v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
