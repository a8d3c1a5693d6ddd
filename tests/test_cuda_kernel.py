"""Backend "cuda" (csrc/cuda/: mps_cuda.cpp, mps_cuda_forward.cu, mps_cuda_backward.cu) on a GPU, against the
float64 reference.

Mirrors the CPU kernel tests: odd sizes, every accepted dtype, non-contiguous
inputs, fixed and converged iterations, gradients, opcheck, torch.compile, and
agreement with the triton backend. Every test needs a CUDA GPU (marked ``gpu``,
skipped elsewhere; bench/gpu_check.sh runs them).
"""

import pytest
import torch

from otseg.ops import mps, sinkhorn
from otseg.ops.mps import triton as triton_backend

from helpers import (assert_close_report, assert_extreme_result_close, dtype_id, extreme_scores, hard_scores,
                     import_bench_script)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# Every block shape the dispatch can pick: 8 rows a thread in the forward up
# to 8 prompts (128 / 256 / 512 threads), 4 rows otherwise and in the backward.
# (3000, 12): 16 prompts in 1024 threads; (2000, 4): 4 prompts in 256 threads,
# the scores still in shared memory; (100, 4): the float32-vector kernel of 4
# prompts (four blocks an SM, as the float32 x4 kernel of 8); N = 6 takes the
# float32 x2 kernel (rows of whole float2s, 8 prompts only) and N = 1, 3 and
# 12 the kernel for any dtype and stride in float32 too.
SIZES = [(1, 1), (37, 6), (100, 4), (129, 8), (900, 8), (1023, 16), (2000, 4), (2500, 6), (3000, 8), (3000, 12),
         (4096, 3)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Absolute tolerance on the refined score (values of order 1..N) and on the plan * M * N.
ATOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 1.5e-1}


def _ids(sizes):
    return [f"M{m}xN{n}" for m, n in sizes]


def _reference(S64, **kw):
    """float64 reference on the CPU, one problem at a time (fused backends stop
    each problem on its own)."""
    flat = S64.reshape(-1, *S64.shape[-2:])
    outs = [mps(s, return_plan=True, backend="reference", **kw) for s in flat]
    score = torch.stack([o[0] for o in outs]).reshape(S64.shape[:-1])
    plan = torch.stack([o[1] for o in outs]).reshape(S64.shape)
    return score, plan


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("M,N", SIZES, ids=_ids(SIZES))
@pytest.mark.parametrize("mode", ["fixed", "converged"])
def test_forward_matches_float64_reference(M, N, dtype, mode):
    kw = dict(eps=0.05, max_iter=10, tol=0.0) if mode == "fixed" else dict(eps=0.05, max_iter=500, tol=1e-7)
    S64 = hard_scores((3, M, N), seed=M * 31 + N)
    score, plan, info = mps(S64.to("cuda", dtype), return_plan=True, return_info=True, backend="cuda", **kw)
    assert info.backend == "cuda" and score.dtype == dtype and plan.dtype == dtype
    ref_score, ref_plan = _reference(S64, **kw)
    if mode == "fixed":
        assert (info.n_iter.cpu() == 10).all()
    assert_close_report(score.double().cpu(), ref_score, atol=ATOL[dtype] * N, what="refined score")
    assert_close_report(plan.double().cpu() * M * N, ref_plan * M * N, atol=ATOL[dtype] * 10, what="plan*M*N")


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded", "offset", "padded_rows"])
def test_non_contiguous_inputs(layout):
    # Every layout the vector reads must handle: none (transposed, strided),
    # 8-byte ones (a storage offset of 2 floats), 16-byte ones over padded
    # rows (row stride 12 for 8 prompts). Expanded and padded rows run the
    # contiguous input's kernel (float32 x4): bitwise the same. The others
    # run the kernels for any rows and for float32 x2, whose first iteration
    # takes the exponents as S ie2 + c - max where the float32 x4 kernel
    # with the scores in shared memory takes (S - max S) ie2: within a few
    # float32 roundings.
    base = hard_scores((4, 300, 8), seed=3).float().cuda()
    if layout == "transposed":
        x = base.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "strided":
        x = hard_scores((4, 600, 16), seed=3).float().cuda()[:, ::2, ::2]
    elif layout == "offset":
        x = torch.cat([torch.zeros(2, device="cuda"), base.flatten()])[2:].view(4, 300, 8)
        assert x.storage_offset() == 2
    elif layout == "padded_rows":
        x = torch.cat([base, base[..., :4]], dim=-1)[..., :8]
        assert x.stride() == (3600, 12, 1)
    else:
        x = base[:1].expand(3, 300, 8)
    got = mps(x, backend="cuda", max_iter=20, tol=0.0)
    want = mps(x.contiguous(), backend="cuda", max_iter=20, tol=0.0)
    if layout in ("expanded", "padded_rows"):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        assert_close_report(got.double().cpu(), want.double().cpu(), atol=1e-5 * float(want.abs().max()),
                            what=f"{layout} against contiguous")


