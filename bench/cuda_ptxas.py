"""Static statistics of the CUDA MPS kernels' machine code, without a GPU.

Compiles the kernel files ``csrc/cuda/mps_cuda_forward.cu`` and
``mps_cuda_backward.cu`` (which hold no ATen code, so they need only nvcc and
the CUDA headers) for one architecture with
``-Xptxas -v`` and the extension's nvcc flags, and prints what ptxas reports
for every instantiated kernel: registers, stack frame and spilled bytes per
thread, static shared memory per block, and the blocks of that size the
registers allow on an SM (65536 registers; shared memory and the warp limit
can allow fewer). With ``--sass``, the instructions of each kernel's machine
code instead (``nvdisasm``): in all, special-function (MUFU), shuffles,
barriers, and those of one ordinary forward iteration and of the first
(``bench/sass_paths.py``, as ``bench/triton_sass.py`` counts the Triton
forward's). These are static
counts, not timings; ``bench/gpu_profile.py`` and Nsight Compute
(``bench/gpu_check.sh``) time the kernels on a GPU.

    python bench/cuda_ptxas.py [--arch 90] [--sass]

Needs nvcc (that of CUDA_HOME or CUDA_PATH, else the one on the PATH);
``--sass`` also nvdisasm (the toolkit's, or the one in the Triton wheel).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

from sass_paths import first_iteration_path, functions, iteration_path, op_counts, triton_tool  # bench/sass_paths.py, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# mps_fwd_kernel<8, 128, F32Vec4Rows<8>, 4, true>:
# "_ZN5otseg4cuda12_GLOBAL__N_114mps_fwd_kernelILi8ELi128ENS0_11F32Vec4RowsILi8EEELi4ELb1EEEvNS0_11ForwardArgsE"
_ENTRY = re.compile(r"Compiling entry function '\S*mps_(fwd|bwd)_kernelILi(\d+)ELi(\d+)E(\S*)'")
_MANGLED = re.compile(r"mps_(fwd|bwd)_kernelILi(\d+)ELi(\d+)E(\S*)")
# Each kernel's way of reading and writing rows (its Rows template argument).
_IO = (("F32Vec4", "float32 x4"), ("F32Vec2", "float32 x2"), ("Any", "any"))
# The forward's last template argument, kFull (M = rows x threads, every row
# a pixel; mangled "Lb1E"): its twins are named "<rows>, full tile". The
# backward's float32 x2 twin for N = 6 (F32Vec2Rows6, no kFull) is
# "float32 x2, N = 6".
_FULL = "Lb1E"
_USAGE = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _io(tail):
    """The rows column of a kernel from the mangled name's tail after its
    threads argument."""
    io = next((name for key, name in _IO if key in tail), "?")
    if _FULL in tail:
        return io + ", full tile"
    return io + ", N = 6" if "F32Vec2Rows6" in tail else io


def find_nvcc():
    """nvcc of CUDA_HOME or CUDA_PATH, else the one on the PATH, else None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.path.join(os.environ.get(var, ""), "bin", "nvcc")
        if os.environ.get(var) and os.path.isfile(path):
            return path
    return shutil.which("nvcc")


KERNEL_FILES = ("mps_cuda_forward.cu", "mps_cuda_backward.cu")


def _compile(arch, tmp, nvcc=None, cubin=False):
    """Compile the kernel files for sm_<arch> into ``tmp`` (objects, or
    cubins with ``cubin``) with ptxas -v, both at once as the build does:
    {file name: (ptxas's output, the output file)}."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("no CUDA toolkit with nvcc found (set CUDA_HOME)")
    out = {name: os.path.join(tmp, name + (".cubin" if cubin else ".o")) for name in KERNEL_FILES}
    jobs = {name: subprocess.Popen(
                [nvcc, "-cubin" if cubin else "-c", os.path.join(ROOT, "csrc", "cuda", name), "-o", out[name],
                 f"-I{os.path.join(ROOT, 'csrc')}",
                 "-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-std=c++17",
                 "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                 "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                 f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name in KERNEL_FILES}
    result = {}
    for name, job in jobs.items():
        stdout, stderr = job.communicate()
        if job.returncode != 0:
            raise RuntimeError(f"nvcc failed on {name} ({job.returncode}):\n{stderr[-3000:]}")
        result[name] = (stderr + stdout, out[name])
    return result


def ptxas_report(arch, nvcc=None):
    """ptxas's -v output for the kernel files compiled for sm_<arch>."""
    with tempfile.TemporaryDirectory() as tmp:
        return "".join(report for report, _ in _compile(arch, tmp, nvcc).values())


