"""Backend "triton" (kernels/mps.py, otseg/ops/mps/triton.py) against the
float64 reference: forward values, plans and iteration counts, dtypes, strides,
per-problem stopping, robustness, output coverage, the implicit backward,
opcheck and torch.compile.

Every comparison runs on one of two devices:

- ``interp`` (marked ``interpreter``): CPU tensors in Triton's interpreter, in
  a process started with ``TRITON_INTERPRET=1``. A plain pytest run reaches
  them through ``test_interpreter_subset_in_own_process``, which runs this file
  again with ``-m interpreter`` in such a process (Triton's own CI recipe).
- ``cuda`` (marked ``gpu``): CUDA tensors with compiled kernels, where a GPU
  is present (skipped otherwise).

Without a GPU, ``test_kernels_compile_for_sm90`` still compiles both kernels
for an H100 with the installed Triton (front end, LLVM and ptxas), which the
interpreter cannot check.
"""

import math
import os
import re
import subprocess
import sys

import pytest
import torch

from otseg import kernels
from otseg.ops import backends, mps, resolve_backend, sinkhorn
from otseg.ops.mps import triton as tb

from helpers import (
    BATCH_LAYOUTS,
    HALF_DTYPES,
    assert_batch_dims_match_flattened,
    assert_close_report,
    assert_extreme_result_close,
    batch_layout_scores,
    clip_scores,
    dtype_id,
    eager_and_compiled,
    extreme_scores,
    hard_scores,
    import_bench_script,
    max_abs_err,
    reference_per_problem,
    unit_roundoff,
)

INTERPRET = tb.interpreter_requested()
REF = dict(backend="reference")
TRI = dict(backend="triton")
FIXED = dict(eps=0.05, max_iter=10, tol=0.0)


@pytest.fixture(
    params=[
        pytest.param("cpu", marks=pytest.mark.interpreter, id="interp"),
        pytest.param("cuda", marks=pytest.mark.gpu, id="cuda"),
    ]
)
def device(request):
    if request.param == "cpu":
        if not INTERPRET:
            pytest.skip("runs in the TRITON_INTERPRET=1 process of test_interpreter_subset_in_own_process")
        if not tb.available:
            pytest.skip(f"triton is unavailable: {tb.error}")
        assert tb.interpreted, "TRITON_INTERPRET=1 is set but the kernels were compiled, not interpreted"
    else:
        if INTERPRET:
            pytest.skip("this process runs Triton's interpreter (CPU tensors only)")
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        if not tb.available:
            pytest.skip(f"triton is unavailable: {tb.error}")
    return torch.device(request.param)


def sizes(*mn):
    return [pytest.param(M, N, id=f"M{M}xN{N}") for M, N in mn]


def float_tolerances(dtype, gt_score, gt_plan_mn):
    """(score atol, plan*M*N atol) against the float64 reference on the same
    rounded input: rounding only in float64; float32 compute (also for half
    inputs) within a few 1e-6 of the largest value (a GPU's exp2 and log2
    approximations included)."""
    scale = max(1.0, float(gt_score.abs().max()))
    plan_scale = max(1.0, float(gt_plan_mn.abs().max()))
    if dtype == torch.float64:
        return 1e-10 * scale, 1e-10 * plan_scale
    return 2e-5 * scale, 2e-5 * plan_scale


def half_output_tolerances(dtype, M, N):
    """(rtol, plan*M*N atol) added for half outputs: one rounding of the float32
    result (at most one unit in the last place: Triton's interpreter rounds to
    bfloat16 towards zero), and float16's subnormal spacing for plan entries of
    order 1/(M N)."""
    rtol = 2 * unit_roundoff(dtype)
    plan_atol = 2.0**-24 * M * N if dtype == torch.float16 else 0.0
    return rtol, plan_atol


# ------------------------------------------------ the interpreter, own process


@pytest.mark.slow
@pytest.mark.watchdog(960)  # the subprocess's own limit, 900 s, and a margin
def test_interpreter_subset_in_own_process():
    if INTERPRET:
        pytest.skip("this is the interpreter process")
    if not kernels.available:
        pytest.skip(f"triton is unavailable: {kernels.error}")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "pytest", "-m", "interpreter", "-q", "-rfEs", "-p", "no:cacheprovider",
           os.path.abspath(__file__)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"interpreter run failed (exit {proc.returncode}):\n{out[-8000:]}"
    assert " passed" in out and " failed" not in out, out[-4000:]