@pytest.mark.parametrize("M", [37, 1500, 4000], ids=lambda m: f"M{m}")
def test_float2_row_kernels_match_the_kernel_for_any_rows(M):
    # N = 6 in float32: contiguous rows take the float32 x2 kernels
    # (F32Vec2Rows; the backward's twin for N = 6, F32Vec2Rows6, in blocks of
    # 128 threads), transposed ones the kernels for any rows, at each block
    # size of 8 prompts (M = 37, 1500, 4000: 128, 256 and 512 threads). The
    # arithmetic is the same: the forward's outputs bitwise, the gradient
    # within a few roundings (the x2 backward requests its rows at once);
    # the refined score against the float64 reference.
    S64 = hard_scores((3, M, 6), seed=M)
    base = S64.float().cuda()
    up = torch.randn(3, M, generator=torch.Generator().manual_seed(M)).cuda()
    outs = []
    x2_bwd = "F32Vec2Rows6" if M <= 1024 else "F32Vec2Rows<8>"
    for x, rows in ((base, ("F32Vec2Rows<8>", x2_bwd)),
                    (base.transpose(-1, -2).contiguous().transpose(-1, -2), ("AnyRows<8>", "AnyRows<8>"))):
        x = x.detach().requires_grad_()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            score, plan = mps(x, eps=0.1, max_iter=30, tol=0.0, return_plan=True, backend="cuda")
            (g,) = torch.autograd.grad(score, x, up)
            torch.cuda.synchronize()
        # The profiler names the kernels that ran: the layout picked them.
        for kernel, kernel_rows in zip(("mps_fwd_kernel", "mps_bwd_kernel"), rows):
            names = [e.name for e in prof.events() if kernel in e.name]
            assert names and all(kernel_rows in n for n in names), (kernel, kernel_rows, names)
        outs.append((score.detach(), plan.detach(), g))
    assert outs[0][0].is_contiguous() and outs[1][2].shape == (3, M, 6)
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=0, atol=0)
    g0, g1 = outs[0][2], outs[1][2]
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6 * float(g0.abs().max()))
    ref_score, _ = _reference(S64, eps=0.1, max_iter=30, tol=0.0)
    assert_close_report(outs[0][0].double().cpu(), ref_score, atol=ATOL[torch.float32] * 6, what="refined score")


def test_eight_prompt_float32_forward_runs_the_four_block_kernel():
    # The float32 x4 forward of 8 prompts in blocks of 128 threads is
    # budgeted for four blocks an SM (fwd_min_blocks, its last template
    # argument): the profiler names the kernel that ran, and its refined
    # score meets the float64 reference.
    S64 = hard_scores((3, 1000, 8), seed=8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        score = mps(S64.float().cuda(), eps=0.1, max_iter=30, tol=0.0, backend="cuda")
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if "mps_fwd_kernel" in e.name]
    assert names and all("F32Vec4Rows<8>, 4, false>" in n for n in names), names
    ref_score, _ = _reference(S64, eps=0.1, max_iter=30, tol=0.0)
    assert_close_report(score.double().cpu(), ref_score, atol=ATOL[torch.float32] * 8, what="refined score")


FULL_TILE = [(1024, 8, "F32Vec4Rows<8>, 4, true>"), (1024, 4, "F32Vec4Rows<4>, 4, true>"),
             (512, 16, "F32Vec4Rows<16>, 3, true>"), (1024, 6, "F32Vec2Rows6, 3, true>"),
             (1023, 8, "F32Vec4Rows<8>, 4, false>"), (511, 16, "F32Vec4Rows<16>, 3, false>"),
             (1023, 6, "F32Vec2Rows<8>, 3, false>")]


