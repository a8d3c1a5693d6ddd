"""The reference backend (otseg/ops/mps/naive.py) against ground truth that
does not come from otseg: an independent numpy/scipy float64 implementation of
SPEC section 1 (helpers.np_sinkhorn) and POT's log-domain Sinkhorn."""

import warnings

import numpy as np
import pytest
import torch

from otseg.ops import mps, sinkhorn

from helpers import (
    OUTPUTS,
    run_output,
    assert_close_report,
    hard_scores,
    np_batch_mean_iterations,
    np_mps_batch,
    np_sinkhorn_batch,
    random_costs,
)

REF = dict(backend="reference")
SIZES = [(1, 1), (5, 1), (1, 4), (37, 6), (129, 8)]


def sizes(*mn):
    return [pytest.param(M, N, id=f"M{M}xN{N}") for M, N in mn]


# --------------------------------------------------- independent implementation


@pytest.mark.parametrize("max_iter", [1, 7, 50], ids=lambda n: f"iters{n}")
@pytest.mark.parametrize("eps", [0.05, 0.5], ids=lambda e: f"eps{e}")
@pytest.mark.parametrize("M,N", sizes(*SIZES))
def test_mps_matches_independent_float64_at_fixed_iterations(M, N, eps, max_iter):
    S = hard_scores((3, M, N), seed=M * 1000 + N)
    score, plan, info = mps(S, eps, max_iter, 0.0, return_plan=True, return_info=True, **REF)
    e_score, e_plan, e_n = np_mps_batch(S, eps, max_iter, 0.0)
    assert (e_n == max_iter).all()
    assert info.n_iter.tolist() == [max_iter] * 3
    assert score.dtype == plan.dtype == torch.float64
    assert_close_report(plan * M * N, e_plan * M * N, atol=1e-10, what="plan*M*N")
    assert_close_report(score, e_score, atol=1e-10, rtol=1e-10, what="refined score")


@pytest.mark.parametrize("max_iter", [1, 7, 50], ids=lambda n: f"iters{n}")
@pytest.mark.parametrize("M,N", sizes((37, 6), (6, 37), (1, 3)))
def test_sinkhorn_matches_independent_float64_at_fixed_iterations(M, N, max_iter):
    C = random_costs((2, M, N), seed=11)
    plan = sinkhorn(C, 0.1, max_iter, 0.0, **REF)
    e_plan, _, _, _ = np_sinkhorn_batch(C, 0.1, max_iter, 0.0)
    assert_close_report(plan * M * N, e_plan * M * N, atol=1e-10, what="plan*M*N")


def test_refined_score_is_mn_weighted_sum_of_plan_times_scores():
    S = hard_scores((2, 3, 37, 6), seed=5)
    score, plan = mps(S, return_plan=True, **REF)
    assert_close_report(score, 37 * 6 * (plan * S).sum(-1), atol=1e-12, what="refined score")


# ------------------------------------------------------------------------ POT

POT_SIZES = [(37, 6), (5, 1), (1, 4), (129, 8)]


@pytest.mark.parametrize("eps", [0.05, 0.5], ids=lambda e: f"eps{e}")
@pytest.mark.parametrize("M,N", sizes(*POT_SIZES))
def test_converged_plan_matches_pot_sinkhorn_log(M, N, eps):
    # POT is a test dependency (installed by the Makefile); a GPU machine without it skips this.
    ot = pytest.importorskip("ot")
    S = hard_scores((M, N), seed=M + 7 * N)
    C = (1 - S).numpy()
    a, b = np.full(M, 1.0 / M), np.full(N, 1.0 / N)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected, log = ot.bregman.sinkhorn_log(a, b, C, eps, numItermax=200000, stopThr=1e-14, log=True)
    assert log["niter"] < 199999, "POT did not converge: the ground truth is not usable"
    expected = torch.from_numpy(expected)

    plan, info = sinkhorn(torch.from_numpy(C), eps, 200000, 1e-14, return_info=True, **REF)
    assert int(info.n_iter) < 200000, "the reference did not converge"
    assert_close_report(plan * M * N, expected * M * N, atol=1e-8, what="plan*M*N vs POT")

    score = mps(S, eps, 200000, 1e-14, **REF)
    assert_close_report(score, M * N * (expected * S).sum(-1), atol=1e-8, rtol=1e-8, what="refined score vs POT")


# ------------------------------------------------------------------ marginals


@pytest.mark.parametrize("max_iter", [1, 3, 20], ids=lambda n: f"iters{n}")
@pytest.mark.parametrize("M,N", sizes((37, 6), (1, 4), (5, 1), (900, 8)))
def test_columns_sum_to_nu_after_every_g_update(M, N, max_iter):
    C = 1 - hard_scores((2, M, N), seed=3)
    plan = sinkhorn(C, 0.05, max_iter, 0.0, **REF)
    assert_close_report(plan.sum(-2) * N, torch.ones(2, N, dtype=torch.float64), atol=1e-12, what="column sums * N")