def test_backend_status_without_gpu_or_interpreter():
    if INTERPRET or torch.cuda.is_available():
        pytest.skip("only meaningful on a machine without GPU and interpreter")
    status = {s.name: s for s in backends()}["triton"]
    assert not status.available
    assert status.devices == ("cuda",)
    assert "TRITON_INTERPRET" in status.reason or not kernels.available
    assert resolve_backend("auto", "cpu") != "triton"


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Both kernels through Triton's whole CUDA pipeline (to a cubin for sm_90)
    without a GPU, at the benchmark shape and at a tiny one where Triton makes
    M = N = 1 compile-time constants."""
    if INTERPRET:
        pytest.skip("the interpreter process holds interpreted kernels")
    if not kernels.available:
        pytest.skip(f"triton is unavailable: {kernels.error}")
    from otseg.kernels.mps import _mps_bwd_kernel, _mps_fwd_kernel
    from otseg.kernels.offline import compile_mps_kernel

    def compile_kernel(kernel, dtype, acc, consts, warps):
        compiled = compile_mps_kernel(kernel, consts, dtype, acc, warps)
        assert compiled.asm["cubin"], f"{kernel.__name__} {dtype}: no cubin"
        return compiled

    # Forward: (dtype, compute type, BLOCK_M, NG, VEC, warps, compile-time ones).
    for dtype, acc, bm, ng, vec, warps, ones in [
        ("fp32", "fp32", 1024, 2, 4, 8, {}),  # contiguous, N = 8: vector loads
        ("fp32", "fp32", 1024, 2, 4, 4, {"EVEN_M": True, "EVEN_N": True}),  # 1024 x 8, the full tile's masks
        ("fp32", "fp32", 1024, 8, 1, 8, {}),  # any strides
        ("fp32", "fp32", 1024, 8, 1, 4, {"EVEN_N": True}),  # any strides, N = 8
        ("fp32", "fp32", 1024, 8, 1, 4, {"EVEN_M": True, "EVEN_N": True}),  # any strides, the full tile (unmasked)
        ("bf16", "fp32", 1024, 4, 2, 8, {}),
        ("fp64", "fp64", 1024, 4, 2, 16, {}),
        ("fp64", "fp64", 16, 2, 1, 1, {"M": 1, "N": 1, "stride_sn": 1}),
    ]:
        for hold in (True, False):
            compiled = compile_kernel(_mps_fwd_kernel, dtype, acc,
                                      dict(HAS_PLAN=True, BLOCK_M=bm, NG=ng, VEC=vec, HOLD_S=hold, **ones), warps)
        if vec > 1:
            # Each thread holds whole pixel rows (all N prompts): the row
            # reductions of every iteration stay in registers.
            assert f"sizePerThread = [1, 1, {vec}], threadsPerWarp = [1, 32, 1]" in compiled.asm["ttgir"], (
                f"forward {dtype} VEC={vec}: prompts spread over threads")
    # Backward: (dtype, compute type, BLOCK_M, NG, VEC, warps, compile-time ones).
    for dtype, acc, bm, ng, vec, warps, ones in [
        ("fp32", "fp32", 1024, 2, 4, 16, {}),
        ("fp32", "fp32", 1024, 8, 1, 16, {}),
        ("bf16", "fp32", 1024, 4, 2, 16, {}),
        ("fp64", "fp64", 16, 2, 1, 1, {"M": 1, "N": 1, "stride_sn": 1}),
    ]:
        for one_pass in (True, False):
            compiled = compile_kernel(_mps_bwd_kernel, dtype, acc, dict(HAS_DSCORE=True, HAS_DPLAN=True, BLOCK_M=bm,
                                                                        NG=ng, VEC=vec, W_ONE_PASS=one_pass, **ones),
                                      warps)
            if one_pass and bm == 1024:
                # The N x N weights sit whole in every thread: no [BN, BN]
                # tensor spread over threads.
                assert "tensor<8x8xf32, #blocked" not in compiled.asm["ttgir"], f"backward {dtype}: W spread"


def _small_kernel_configs(hold_scores):
    """Both kernels (after the skips of a test that compiles them offline)
    with compile-time arguments of a small problem, one warp each:
    [(kernel, constexprs)]."""
    if INTERPRET:
        pytest.skip("the interpreter process holds interpreted kernels")
    if not kernels.available:
        pytest.skip(f"triton is unavailable: {kernels.error}")
    from otseg.kernels.mps import _mps_bwd_kernel, _mps_fwd_kernel

    return [(_mps_fwd_kernel, dict(HAS_PLAN=True, BLOCK_M=64, NG=8, VEC=1, HOLD_S=hold_scores)),
            (_mps_bwd_kernel, dict(HAS_DSCORE=True, HAS_DPLAN=True, BLOCK_M=64, NG=8, VEC=1, W_ONE_PASS=True))]


def test_kernels_compile_from_inductors_copy_of_their_source(tmp_path):
    """Under torch.compile, Inductor compiles a copy of each kernel's source
    with the globals it references, below its own header of imports
    (torch/_inductor/codegen/wrapper.py). The kernels' fast-math switch and
    constants must survive that copy, and ``libdevice`` must resolve there
    (the copy does not import it; the header's ``libdevice`` does): compiled
    for sm_90 from the copy, the float32 kernels use the fast division (and
    the forward the fast log), the float64 ones neither."""
    configs = _small_kernel_configs(hold_scores=False)
    import importlib.util

    from torch._inductor.codegen.triton import TritonKernel
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code

    from otseg.kernels.offline import compile_mps_kernel

    for kernel, consts in configs:
        src = user_defined_triton_kernel_transitive_closure_source_code(kernel)
        assert "_FAST_MATH = tl.constexpr(True)" in src, src[:2000]
        path = tmp_path / f"copy_{kernel.__name__}.py"
        path.write_text(TritonKernel.gen_common_triton_imports() + "\n@triton.jit\n" + src)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        copy = getattr(module, kernel.__name__)
        for acc in ("fp32", "fp64"):
            ptx = compile_mps_kernel(copy, consts, acc, acc, num_warps=1, float_args="fp64").asm["ptx"]
            # (The backward takes no logarithm.)
            fast = "div.approx" in ptx and ("lg2.approx" in ptx or kernel.__name__ == "_mps_bwd_kernel")
            assert fast == (acc == "fp32"), f"{kernel.__name__} {acc}: fast math {fast}"


def test_kernels_compile_with_float64_scalars_as_inductor_passes_them():
    """Under torch.compile, Inductor passes eps and tol as float64 (the first
    GPU run of the compile test failed on it: a loop-carried float32 value
    became float64); the kernels must compile with either."""
    configs = _small_kernel_configs(hold_scores=True)
    from otseg.kernels.offline import compile_mps_kernel

    for kernel, consts in configs:
        for acc in ("fp32", "fp64"):
            compiled = compile_mps_kernel(kernel, consts, acc, acc, num_warps=1, float_args="fp64")
            assert compiled.asm["cubin"], f"{kernel.__name__} {acc}: no cubin"


def test_sass_statistics_script_reads_the_forward_iteration():
    """bench/triton_sass.py (static SASS statistics without a GPU) finds the
    forward's loop and counts the instructions of an ordinary iteration and
    of the first."""
    if INTERPRET:
        pytest.skip("the interpreter process holds interpreted kernels")
    if not kernels.available:
        pytest.skip(f"triton is unavailable: {kernels.error}")
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "triton_sass.py")
    out = subprocess.run([sys.executable, script, "--M", "256", "--N", "6"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.stdout.splitlines()
            if line.startswith("| forward") or line.startswith("| backward")}
    eager = f"forward (HOLD_S={tb.FWD_HOLD_S}, maxnreg {tb.FWD_MAXNREG})"  # one warp: the cap fits
    traced = f"forward, traced (HOLD_S={tb.FWD_HOLD_S}, no cap)"
    held = "forward, scores held (HOLD_S=True, no cap)"
    assert set(rows) == {eager, traced, held, "backward"}, out.stdout
    # The cap holds; rereading the scores takes fewer registers than holding them.
    assert int(rows[eager][3]) <= tb.FWD_MAXNREG, out.stdout
    assert int(rows[traced][3]) < int(rows[held][3]), out.stdout
    per_thread, per_program = rows[eager][8].split("/")
    # 256 x 8 (N = 6, VEC = 2) in one warp.
    assert 100 < int(per_thread) < 2000 and int(per_program) == int(per_thread) * int(rows[eager][2])
    # The first iteration rebuilds K with exponentials: longer than a sweep.
    assert int(per_thread) < int(rows[eager][7]) < int(rows[eager][6]), out.stdout
    assert "VEC=2" in out.stdout


def test_host_overhead_script_compares_the_glues():
    """bench/host_overhead.py (host work of a triton-backend call, in the
    interpreter with no-op launches) runs and reports both autograd glues."""
    if INTERPRET:
        pytest.skip("it starts its own interpreter process")
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "host_overhead.py")
    out = subprocess.run([sys.executable, script, "--calls", "40", "--rounds", "1"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| C++") or line.startswith("| Python")]
    assert len(rows) == 2 and all(float(v) > 0 for row in rows for v in row.strip("| ").split("|")[1:]), out.stdout


def test_operator_bodies_trace_on_fake_tensors_with_symbolic_sizes(monkeypatch):
    """On a GPU the Triton operators are triton_ops: torch.compile runs their
    Python bodies on fake tensors (no data pointer) with possibly symbolic
    sizes. Here the bodies run so, with the launches recorded instead of run;
    the contiguous scores get vector reads, a slice at an odd offset not."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, kwargs))

    from otseg.kernels.mps import _mps_fwd_kernel

    class Named(str):  # a stand-in kernel with the real one's signature
        arg_names = _mps_fwd_kernel.arg_names

    monkeypatch.setattr(tb, "wrap_triton", Recorder, raising=False)
    monkeypatch.setattr(tb, "_mps_fwd_kernel", Named("fwd"), raising=False)
    monkeypatch.setattr(tb, "_mps_bwd_kernel", "bwd", raising=False)
    monkeypatch.setattr(tb, "interpreted", True)  # lets CPU tensors through the device check
    x = torch.rand(3, 40, 8)
    dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * 3)
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        fx = mode.from_tensor(x, symbolic_context=dynamic)
        assert not isinstance(fx.shape[-1], int), "sizes should be symbolic here"
        score, plan, f, g, n_iter = tb._mps_forward_triton(fx, 0.05, 10, 0.0, True)
        assert plan.shape == fx.shape and score.shape == fx.shape[:-1]
        grad = tb._mps_backward_triton(score, plan, fx, f, g, 0.05)
        assert grad.shape == fx.shape
        odd = mode.from_tensor(torch.rand(3 * 40 * 8 + 1)[1:].view(3, 40, 8))
        tb._mps_forward_triton(odd, 0.05, 10, 0.0, False)
    assert [(k, kw["VEC"], kw["NG"]) for k, kw in launches] == [("fwd", 4, 2), ("bwd", 4, 2), ("fwd", 1, 8)]
    # 40 x 8: the prompts fill the tile (BLOCK_N = 8), the pixels not (BLOCK_M = 64).
    assert [(kw["EVEN_M"], kw["EVEN_N"]) for k, kw in launches if k == "fwd"] == [(False, True)] * 2