@pytest.mark.parametrize("M,N,kernel", FULL_TILE, ids=[f"M{m}xN{n}" for m, n, _ in FULL_TILE])
@pytest.mark.parametrize("mode", ["fixed", "converged"])
def test_full_tile_kernels_run_where_every_row_is_a_pixel(M, N, kernel, mode):
    # The float32 forwards of 128 threads have a twin for M = rows x 128
    # (1024 up to 8 prompts, 512 for 16: fwd_full_tile), without the per-row
    # tests of the rows past M, its last template argument true: the float32
    # x4 kernels', and the float32 x2 kernel's for N = 6 (F32Vec2Rows6); one
    # pixel fewer takes the other (false). The profiler names the kernel that ran;
    # the refined score and the plan meet the float64 reference (hard scores,
    # 30 iterations or converged), and in fixed iterations the kernel for any
    # rows (the transposed layout) within float32 roundings.
    S64 = hard_scores((3, M, N), seed=M + N)
    kw = dict(eps=0.05, max_iter=30, tol=0.0) if mode == "fixed" else dict(eps=0.05, max_iter=500, tol=1e-7)
    x = S64.float().cuda()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        score, plan = mps(x, return_plan=True, backend="cuda", **kw)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if "mps_fwd_kernel" in e.name]
    assert names and all(kernel in n for n in names), (kernel, names)
    ref_score, ref_plan = _reference(S64, **kw)
    assert_close_report(score.double().cpu(), ref_score, atol=ATOL[torch.float32] * N, what="refined score")
    assert_close_report(plan.double().cpu() * M * N, ref_plan * M * N, atol=ATOL[torch.float32] * 10, what="plan*M*N")
    if mode == "converged":
        return  # two kernels' stopping iterations may differ by one (roundings)
    t = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # the kernel for any rows
    other, other_plan = mps(t, return_plan=True, backend="cuda", **kw)
    assert_close_report(score, other, atol=2e-5 * float(other.abs().max()), what="full tile against any rows")
    assert_close_report(plan, other_plan, atol=2e-5 * float(other_plan.abs().max()), what="plan against any rows")


@pytest.mark.parametrize("eps", [0.002, 0.01, 10.0], ids=lambda e: f"eps{e}")
@pytest.mark.parametrize("kind", ["hard", "big", "onehot50", "split", "const"])
def test_extreme_inputs_take_the_log_domain_and_stay_exact(kind, eps):
    # Scores far outside the cosine range, or a tiny eps, send scalings out of
    # [e^-30, e^30]: the sweeps whose u or v leave the range and the
    # log-domain rebuilds after them (hard scores at eps = 0.002 take both
    # within 300 iterations). The result is the reference's, never a wrong
    # finite value.
    M, N = 129, 8
    x = extreme_scores(kind, (2, M, N), seed=1, dtype=torch.float32)
    kw = dict(eps=eps, max_iter=300, tol=0.0)
    gt_score, gt_plan = mps(x.double(), return_plan=True, backend="reference", **kw)
    score, plan = mps(x.cuda(), return_plan=True, backend="cuda", **kw)
    assert_extreme_result_close(score, plan, gt_score, gt_plan, x, eps)


def test_per_problem_independence():
    a = hard_scores((6, 257, 8), seed=1).float().cuda()
    b = a.clone()
    b[1:] = hard_scores((5, 257, 8), seed=2).float().cuda()
    sa, ia = mps(a, backend="cuda", return_info=True)
    sb, ib = mps(b, backend="cuda", return_info=True)
    torch.testing.assert_close(sa[0], sb[0], rtol=0, atol=0)
    assert ia.n_iter[0] == ib.n_iter[0]


