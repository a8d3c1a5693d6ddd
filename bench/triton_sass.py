"""Static statistics of the Triton MPS kernels' machine code, without a GPU.

Compiles ``_mps_fwd_kernel`` and ``_mps_bwd_kernel`` (kernels/mps.py) with the
installed Triton for an NVIDIA target (default sm_90, an H100) at the launch
configuration ``otseg/ops/mps/triton.py`` picks for a shape, and prints what
the cubin says: registers and local memory (spills) per thread, shared memory,
and counts of SASS instructions (all of them, barriers, special-function
ops, shuffles). For the forward it also counts the instructions on the path
one ordinary iteration takes (a sweep, no absorption), from the loop's first
block to its back edge: the work every iteration repeats, per thread and per
program.

These are static counts, not timings: they say how much an iteration issues,
not how long it waits. They are what can be checked about the kernels' speed
on a machine without a GPU; ``bench/gpu_profile.py`` times them on one.

    python bench/triton_sass.py [--M 1024] [--N 8] [--dtype float32] [--arch 90]

Needs Triton with its NVIDIA backend (ptxas, nvdisasm and cuobjdump ship in
the wheel); no GPU and no CUDA driver.
"""

import argparse
import collections
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

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
# A branch to a label: "BRA `(.L_x_3)", also with a second predicate, "BRA P3, `(.L_x_3)".
_BRANCH = re.compile(r"\bBRA\s+(?:!?U?P\w+,\s*)?`?\(?(\.L_x_\d+)\)?")
_INSTR = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", re.M)


def _tool(name):
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def _stats(compiled, workdir, tag):
    cubin = os.path.join(workdir, tag + ".cubin")
    with open(cubin, "wb") as fh:
        fh.write(compiled.asm["cubin"])
    sass = subprocess.run([_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True,
                           check=True).stdout
    res = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    ops = collections.Counter(op for _, op in _INSTR.findall(sass))
    return sass, res, ops


# Paths through the forward's loop walked at most (2 to the number of its
# forward branches; 6 for 1024 x 8 with Triton 3.8).
_MAX_PATHS = 1 << 14


def _iteration_path(sass):
    """Instructions a thread issues in one ordinary forward iteration: from the
    loop head (the target of the one backward branch) to the back edge,
    along the path an iteration without absorption takes. Every path
    through the loop's forward branches is walked; the ordinary one is the
    longest with shuffles (the column sums of a sweep) and no exponential
    (MUFU.EX2: a log-domain rebuild of K, which the first iteration and an
    absorption run)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    branches = [(i, m.group(1)) for i, line in enumerate(lines) if (m := _BRANCH.search(line))]
    # The loop's back edge: the longest backward branch before the first EXIT
    # (after it come out-of-line blocks that jump back into the body).
    first_exit = next((i for i, line in enumerate(lines) if re.search(r"\bEXIT\b", line)), len(lines))
    back = [(i, t) for i, t in branches if t in labels and labels[t] < i - 1 and i < first_exit]
    if not back:
        return None
    end, head = max(back, key=lambda b: b[0] - labels[b[1]])
    best = None
    # (line, instructions so far, shuffles, exponentials); a path ends at the back edge.
    stack = [(labels[head], 0, 0, 0)]
    walked = 0
    while stack:
        walked += 1
        if walked > _MAX_PATHS:
            return None  # too many branches to walk every path: no figure rather than a wait
        i, count, shfl, ex2 = stack.pop()
        while i <= end:
            line = lines[i]
            if _INSTR.match(line):
                count += 1
                shfl += "SHFL" in line
                ex2 += "MUFU.EX2" in line
                m = _BRANCH.search(line)
                if m and m.group(1) in labels and i < labels[m.group(1)] <= end:
                    if not re.search(r"@!?P\d+\s+BRA\s", line):
                        i = labels[m.group(1)]  # unconditional: jump
                        continue
                    stack.append((labels[m.group(1)], count, shfl, ex2))  # taken; fall through below
            i += 1
        if shfl and not ex2 and (best is None or count > best):
            best = count
    return best


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
    print("| kernel | warps | registers | local memory B | shared B | instructions | per iteration "
          "(thread / warp-instructions of a program) | barriers | MUFU | SHFL |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    # (name, kernel, constexprs, warps, capped): the forward as the launchers
    # run it eagerly (FWD_HOLD_S, with the cap _fwd_variant gives each warp
    # count), as torch.compile traces it (no cap), and with the scores held.
    cap = tb._fwd_variant(blocks.fwd_warps, traced=False)[1]
    runs = [(f"forward (HOLD_S={tb.FWD_HOLD_S}, maxnreg {cap})", _mps_fwd_kernel,
             dict(HAS_PLAN=False, HOLD_S=tb.FWD_HOLD_S), blocks.fwd_warps, True),
            (f"forward, traced (HOLD_S={tb.FWD_HOLD_S}, no cap)", _mps_fwd_kernel,
             dict(HAS_PLAN=False, HOLD_S=tb.FWD_HOLD_S), blocks.fwd_warps, False),
            ("forward, scores held (HOLD_S=True, no cap)", _mps_fwd_kernel,
             dict(HAS_PLAN=False, HOLD_S=True), blocks.fwd_warps, False),
            ("backward", _mps_bwd_kernel, dict(HAS_DSCORE=True, HAS_DPLAN=False, W_ONE_PASS=blocks.one_pass),
             blocks.bwd_warps, False)]
    with tempfile.TemporaryDirectory() as workdir:
        for name, kernel, flags, default, capped in runs:
            for warps in sorted({default, *(args.warps or ())}):
                consts = dict(flags, BLOCK_M=block_m, NG=block_n // vec, VEC=vec)
                maxnreg = tb._fwd_variant(warps, traced=False)[1] if capped else None
                compiled = compile_mps_kernel(kernel, consts, _TYPES[dtype], acc, warps, args.arch, maxnreg=maxnreg)
                sass, res, ops = _stats(compiled, workdir, f"{name}{warps}")
                per_it = _iteration_path(sass) if name.startswith("forward") else None
                it_text = f"{per_it} / {per_it * warps}" if per_it else "-"
                mark = "" if warps == default else " (not the default)"
                print(f"| {name}{mark} | {warps} | {res.get('REG')} | {res.get('STACK', 0) + res.get('LOCAL', 0)} | "
                      f"{res.get('SHARED')} | {sum(ops.values())} | {it_text} | {ops['BAR']} | {ops['MUFU']} | "
                      f"{ops['SHFL']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