# ------------------------------------------------------------ dispatch, checks


def test_dispatch_and_status(device):
    status = {s.name: s for s in backends()}["triton"]
    assert status.available and device.type in status.devices
    x = hard_scores((2, 5, 3), seed=1).to(device)
    _, info = mps(x, return_info=True, **FIXED, **TRI)
    assert info.backend == "triton" and info.n_iter.dtype == torch.int32
    if device.type == "cpu":
        # "auto" never takes the interpreter for CPU tensors.
        assert resolve_backend("auto", "cpu") != "triton"
    else:
        assert resolve_backend("auto", "cuda") in ("cuda", "triton")


@pytest.mark.parametrize("M,N,what", [(4097, 3, "M=4096"), (5, 17, "N=16")])
def test_limits_raise_value_error_naming_them(device, M, N, what):
    x = torch.zeros(1, M, N, device=device)
    with pytest.raises(ValueError, match=what) as exc:
        mps(x, **TRI)
    assert "cpu" in str(exc.value) and "reference" in str(exc.value)


def test_non_finite_input_raises_unless_unchecked(device):
    x = hard_scores((2, 7, 3), seed=2, dtype=torch.float32).to(device)
    x[1, 3, 2] = math.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        mps(x, **FIXED, **TRI)
    score, info = mps(x, check_finite=False, return_info=True, **FIXED, **TRI)
    # The finite problem is untouched by its neighbour; the loop ends.
    assert torch.isfinite(score[0]).all()
    assert (info.n_iter <= FIXED["max_iter"]).all()


# --------------------------------------------------- forward vs the reference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("M,N", sizes((1, 1), (1, 16), (37, 1), (37, 3), (37, 8), (129, 6), (129, 16)))
def test_fixed_iterations_match_float64_reference(device, M, N, dtype):
    x = hard_scores((2, M, N), seed=M * 100 + N, dtype=dtype)
    gt_score, gt_plan, info = mps(x.double(), return_plan=True, return_info=True, **FIXED, **REF)
    score, plan, info = mps(x.to(device), return_plan=True, return_info=True, **FIXED, **TRI)
    assert score.dtype == plan.dtype == dtype and score.shape == (2, M) and plan.shape == (2, M, N)
    assert info.backend == "triton" and (info.n_iter.cpu() == FIXED["max_iter"]).all()
    score_atol, plan_atol = float_tolerances(dtype, gt_score, gt_plan * M * N)
    assert_close_report(score.cpu(), gt_score, atol=score_atol, what="refined score")
    assert_close_report(plan.cpu().double() * M * N, gt_plan * M * N, atol=plan_atol, what="plan*M*N")


def test_largest_problem_forward_and_backward(device):
    # M = 4096, N = 16: the limits are inclusive; the block is 4096 x 16.
    M, N = 4096, 16
    x = clip_scores((1, M, N), seed=30, dtype=torch.float32)
    kw = dict(eps=0.05, max_iter=5, tol=0.0)
    gt_score, gt_plan = mps(x.double(), return_plan=True, **kw, **REF)
    xb = x.to(device).clone().requires_grad_()
    score, plan = mps(xb, return_plan=True, **kw, **TRI)
    scale = float(gt_score.abs().max())
    assert_close_report(score.detach().cpu(), gt_score, atol=2e-5 * scale, what="refined score")
    plan_scale = float((gt_plan * M * N).max())
    assert_close_report(plan.detach().cpu().double() * M * N, gt_plan * M * N, atol=2e-5 * plan_scale, what="plan*M*N")
    score.sum().backward()
    if hasattr(torch.ops.otseg, "mps_backward"):
        _, _, f, g, _ = torch.ops.otseg.mps_forward_triton(xb.detach(), 0.05, 5, 0.0, False)
        expected = torch.ops.otseg.mps_backward(torch.ones(1, M, dtype=torch.float64), None, x.double(),
                                                f.cpu().double(), g.cpu().double(), 0.05)
        assert_close_report(xb.grad.cpu(), expected, atol=1e-4 * float(expected.abs().max()), what="dL/dS")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("M,N", sizes((37, 6), (129, 16)))
def test_half_inputs_within_twice_the_reference_error(device, M, N, dtype):
    x = hard_scores((2, M, N), seed=M + N, dtype=dtype)
    gt_score, gt_plan = mps(x.double(), return_plan=True, **FIXED, **REF)
    score, plan = mps(x.to(device), return_plan=True, **FIXED, **TRI)
    assert score.dtype == plan.dtype == dtype
    score_atol, plan_atol = float_tolerances(torch.float32, gt_score, gt_plan * M * N)
    rtol, half_plan_atol = half_output_tolerances(dtype, M, N)
    assert_close_report(score.cpu(), gt_score, atol=score_atol, rtol=rtol, what="refined score")
    assert_close_report(plan.cpu().double() * M * N, gt_plan * M * N, atol=plan_atol + half_plan_atol, rtol=rtol,
                        what="plan*M*N")
    # House style: at most about 2x the error of the reference in the same dtype.
    ref_score, ref_plan = mps(x, return_plan=True, **FIXED, **REF)
    floor = 2 * unit_roundoff(dtype) * max(1.0, float(gt_score.abs().max()))
    assert max_abs_err(score.cpu(), gt_score) <= 2 * max_abs_err(ref_score, gt_score) + floor
    plan_floor = plan_atol + half_plan_atol + 2 * unit_roundoff(dtype) * float((gt_plan * M * N).abs().max())
    ref_plan_err = max_abs_err(ref_plan.double() * M * N, gt_plan * M * N)
    assert max_abs_err(plan.cpu().double() * M * N, gt_plan * M * N) <= 2 * ref_plan_err + plan_floor


