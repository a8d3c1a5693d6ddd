"""Static statistics of the CUDA MPS kernels' machine code, without a GPU.

Compiles the kernel files ``csrc/cuda/mps_cuda_forward.cu`` and
``mps_cuda_backward.cu`` (which hold no ATen code, so they need only nvcc and
the CUDA headers) for one architecture with
``-Xptxas -v`` and the extension's nvcc flags, and prints what ptxas reports
for every instantiated kernel: registers, stack frame and spilled bytes per
thread, static shared memory per block, and the blocks of that size the
registers allow on an SM (65536 registers; shared memory and the warp limit
can allow fewer). These are static counts, not timings; ``bench/gpu_profile.py``
and Nsight Compute (``bench/gpu_check.sh``) time the kernels on a GPU.

    python bench/cuda_ptxas.py [--arch 90]

Needs nvcc (that of CUDA_HOME or CUDA_PATH, else the one on the PATH).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# mps_fwd_kernel<8, 128, F32Vec4Rows<8>>: "_ZN5otseg4cuda12_GLOBAL__N_114mps_fwd_kernelILi8ELi128ENS0_11F32Vec4RowsILi8EEEEEvNS0_11ForwardArgsE"
_ENTRY = re.compile(r"Compiling entry function '\S*mps_(fwd|bwd)_kernelILi(\d+)ELi(\d+)E(\S*)'")
# Each kernel's way of reading and writing rows (its Rows template argument).
_IO = (("F32Vec4", "float32 x4"), ("Any", "any"))
_USAGE = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def find_nvcc():
    """nvcc of CUDA_HOME or CUDA_PATH, else the one on the PATH, else None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.path.join(os.environ.get(var, ""), "bin", "nvcc")
        if os.environ.get(var) and os.path.isfile(path):
            return path
    return shutil.which("nvcc")


KERNEL_FILES = ("mps_cuda_forward.cu", "mps_cuda_backward.cu")


def ptxas_report(arch, nvcc=None):
    """ptxas's -v output for the kernel files compiled for sm_<arch>."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("no CUDA toolkit with nvcc found (set CUDA_HOME)")
    report = ""
    with tempfile.TemporaryDirectory() as tmp:
        # Both files at once, as the build compiles them.
        jobs = {name: subprocess.Popen(
                    [nvcc, "-c", os.path.join(ROOT, "csrc", "cuda", name), "-o",
                     os.path.join(tmp, name + ".o"), f"-I{os.path.join(ROOT, 'csrc')}",
                     "-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-std=c++17",
                     "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                     "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                     f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for name in KERNEL_FILES}
        for name, job in jobs.items():
            stdout, stderr = job.communicate()
            if job.returncode != 0:
                raise RuntimeError(f"nvcc failed on {name} ({job.returncode}):\n{stderr[-3000:]}")
            report += stderr + stdout
    return report


def parse(report):
    """One dict per kernel: kernel, NP, threads, io, regs, smem, stack, spill_st, spill_ld."""
    rows, cur = [], None
    for line in report.splitlines():
        if (m := _ENTRY.search(line)):
            io = next((name for key, name in _IO if key in m.group(4)), "?")
            cur = dict(kernel="forward" if m.group(1) == "fwd" else "backward", NP=int(m.group(2)),
                       threads=int(m.group(3)), io=io)
        elif cur is not None and (m := _FRAME.search(line)):
            cur.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        elif cur is not None and (m := _USAGE.search(line)):
            smem = _SMEM.search(line)
            cur.update(regs=int(m.group(1)), smem=int(smem.group(1)) if smem else 0)
            rows.append(cur)
            cur = None
    return sorted(rows, key=lambda r: (r["kernel"] != "forward", r["NP"], r["threads"], r["io"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80: A100, 86: 3090, 90: H100)")
    args = parser.parse_args(argv)
    rows = parse(ptxas_report(args.arch))
    if not rows:
        sys.exit("ptxas reported no MPS kernel")
    print(f"csrc/cuda/{', '.join(KERNEL_FILES)} for sm_{args.arch} (ptxas -v); prompts NP is the kernel's bucket "
          "(N <= 4, 8, 16), threads the block size (rows a thread x threads >= M), rows its way of reading and "
          "writing rows (float32 x4: float32 in 16-byte vectors, no plan gradient; any: every dtype and stride)")
    print()
    print("| kernel | NP | threads | rows | registers | stack B | spill stores B | spill loads B | static smem B "
          "| blocks an SM by registers |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        # Registers are allocated per warp in units of 256 (8 a thread).
        per_warp = -(-r["regs"] * 32 // 256) * 256
        blocks = 65536 // (per_warp * (r["threads"] // 32))
        print(f"| {r['kernel']} | {r['NP']} | {r['threads']} | {r['io']} | {r['regs']} | {r['stack']} | {r['spill_st']} | "
              f"{r['spill_ld']} | {r['smem']} | {blocks} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
