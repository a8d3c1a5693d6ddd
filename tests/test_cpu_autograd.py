"""Gradients of the fused CPU kernel (the implicit gradient of the converged
fixed point, SPEC section 1), the operator registrations (opcheck) and
torch.compile."""

import math

import pytest
import torch

from otseg.ops import mps, sinkhorn

from helpers import (
    BATCH_LAYOUTS,
    HALF_DTYPES,
    OUTPUTS,
    assert_batch_dims_match_flattened,
    assert_close_report,
    batch_layout_scores,
    dtype_id,
    eager_and_compiled,
    extreme_scores,
    hard_scores,
    reference_per_problem,
    run_output,
)

CPU = dict(backend="cpu")
REF = dict(backend="reference")
# Converged, as the implicit gradient assumes.
CONVERGED = dict(eps=0.1, tol=1e-13, max_iter=5000)


def sizes(*mn):
    return [pytest.param(M, N, id=f"M{M}xN{N}") for M, N in mn]


# ------------------------------------------------------------------ gradcheck


@pytest.mark.parametrize("output", OUTPUTS)
def test_gradcheck_float64_converged(output):
    x = hard_scores((2, 7, 4), seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: run_output(output, t, "cpu", **CONVERGED), (x,), atol=1e-6, rtol=1e-4)


def test_double_backward_raises_a_clear_error():
    x = hard_scores((2, 9, 4), seed=2).requires_grad_()
    score = mps(x, eps=0.1, max_iter=50, tol=0.0, **CPU)
    (g,) = torch.autograd.grad(score.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives .* not implemented"):
        g.sum().backward()


def test_calls_without_gradients_build_no_graph_and_give_the_same_results():
    # The operator's autograd kernel skips the graph node when nothing is to
    # be differentiated (grad mode off, or scores without requires_grad); the
    # results are bitwise those of a differentiable call, which gets a node.
    x = hard_scores((2, 3, 9, 4), seed=5, dtype=torch.float32)
    op = torch.ops.otseg.mps_forward
    graph = op(x.clone().requires_grad_(), 0.05, 100, 1e-6, True, False)
    assert graph[0].grad_fn is not None and graph[1].grad_fn is not None
    with torch.no_grad():
        no_grad = op(x.clone().requires_grad_(), 0.05, 100, 1e-6, True, False)
    for out in (op(x, 0.05, 100, 1e-6, True, False), no_grad):
        assert all(t.grad_fn is None and not t.requires_grad for t in out)
        assert all(torch.equal(a.detach(), b) for a, b in zip(graph, out))


@pytest.mark.parametrize("in_dim", [0, 2])
def test_vmap_solves_every_problem_in_one_call(in_dim, capfd):
    # The operator's vmap rule moves the mapped dim to the front and makes one
    # call (functorch's fallback, one call per element, warns on stderr).
    x = hard_scores((3, 4, 9, 5), seed=6)
    score, plan = torch.func.vmap(lambda s: mps(s, return_plan=True, **CPU), in_dims=in_dim)(x.movedim(0, in_dim))
    expected = mps(x, return_plan=True, **CPU)
    assert torch.equal(score, expected[0]) and torch.equal(plan, expected[1])
    assert torch.equal(torch.func.vmap(lambda c: sinkhorn(c, **CPU))(1 - x), sinkhorn(1 - x, **CPU))
    assert "performance drop" not in capfd.readouterr().err
    with pytest.raises(RuntimeError, match="functorch transforms"):  # gradients through torch.func: not supported
        torch.func.grad(lambda s: mps(s, **CPU).sum())(x)


def test_forward_mode_ad_raises_instead_of_dropping_the_tangent():
    import torch.autograd.forward_ad as fwAD

    x = hard_scores((2, 9, 4), seed=2)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match="jvp is not implemented"):
            mps(dual, **CPU)
        with torch.no_grad(), pytest.raises(RuntimeError, match="jvp is not implemented"):
            mps(dual, **CPU)


@pytest.mark.parametrize("M,N", sizes((1, 4), (5, 1), (3, 2), (2, 9)))
def test_gradcheck_float64_edge_sizes(M, N):
    x = hard_scores((2, M, N), seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: run_output("score+plan", t, "cpu", **CONVERGED), (x,), atol=1e-6, rtol=1e-4)