def test_max_iter_beyond_int32_is_capped(device):
    # The operator's int is 64 bits and the kernel counts in int32: no
    # problem runs 2^31 iterations, so a larger max_iter is capped.
    x = hard_scores((2, 37, 6), seed=5)
    kw = dict(eps=0.05, tol=1e-11)
    ref_score, _, ref_n = reference_per_problem(x, max_iter=3000, **kw)
    for max_iter in (2**31, 2**63):
        score, info = mps(x.to(device), max_iter=max_iter, return_info=True, **kw, **TRI)
        assert (info.n_iter.cpu() - ref_n).abs().max() <= 1
        assert_close_report(score.cpu(), ref_score, atol=1e-7 * float(ref_score.abs().max()), what="refined score")


@pytest.mark.parametrize("M,N", sizes((37, 6), (129, 8)))
def test_converged_per_problem_float64(device, M, N):
    # Problems of different difficulty: each stops on its own error.
    x = torch.cat([hard_scores((2, M, N), seed=3), clip_scores((1, M, N), seed=4)])
    kw = dict(eps=0.05, max_iter=3000, tol=1e-11)
    ref_score, ref_plan, ref_n = reference_per_problem(x, **kw)
    score, plan, info = mps(x.to(device), return_plan=True, return_info=True, **kw, **TRI)
    n_iter = info.n_iter.cpu()
    assert len(set(n_iter.tolist())) > 1, "the problems should stop at different iterations"
    # The same algorithm in the same precision: the same stopping iteration,
    # give or take a rounding at the threshold.
    assert (n_iter - ref_n).abs().max() <= 1, (n_iter, ref_n)
    assert (n_iter < kw["max_iter"]).all()
    gt_score, gt_plan, _ = reference_per_problem(x, eps=0.05, max_iter=20000, tol=1e-13)
    scale = float(gt_score.abs().max())
    assert_close_report(score.cpu(), gt_score, atol=1e-7 * scale, what="refined score")
    assert_close_report(plan.cpu().double() * M * N, gt_plan * M * N, atol=1e-7, what="plan*M*N")


def test_converged_per_problem_float32(device):
    M, N = 129, 6
    x = torch.cat([hard_scores((1, M, N), seed=5), clip_scores((1, M, N), seed=6)]).float()
    kw = dict(eps=0.05, max_iter=3000, tol=1e-6)
    _, _, ref_n = reference_per_problem(x.double(), **kw)
    score, plan, info = mps(x.to(device), return_plan=True, return_info=True, **kw, **TRI)
    assert (info.n_iter.cpu() - ref_n).abs().max() <= 3, (info.n_iter, ref_n)
    gt_score, gt_plan, _ = reference_per_problem(x.double(), eps=0.05, max_iter=20000, tol=1e-13)
    # Truncation at tol (a potential change of 1e-6 moves plan entries by
    # about tol/eps relative) on top of float32 rounding.
    scale = max(1.0, float(gt_score.abs().max()))
    assert_close_report(score.cpu(), gt_score, atol=2e-4 * scale, what="refined score")
    assert_close_report(plan.cpu().double() * M * N, gt_plan * M * N, atol=2e-4 * float((gt_plan * M * N).max()),
                        what="plan*M*N")


def test_per_problem_results_independent_of_the_batch(device):
    M, N = 37, 6
    p0 = hard_scores((1, M, N), seed=7)
    others = extreme_scores("onehot", (3, M, N), seed=8)
    kw = dict(eps=0.05, max_iter=500, tol=1e-9)
    alone = mps(p0.to(device), return_plan=True, return_info=True, **kw, **TRI)
    batch = mps(torch.cat([others[:1], p0, others[1:]]).to(device), return_plan=True, return_info=True, **kw, **TRI)
    assert torch.equal(batch[0][1], alone[0][0])
    assert torch.equal(batch[1][1], alone[1][0])
    assert batch[2].n_iter[1] == alone[2].n_iter[0]


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_non_contiguous_input_matches_contiguous(device, layout):
    if layout == "transposed":
        x = hard_scores((2, 6, 37), seed=9, dtype=torch.float32).to(device).transpose(-1, -2)
    elif layout == "sliced":
        x = hard_scores((2, 74, 13), seed=10, dtype=torch.float32).to(device)[:, ::2, 1:7]
    else:
        x = hard_scores((37, 6), seed=11, dtype=torch.float32).to(device).expand(3, 37, 6)
    assert not x.is_contiguous()
    a = mps(x, return_plan=True, **FIXED, **TRI)
    b = mps(x.contiguous(), return_plan=True, **FIXED, **TRI)
    # Compiled for other strides, the kernel may reduce in another order.
    assert_close_report(a[0].cpu(), b[0].cpu(), atol=1e-6 * float(b[0].abs().max()), what="score")
    assert_close_report(a[1].cpu(), b[1].cpu(), atol=1e-6 * float(b[1].abs().max()), what="plan")


def test_batch_dims_and_sinkhorn(device):
    x = hard_scores((2, 3, 37, 6), seed=12).to(device)
    score, info = mps(x, return_info=True, **FIXED, **TRI)
    assert score.shape == (2, 3, 37) and info.n_iter.shape == (2, 3)
    cost = 1 - x
    plan = sinkhorn(cost, **FIXED, **TRI)
    ref = sinkhorn(cost.cpu(), **FIXED, **REF)
    assert_close_report(plan.cpu() * 37 * 6, ref * 37 * 6, atol=1e-10, what="sinkhorn plan*M*N")


@pytest.mark.parametrize("eps", [0.01, 10.0], ids=lambda e: f"eps{e}")
@pytest.mark.parametrize("kind", ["big", "onehot50", "split", "const"])
def test_extreme_inputs_stay_exact(device, kind, eps):
    # Scores far outside the cosine range and a wide eps range exercise the
    # absorption into the log domain: the result is the reference's, never a
    # wrong finite value.
    M, N = 37, 6
    x = extreme_scores(kind, (2, M, N), seed=13, dtype=torch.float32)
    kw = dict(eps=eps, max_iter=30, tol=0.0)
    gt_score, gt_plan = mps(x.double(), return_plan=True, **kw, **REF)
    score, plan = mps(x.to(device), return_plan=True, **kw, **TRI)
    assert_extreme_result_close(score, plan, gt_score, gt_plan, x, eps)


def test_forward_writes_every_output(device):
    # Outputs filled with NaN (and -1 iterations) before the launch: a missed
    # write shows.
    P, M, N = 3, 37, 6
    x = hard_scores((P, M, N), seed=14, dtype=torch.float32).to(device)
    nan = dict(device=device)
    score = torch.full((P, M), math.nan, **nan)
    plan = torch.full((P, M, N), math.nan, **nan)
    f = torch.full((P, M), math.nan, **nan)
    g = torch.full((P, N), math.nan, **nan)
    n_iter = torch.full((P,), -1, dtype=torch.int32, **nan)
    tb.launch_forward(x, 0.05, 10, 0.0, score, plan, f, g, n_iter)
    for name, t in (("score", score), ("plan", plan), ("f", f), ("g", g)):
        assert torch.isfinite(t).all(), f"{name} not fully written"
    assert (n_iter == 10).all()
    ref_score, ref_plan = mps(x.cpu().double(), return_plan=True, **FIXED, **REF)
    assert_close_report(score.cpu(), ref_score, atol=2e-5 * float(ref_score.abs().max()), what="score")


