"""The build: the C++ extension is there, and its CUDA kernels were compiled
whenever this machine has a CUDA toolkit and a CUDA build of torch (no GPU is
needed to compile them), so a silently dropped CUDA build fails here."""

import os
import shutil

import pytest
import torch

from otseg import _extension

from helpers import import_bench_script


def test_cpu_extension_loaded():
    assert _extension.available, _extension.error
    for op in ("mps_forward", "mps_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"otseg::{op}", "CPU")


@pytest.mark.skipif(
    not (shutil.which("nvcc") and torch.version.cuda) or os.environ.get("OTSEG_NO_CUDA") == "1",
    reason="no CUDA toolkit or a CPU build of torch: the CUDA kernels are not expected",
)
def test_cuda_kernels_compiled_when_a_toolkit_is_present():
    assert _extension.with_cuda, "nvcc and a CUDA torch are present, but otseg._C was built without CUDA"
    for op in ("mps_forward", "mps_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"otseg::{op}", "CUDA")


def test_cuda_kernels_file_holds_no_host_library_code():
    """nvcc compiles only the kernels and their launches: every ATen, c10 or
    torch header (and so every check that throws) belongs in the C++ host
    file, since an exception raised from nvcc-compiled host code crashed the
    process on an H100 (csrc/cuda/mps_cuda.h says why)."""
    import glob
    import re

    root = os.path.join(os.path.dirname(__file__), "..", "csrc", "cuda")
    kernels = glob.glob(os.path.join(root, "*.cu"))
    assert kernels, "no .cu file in csrc/cuda"
    def includes(path, seen):
        """The headers ``path`` includes, following its local ("...") includes."""
        found = []
        for kind, name in re.findall(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', open(path).read(), flags=re.M):
            found.append(name)
            local = os.path.normpath(os.path.join(os.path.dirname(path), name))
            if kind == '"' and os.path.isfile(local) and local not in seen:
                seen.add(local)
                found += includes(local, seen)
        return found

    for path in kernels:
        host = [i for i in includes(path, set()) if i.split("/")[0] in ("ATen", "c10", "torch")]
        assert not host, f"{os.path.basename(path)} includes {host} (directly or through its local headers)"
        assert "TORCH_" not in open(path).read(), f"{os.path.basename(path)} uses a TORCH_ macro"


def test_cuda_block_reduction_emulated_on_the_host(tmp_path):
    """The CUDA forward's block sums and maxima (csrc/cuda/block_reduce.h: a
    reduce-scatter within each warp, then the warps' partials through shared
    memory), compiled for the host with g++ and run by a block of threads
    whose shuffles and barrier are emulated (tests/cuda_block_reduce_host.cpp):
    exact sums and maxima of integers, and bitwise the same result in every
    thread for fractions, for 1 to 33 values and 128 to 1024 threads. The
    lane and index arithmetic is the GPU's; only the policy differs."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    cxx = os.environ.get("CXX", "g++")
    assert shutil.which(cxx), f"no C++ compiler {cxx!r} (the extension needs one too)"
    exe = str(tmp_path / "block_reduce_host")
    subprocess.run([cxx, "-std=c++20", "-O2", "-pthread", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
                    f"-I{os.path.join(here, '..', 'csrc')}", os.path.join(here, "cuda_block_reduce_host.cpp"),
                    "-o", exe], check=True)
    run = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


@pytest.fixture(scope="module")
def cuda_sm90():
    """The CUDA kernel files compiled for sm_90 once (bench/cuda_ptxas.py):
    (ptxas's rows, the machine code's rows)."""
    if not shutil.which("nvcc"):
        pytest.skip("no nvcc: the CUDA kernels cannot be compiled here")
    cuda_ptxas = import_bench_script("cuda_ptxas")
    if cuda_ptxas.find_nvdisasm() is None:
        # The register budgets need no disassembler; the SASS test skips.
        return cuda_ptxas.parse(cuda_ptxas.ptxas_report(90)), None
    sass, report = cuda_ptxas.sass_rows(90, with_report=True)
    return cuda_ptxas.parse(report), sass


@pytest.mark.slow
def test_cuda_kernels_register_budget(cuda_sm90):
    """The kernels' register budgets for sm_90 (bench/cuda_ptxas.py), for both
    ways of reading rows (float32 vectors, any dtype): forward blocks of 128
    threads (every problem up to 1024 pixels) within 168 registers, so three
    fit on an SM (four up to 4 prompts, and for 8 in float32 x4 rows: 128
    registers), with the scores in shared memory and no local memory up to
    8 prompts (16 prompts: at most 16 B of spills); the backward's blocks of
    128 threads likewise three an SM up to 16 prompts (H in shared memory),
    at least four up to 4, and no spills up to 256 threads (2048 pixels up
    to 8 prompts, 1024 with 16).
    The float32 x2 kernels exist for 8 prompts only."""
    rows = cuda_sm90[0]
    by_shape = {(r["kernel"], r["NP"], r["threads"], r["io"]): r for r in rows}
    # Every instantiation the dispatch can launch: 20 a kernel for float32 x4
    # and any rows, 3 for float32 x2 (8 prompts: 128, 256, 512 threads), and
    # the 4 full-tile twins of the float32 forwards of 128 threads (x4 for 4,
    # 8 and 16 prompts, x2 for N = 6), and the float32 x2 backward's twin for
    # N = 6 (128 threads). The float32 x4 forward of 8 prompts and 128
    # threads is budgeted for four blocks an SM: 128 registers, no spills
    # (its twin too). Each kernel once.
    assert len(rows) == len(by_shape) == 51, sorted(by_shape)
    assert {k[1] for k in by_shape if k[3] == "float32 x2"} == {8}, sorted(by_shape)
    assert {k[:3] for k in by_shape if k[3] == "float32 x4, full tile"} == {("forward", n, 128) for n in (4, 8, 16)}
    assert {k[:3] for k in by_shape if k[3] == "float32 x2, full tile"} == {("forward", 8, 128)}
    assert {k[:3] for k in by_shape if k[3] == "float32 x2, N = 6"} == {("backward", 8, 128)}
    for io in ("float32 x4", "float32 x4, full tile", "float32 x2", "float32 x2, full tile", "any"):
        for np_ in (4, 8, 16) if not io.startswith("float32 x2") else (8,):
            r = by_shape["forward", np_, 128, io]
            spill = 0 if np_ <= 8 else 16
            budget = 128 if np_ == 4 or (np_, io[:10]) == (8, "float32 x4") else 168
            assert r["regs"] <= budget and r["stack"] <= spill and r["spill_st"] <= spill, r
            assert r["smem"] >= 4 * np_ * 128 * (8 if np_ <= 8 else 4), f"scores not in shared memory: {r}"
            if io.endswith("full tile"):
                continue  # no backward twin
            for bwd_io in (io, "float32 x2, N = 6") if io == "float32 x2" else (io,):
                r = by_shape["backward", np_, 128, bwd_io]
                assert r["regs"] <= (128 if np_ == 4 else 168), r
                assert r["smem"] >= 4 * np_ * 128 * (8 if np_ <= 8 else 4), f"H not in shared memory: {r}"
    for r in rows:
        if r["kernel"] == "backward" and r["threads"] <= 256:
            assert r["spill_st"] == 0 and r["stack"] == 0, r


@pytest.mark.slow
def test_cuda_sass_counts_each_forwards_ordinary_iteration(cuda_sm90):
    """bench/cuda_ptxas.py --sass: every kernel instantiation found in the
    machine code, and in each forward the ordinary iteration (a sweep: one
    block sum, shuffles, no exponential), a small part of the kernel's code."""
    rows = cuda_sm90[1]
    if rows is None:
        pytest.skip("no nvdisasm (neither the CUDA toolkit's nor the Triton wheel's)")
    by_shape = {(r["kernel"], r["NP"], r["threads"], r["io"]): r for r in rows}
    assert len(rows) == len(by_shape) == 51, sorted(by_shape)
    for r in rows:
        assert r["SHFL"] > 0 and r["MUFU"] > 0 and r["BAR"] > 0, r
        if r["kernel"] == "forward":
            assert r["per_iteration"] is not None and 50 < r["per_iteration"] < r["instructions"] // 4, r
            # The first iteration rebuilds K with exponentials: longer than a sweep.
            assert r["first_iteration"] is not None and r["per_iteration"] < r["first_iteration"] < r["instructions"], r


def test_sass_iteration_path_takes_the_sweep_not_the_rebuild():
    """bench/sass_paths.py on a made-up loop. Its paths: a rebuild (a shuffle
    and an exponential, 11 instructions with the back edge), and a sweep
    (a shuffle, no exponential) of 8 instructions or, skipping two, 6; an
    unconditional branch skips 3 dead instructions. The sweep's longest path
    is counted: 8. (Counting the rebuild would give 11, every branch taken
    6, every branch conditional 11, the shortest path 6.) The first
    iteration, the shortest path with an exponential, is the rebuild: 11.
    functions() splits an nvdisasm listing by function."""
    sass_paths = import_bench_script("sass_paths")
    loop = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   FADD R2, R2, R3 ;
        /*0020*/               @P0 BRA `(.L_x_2) ;
        /*0030*/                   SHFL.BFLY PT, R5, R6, 0x10, 0x1f ;
        /*0040*/                   MUFU.EX2 R4, R4 ;
        /*0050*/                   FMUL R4, R4, R4 ;
        /*0060*/                   FMUL R4, R4, R4 ;
        /*0070*/                   FMUL R4, R4, R4 ;
        /*0080*/                   FMUL R4, R4, R4 ;
        /*0090*/                   FMUL R4, R4, R4 ;
        /*00a0*/                   BRA `(.L_x_4) ;
.L_x_2:
        /*00b0*/                   SHFL.BFLY PT, R5, R6, 0x10, 0x1f ;
        /*00c0*/               @P2 BRA `(.L_x_3) ;
        /*00d0*/                   FADD R5, R5, R6 ;
        /*00e0*/                   FADD R5, R5, R6 ;
.L_x_3:
        /*00f0*/                   BRA `(.L_x_4) ;
        /*0100*/                   FMUL R7, R7, R7 ;
        /*0110*/                   FMUL R7, R7, R7 ;
        /*0120*/                   FMUL R7, R7, R7 ;
.L_x_4:
        /*0130*/               @P1 BRA `(.L_x_1) ;
        /*0140*/                   EXIT ;
"""
    assert sass_paths.iteration_path(loop) == 8
    assert sass_paths.iteration_path(loop.replace("SHFL.BFLY", "FMUL")) is None  # no path with a shuffle
    # @PT: always taken, like no predicate; @!PT: never.
    assert sass_paths.iteration_path(loop.replace("@P2 BRA", "@PT BRA")) == 6
    assert sass_paths.iteration_path(loop.replace("@P2 BRA", "@!PT BRA")) == 8
    assert sass_paths.op_counts(loop)["FMUL"] == 8
    assert sass_paths.first_iteration_path(loop) == 11
    # With an exponential on the sweep's paths too (8 or 6), the shortest: 6.
    assert sass_paths.first_iteration_path(loop.replace("SHFL.BFLY PT, R5, R6, 0x10, 0x1f ;\n        /*00c0*/",
                                                        "MUFU.EX2 R5, R6 ;\n        /*00c0*/")) == 6
    assert sass_paths.first_iteration_path(loop.replace("MUFU.EX2", "FMUL")) is None  # no exponential
    assert sass_paths.first_iteration_path(loop.replace("@P1 BRA `(.L_x_1)", "FMUL R1, R1, R1")) is None  # no loop
    listing = f"        .text.first:\n{loop}        .text.second:\n        /*0000*/                   EXIT ;\n"
    parts = sass_paths.functions(listing)
    assert list(parts) == ["first", "second"]
    assert sass_paths.iteration_path(parts["first"]) == 8 and sass_paths.iteration_path(parts["second"]) is None
