"""The fused CPU kernel (backend "cpu", csrc/cpu/) against the
float64 reference: forward values, plans, iteration counts, dtypes, strides,
per-problem independence, robustness, input checks and output coverage.

Gradients, opcheck and torch.compile are in test_cpu_autograd.py.
"""

import math

import pytest
import torch

from otseg.ops import mps, sinkhorn

from helpers import (
    DTYPES,
    HALF_DTYPES,
    assert_close_report,
    dtype_id,
    extreme_scores,
    hard_scores,
    max_abs_err,
    np_sinkhorn_batch,
    random_costs,
    reference_per_problem,
    unit_roundoff,
)

CPU = dict(backend="cpu")
REF = dict(backend="reference")

MS = (1, 37, 900, 1023)
NS = (1, 6, 8, 16)
MODES = {
    "fixed20": dict(eps=0.05, max_iter=20, tol=0.0),
    "converged": dict(eps=0.05, max_iter=5000),
}
# Stopping tolerance of the fused kernel in "converged" mode, per dtype: tight
# enough that the truncation error is below the dtype's own error.
# (float32 stops 10x closer to the fixed point per decade of tol; at 1e-7 the
# truncation, ~2e-4 of the plan, would dominate the float32 rounding error.)
CONVERGED_TOL = {torch.float64: 1e-13, torch.float32: 1e-9, torch.float16: 1e-9, torch.bfloat16: 1e-9}


def dtypes_param(dtypes=DTYPES):
    return pytest.mark.parametrize("dtype", dtypes, ids=dtype_id)


def sizes(*mn):
    return [pytest.param(M, N, id=f"M{M}xN{N}") for M, N in mn]


def float_tolerances(dtype, gt_score):
    """(score atol, plan*M*N atol) of the fused kernel against the float64
    reference on the same (rounded) input, for float64 and float32 compute.

    float64: the two implementations differ only in rounding. float32 (also
    the compute type of half inputs): measured at most 4e-7 of the largest
    score and 7e-6 on plan*M*N over the sizes of the matrix below (fixed and
    converged); the bounds leave 10x and 3x of room.
    """
    scale = max(1.0, float(gt_score.abs().max()))
    if dtype == torch.float64:
        return 1e-10 * scale, 1e-10
    return 4e-6 * scale, 2e-5


def half_output_tolerances(dtype, M, N):
    """(rtol, plan*M*N atol) added for half outputs: one unit in the last
    place of the result (the float32 result is rounded once to the dtype), and
    for float16 plans the spacing of its subnormals (2^-24), as plan entries
    of order 1/(M*N) fall below float16's smallest normal (6e-5)."""
    rtol = 2 * unit_roundoff(dtype)
    plan_atol = 2.0 ** -24 * M * N if dtype == torch.float16 else 0.0
    return rtol, plan_atol


# ------------------------------------------------- against the float64 reference