@pytest.mark.parametrize("case", ["hard", "extreme", "strided", "float16", "odd"])
def test_forward_rereading_the_scores_matches_holding_them(device, case):
    # HOLD_S=False (the kernel reads the scores again where it rebuilds K and
    # for the refined score) computes the same values as HOLD_S=True, through
    # absorptions (extreme scores), any strides, 16-bit inputs and padding
    # (M, N odd): the same iteration counts, and the outputs within a few
    # float32 roundings of each other. Not bitwise, even on the interpreter:
    # the first iteration's exponents are (S - max S) log2(e)/eps in the
    # rereading kernel, S log2(e)/eps + c - max in the other (kernels/mps.py),
    # and on a GPU the compiler contracts and schedules the two programs
    # differently (an H200 run of 0b64572 gave last-bit differences).
    P, M, N = 3, 37, 6
    if case == "extreme":
        x = extreme_scores("onehot50", (P, M, N), seed=21, dtype=torch.float32)
    elif case == "odd":
        x = hard_scores((P, 129, 5), seed=22, dtype=torch.float32)
    else:
        x = hard_scores((P, M, N), seed=23, dtype=torch.float16 if case == "float16" else torch.float32)
    x = x.to(device)
    if case == "strided":
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    P, M, N = x.shape
    eps, max_iter, tol = (0.01, 30, 0.0) if case == "extreme" else (0.05, 100, 1e-6)
    outs = {}
    for hold in (True, False):
        acc = torch.float32
        out = (torch.full((P, M), math.nan, dtype=x.dtype, device=device),
               torch.full((P, M, N), math.nan, dtype=x.dtype, device=device),
               torch.full((P, M), math.nan, dtype=acc, device=device),
               torch.full((P, N), math.nan, dtype=acc, device=device),
               torch.full((P,), -1, dtype=torch.int32, device=device))
        tb.launch_forward(x, eps, max_iter, tol, *out, hold_scores=hold, maxnreg=None)
        outs[hold] = out
    for name, held, reread in zip(("score", "plan", "f", "g", "n_iter"), outs[True], outs[False]):
        assert torch.isfinite(held.double()).all(), f"{case}: {name} not fully written"
        if name == "n_iter":
            assert torch.equal(held, reread), f"{case}: {name} differs between HOLD_S=True and False"
        else:
            scale = float(held.double().abs().max()) + 1.0
            rtol = 1e-5 if x.dtype == torch.float32 or name in ("f", "g") else 1e-2
            assert_close_report(reread.double(), held.double(), atol=rtol * scale,
                                what=f"{case}: {name}, HOLD_S=False against True")
    ref_score = mps(x.cpu().double(), eps=eps, max_iter=max_iter, tol=tol, **REF)
    assert_close_report(outs[False][0].cpu().double(), ref_score, atol=2e-2 * float(ref_score.abs().max()),
                        what="score (HOLD_S=False)")


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("M,N", [(64, 8), (64, 4), (16, 2), (64, 3), (60, 4), (37, 6)],
                         ids=lambda v: str(v))
def test_forward_full_tile_specialisation_changes_no_bit(device, M, N, strided, monkeypatch):
    # launch_forward's EVEN_M / EVEN_N (M = BLOCK_M, N = BLOCK_N: no padding
    # rows or prompts, the masks decided at compile time) are set exactly
    # where the shape fills the tile, and change no bit of any output against
    # the run-time masks (full_tile=False), with and without a plan, on hard
    # scores with absorptions, read in vectors (contiguous) or one by one
    # (strided: VEC = 1); the outputs meet the float64 reference.
    seen = []
    real = tb.wrap_triton

    def spy(kernel):
        launcher = real(kernel)

        class Grid:
            def __getitem__(self, grid):
                def call(*args, **kw):
                    seen.append((kw.get("EVEN_M"), kw.get("EVEN_N")))
                    return launcher[grid](*args, **kw)
                return call
        return Grid()

    monkeypatch.setattr(tb, "wrap_triton", spy)
    P = 3
    x = hard_scores((P, M, N), seed=M * 7 + N, dtype=torch.float32).to(device)
    if strided:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert tb._vector_width(x, N) == 1
    blocks = tb._blocks(M, N)
    want = (M == blocks.block_m, N == blocks.block_n)
    assert tb.full_tile_flags(M, N, blocks) == dict(zip(("EVEN_M", "EVEN_N"), want))
    outs = {}
    for full in (True, False):
        for with_plan in (True, False):
            out = (torch.full((P, M), math.nan, device=device),
                   torch.full((P, M, N), math.nan, device=device) if with_plan else None,
                   torch.full((P, M), math.nan, device=device),
                   torch.full((P, N), math.nan, device=device),
                   torch.full((P,), -1, dtype=torch.int32, device=device))
            tb.launch_forward(x, 0.02, 200, 1e-6, *out, full_tile=full)
            outs[full, with_plan] = [t for t in out if t is not None]
    assert seen == [want, want, (False, False), (False, False)], seen
    for with_plan in (True, False):
        for name, a, b in zip(("score", "plan", "f", "g", "n_iter") if with_plan else ("score", "f", "g", "n_iter"),
                              outs[True, with_plan], outs[False, with_plan]):
            assert torch.equal(a, b), f"{name} (plan: {with_plan}) differs with the full tile's masks"
    ref_score = mps(x.cpu().double(), eps=0.02, max_iter=200, tol=1e-6, **REF)
    assert_close_report(outs[True, False][0].cpu().double(), ref_score, atol=2e-3 * float(ref_score.abs().max()),
                        what="score")


# ------------------------------------------------------------------- backward


def _triton_and_reference_grads(x, output, kw, weights, device):
    grads = {}
    for backend, dev in (("reference", torch.device("cpu")), ("triton", device)):
        xb = x.to(dev).clone().requires_grad_()
        if output == "sinkhorn":
            outs = (sinkhorn(1 - xb, backend=backend, **kw),)
        else:
            out = mps(xb, return_plan=True, backend=backend, **kw)
            outs = {"score": out[:1], "plan": out[1:], "score+plan": out}[output]
        loss = sum((o * w.to(dev)).sum() for o, w in zip(outs, weights))
        loss.backward()
        grads[backend] = xb.grad.cpu()
    return grads


@pytest.mark.parametrize("eps", [0.1, 0.5], ids=lambda e: f"eps{e}")
@pytest.mark.parametrize("output", ["score", "plan", "score+plan", "sinkhorn"])
def test_gradient_matches_reference_autograd_on_converged_problems(device, output, eps):
    M, N = 37, 6
    x = hard_scores((2, M, N), seed=15)
    gen = torch.Generator().manual_seed(16)
    w_score = torch.randn(2, M, generator=gen, dtype=torch.float64)
    w_plan = M * N * torch.randn(2, M, N, generator=gen, dtype=torch.float64)
    weights = {"score": [w_score], "plan": [w_plan], "score+plan": [w_score, w_plan], "sinkhorn": [w_plan]}[output]
    grads = _triton_and_reference_grads(x, output, dict(eps=eps, tol=1e-13, max_iter=20000), weights, device)
    scale = float(grads["reference"].abs().max())
    assert_close_report(grads["triton"], grads["reference"], atol=1e-7 * scale, what="dL/dS")