def test_gradcheck_float64_non_contiguous_input():
    base = hard_scores((2, 4, 7), seed=3)
    x = base.transpose(-1, -2).detach().requires_grad_()
    assert not x.is_contiguous()
    assert torch.autograd.gradcheck(lambda t: run_output("score+plan", t, "cpu", **CONVERGED), (x,), atol=1e-6, rtol=1e-4)


# -------------------------------------------------- against the reference autograd


def _losses(output, x, backend, kw, weights):
    out = run_output(output, x, backend, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    return sum((o * w).sum() for o, w in zip(outs, weights))


@pytest.mark.parametrize("eps", [0.05, 0.5], ids=lambda e: f"eps{e}")
@pytest.mark.parametrize("output", OUTPUTS)
def test_gradient_matches_reference_autograd_on_converged_problems(output, eps):
    M, N = 37, 6
    x = hard_scores((2, M, N), seed=4)
    g = torch.Generator().manual_seed(5)
    # Upstream gradients: of the score [.., M], and of the plan scaled to O(1).
    weights = {
        "score": [torch.randn(2, M, generator=g, dtype=torch.float64)],
        "plan": [M * N * torch.randn(2, M, N, generator=g, dtype=torch.float64)],
        "sinkhorn": [M * N * torch.randn(2, M, N, generator=g, dtype=torch.float64)],
    }
    weights["score+plan"] = weights["score"] + weights["plan"]
    kw = dict(eps=eps, tol=1e-13, max_iter=20000)
    grads = {}
    for backend in ("reference", "cpu"):
        xb = x.clone().requires_grad_()
        _losses(output, xb, backend, kw, weights[output]).backward()
        grads[backend] = xb.grad
    scale = float(grads["reference"].abs().max())
    assert_close_report(grads["cpu"], grads["reference"], atol=1e-7 * scale, what="dL/dS")


def test_fixed_iteration_gradient_is_the_implicit_one_not_the_unrolled_one():
    # Documented difference (SPEC section 1): far from convergence the fused
    # gradient is that of the fixed point, not of the few unrolled steps.
    x = hard_scores((1, 37, 6), seed=6)
    grads = {}
    for name, backend, kw in (
        ("cpu-2", "cpu", dict(eps=0.05, max_iter=2, tol=0.0)),
        ("ref-2", "reference", dict(eps=0.05, max_iter=2, tol=0.0)),
    ):
        xb = x.clone().requires_grad_()
        mps(xb, backend=backend, **kw).sum().backward()
        grads[name] = xb.grad
    assert float((grads["cpu-2"] - grads["ref-2"]).abs().max()) > 1e-3 * float(grads["ref-2"].abs().max())


def test_unused_plan_output_does_not_change_the_score_gradient():
    x = hard_scores((2, 37, 6), seed=7)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    mps(xa, **CPU).sum().backward()
    score, _plan = mps(xb, return_plan=True, **CPU)
    score.sum().backward()
    assert torch.equal(xa.grad, xb.grad)


def test_plan_only_gradient_matches_reference():
    x = hard_scores((2, 37, 6), seed=8)
    w = torch.randn(2, 37, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = []
    for backend in ("reference", "cpu"):
        xb = x.clone().requires_grad_()
        _, plan = mps(xb, return_plan=True, backend=backend, eps=0.05, tol=1e-13, max_iter=20000)
        (plan * w).sum().backward()  # the score output gets no gradient
        grads.append(xb.grad)
    assert_close_report(grads[1], grads[0], atol=1e-7 * float(grads[0].abs().max()), what="dL/dS")


def test_gradient_is_per_problem_and_bitwise_independent_of_the_batch():
    p0 = hard_scores((37, 6), seed=9)
    rest = extreme_scores("onehot", (4, 37, 6), seed=10)
    x_alone = p0[None].clone().requires_grad_()
    mps(x_alone, return_plan=True, **CPU)[0].sum().backward()
    x = torch.cat([rest[:2], p0[None], rest[2:]]).requires_grad_()
    mps(x, return_plan=True, **CPU)[0].sum().backward()
    assert torch.equal(x.grad[2], x_alone.grad[0])


@pytest.mark.parametrize("layout", ["transposed", "expanded", "sliced"])
def test_gradient_of_non_contiguous_input_matches_contiguous(layout):
    if layout == "transposed":
        base = hard_scores((2, 6, 37), seed=11)
        view = lambda t: t.transpose(-1, -2)  # noqa: E731
    elif layout == "expanded":
        base = hard_scores((37, 6), seed=12)
        view = lambda t: t.expand(3, 37, 6)  # noqa: E731
    else:
        base = hard_scores((2, 74, 13), seed=13)
        view = lambda t: t[:, ::2, 1:7]  # noqa: E731
    w = torch.randn(view(base).shape[:-1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = []
    for contiguous in (False, True):
        b = base.clone().requires_grad_()
        v = view(b)
        v = v.contiguous() if contiguous else v
        score, plan = mps(v, return_plan=True, **CPU)
        ((score * w).sum() + (plan * plan).sum()).backward()
        grads.append(b.grad)
    assert_close_report(grads[0], grads[1], atol=1e-14 * float(grads[1].abs().max()) + 1e-300, what="dL/dbase")


@pytest.mark.parametrize("dtype", (torch.float32,) + HALF_DTYPES, ids=dtype_id)
def test_low_precision_gradient_close_to_float64(dtype):
    M, N = 37, 6
    x = hard_scores((2, M, N), seed=14, dtype=dtype)
    w = torch.randn(2, M, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = {}
    for dt in (torch.float64, dtype):
        xb = x.to(dt).clone().requires_grad_()
        score = mps(xb, eps=0.1, tol=1e-9, max_iter=5000, **CPU)
        (score * w.to(dt)).sum().backward()
        assert xb.grad.dtype == dt
        grads[dt] = xb.grad.double()
    scale = float(grads[torch.float64].abs().max())
    # float32 compute, then one rounding of the upstream gradient and of the
    # result to the dtype.
    rel = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype]
    assert_close_report(grads[dtype], grads[torch.float64], atol=rel * scale, what="dL/dS")


# ----------------------------------------------------------------- opcheck


@pytest.mark.parametrize("return_plan", [True, False], ids=["plan", "noplan"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=dtype_id)
def test_opcheck_mps_forward(dtype, return_plan):
    scores = hard_scores((3, 7, 4), seed=20, dtype=dtype).requires_grad_(dtype != torch.float16)
    torch.library.opcheck(torch.ops.otseg.mps_forward.default, (scores, 0.05, 20, 0.0, return_plan, True))


def test_opcheck_mps_forward_without_check_and_with_tol():
    scores = hard_scores((2, 9, 3), seed=21)
    torch.library.opcheck(torch.ops.otseg.mps_forward.default, (scores, 0.1, 50, 1e-6, True, False))


@pytest.mark.parametrize("grads", ["score", "plan", "both", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_opcheck_mps_backward(dtype, grads):
    scores = hard_scores((3, 7, 4), seed=22, dtype=dtype)
    score, plan, f, g, _ = torch.ops.otseg.mps_forward(scores, 0.05, 20, 0.0, True, True)
    gen = torch.Generator().manual_seed(3)
    gs = torch.randn(score.shape, generator=gen, dtype=dtype) if grads in ("score", "both") else None
    gp = torch.randn(plan.shape, generator=gen, dtype=dtype) if grads in ("plan", "both") else None
    torch.library.opcheck(torch.ops.otseg.mps_backward.default, (gs, gp, scores, f, g, 0.05))


@pytest.mark.parametrize("layout", BATCH_LAYOUTS)
def test_operators_take_batch_dims_like_the_flattened_problems(layout):
    """The fused operators take scores [..., M, N] (no reshape by the caller):
    outputs carry the batch dims and equal those of the flattened problems,
    also where the batch dims cannot be merged into a view (a permuted batch)."""
    x = batch_layout_scores(layout, seed=25)
    score, plan, f, g, gs, gp = assert_batch_dims_match_flattened(
        lambda s: torch.ops.otseg.mps_forward(s, 0.1, 50, 1e-9, True, True),
        lambda *a: torch.ops.otseg.mps_backward(*a, 0.1), x, seed=7)
    torch.library.opcheck(torch.ops.otseg.mps_forward.default, (x, 0.1, 20, 0.0, True, True))
    torch.library.opcheck(torch.ops.otseg.mps_backward.default, (gs, gp, x, f, g, 0.1))
    with pytest.raises(RuntimeError, match="must have shape"):
        torch.ops.otseg.mps_backward(gs.reshape(-1, 9), None, x, f, g, 0.1)
    if x.dim() > 2:
        # Through autograd, as mps() calls it: the gradient lands in x's shape.
        xr = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad((torch.ops.otseg.mps_forward(xr, 0.1, 50, 1e-9, False, True)[0] * gs).sum(), xr)
        assert torch.equal(gx, torch.ops.otseg.mps_backward(gs, None, x, f, g, 0.1))


def test_mps_backward_with_non_contiguous_upstream_plan_gradient():
    scores = hard_scores((2, 7, 4), seed=23)
    score, plan, f, g, _ = torch.ops.otseg.mps_forward(scores, 0.1, 500, 1e-12, True, True)
    gp = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64).transpose(-1, -2)
    gs = torch.randn(2, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64).expand(2, 7)
    a = torch.ops.otseg.mps_backward(gs, gp, scores, f, g, 0.1)
    b = torch.ops.otseg.mps_backward(gs.contiguous(), gp.contiguous(), scores, f, g, 0.1)
    assert torch.equal(a, b)


def test_mps_backward_output_is_fully_written():
    P, M, N = 3, 1023, 16
    scores = hard_scores((P, M, N), seed=24, dtype=torch.float32)
    score, plan, f, g, _ = torch.ops.otseg.mps_forward(scores, 0.05, 300, 1e-7, True, True)
    gs = torch.randn(P, M, generator=torch.Generator().manual_seed(6))
    junk = torch.full((P, M, N), math.nan)
    del junk
    grad = torch.ops.otseg.mps_backward(gs, None, scores, f, g, 0.05)
    assert grad.shape == (P, M, N) and grad.dtype == torch.float32
    assert torch.isfinite(grad).all()
    zero = torch.ops.otseg.mps_backward(None, None, scores, f, g, 0.05)
    assert torch.equal(zero, torch.zeros_like(zero))


# ------------------------------------------------------------------ compile


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_torch_compile_fullgraph_matches_eager(dtype):
    torch._dynamo.reset()

    def fn(x, w):
        score, plan = mps(x, return_plan=True, backend="cpu")
        return (score * w).sum() + (plan * plan).sum() * 1e3, score, plan

    x = hard_scores((2, 3, 37, 6), seed=30, dtype=dtype)
    w = torch.randn(2, 3, 37, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    results = eager_and_compiled(fn, x, w)
    for a, b, what in zip(results["compiled"], results["eager"], ("score", "plan", "grad")):
        assert_close_report(a, b, atol=0.0, what=what)


@pytest.mark.slow
def test_torch_compile_fullgraph_dynamic_eps_and_shapes():
    # With dynamic=True (or once a second eps recompiles) dynamo passes eps as
    # a symbolic float; the argument checks must not break the graph on it.
    torch._dynamo.reset()

    def fn(x, eps):
        score, plan = mps(x, eps=eps, tol=1e-10, max_iter=2000, return_plan=True, backend="cpu")
        return score, plan

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for shape, eps in (((2, 3, 37, 6), 0.05), ((2, 3, 37, 6), 0.1), ((4, 29, 5), 0.2)):
        x = hard_scores(shape, seed=32)
        score, plan = compiled(x, eps)
        eager_score, eager_plan = fn(x, eps)
        assert torch.equal(score, eager_score) and torch.equal(plan, eager_plan), f"{shape}, eps {eps}"
        ref_score, ref_plan, _ = reference_per_problem(x, eps, 2000, 1e-10)
        assert_close_report(score, ref_score, atol=1e-8, rtol=1e-8, what=f"score {shape}, eps {eps}")
        assert_close_report(plan, ref_plan, atol=1e-10, rtol=1e-8, what=f"plan {shape}, eps {eps}")


@pytest.mark.slow
def test_torch_compile_fullgraph_sinkhorn_and_info():
    torch._dynamo.reset()

    def fn(c):
        plan, info = sinkhorn(c, backend="cpu", return_info=True)
        return plan, info.n_iter

    compiled = torch.compile(fn, fullgraph=True)
    c = 1 - hard_scores((4, 37, 6), seed=31)
    p1, n1 = compiled(c)
    p2, n2 = fn(c)
    assert torch.equal(p1, p2) and torch.equal(n1, n2)