# Every backward kernel (float32 x4 where N is a multiple of 4, float32 x2
# for N = 6, its twin of a compile-time N up to 1024 pixels, else the one
# for any row) and every place H can wait: shared
# memory with the rows read at once (129 x 4, 1500 x 4 in 256 threads,
# 257 x 8, 129 x 16, 37 x 6), shared memory read row by row (50 x 3),
# registers (2000 x 8, 2500 x 6).
GRAD_SIZES = [(50, 1), (50, 3), (37, 6), (129, 4), (1500, 4), (257, 8), (129, 16), (2000, 8), (2500, 6)]


def _reference_gradient(S64, up):
    """dL/dS of L = sum(up * refined score) through the float64 reference,
    converged (eps 0.1, tol 1e-12), each problem on its own (the reference
    stops a batch together)."""
    x = S64.clone().requires_grad_()
    return torch.stack([torch.autograd.grad(mps(x[i], eps=0.1, max_iter=5000, tol=1e-12, backend="reference"), x,
                                            up[i])[0][i] for i in range(S64.shape[0])])


@pytest.mark.parametrize("M,N", GRAD_SIZES, ids=_ids(GRAD_SIZES))
def test_gradient_matches_reference_on_converged_problems(M, N):
    S64 = hard_scores((2, M, N), seed=M + N)
    up = torch.randn(2, M, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = _reference_gradient(S64, up)
    y = S64.float().cuda().requires_grad_()
    (g,) = torch.autograd.grad(mps(y, eps=0.1, max_iter=5000, tol=1e-7, backend="cuda"), y, up.float().cuda())
    assert_close_report(g.double().cpu(), ref, atol=2e-3 * float(ref.abs().max()), what="dL/dS")


# (The profiler's names write "F32Vec4Rows<8> >", with a space; F32Vec2Rows6
# and F32Vec2Rows<8> do not name each other.)
BWD_KERNELS = [(1024, 6, "F32Vec2Rows6"), (37, 6, "F32Vec2Rows6"), (2500, 6, "F32Vec2Rows<8>"),
               (1024, 8, "F32Vec4Rows<8>"), (1024, 7, "AnyRows<8>")]


@pytest.mark.parametrize("M,N,kernel", BWD_KERNELS, ids=[f"M{m}xN{n}" for m, n, _ in BWD_KERNELS])
def test_backward_kernel_for_each_rows_layout(M, N, kernel):
    # The float32 x2 backward has a twin for N = 6 (F32Vec2Rows6, N known at
    # compile time) in blocks of 128 threads, M <= 1024 (VOC's 1024 x 6);
    # larger M takes the x2 kernel of a run-time N. The profiler names the
    # kernel that ran; the gradient meets the float64 reference's.
    S = hard_scores((2, M, N), seed=M + 3 * N)
    up = torch.randn(2, M, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = _reference_gradient(S, up)
    y = S.float().cuda().requires_grad_()
    score = mps(y, eps=0.1, max_iter=5000, tol=1e-7, backend="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        (g,) = torch.autograd.grad(score, y, up.float().cuda())
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if "mps_bwd_kernel" in e.name]
    assert names and all(kernel in n for n in names), (kernel, names)
    assert_close_report(g.double().cpu(), ref, atol=2e-3 * float(ref.abs().max()), what="dL/dS")


def test_plan_gradient_and_sinkhorn_match_cpu_backend():
    C = (1 - hard_scores((2, 129, 8), seed=9)).float()
    w = torch.randn(2, 129, 8)
    grads = []
    for dev, backend in (("cpu", "cpu"), ("cuda", "cuda")):
        x = C.to(dev).requires_grad_()
        plan = sinkhorn(x, eps=0.1, max_iter=3000, tol=1e-7, backend=backend)
        (g,) = torch.autograd.grad((plan * w.to(dev)).sum(), x)
        grads.append(g.cpu())
    torch.testing.assert_close(grads[1], grads[0], rtol=2e-3, atol=2e-3 * float(grads[0].abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("M,N", [(129, 8), (257, 16), (37, 6)], ids=_ids([(129, 8), (257, 16), (37, 6)]))
def test_low_precision_gradient_close_to_float64(M, N, dtype):
    # 16-bit scores and upstream gradients: the backward reads and writes them
    # as 16-, 8- or 4-byte vectors (N = 8 and 16: 8 elements, N = 6: 2).
    S = hard_scores((2, M, N), seed=M * N).to(dtype)
    up = torch.randn(2, M, generator=torch.Generator().manual_seed(1)).to(dtype)
    x = S.double().requires_grad_()
    (ref,) = torch.autograd.grad(mps(x, eps=0.1, max_iter=3000, tol=1e-10, backend="cpu"), x, up.double())
    y = S.cuda().requires_grad_()
    (g,) = torch.autograd.grad(mps(y, eps=0.1, max_iter=3000, tol=1e-7, backend="cuda"), y, up.cuda())
    assert g.dtype == dtype and g.is_contiguous()
    # Relative to the largest gradient, as the triton backend's test allows.
    rel = {torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype]
    assert_close_report(g.double().cpu(), ref, atol=rel * float(ref.abs().max()), what=f"dL/dS {dtype}")


@pytest.mark.parametrize("layout", ["contiguous", "offset", "strided"])
def test_plan_gradient_in_any_layout(layout):
    # The upstream plan gradient read as 16-byte vectors (contiguous), as
    # 8-byte ones (a storage offset of 2 floats) or one element at a time.
    S = hard_scores((2, 129, 8), seed=5).float()
    values = torch.randn(2 * 129 * 8 + 2, 10, generator=torch.Generator().manual_seed(2))
    grads = []
    for dev in ("cpu", "cuda"):
        base = values.to(dev)  # the layouts are made on the device (.to() would not keep them)
        if layout == "contiguous":
            w = base[: 2 * 129 * 8, 0].reshape(2, 129, 8).contiguous()
        elif layout == "offset":
            w = base[:, 0].contiguous()[2:].view(2, 129, 8)
            assert w.storage_offset() == 2
        else:
            w = base[: 2 * 129 * 8].reshape(2, 129, 8, 10)[..., 3]
        x = S.to(dev).requires_grad_()
        _, plan = mps(x, eps=0.1, max_iter=3000, tol=1e-7, return_plan=True, backend=dev)
        (g,) = torch.autograd.grad(plan, x, w.to(dev))
        grads.append(g.cpu())
    torch.testing.assert_close(grads[1], grads[0], rtol=2e-3, atol=2e-3 * float(grads[0].abs().max()))


def test_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match="float64"):
        mps(torch.rand(2, 10, 4, dtype=torch.float64, device="cuda"), backend="cuda")
    with pytest.raises(ValueError, match="N <= 16"):
        mps(torch.rand(2, 10, 17, device="cuda"), backend="cuda")
    with pytest.raises(ValueError, match="M <= 4096"):
        mps(torch.rand(1, 4097, 4, device="cuda"), backend="cuda")
    x = torch.rand(2, 10, 4, device="cuda")
    x[1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="scores"):
        mps(x, backend="cuda")


@pytest.mark.parametrize("M,N,dtype", [(1024, 8, torch.float32), (1000, 8, torch.float32), (1024, 6, torch.float32),
                                         (129, 6, torch.float32), (2500, 8, torch.float32), (37, 5, torch.bfloat16),
                                         (1023, 16, torch.float16)],
                         ids=["f32x4-full", "f32x4-smem", "f32x2-full", "f32x2-smem", "f32x4-reread", "any-bf16",
                              "any-f16"])
def test_kernel_finiteness_check_flags_nan_and_either_infinity(M, N, dtype):
    # The operator's own check (check_finite=True, a flag the kernel sets
    # from the sum of s 2^-10 over each thread's entries, read after it):
    # NaN, +inf and -inf anywhere raise, on the kernels with the scores in
    # shared memory and on those that read them again (M > 1024 for 8
    # prompts); the largest finite scores do not (no overflow of the sum),
    # nor does a NaN with the check off.
    for bad in (float("nan"), float("inf"), float("-inf"), "both", "both in a row"):
        x = torch.rand(3, M, N, device="cuda").to(dtype)
        if bad == "both":
            x[0, M - 1, 0], x[2, M // 2, N - 1] = float("inf"), float("-inf")
        elif bad == "both in a row":  # inf - inf: a NaN in one thread's sum
            x[1, M // 2, 0], x[1, M // 2, N - 1] = float("inf"), float("-inf")
        else:
            x[1, M // 3, N // 2] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            torch.ops.otseg.mps_forward(x, 0.05, 10, 0.0, False, True)
        torch.ops.otseg.mps_forward(x, 0.05, 10, 0.0, False, False)  # unchecked: no error
    big = torch.full((3, M, N), torch.finfo(dtype).max, device="cuda", dtype=dtype)
    big[:, ::2] = -torch.finfo(dtype).max
    torch.ops.otseg.mps_forward(big, 0.05, 3, 0.0, False, True)


def test_opcheck_on_cuda_tensors():
    S = hard_scores((3, 65, 8), seed=4).float().cuda()
    torch.library.opcheck(torch.ops.otseg.mps_forward.default, (S, 0.05, 20, 0.0, True, True))
    _, _, f, g, _ = torch.ops.otseg.mps_forward(S, 0.05, 20, 0.0, False, True)
    torch.library.opcheck(torch.ops.otseg.mps_backward.default,
                          (torch.randn(3, 65, device="cuda"), None, S, f, g, 0.05))


def test_torch_compile_fullgraph_matches_eager():
    S = hard_scores((2, 3, 129, 8), seed=5).float().cuda().requires_grad_()

    def f(x):
        return mps(x, backend="cuda").sum()

    compiled = torch.compile(f, fullgraph=True)
    (g_eager,) = torch.autograd.grad(f(S), S)
    out = compiled(S)
    (g_comp,) = torch.autograd.grad(out, S)
    torch.testing.assert_close(out, f(S).detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_comp, g_eager, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not triton_backend.available, reason=f"triton backend unavailable: {triton_backend.error}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cuda_and_triton_agree(dtype):
    S = hard_scores((4, 900, 8), seed=6).to("cuda", dtype)
    sc, pc, ic = mps(S, return_plan=True, return_info=True, backend="cuda")
    st, pt, it = mps(S, return_plan=True, return_info=True, backend="triton")
    assert (ic.n_iter - it.n_iter).abs().max() <= 1
    assert_close_report(sc.double().cpu(), st.double().cpu(), atol=ATOL[dtype] * 8, what="cuda vs triton score")


def test_auto_picks_a_fused_backend_and_says_which():
    _, info = mps(torch.rand(2, 3, 100, 8, device="cuda"), return_info=True)
    assert info.backend in ("cuda", "triton")
    assert info.n_iter.shape == (2, 3)


def test_batch_dims_and_a_repeatable_backward():
    """The operator takes [..., M, N] like the flattened problems, and the
    backward (prompt weights summed in a fixed order, no atomics) gives the
    same bits on every launch."""
    x = hard_scores((2, 3, 257, 8), seed=6).float().cuda()
    out = torch.ops.otseg.mps_forward(x, 0.05, 30, 0.0, True, False)
    ref = torch.ops.otseg.mps_forward(x.reshape(-1, 257, 8), 0.05, 30, 0.0, True, False)
    for got, want in zip(out, ref):
        assert got.shape[:2] == (2, 3) and torch.equal(got, want.reshape(got.shape))
    score, _, f, g, _ = out
    gs = torch.randn(score.shape, generator=torch.Generator().manual_seed(8)).cuda()
    grads = [torch.ops.otseg.mps_backward(gs, None, x, f, g, 0.05) for _ in range(3)]
    assert grads[0].shape == x.shape
    assert all(torch.equal(grads[0], g_) for g_ in grads[1:])


def test_errors_raised_in_the_cuda_library_reach_python():
    """GPU runs crashed (SIGSEGV) where the cuda library raised a C++
    exception: an H200 run on float64 input, and the H100 runs of 41c01fa and
    8667a72 and the H200 run of 0b64572 on a wrongly shaped gradient (the
    backtrace: inside c10::str formatting the check's two shapes; moving the
    backend's host code out of nvcc, in between, did not help). The shapes are
    now formatted as strings (csrc/common/checks.h, OTSEG_CHECK). The probes
    of bench/gpu_errors.py call operators that must raise, each in a child
    process: each must end as the Python exception it should, not a crash."""
    gpu_errors = import_bench_script("gpu_errors")
    results = gpu_errors.run_all()
    assert all(ok for ok, _ in results.values()), "\n".join(
        f"{name}: {'ok' if ok else 'FAILED'}: {how}" for name, (ok, how) in results.items())