@pytest.mark.parametrize("M,N", sizes((1, 1), (1, 5), (7, 1), (37, 3), (37, 16), (129, 8)))
def test_backward_kernel_matches_cpu_backward(device, M, N):
    """The backward is a function of (S, f, g, upstream gradients) alone: the
    same inputs through the C++ kernel's float64 backward, every N up to 16."""
    if not hasattr(torch.ops.otseg, "mps_backward"):
        pytest.skip("the C++ extension is not built")
    x = hard_scores((2, M, N), seed=17 + M + N)
    _, _, f, g, _ = torch.ops.otseg.mps_forward(x, 0.1, 200, 0.0, False, True)
    gen = torch.Generator().manual_seed(18)
    gs = torch.randn(2, M, generator=gen, dtype=torch.float64)
    gp = M * N * torch.randn(2, M, N, generator=gen, dtype=torch.float64)
    expected = torch.ops.otseg.mps_backward(gs, gp, x, f, g, 0.1)
    got = torch.ops.otseg.mps_backward_triton(gs.to(device), gp.to(device), x.to(device), f.to(device),
                                              g.to(device), 0.1)
    scale = max(1e-300, float(expected.abs().max()))
    assert_close_report(got.cpu(), expected, atol=1e-9 * scale, what="dL/dS float64")
    # float32: the same potentials rounded; against the float64 result.
    got32 = torch.ops.otseg.mps_backward_triton(gs.float().to(device), gp.float().to(device), x.float().to(device),
                                                f.float().to(device), g.float().to(device), 0.1)
    assert got32.dtype == torch.float32
    assert_close_report(got32.cpu(), expected, atol=1e-4 * scale, what="dL/dS float32")


@pytest.mark.parametrize("dtype", (torch.float32,) + HALF_DTYPES, ids=dtype_id)
def test_low_precision_gradient_close_to_float64(device, dtype):
    M, N = 37, 6
    x = hard_scores((2, M, N), seed=19, dtype=dtype)
    w = torch.randn(2, M, generator=torch.Generator().manual_seed(20), dtype=torch.float64)
    grads = {}
    for dt in (torch.float64, dtype):
        xb = x.to(dt).to(device).clone().requires_grad_()
        score = mps(xb, eps=0.1, tol=1e-9, max_iter=5000, **TRI)
        (score * w.to(dt).to(device)).sum().backward()
        assert xb.grad.dtype == dt
        grads[dt] = xb.grad.cpu().double()
    scale = float(grads[torch.float64].abs().max())
    rel = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype]
    assert_close_report(grads[dtype], grads[torch.float64], atol=rel * scale, what="dL/dS")


def test_gradcheck_float64_converged(device):
    x = hard_scores((1, 4, 3), seed=21).to(device).requires_grad_()
    fn = lambda t: mps(t, eps=0.5, tol=1e-13, max_iter=5000, return_plan=True, **TRI)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), atol=1e-6, rtol=1e-4)


def test_backward_writes_every_output_and_handles_missing_gradients(device):
    P, M, N = 2, 37, 16
    x = hard_scores((P, M, N), seed=22, dtype=torch.float32).to(device)
    _, _, f, g, _ = torch.ops.otseg.mps_forward_triton(x, 0.05, 50, 0.0, False)
    gen = torch.Generator().manual_seed(23)
    gs = torch.randn(P, M, generator=gen).to(device)
    gp = torch.randn(P, M, N, generator=gen).to(device)
    results = []
    for a, b in ((gs, None), (None, gp), (gs, gp)):
        grad = torch.full((P, M, N), math.nan, device=device)
        tb.launch_backward(a, b, x, f, g, 0.05, grad)
        assert torch.isfinite(grad).all(), "grad not fully written"
        results.append(grad)
    # Linear in the upstream gradients.
    assert_close_report(results[0] + results[1], results[2], atol=1e-5 * float(results[2].abs().max()), what="sum")
    zero = torch.ops.otseg.mps_backward_triton(None, None, x, f, g, 0.05)
    assert torch.equal(zero, torch.zeros_like(zero))
    # Expanded (stride 0) and transposed upstream gradients, as autograd hands them over.
    gs_e = gs[:, :1].expand(P, M)
    gp_t = gp.transpose(-1, -2).contiguous().transpose(-1, -2)
    a = torch.ops.otseg.mps_backward_triton(gs_e, gp_t, x, f, g, 0.05)
    b = torch.ops.otseg.mps_backward_triton(gs_e.contiguous(), gp_t.contiguous(), x, f, g, 0.05)
    assert_close_report(a.cpu(), b.cpu(), atol=1e-6 * float(b.abs().max()), what="strided upstream")


def test_fixed_iteration_gradient_is_the_implicit_one(device):
    # Documented: far from convergence the gradient is that of the fixed point.
    x = hard_scores((1, 37, 6), seed=24)
    grads = {}
    for backend, dev in (("triton", device), ("reference", torch.device("cpu"))):
        xb = x.to(dev).clone().requires_grad_()
        mps(xb, eps=0.05, max_iter=2, tol=0.0, backend=backend).sum().backward()
        grads[backend] = xb.grad.cpu()
    assert float((grads["triton"] - grads["reference"]).abs().max()) > 1e-3 * float(grads["reference"].abs().max())


# --------------------------------------------------------- opcheck, compile