@pytest.mark.parametrize("mode", list(MODES))
@dtypes_param()
@pytest.mark.parametrize("N", NS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("M", MS, ids=lambda m: f"M{m}")
def test_cpu_matches_float64_reference(M, N, dtype, mode):
    P = 3 if M * N < 1000 else 2
    x = hard_scores((P, M, N), seed=M * 100 + N, dtype=dtype)
    x64 = x.to(torch.float64)  # ground truth on the same rounded values
    kw = dict(MODES[mode])
    if mode == "converged":
        kw["tol"] = CONVERGED_TOL[dtype]
        # Fully converged float64 ground truth, each problem alone.
        gt_score, gt_plan, gt_n = reference_per_problem(x64, kw["eps"], 20000, 1e-13)
    else:
        gt_score, gt_plan, info = mps(x64, return_plan=True, return_info=True, **kw, **REF)
        assert (info.n_iter == kw["max_iter"]).all()

    score, plan, info = mps(x, return_plan=True, return_info=True, **kw, **CPU)
    assert score.dtype == plan.dtype == dtype
    assert score.shape == (P, M) and plan.shape == (P, M, N)
    plan = plan.double()  # scale by M*N in float64, not in the output dtype
    assert info.backend == "cpu"
    if mode == "fixed20":
        assert (info.n_iter == kw["max_iter"]).all()
    elif dtype == torch.float64:
        # Same stopping rule per problem, same arithmetic up to rounding.
        assert info.n_iter.tolist() == gt_n.tolist()

    score_atol, plan_atol = float_tolerances(dtype, gt_score)
    rtol = 0.0
    if dtype in HALF_DTYPES:
        rtol, half_plan_atol = half_output_tolerances(dtype, M, N)
        plan_atol += half_plan_atol
    assert_close_report(score, gt_score, atol=score_atol, rtol=rtol, what="refined score")
    assert_close_report(plan * M * N, gt_plan * M * N, atol=plan_atol, rtol=rtol, what="plan*M*N")

    if dtype in HALF_DTYPES and mode == "fixed20":
        # The reference run in the same dtype, against the same ground truth:
        # the fused kernel may be at most about 2x as far off (house style).
        ref_score, ref_plan = mps(x, return_plan=True, **kw, **REF)
        ref_plan = ref_plan.double()
        floor = 2 * unit_roundoff(dtype) * max(1.0, float(gt_score.abs().max()))
        assert max_abs_err(score, gt_score) <= 2 * max_abs_err(ref_score, gt_score) + floor
        plan_floor = plan_atol + 2 * unit_roundoff(dtype) * float((gt_plan * M * N).abs().max())
        assert max_abs_err(plan * M * N, gt_plan * M * N) <= 2 * max_abs_err(ref_plan * M * N, gt_plan * M * N) + plan_floor


@pytest.mark.parametrize("mode", list(MODES))
@dtypes_param((torch.float64, torch.float32))
@pytest.mark.parametrize("M,N", sizes((37, 6), (900, 8), (1, 4), (5, 1), (6, 37)))
def test_sinkhorn_cpu_matches_reference(M, N, dtype, mode):
    C = random_costs((2, M, N), seed=M + N, dtype=dtype)
    kw = dict(eps=0.1, max_iter=30, tol=0.0) if mode == "fixed20" else dict(eps=0.1, max_iter=5000, tol=CONVERGED_TOL[dtype])
    if mode == "fixed20":
        gt = sinkhorn(C.double(), **kw, **REF)
    else:
        _, gt, _ = reference_per_problem(1 - C.double(), 0.1, 20000, 1e-13)
    plan, info = sinkhorn(C, return_info=True, **kw, **CPU)
    assert info.backend == "cpu" and plan.dtype == dtype
    plan = plan.double()
    _, plan_atol = float_tolerances(dtype, torch.ones(1))
    assert_close_report(plan * M * N, gt * M * N, atol=plan_atol, what="plan*M*N")
    # Columns hold exactly nu after the last g-update.
    assert_close_report(plan.sum(-2) * N, torch.ones(2, N), atol=plan_atol, what="column sums * N")


@dtypes_param(HALF_DTYPES)
@pytest.mark.parametrize("M,N", sizes((37, 6), (900, 8)))
def test_sinkhorn_half_costs_compute_in_float32(M, N, dtype):
    # Half inputs compute in float32: the plan for a half cost must be as
    # accurate as the mps plan for half scores (float32 result, one rounding).
    C = random_costs((2, M, N), seed=M + N, dtype=dtype)
    gt = sinkhorn(C.double(), 0.05, 20, 0.0, **REF).double() * M * N
    plan = sinkhorn(C, 0.05, 20, 0.0, **CPU)
    assert plan.dtype == dtype
    # The house rule (at most ~2x the error of the reference run in the dtype).
    ref = sinkhorn(C, 0.05, 20, 0.0, **REF).double() * M * N
    plan = plan.double() * M * N
    assert max_abs_err(plan, gt) <= 2 * max_abs_err(ref, gt)
    # And the float32 contract.
    _, plan_atol = float_tolerances(torch.float32, torch.ones(1))
    rtol, half_plan_atol = half_output_tolerances(dtype, M, N)
    assert_close_report(plan, gt, atol=plan_atol + half_plan_atol, rtol=rtol, what="plan*M*N")


@pytest.mark.parametrize("tol", [1e-4, 1e-6, 1e-9], ids=lambda t: f"tol{t:g}")
@pytest.mark.parametrize("eps", [0.02, 0.05, 0.5], ids=lambda e: f"eps{e}")
def test_each_problem_stops_on_its_own_error(eps, tol):
    # Problems of very different difficulty in one batch.
    x = torch.cat([
        hard_scores((2, 37, 6), seed=1),
        extreme_scores("onehot", (1, 37, 6), seed=2),
        torch.full((1, 37, 6), 0.3, dtype=torch.float64),
    ])
    score, plan, info = mps(x, eps, 20000, tol, return_plan=True, return_info=True, **CPU)
    gt_score, gt_plan, gt_n = reference_per_problem(x, eps, 20000, tol)
    _, _, _, np_n = np_sinkhorn_batch(1 - x, eps, 20000, tol)
    assert info.n_iter.tolist() == gt_n.tolist() == np_n.tolist()
    assert len(set(info.n_iter.tolist())) > 1, "the batch was meant to hold problems of different difficulty"
    assert_close_report(score, gt_score, atol=1e-10, rtol=1e-10, what="refined score")
    assert_close_report(plan * 37 * 6, gt_plan * 37 * 6, atol=1e-10, what="plan*M*N")


def test_potentials_match_independent_implementation():
    # The op's f and g outputs (used by the backward) at fixed iterations.
    x = hard_scores((3, 37, 6), seed=9)
    for max_iter in (1, 2, 25):
        score, plan, f, g, n_iter = torch.ops.otseg.mps_forward(x, 0.05, max_iter, 0.0, True, True)
        e_plan, e_f, e_g, e_n = np_sinkhorn_batch(1 - x, 0.05, max_iter, 0.0)
        assert n_iter.dtype == torch.int32 and n_iter.tolist() == e_n.tolist()
        assert f.dtype == g.dtype == torch.float64
        assert_close_report(f, e_f, atol=1e-12, what=f"f after {max_iter}")
        assert_close_report(g, e_g, atol=1e-12, what=f"g after {max_iter}")
        assert_close_report(plan * 37 * 6, e_plan * 37 * 6, atol=1e-10, what="plan*M*N")


@dtypes_param(HALF_DTYPES + (torch.float32,))
def test_potentials_are_in_the_compute_dtype(dtype):
    x = hard_scores((2, 9, 4), seed=3, dtype=dtype)
    score, plan, f, g, n_iter = torch.ops.otseg.mps_forward(x, 0.05, 10, 0.0, False, True)
    assert score.dtype == dtype and plan.numel() == 0
    assert f.dtype == g.dtype == torch.float32
    assert f.shape == (2, 9) and g.shape == (2, 4) and n_iter.shape == (2,)


# ---------------------------------------------------------- memory layouts

M_, N_ = 37, 6


def _layouts(dtype):
    """name -> a non-contiguous [.., M, N] view holding problems of hard scores."""
    base = hard_scores((3, 2 * M_ + 1, 2 * N_ + 1), seed=31, dtype=dtype)
    return {
        "transposed": hard_scores((3, N_, M_), seed=32, dtype=dtype).transpose(-1, -2),
        "sliced-step2": base[:, ::2, ::2][:, :M_, :N_],
        "sliced-offset": base[:, 1:M_ + 1, 3:N_ + 3],
        "batch-step2": hard_scores((6, M_, N_), seed=33, dtype=dtype)[::2],
        "expanded-batch": hard_scores((M_, N_), seed=34, dtype=dtype).expand(4, M_, N_),
        "expanded-4d": hard_scores((1, 3, M_, N_), seed=35, dtype=dtype).expand(2, 3, M_, N_),
        "permuted-batch": hard_scores((3, 2, M_, N_), seed=36, dtype=dtype).transpose(0, 1),
        "expanded-prompts": hard_scores((2, M_, 1), seed=37, dtype=dtype).expand(2, M_, N_),
        "column-major-4d": hard_scores((2, 3, N_, M_), seed=38, dtype=dtype).transpose(-1, -2),
    }


LAYOUT_NAMES = list(_layouts(torch.float64))


@pytest.mark.parametrize("mode", ["fixed", "tol"])
@dtypes_param((torch.float64, torch.float32, torch.float16))
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_non_contiguous_input_gives_the_same_bits_as_contiguous(layout, dtype, mode):
    x = _layouts(dtype)[layout]
    assert not x.is_contiguous()
    kw = dict(max_iter=15, tol=0.0) if mode == "fixed" else dict(max_iter=1000, tol=1e-6)
    s1, p1, i1 = mps(x, return_plan=True, return_info=True, **kw, **CPU)
    s2, p2, i2 = mps(x.contiguous(), return_plan=True, return_info=True, **kw, **CPU)
    assert torch.equal(s1, s2)
    assert torch.equal(p1, p2)
    assert torch.equal(i1.n_iter, i2.n_iter)
    assert torch.equal(sinkhorn(1 - x, **kw, **CPU), sinkhorn((1 - x).contiguous(), **kw, **CPU))


def test_expanded_batch_repeats_the_single_problem():
    x = hard_scores((37, 6), seed=40)
    s1, p1, i1 = mps(x, return_plan=True, return_info=True, **CPU)
    s, p, i = mps(x.expand(5, 37, 6), return_plan=True, return_info=True, **CPU)
    for k in range(5):
        assert torch.equal(s[k], s1) and torch.equal(p[k], p1) and int(i.n_iter[k]) == int(i1.n_iter)


# ---------------------------------------------------- per-problem independence


@dtypes_param((torch.float64, torch.float32, torch.bfloat16))
def test_a_problem_is_bitwise_independent_of_the_rest_of_the_batch(dtype):
    M, N = 37, 6
    p0 = hard_scores((M, N), seed=50, dtype=dtype)
    others = [
        hard_scores((6, M, N), seed=51, dtype=dtype),
        extreme_scores("onehot", (6, M, N), seed=52, dtype=dtype),
        torch.full((6, M, N), 0.9, dtype=dtype),
    ]
    kw = dict(eps=0.05, max_iter=500, tol=1e-6)
    s_alone, pl_alone, info_alone = mps(p0, return_plan=True, return_info=True, **kw, **CPU)
    for k, rest in enumerate(others):
        for pos in (0, 3, 6):  # first, middle and last of 7 problems (threads split them differently)
            batch = torch.cat([rest[:pos], p0[None], rest[pos:]])
            s, pl, info = mps(batch, return_plan=True, return_info=True, **kw, **CPU)
            assert torch.equal(s[pos], s_alone), (k, pos)
            assert torch.equal(pl[pos], pl_alone), (k, pos)
            assert int(info.n_iter[pos]) == int(info_alone.n_iter), (k, pos)
    # And in a batch where the neighbours hold NaN (check skipped).
    batch = torch.stack([others[0][0], p0, others[0][1]])
    batch[0, 3, 2] = math.nan
    batch[2, 0, 0] = math.inf
    s, pl, info = mps(batch, return_plan=True, return_info=True, check_finite=False, **kw, **CPU)
    assert torch.equal(s[1], s_alone) and torch.equal(pl[1], pl_alone)
    assert int(info.n_iter[1]) == int(info_alone.n_iter)


def test_independence_holds_with_one_thread_and_with_several():
    x = hard_scores((9, 37, 6), seed=55)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mps(x, return_plan=True, return_info=True, **CPU)
    finally:
        torch.set_num_threads(before)
    many = mps(x, return_plan=True, return_info=True, **CPU)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    assert torch.equal(one[2].n_iter, many[2].n_iter)


# ---------------------------------------------------------------- robustness

EPS_SWEEP = (0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 10.0)
KINDS = ("hard", "big", "const", "onehot", "onehot50", "split")


@dtypes_param((torch.float64, torch.float32))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eps", EPS_SWEEP, ids=lambda e: f"eps{e:g}")
def test_robust_over_eps_and_extreme_scores_fixed_iterations(eps, kind, dtype):
    M, N = 37, 6
    x = extreme_scores(kind, (3, M, N), seed=60, dtype=dtype)
    x64 = x.to(torch.float64)
    gt_score, gt_plan = mps(x64, eps, 50, 0.0, return_plan=True, **REF)
    gt_plan = gt_plan * M * N
    assert torch.isfinite(gt_score).all() and torch.isfinite(gt_plan).all()
    score, plan, info = mps(x, eps, 50, 0.0, return_plan=True, return_info=True, **CPU)
    assert (info.n_iter == 50).all()
    plan = plan.double() * M * N
    score_scale, plan_scale = float(gt_score.abs().max()) + 1e-12, float(gt_plan.abs().max())
    if dtype == torch.float64:
        score_atol, plan_atol = 1e-10 * score_scale, 1e-10 * plan_scale
    else:
        # float32: (1 - S)/eps reaches 5000 here, so float32 compute carries
        # relative errors up to ~1e-4 whatever the algorithm. Bound: twice the
        # error of the reference run in float32, or a 1e-6 relative floor.
        ref_score, ref_plan = mps(x, eps, 50, 0.0, return_plan=True, **REF)
        score_atol = max(2 * max_abs_err(ref_score, gt_score), 1e-6 * score_scale)
        plan_atol = max(2 * max_abs_err(ref_plan.double() * M * N, gt_plan), 1e-6 * plan_scale)
    assert_close_report(score, gt_score, atol=score_atol, what="refined score")
    assert_close_report(plan, gt_plan, atol=plan_atol, what="plan*M*N")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eps", EPS_SWEEP, ids=lambda e: f"eps{e:g}")
def test_robust_over_eps_and_extreme_scores_converged(eps, kind):
    x = extreme_scores(kind, (3, 37, 6), seed=61)
    score, plan, info = mps(x, eps, 1000, 1e-6, return_plan=True, return_info=True, **CPU)
    gt_score, gt_plan, gt_n = reference_per_problem(x, eps, 1000, 1e-6)
    assert info.n_iter.tolist() == gt_n.tolist()
    assert_close_report(score, gt_score, atol=1e-9 * float(gt_score.abs().max()) + 1e-12, what="refined score")
    assert_close_report(plan * 37 * 6, gt_plan * 37 * 6, atol=1e-9, what="plan*M*N")


@pytest.mark.parametrize("eps", [1e-3, 1e-4], ids=lambda e: f"eps{e:g}")
@dtypes_param((torch.float64, torch.float32))
def test_tiny_eps_is_finite_or_raises(eps, dtype):
    # Far below the supported range: a finite answer must still be right,
    # and a non-finite one must not be returned silently.
    x = extreme_scores("big", (2, 37, 6), seed=62, dtype=dtype)
    gt_score = mps(x.double(), eps, 30, 0.0, **REF)
    try:
        score = mps(x, eps, 30, 0.0, **CPU)
    except (RuntimeError, ValueError) as exc:
        assert str(exc)
        return
    assert torch.isfinite(score).all(), "non-finite result returned without an error"
    rel = 1e-9 if dtype == torch.float64 else 1e-3
    assert_close_report(score, gt_score, atol=rel * float(gt_score.abs().max()), what="refined score")


@pytest.mark.parametrize("N", [64, 33])
def test_up_to_64_prompts_work(N):
    x = hard_scores((2, 37, N), seed=70)
    gt_score, gt_plan = mps(x, 0.05, 20, 0.0, return_plan=True, **REF)
    score, plan = mps(x, 0.05, 20, 0.0, return_plan=True, **CPU)
    assert_close_report(score, gt_score, atol=1e-10, what="refined score")
    assert_close_report(plan * 37 * N, gt_plan * 37 * N, atol=1e-10, what="plan*M*N")
    s32 = mps(x.float(), 0.05, 20, 0.0, **CPU)
    assert_close_report(s32, gt_score, atol=1e-4, what="float32 refined score")


@pytest.mark.parametrize("func", ["mps", "sinkhorn"])
def test_more_than_64_prompts_raise_a_clear_error(func):
    x = hard_scores((2, 9, 65), seed=71)
    fn = mps if func == "mps" else sinkhorn
    with pytest.raises(ValueError) as exc:
        fn(x, **CPU)
    msg = str(exc.value)
    assert "65" in msg and "64" in msg and "reference" in msg
    # The reference has no such limit.
    assert torch.isfinite(fn(x, **REF)).all()


# -------------------------------------------------------------- finiteness

POSITIONS = {"first": (0, 0, 0), "middle": (1, 500, 7), "last": (2, 1022, 15)}


@dtypes_param()
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", list(POSITIONS))
def test_nonfinite_is_detected_anywhere_in_the_batch(where, value, dtype):
    x = hard_scores((3, 1023, 16), seed=80, dtype=dtype)
    x[POSITIONS[where]] = value
    with pytest.raises(ValueError, match="NaN or inf"):
        mps(x, **CPU)
    with pytest.raises(ValueError, match="NaN or inf"):
        mps(x.transpose(-1, -2).contiguous().transpose(-1, -2), **CPU)  # column-major read path
    with pytest.raises(ValueError, match="NaN or inf"):
        sinkhorn(1 - x, **CPU)


@dtypes_param((torch.float64, torch.float32, torch.float16))
def test_check_finite_false_runs_and_leaves_other_problems_alone(dtype):
    clean = hard_scores((3, 37, 6), seed=81, dtype=dtype)
    x = clean.clone()
    x[1, 4, 2] = math.nan
    score, plan, info = mps(x, return_plan=True, return_info=True, check_finite=False, max_iter=50, **CPU)
    c_score, c_plan, c_info = mps(clean, return_plan=True, return_info=True, max_iter=50, **CPU)
    for k in (0, 2):
        assert torch.equal(score[k], c_score[k]) and torch.equal(plan[k], c_plan[k])
        assert info.n_iter[k] == c_info.n_iter[k]
    # Garbage in, garbage out: the poisoned problem is not silently finite.
    assert not torch.isfinite(score[1]).all()
    assert 1 <= int(info.n_iter[1]) <= 50


# ------------------------------------------------------------ output coverage


def _poison(*like):
    """Free NaN-filled blocks of the sizes the op is about to allocate, so the
    allocator is likely to hand them back: an output entry the kernel fails to
    write then reads as NaN rather than as a stale plausible value."""
    junk = [torch.full(shape, math.nan, dtype=dtype) for shape, dtype in like]
    del junk


@dtypes_param()
@pytest.mark.parametrize("M,N", sizes((1, 1), (37, 6), (1023, 16), (900, 8), (5, 64)))
def test_every_output_entry_is_written(M, N, dtype):
    P = 3
    x = hard_scores((P, M, N), seed=90, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gt_score, gt_plan = mps(x.double(), 0.05, 8, 0.0, return_plan=True, **REF)
    for return_plan in (True, False):
        _poison(((P, M), dtype), ((P, M, N), dtype), ((P, M), acc), ((P, N), acc))
        score, plan, f, g, n_iter = torch.ops.otseg.mps_forward(x, 0.05, 8, 0.0, return_plan, True)
        plan = plan.double()
        for name, t in (("score", score), ("plan", plan), ("f", f), ("g", g)):
            assert torch.isfinite(t).all(), f"{name} has unwritten (NaN) entries"
        assert n_iter.tolist() == [8] * P
        score_atol, plan_atol = float_tolerances(dtype, gt_score)
        rtol = 0.0
        if dtype in HALF_DTYPES:
            rtol, extra = half_output_tolerances(dtype, M, N)
            plan_atol += extra
        assert_close_report(score, gt_score, atol=score_atol, rtol=rtol, what="refined score")
        if return_plan:
            assert_close_report(plan * M * N, gt_plan * M * N, atol=plan_atol, rtol=rtol, what="plan*M*N")
        else:
            assert plan.numel() == 0


# ------------------------------------------------ every instruction set


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_narrower_instruction_sets_in_own_process(isa):
    """The kernels are compiled once per instruction set (AVX-512, AVX2,
    baseline) and the widest the CPU has runs; OTSEG_CPU_ISA selects a
    narrower one, so its code is tested here too: this file and the gradient
    tests in a process that uses it."""
    import os
    import subprocess
    import sys

    from otseg import _extension

    if _extension.cpu_isa not in ("AVX-512", "AVX2"):
        pytest.skip(f"this build has one instruction set only ({_extension.cpu_isa})")
    if isa == "avx2" and _extension.cpu_isa != "AVX-512":
        pytest.skip("AVX2 is already the instruction set of the main test process")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OTSEG_CPU_ISA=isa)
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow",
           os.path.join(here, "test_cpu_kernel.py"), os.path.join(here, "test_cpu_autograd.py"),
           os.path.join(here, "test_fused_loss.py")]
    check = [sys.executable, "-c", "from otseg import _extension; print(_extension.cpu_isa)"]
    ran = subprocess.run(check, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert ran.stdout.strip() == {"avx2": "AVX2", "baseline": "SSE2"}[isa], ran.stdout + ran.stderr
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"OTSEG_CPU_ISA={isa} run failed (exit {proc.returncode}):\n{out[-8000:]}"
    assert " passed" in out and " failed" not in out, out[-4000:]