@pytest.mark.parametrize("M,N", sizes((37, 6), (1, 4), (5, 1), (129, 8)))
def test_rows_sum_to_mu_after_convergence(M, N):
    C = 1 - hard_scores((2, M, N), seed=4)
    plan = sinkhorn(C, 0.05, 20000, 1e-13, **REF)
    assert_close_report(plan.sum(-1) * M, torch.ones(2, M, dtype=torch.float64), atol=1e-9, what="row sums * M")


def test_rows_are_off_before_convergence():
    # Guards the test above: a single iteration leaves the rows visibly off.
    plan = sinkhorn(1 - hard_scores((37, 6), seed=4), 0.05, 1, 0.0, **REF)
    assert float((plan.sum(-1) * 37 - 1).abs().max()) > 1e-3


# ------------------------------------------------------------- batch layouts

LAYOUTS = {"MN": (), "PMN": (5,), "BKMN": (2, 3), "2x3x4xMN": (2, 3, 4)}


@pytest.mark.parametrize("batch", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_batch_layouts_solve_each_problem_alone(batch):
    M, N, eps, iters = 13, 5, 0.05, 10
    S = hard_scores(batch + (M, N), seed=8)
    score, plan, info = mps(S, eps, iters, 0.0, return_plan=True, return_info=True, **REF)
    assert score.shape == batch + (M,)
    assert plan.shape == batch + (M, N)
    assert info.n_iter.shape == batch
    cost_plan = sinkhorn(1 - S, eps, iters, 0.0, **REF)
    assert cost_plan.shape == batch + (M, N)
    for idx in np.ndindex(*batch):
        s1, p1 = mps(S[idx], eps, iters, 0.0, return_plan=True, **REF)
        assert_close_report(score[idx], s1, atol=1e-13, what=f"score{idx}")
        assert_close_report(plan[idx] * M * N, p1 * M * N, atol=1e-13, what=f"plan{idx}")
        assert_close_report(cost_plan[idx] * M * N, p1 * M * N, atol=1e-13, what=f"sinkhorn plan{idx}")
    e_score, e_plan, _ = np_mps_batch(S, eps, iters, 0.0)
    assert_close_report(score, e_score, atol=1e-10, rtol=1e-10, what="score vs independent")


# ------------------------------------------------------------------- gradients

GRAD_MODES = {
    "fixed3": dict(eps=0.1, max_iter=3, tol=0.0),
    "converged": dict(eps=0.1, max_iter=3000, tol=1e-13),
}


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("mode", list(GRAD_MODES))
def test_reference_gradcheck_float64(mode, output):
    x = hard_scores((2, 5, 3), seed=21).requires_grad_()
    kw = GRAD_MODES[mode]
    assert torch.autograd.gradcheck(lambda t: run_output(output, t, "reference", **kw), (x,), atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------- iteration counts


def test_tol_zero_runs_exactly_max_iter():
    S = hard_scores((3, 4, 9, 5), seed=2)
    for max_iter in (1, 2, 17):
        _, info = mps(S, tol=0.0, max_iter=max_iter, return_info=True, **REF)
        assert info.n_iter.shape == (3, 4)
        assert info.n_iter.dtype == torch.int32
        assert (info.n_iter == max_iter).all()


@pytest.mark.parametrize("tol", [1e-3, 1e-6, 1e-10], ids=lambda t: f"tol{t:g}")
@pytest.mark.parametrize("eps", [0.05, 0.2], ids=lambda e: f"eps{e}")
def test_converged_iterations_match_hand_rolled_batch_mean_loop(eps, tol):
    S = hard_scores((3, 2, 37, 6), seed=13)
    _, info = mps(S, eps, 10000, tol, return_info=True, **REF)
    expected = np_batch_mean_iterations(1 - S, eps, 10000, tol)
    assert expected < 10000
    # The published rule stops the whole batch together.
    assert (info.n_iter == expected).all(), (info.n_iter.unique().tolist(), expected)


def test_reference_batch_stops_together_on_batch_mean():
    # Problems that converge at very different speeds alone still report one count.
    S = torch.stack([hard_scores((37, 6), seed=1), torch.full((37, 6), 0.3, dtype=torch.float64)])
    _, info = mps(S, 0.05, 10000, 1e-8, return_info=True, **REF)
    alone = [int(mps(s, 0.05, 10000, 1e-8, return_info=True, **REF)[1].n_iter) for s in S]
    assert alone[1] < alone[0]
    assert info.n_iter.tolist() == [info.n_iter[0].item()] * 2
    assert info.n_iter[0].item() == np_batch_mean_iterations(1 - S, 0.05, 10000, 1e-8)


def test_loose_tol_stops_earlier_than_tight():
    S = hard_scores((2, 37, 6), seed=17)
    counts = [int(mps(S, 0.05, 10000, tol, return_info=True, **REF)[1].n_iter[0]) for tol in (1e-2, 1e-5, 1e-10)]
    assert counts[0] < counts[1] < counts[2] < 10000, counts