@pytest.mark.parametrize("return_plan", [True, False], ids=["plan", "noplan"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
def test_opcheck_forward(device, dtype, return_plan):
    x = hard_scores((3, 7, 4), seed=25, dtype=dtype).to(device).requires_grad_(dtype != torch.bfloat16)
    torch.library.opcheck(torch.ops.otseg.mps_forward_triton.default, (x, 0.05, 5, 0.0, return_plan))
    # The backend's entry, the same operator with its autograd in C++.
    torch.library.opcheck(torch.ops.otseg.mps_triton.default, (x, 0.05, 5, 0.0, return_plan))


def test_entry_has_its_autograd_in_cpp_and_refuses_double_backward(device):
    assert tb._entry is torch.ops.otseg.mps_triton.default, "the C++ autograd glue is not used"
    x = hard_scores((2, 9, 4), seed=26, dtype=torch.float32).to(device).requires_grad_()
    score = mps(x, eps=0.1, max_iter=50, tol=0.0, **TRI)
    assert type(score.grad_fn).__name__ == "CppFunction"
    (g,) = torch.autograd.grad(score.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives .* not implemented"):
        g.sum().backward()
    # Below autograd (inference mode) the entry runs the Triton forward itself.
    with torch.inference_mode():
        inf = mps(x.detach(), eps=0.1, max_iter=50, tol=0.0, **TRI)
    assert torch.equal(inf, score.detach())


def test_vmap_solves_every_problem_in_one_call(device):
    # check_finite=False: the backend's separate finiteness pass reads a
    # value on the host, which vmap cannot batch.
    x = hard_scores((3, 2, 9, 5), seed=29, dtype=torch.float32).to(device)
    score, plan = torch.func.vmap(lambda s: mps(s, return_plan=True, check_finite=False, **TRI),
                                  in_dims=1)(x.movedim(0, 1))
    expected = mps(x, return_plan=True, **TRI)
    assert torch.equal(score, expected[0]) and torch.equal(plan, expected[1])


def test_python_glue_gives_the_same_gradients(device, monkeypatch):
    """Without the C++ extension's mps_triton, the backend glues the same
    operators in Python: same values and gradients."""
    x = hard_scores((2, 9, 6), seed=27, dtype=torch.float32).to(device)
    w = torch.randn(2, 9, generator=torch.Generator().manual_seed(28)).to(device)
    results = []
    for entry in (torch.ops.otseg.mps_triton.default, torch.ops.otseg.mps_forward_triton.default):
        monkeypatch.setattr(tb, "_entry", entry)
        xg = x.clone().requires_grad_()
        score, plan = mps(xg, eps=0.1, max_iter=50, tol=0.0, return_plan=True, **TRI)
        ((score * w).sum() + plan.square().sum()).backward()
        results.append((score.detach(), plan.detach(), xg.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", BATCH_LAYOUTS)
def test_operators_take_batch_dims_like_the_flattened_problems(device, layout):
    """The Triton operators take scores [..., M, N] (no reshape around them):
    outputs carry the batch dims and equal those of the flattened problems,
    also where the batch dims cannot be merged into a view."""
    x = batch_layout_scores(layout, seed=28).to(device)
    score, plan, f, g, gs, gp = assert_batch_dims_match_flattened(
        lambda s: torch.ops.otseg.mps_forward_triton(s, 0.1, 30, 0.0, True),
        lambda *a: torch.ops.otseg.mps_backward_triton(*a, 0.1), x, seed=29)
    torch.library.opcheck(torch.ops.otseg.mps_forward_triton.default, (x, 0.1, 5, 0.0, True))
    torch.library.opcheck(torch.ops.otseg.mps_backward_triton.default, (gs, gp, x, f, g, 0.1))
    with pytest.raises(ValueError, match="grad_score must have shape"):
        torch.ops.otseg.mps_backward_triton(gs.reshape(-1, 9), None, x, f, g, 0.1)
    # The C++ entries: on a GPU, launched from C++ from the second call of a
    # kernel variant on (csrc/triton/launch.h); the same results.
    for _ in range(2):
        got = assert_batch_dims_match_flattened(
            lambda s: torch.ops.otseg.mps_triton(s, 0.1, 30, 0.0, True),
            lambda *a: torch.ops.otseg.mps_triton_backward(*a, 0.1), x, seed=29)
        for a, b in zip(got, (score, plan, f, g)):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="grad_score must have shape"):
        torch.ops.otseg.mps_triton_backward(gs.reshape(-1, 9), None, x, f, g, 0.1)


@pytest.mark.parametrize("grads", ["score", "plan", "both", "none"])
def test_opcheck_backward(device, grads):
    x = hard_scores((3, 7, 4), seed=26).to(device)
    score, plan, f, g, _ = torch.ops.otseg.mps_forward_triton(x, 0.05, 20, 0.0, True)
    gen = torch.Generator().manual_seed(27)
    gs = torch.randn(score.shape, generator=gen, dtype=torch.float64).to(device) if grads in ("score", "both") else None
    gp = torch.randn(plan.shape, generator=gen, dtype=torch.float64).to(device) if grads in ("plan", "both") else None
    torch.library.opcheck(torch.ops.otseg.mps_backward_triton.default, (gs, gp, x, f, g, 0.05))
    torch.library.opcheck(torch.ops.otseg.mps_triton_backward.default, (gs, gp, x, f, g, 0.05))


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()

    def fn(x, w):
        score, plan = mps(x, return_plan=True, eps=0.1, max_iter=200, tol=1e-9, **TRI)
        return (score * w).sum() + (plan * plan).sum() * 1e3, score, plan

    x = hard_scores((2, 3, 37, 6), seed=28, dtype=torch.float32).to(device)
    w = torch.randn(2, 3, 37, generator=torch.Generator().manual_seed(29)).to(device)
    results = eager_and_compiled(fn, x, w)
    for a, b, what in zip(results["compiled"], results["eager"], ("score", "plan", "grad")):
        # Inductor may fuse the surrounding arithmetic differently.
        assert_close_report(a.cpu(), b.cpu(), atol=1e-6 * max(1.0, float(b.abs().max())), what=what)


# ------------------------------------- the fused loss (kernels/mask_stats.py)


def loss_problem(B, K, h, w, H, W, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(B, K, h, w, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, K, (B, H, W), generator=g)
    labels[torch.rand(B, H, W, generator=g) < 0.2] = 255
    grad_stats = torch.randn(4, B, K, generator=g, dtype=torch.float64)
    return logits, labels, grad_stats


def loss_stats_and_grad(logits, labels, grad_stats, backend, device, **kw):
    from otseg.model.losses import mask_statistics

    x = logits.to(device).requires_grad_()
    stats = mask_statistics(x, labels.to(device), backend=backend, **kw)
    (grad,) = torch.autograd.grad(stats, x, grad_stats.to(device, logits.dtype))
    return stats.detach().cpu().double(), grad.cpu().double()


LOSS_CASES = [(2, 3, 4, 5, 17, 23), (1, 5, 7, 3, 7, 3), (2, 4, 9, 8, 5, 6), (1, 2, 1, 1, 3, 33), (1, 3, 8, 8, 64, 64)]


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (None, 0.0), (0.4, 1.5)])
@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: "x".join(map(str, c)))
def test_loss_kernels_match_reference(device, case, alpha, gamma):
    """Forward sums and gradient of the upsampled logits against the float64
    PyTorch path (F.interpolate, then the sums), float64 and float32."""
    logits, labels, grad_stats = loss_problem(*case)
    want, want_grad = loss_stats_and_grad(logits, labels, grad_stats, "reference", "cpu", alpha=alpha, gamma=gamma)
    for dtype, tol in ((torch.float64, 1e-11), (torch.float32, 2e-5)):
        got, grad = loss_stats_and_grad(logits.to(dtype), labels, grad_stats, "triton", device, alpha=alpha,
                                        gamma=gamma)
        assert_close_report(got, want, rtol=tol, atol=tol * float(want.abs().max()))
        assert_close_report(grad, want_grad, rtol=tol, atol=tol * float(want_grad.abs().max()))


def test_loss_kernels_take_strides_and_label_types(device):
    logits, labels, grad_stats = loss_problem(2, 6, 5, 7, 19, 12, seed=3)
    strided = logits.transpose(2, 3).contiguous().transpose(2, 3)[:, ::2]
    labels = torch.where(labels >= 3, 255, labels)
    want, want_grad = loss_stats_and_grad(strided, labels, grad_stats[:, :, :3], "reference", "cpu")
    for lab in (labels, labels.int(), labels.to(torch.uint8)):
        got, grad = loss_stats_and_grad(strided.to(device), lab, grad_stats[:, :, :3], "triton", device)
        assert_close_report(got, want, rtol=1e-11, atol=1e-11)
        assert_close_report(grad, want_grad, rtol=1e-11, atol=1e-11 * float(want_grad.abs().max()))


def test_loss_through_the_model_functions_and_opcheck(device):
    from otseg.model.losses import otseg_loss, segmentation_loss

    logits, labels, _ = loss_problem(2, 3, 3, 4, 7, 5, seed=4)
    x, lab = logits.to(device), labels.to(device)
    got = otseg_loss((x, x.flip(1)), lab, backend="triton")
    want = otseg_loss((logits, logits.flip(1)), labels, backend="reference")
    assert got.backend == "triton" and want.backend == "reference"
    assert_close_report(got.total.cpu(), want.total, rtol=1e-12, atol=0)
    xg = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: segmentation_loss(t, lab, backend="triton").total, (xg,))
    torch.library.opcheck(torch.ops.otseg.mask_stats_triton.default, (xg, lab, 0.25, 2.0, 255))
    gs = torch.randn(4, 2, 3, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.otseg.mask_stats_backward_triton.default, (gs, x, lab, 0.4, 1.5, 255))


def test_loss_kernel_limits(device):
    from otseg.model.losses import segmentation_loss
    from otseg.ops import mask_stats as fused

    x = torch.zeros(1, 2, 128, 128, device=device)  # a grid past the kernels' register tiles
    labels = torch.zeros(1, 128, 128, dtype=torch.long, device=device)
    assert "128" in fused.fused_takes("triton", x, labels)
    with pytest.raises(ValueError, match="does not take"):
        torch.ops.otseg.mask_stats_triton(x, labels, 0.25, 2.0, 255)
    with pytest.warns(RuntimeWarning, match="does not take"):
        out = segmentation_loss(x, labels, backend="triton")
    assert out.backend == "reference"
    with pytest.raises(TypeError, match="float32 or float64"):
        torch.ops.otseg.mask_stats_triton(x[:, :, :4, :4].half(), labels, 0.25, 2.0, 255)
    with pytest.raises(ValueError, match="empty grid"):
        torch.ops.otseg.mask_stats_triton(x[:, :, :0], labels, 0.25, 2.0, 255)


@pytest.mark.slow
def test_loss_kernels_compile_for_sm90():
    """The loss kernels through Triton's whole CUDA pipeline (to a cubin for
    sm_90) without a GPU, at the model's shape (32 x 32 tokens to 512 x 512)."""
    if INTERPRET:
        pytest.skip("the interpreter process holds interpreted kernels")
    if not kernels.available:
        pytest.skip(f"triton is unavailable: {kernels.error}")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    from otseg.kernels.mask_stats import _mask_stats_bwd_kernel, _mask_stats_fwd_kernel

    for acc, gamma2 in (("fp32", True), ("fp32", False), ("fp64", True)):
        for kernel, consts in ((_mask_stats_fwd_kernel, {}),
                               (_mask_stats_bwd_kernel, {"BLOCK_H_IN": 32, "BLOCK_W_IN": 32})):
            consts = dict(consts, GAMMA2=gamma2, BLOCK_W=512)
            sig = {}
            for name in kernel.arg_names:
                if name in consts:
                    sig[name] = "constexpr"
                elif name in ("LAB", "Y0", "Y1", "X0", "X1"):
                    sig[name] = "*i32"
                elif name in ("X", "LY", "LX", "GS", "OUT", "PARAMS"):
                    sig[name] = f"*{acc}"
                else:
                    sig[name] = "i32"
            src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
            compiled = triton_compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
            assert compiled.asm["cubin"], f"{kernel.__name__} {acc}: no cubin"


def test_gpu_profile_forward_variants_table(device):
    # bench/gpu_profile.py's table of the forward's variants (FWD_VARIANTS),
    # run on a tiny case with a stand-in timer: every variant launches (the
    # register cap included) and reports the default's outputs.
    gpu_profile = import_bench_script("gpu_profile")
    from otseg.benchmark.generators import Case

    case = Case("tiny", 1, 2, 37, 6, "voc20")

    def once(fn):
        fn()
        return 1e-3

    lines = gpu_profile._forward_variants(case, ["hard"], copy=1000.0, device=device, timer=once)
    rows = [line for line in lines if line.startswith("| hard |")]
    assert len(rows) == len(gpu_profile.FWD_VARIANTS), lines
    assert not any("failed" in row for row in rows), rows
    diffs = [row.split("|")[-2].strip() for row in rows]
    assert diffs[0] == "-" and rows[0].split("|")[-3].strip() == "-", rows
    # Within float32 roundings (bitwise between the variants of the same
    # HOLD_S on the interpreter; see
    # test_forward_rereading_the_scores_matches_holding_them).
    assert all(float(d) <= 1e-5 for d in diffs[1:]), rows
    if device.type == "cpu":
        hold = [row.split("|")[2].strip() for row in rows]
        same = [float(d) for h, d in zip(hold[1:], diffs[1:]) if h == hold[0]]
        assert same and all(d == 0.0 for d in same), rows


def test_gpu_profile_baseline_forward_table(device, tmp_path):
    # bench/gpu_profile.py --triton-baseline: a kernels/mps.py of another
    # version, loaded from a file, launched with this tree's arguments next
    # to this tree's kernel. Here the baseline is this tree's file copied
    # with its error's scale multiplied by 1e6 (err_scale is the stopping
    # test's only factor: it never stops early): the table must show that
    # copy's iteration counts and outputs differ, and the unchanged copy's
    # not.
    gpu_profile = import_bench_script("gpu_profile")
    from otseg.benchmark.generators import Case

    with open(os.path.join(os.path.dirname(kernels.__file__), "mps.py")) as fh:
        source = fh.read()
    same = tmp_path / "same.py"
    same.write_text(source)
    assert "err_scale = " in source
    changed = tmp_path / "changed.py"
    changed.write_text(source.replace("err_scale = ", "err_scale = 1e6 * ", 1))
    case = Case("tiny", 1, 2, 37, 6, "voc20")

    def once(fn):
        fn()
        return 1e-3

    def diffs(path):
        lines = gpu_profile._baseline_forward([case], ["hard"], 1000.0, str(path), device=device, timer=once)
        rows = [line for line in lines if line.startswith("| tiny | hard |")]
        assert len(rows) == 1 and "failed" not in rows[0], lines
        assert rows[0].split("|")[5].strip() == "1.00x", rows
        return rows[0].split("|")[-3].strip(), float(rows[0].split("|")[-2])

    assert diffs(same) == ("0", 0.0)
    iters, worst = diffs(changed)
    assert re.fullmatch(r"[12] of 2, by up to [1-9]\d*", iters) and worst > 0.0, (iters, worst)


def test_gpu_smoke_script_on_triton(device, monkeypatch, capsys):
    # bench/gpu_smoke.py, which bench/gpu_check.sh runs on each fused backend
    # before timing anything, passes the triton backend (small problems):
    # results against the float64 cpu backend, two calls bitwise equal, and
    # the launch route it asked for.
    gpu_smoke = import_bench_script("gpu_smoke")
    if device.type == "cpu":
        monkeypatch.setenv("OTSEG_TRITON_LAUNCH", "python")  # restored after the test
        args, expect = ["triton-python", "--device", "cpu", "--small"], 0
    else:  # this process's route: C++ unless something turned it off
        args, expect = ["triton", "--small"], 0 if tb.cpp_launch_error is None else 3
    status = gpu_smoke.main(args)
    text = capsys.readouterr().out
    assert status == expect, text
    assert text.count("ok   triton") == len(gpu_smoke.SMALL_PROBLEMS), text
