"""Static statistics of the Triton MPS kernels' machine code, without a GPU.

Compiles ``_mps_fwd_kernel`` and ``_mps_bwd_kernel`` (kernels/mps.py) with the
installed Triton for an NVIDIA target (default sm_90, an H100) at the launch
configuration ``otseg/ops/mps/triton.py`` picks for a shape, and prints what
the cubin says: registers and local memory (spills) per thread, shared memory,
and counts of SASS instructions (all of them, barriers, special-function
ops, shuffles). For the forward it also counts the instructions on the path
one ordinary iteration takes (a sweep, no absorption), from the loop's first
block to its back edge: the work every iteration repeats, per thread and per
program; and those of the first iteration (the log-domain rebuild of K every
problem runs), per thread.

These are static counts, not timings: they say how much an iteration issues,
not how long it waits. They are what can be checked about the kernels' speed
on a machine without a GPU; ``bench/gpu_profile.py`` times them on one.

    python bench/triton_sass.py [--M 1024] [--N 8] [--dtype float32] [--arch 90]

Needs Triton with its NVIDIA backend (ptxas, nvdisasm and cuobjdump ship in
the wheel); no GPU and no CUDA driver.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from otseg.kernels.mps import _mps_bwd_kernel, _mps_fwd_kernel
from otseg.kernels.offline import compile_mps_kernel
from otseg.ops.mps import triton as tb
from sass_paths import first_iteration_path, iteration_path, op_counts, triton_tool  # bench/sass_paths.py, beside this script

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def _tool(name):
    return triton_tool(name) or name


def _stats(compiled, workdir, tag):
    cubin = os.path.join(workdir, tag + ".cubin")
    with open(cubin, "wb") as fh:
        fh.write(compiled.asm["cubin"])
    sass = subprocess.run([_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True,
                           check=True).stdout
    res = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    ops = op_counts(sass)
    return sass, res, ops


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--M", type=int, default=1024)
    parser.add_argument("--N", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80: A100, 86: 3090, 90: H100)")
    parser.add_argument("--warps", type=int, nargs="*", help="also compile with these warp counts")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    wide = dtype == torch.float64
    acc = "fp64" if wide else "fp32"
    blocks = tb._blocks(args.M, args.N, wide)
    block_m, block_n = blocks.block_m, blocks.block_n
    vec = tb._vector_width(torch.empty(1, args.M, args.N, dtype=dtype), args.N)
    print(f"triton {triton.__version__}, sm_{args.arch}, [M={args.M}, N={args.N}] {args.dtype} scores "
          f"(contiguous): BLOCK_M={block_m}, NG={block_n // vec}, VEC={vec}")
    print()
    print("| kernel | warps | registers | local memory B | shared B | instructions | first iteration (thread) | "
          "per iteration (thread / warp-instructions of a program) | barriers | MUFU | SHFL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    # (name, kernel, constexprs, warps, capped): the forward as the launchers
    # run it eagerly (FWD_HOLD_S, with the cap _fwd_variant gives each warp
    # count), as torch.compile traces it (no cap), and with the scores held.
    cap = tb._fwd_variant(blocks.fwd_warps, traced=False)[1]
    # No plan, and the full tile's flags where the shape fills it, as launch_forward.
    fwd = dict(HAS_PLAN=False, **tb.full_tile_flags(args.M, args.N, blocks))
    runs = [(f"forward (HOLD_S={tb.FWD_HOLD_S}, maxnreg {cap})", _mps_fwd_kernel,
             dict(fwd, HOLD_S=tb.FWD_HOLD_S), blocks.fwd_warps, True),
            (f"forward, traced (HOLD_S={tb.FWD_HOLD_S}, no cap)", _mps_fwd_kernel,
             dict(fwd, HOLD_S=tb.FWD_HOLD_S), blocks.fwd_warps, False),
            ("forward, scores held (HOLD_S=True, no cap)", _mps_fwd_kernel,
             dict(fwd, HOLD_S=True), blocks.fwd_warps, False),
            ("backward", _mps_bwd_kernel, dict(HAS_DSCORE=True, HAS_DPLAN=False, W_ONE_PASS=blocks.one_pass),
             blocks.bwd_warps, False)]
    with tempfile.TemporaryDirectory() as workdir:
        for name, kernel, flags, default, capped in runs:
            for warps in sorted({default, *(args.warps or ())}):
                consts = dict(flags, BLOCK_M=block_m, NG=block_n // vec, VEC=vec)
                maxnreg = tb._fwd_variant(warps, traced=False)[1] if capped else None
                compiled = compile_mps_kernel(kernel, consts, _TYPES[dtype], acc, warps, args.arch, maxnreg=maxnreg)
                sass, res, ops = _stats(compiled, workdir, f"{name}{warps}")
                per_it = iteration_path(sass) if name.startswith("forward") else None
                it_text = f"{per_it} / {per_it * warps}" if per_it else "-"
                first = first_iteration_path(sass) if name.startswith("forward") else None
                mark = "" if warps == default else " (not the default)"
                print(f"| {name}{mark} | {warps} | {res.get('REG')} | {res.get('STACK', 0) + res.get('LOCAL', 0)} | "
                      f"{res.get('SHARED')} | {sum(ops.values())} | {first or '-'} | {it_text} | {ops['BAR']} | {ops['MUFU']} | "
                      f"{ops['SHFL']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