def find_nvdisasm(nvcc=None):
    """nvdisasm beside nvcc, else the one on the PATH, else the one in the
    Triton wheel (backends/nvidia/bin; a toolkit of nvcc and ptxas alone, as
    on our CPU machine, has none), else None."""
    nvcc = nvcc or find_nvcc()
    beside = os.path.join(os.path.dirname(nvcc), "nvdisasm") if nvcc else ""
    if os.path.isfile(beside):
        return beside
    return shutil.which("nvdisasm") or triton_tool("nvdisasm")


def sass_rows(arch, nvcc=None, with_report=False):
    """One dict per kernel of the files compiled for sm_<arch> to cubins and
    disassembled (nvdisasm): kernel, NP, threads, io, instructions, MUFU,
    SHFL, BAR, and for the forward first_iteration and per_iteration, the
    instructions a thread issues in the first iteration (the log-domain
    rebuild every problem runs) and
    issues in one ordinary iteration (bench/sass_paths.py): a sweep, no
    absorption. with_report: also ptxas's -v output of that compilation,
    as ``ptxas_report`` gives it: (rows, report)."""
    nvdisasm = find_nvdisasm(nvcc)
    if nvdisasm is None:
        raise FileNotFoundError("no nvdisasm found (it ships with the CUDA toolkit)")
    rows, report = [], ""
    with tempfile.TemporaryDirectory() as tmp:
        for ptxas, cubin in _compile(arch, tmp, nvcc, cubin=True).values():
            report += ptxas
            dis = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True)
            if dis.returncode != 0:
                raise RuntimeError(f"nvdisasm failed on {os.path.basename(cubin)} ({dis.returncode}): "
                                   f"{dis.stderr[-2000:]}")
            sass = dis.stdout
            for name, code in functions(sass).items():
                m = _MANGLED.search(name)
                if not m:
                    continue
                ops = op_counts(code)
                fwd = m.group(1) == "fwd"
                rows.append(dict(kernel="forward" if fwd else "backward", NP=int(m.group(2)),
                                 threads=int(m.group(3)), io=_io(m.group(4)),
                                 instructions=sum(ops.values()), MUFU=ops["MUFU"], SHFL=ops["SHFL"],
                                 BAR=ops["BAR"], per_iteration=iteration_path(code) if fwd else None,
                                 first_iteration=first_iteration_path(code) if fwd else None))
    rows.sort(key=lambda r: (r["kernel"] != "forward", r["NP"], r["threads"], r["io"]))
    return (rows, report) if with_report else rows


def parse(report):
    """One dict per kernel: kernel, NP, threads, io, regs, smem, stack, spill_st, spill_ld."""
    rows, cur = [], None
    for line in report.splitlines():
        if (m := _ENTRY.search(line)):
            io = _io(m.group(4))
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
    parser.add_argument("--sass", action="store_true",
                        help="instead, count the machine code's instructions (cubins disassembled by nvdisasm): in "
                             "all, special-function (MUFU), shuffles, barriers, and the forward's ordinary iteration")
    args = parser.parse_args(argv)
    if args.sass:
        return print_sass(args.arch)
    rows = parse(ptxas_report(args.arch))
    if not rows:
        sys.exit("ptxas reported no MPS kernel")
    print(f"csrc/cuda/{', '.join(KERNEL_FILES)} for sm_{args.arch} (ptxas -v); prompts NP is the kernel's bucket "
          "(N <= 4, 8, 16), threads the block size (rows a thread x threads >= M), rows its way of reading and "
          "writing rows (float32 x4: float32 in 16-byte vectors, no plan gradient; float32 x2: in 8-byte vectors, 8 "
          "prompts only; any: every dtype and stride; full tile: the forward's twin for M = rows x threads, "
          "every row a pixel; N = 6: the backward's float32 x2 twin for N = 6)")
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


def print_sass(arch):
    rows = sass_rows(arch)
    if not rows:
        sys.exit("nvdisasm found no MPS kernel")
    print(f"csrc/cuda/{', '.join(KERNEL_FILES)} for sm_{arch}: instructions of each kernel's machine code "
          "(nvdisasm), columns as in the ptxas table; per iteration: what a thread issues in one ordinary forward "
          "iteration (the sweep u = mu / (K v) and the column sums K^T u, no absorption); first iteration: in "
          "the first (the log-domain rebuild of K and the column sums, no check, no absorption; "
          "bench/sass_paths.py)")
    print()
    print("| kernel | NP | threads | rows | instructions | first iteration | per iteration | MUFU | SHFL | BAR |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        it = "-" if r["per_iteration"] is None else r["per_iteration"]
        first = "-" if r["first_iteration"] is None else r["first_iteration"]
        print(f"| {r['kernel']} | {r['NP']} | {r['threads']} | {r['io']} | {r['instructions']} | {first} | {it} | "
              f"{r['MUFU']} | {r['SHFL']} | {r['BAR']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
