"""Shared test helpers: score generators, an independent float64 Sinkhorn,
per-problem ground truth and per-dtype tolerances.

The independent implementation below is written from SPEC section 1 in numpy
one problem at a time; it never imports ``otseg``. It is the ground
truth for the reference backend. The reference backend (run in float64) is the
ground truth for the fused backends.
"""

import importlib
import math
import os
import sys

import numpy as np
import pytest
import torch

import otseg

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def logsumexp(x, axis):
    """Stable log-sum-exp in numpy (kept here so the tests need no scipy)."""
    mx = np.max(x, axis=axis, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    return np.squeeze(mx, axis=axis) + np.log(np.sum(np.exp(x - mx), axis=axis))


# ---------------------------------------------------------------- generators


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def hard_scores(shape, seed=0, dtype=torch.float64):
    """Scores with a large spread, 0.5*N(0, 1) clipped to [-1, 1] (SPEC section 4)."""
    x = (0.5 * torch.randn(shape, generator=_gen(seed), dtype=torch.float64)).clamp(-1, 1)
    return x.to(dtype)


def clip_scores(shape, seed=0, dtype=torch.float64, dim=32):
    """Cosine similarities of normalised random pixel and prompt embeddings."""
    g = _gen(seed)
    *batch, M, N = shape
    pix = torch.nn.functional.normalize(torch.randn(*batch, M, dim, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(*batch, N, dim, generator=g, dtype=torch.float64), dim=-1)
    return (pix @ txt.transpose(-1, -2)).to(dtype)


def random_costs(shape, seed=0, dtype=torch.float64):
    """Arbitrary non-negative costs in [0, 2] (not of the form 1 - S of a cosine)."""
    return (2 * torch.rand(shape, generator=_gen(seed), dtype=torch.float64)).to(dtype)


def extreme_scores(kind, shape, seed=0, dtype=torch.float64):
    """Finite but extreme scores, far outside the cosine range.

    kinds: ``big`` uniform in [-50, 50]; ``const`` every entry 0.3; ``onehot``
    one prompt at +1 and the others at -1 per pixel; ``onehot50`` the same at
    +-50; ``split`` even pixels +50 on prompt 0, odd pixels -50 everywhere.
    """
    g = _gen(seed)
    if kind == "hard":
        return hard_scores(shape, seed, dtype)
    if kind == "big":
        x = torch.rand(shape, generator=g, dtype=torch.float64) * 100 - 50
    elif kind == "const":
        x = torch.full(shape, 0.3, dtype=torch.float64)
    elif kind in ("onehot", "onehot50"):
        idx = torch.randint(0, shape[-1], shape[:-1], generator=g)
        x = (-torch.ones(shape, dtype=torch.float64)).scatter(-1, idx.unsqueeze(-1), 1.0)
        if kind == "onehot50":
            x = 50 * x
    elif kind == "split":
        x = hard_scores(shape, seed)
        x[..., ::2, 0] = 50
        x[..., 1::2, :] = -50
    else:
        raise ValueError(kind)
    return x.to(dtype)


# ------------------------------------------- independent float64 implementation


def np_sinkhorn(cost, eps, max_iter, tol):
    """One problem, SPEC section 1, in numpy float64.

    Args:
        cost: [M, N] array.

    Returns:
        (plan [M, N], f [M], g [N], iterations run).
    """
    C = np.asarray(cost, dtype=np.float64)
    M, N = C.shape
    f, g = np.zeros(M), np.zeros(N)
    n = 0
    for _ in range(max_iter):
        f_prev = f
        f = eps * math.log(1.0 / M) - eps * logsumexp((g[None, :] - C) / eps, axis=1)
        g = eps * math.log(1.0 / N) - eps * logsumexp((f[:, None] - C) / eps, axis=0)
        n += 1
        if np.mean(np.abs(f - f_prev)) < tol:
            break
    return np.exp((f[:, None] + g[None, :] - C) / eps), f, g, n


def np_sinkhorn_batch(cost, eps, max_iter, tol):
    """Every problem of a batch [..., M, N] solved alone (own stopping test).

    Returns (plan [..., M, N], f [..., M], g [..., N], iterations [...]) as
    float64 tensors (int64 for iterations).
    """
    C = torch.as_tensor(cost).detach().to(torch.float64).numpy()
    batch, (M, N) = C.shape[:-2], C.shape[-2:]
    flat = C.reshape(-1, M, N)
    out = [np_sinkhorn(c, eps, max_iter, tol) for c in flat]
    plan = np.stack([o[0] for o in out]).reshape(*batch, M, N)
    f = np.stack([o[1] for o in out]).reshape(*batch, M)
    g = np.stack([o[2] for o in out]).reshape(*batch, N)
    n = np.array([o[3] for o in out], dtype=np.int64).reshape(batch)
    return torch.from_numpy(plan), torch.from_numpy(f), torch.from_numpy(g), torch.from_numpy(n)


def np_mps_batch(scores, eps, max_iter, tol):
    """Refined score M*N*sum_n T*S per problem (independent implementation).

    Returns (score [..., M], plan [..., M, N], iterations [...]).
    """
    S = torch.as_tensor(scores).detach().to(torch.float64)
    M, N = S.shape[-2:]
    plan, _, _, n = np_sinkhorn_batch(1 - S, eps, max_iter, tol)
    return M * N * (plan * S).sum(-1), plan, n


def np_batch_mean_iterations(cost, eps, max_iter, tol):
    """Iterations of the published stopping rule: the whole batch stops when
    the batch mean of mean_m |f_t - f_(t-1)| drops below tol (numpy, float64)."""
    C = torch.as_tensor(cost).detach().to(torch.float64).numpy()
    M, N = C.shape[-2:]
    f, g = np.zeros(C.shape[:-1]), np.zeros(C.shape[:-2] + (N,))
    for n in range(1, max_iter + 1):
        f_prev = f
        f = eps * math.log(1.0 / M) - eps * logsumexp((g[..., None, :] - C) / eps, axis=-1)
        g = eps * math.log(1.0 / N) - eps * logsumexp((f[..., :, None] - C) / eps, axis=-2)
        if np.mean(np.abs(f - f_prev)) < tol:
            return n
    return max_iter


# ------------------------------------------------------- per-problem reference


def reference_per_problem(scores, eps, max_iter, tol):
    """The float64 reference backend run on each problem alone, so that its
    batch-mean stopping rule becomes the per-problem rule of the fused kernels.

    Returns (score [..., M], plan [..., M, N], iterations [...] int32).
    """
    S = scores.detach().to(torch.float64)
    batch, (M, N) = S.shape[:-2], S.shape[-2:]
    outs = [
        otseg.ops.mps(s, eps, max_iter, tol, return_plan=True, return_info=True, backend="reference")
        for s in S.reshape(-1, M, N)
    ]
    score = torch.stack([o[0] for o in outs]).reshape(*batch, M)
    plan = torch.stack([o[1] for o in outs]).reshape(*batch, M, N)
    n = torch.stack([o[2].n_iter for o in outs]).reshape(batch)
    return score, plan, n


# ----------------------------------------------------------------- tolerances

# Bits of the significand of each dtype (including the implicit one).
_SIGNIFICAND_BITS = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}


def unit_roundoff(dtype):
    return 2.0 ** -_SIGNIFICAND_BITS[dtype]


def max_abs_err(actual, expected):
    return float((actual.detach().to(torch.float64) - expected.detach().to(torch.float64)).abs().max())


def assert_close_report(actual, expected, atol, rtol=0.0, what="value"):
    """allclose in float64 with a message giving the worst error and where."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: {int((~torch.isfinite(a)).sum())} non-finite entries"
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = err > bound
    if bad.any():
        i = int((err - bound).flatten().argmax())
        idx = tuple(int(k) for k in np.unravel_index(i, tuple(a.shape)))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{a.numel()} entries off; worst at {idx}: got {a[idx].item():.10g}, "
            f"expected {e[idx].item():.10g} (|err| {err[idx].item():.3g} > atol {atol:.3g} + rtol {rtol:.3g}*|e|); "
            f"max |err| {err.max().item():.3g}"
        )


# ------------------------------------------------------- shared test drivers

OUTPUTS = ["score", "plan", "score+plan", "sinkhorn"]


def run_output(output, x, backend, **kw):
    """The differentiable output named by ``output`` (one of OUTPUTS) of ``x``."""
    if output == "score":
        return otseg.ops.mps(x, backend=backend, **kw)
    if output == "plan":
        return otseg.ops.mps(x, return_plan=True, backend=backend, **kw)[1]
    if output == "score+plan":
        return otseg.ops.mps(x, return_plan=True, backend=backend, **kw)
    return otseg.ops.sinkhorn(x, backend=backend, **kw)


def eager_and_compiled(fn, x, w):
    """Run ``fn(x, w) -> (loss, score, plan)`` eagerly and under
    torch.compile(fullgraph=True); returns {"eager"|"compiled": (score, plan, dL/dx)}."""
    compiled = torch.compile(fn, fullgraph=True)
    results = {}
    for name, f in (("eager", fn), ("compiled", compiled)):
        xb = x.clone().requires_grad_()
        loss, score, plan = f(xb, w)
        loss.backward()
        results[name] = (score.detach(), plan.detach(), xb.grad)
    return results


# ------------------------------------------------ backends in the model tests

# Backends other than the reference; the ones that do not run on CPU tensors
# here show as skipped, with the reason.
OTHER_BACKENDS = [s.name for s in otseg.ops.backends() if s.name != "reference"]


def cpu_backend_or_skip(name):
    """Skip (with the backend's reason) unless backend ``name`` runs on CPU tensors here."""
    status = next(s for s in otseg.ops.backends() if s.name == name)
    if not status.available or "cpu" not in status.devices:
        pytest.skip(f"backend {name!r} does not run on CPU tensors here: {status.reason}")


def rel_err(a, b):
    """max |a - b| / max |b|, in float64."""
    return float((a.detach().double() - b.detach().double()).abs().max() / b.detach().double().abs().max())


BATCH_LAYOUTS = ["4d", "2d", "permuted-4d"]


def batch_layout_scores(layout, seed, M=9, N=4):
    """Scores [..., M, N] with batch dims that merge into a view ("4d"), none
    ("2d"), or that do not merge ("permuted-4d")."""
    if layout == "4d":
        return hard_scores((2, 3, M, N), seed=seed)
    if layout == "2d":
        return hard_scores((M, N), seed=seed)
    return hard_scores((3, 2, M, N), seed=seed).transpose(0, 1)


def assert_batch_dims_match_flattened(fwd, bwd, x, seed):
    """A fused operator pair on scores x [..., M, N] gives, with the batch dims,
    bitwise what it gives on the flattened problems [P, M, N].

    Args:
        fwd: x -> (score, plan, f, g, n_iter), the plan requested.
        bwd: (grad_score, grad_plan, x, f, g) -> grad.
        x: the scores.
        seed: of the upstream gradients.

    Returns:
        (score, plan, f, g, grad_score, grad_plan) of x, for further checks.
    """
    M, N = x.shape[-2:]
    batch, flat = x.shape[:-2], x.reshape(-1, M, N)
    out, ref = fwd(x), fwd(flat)
    for got, want, tail in zip(out, ref, [(M,), (M, N), (M,), (N,), ()]):
        assert got.shape == (*batch, *tail)
        assert torch.equal(got, want.reshape(got.shape))
    score, plan, f, g, _ = out
    gen = torch.Generator().manual_seed(seed)
    gs = torch.randn(score.shape, generator=gen, dtype=x.dtype).to(x.device)
    gp = torch.randn(plan.shape, generator=gen, dtype=x.dtype).to(x.device)
    grad = bwd(gs, gp, x, f, g)
    want = bwd(gs.reshape(-1, M), gp.reshape(-1, M, N), flat, f.reshape(-1, M), g.reshape(-1, N))
    assert grad.shape == x.shape and torch.equal(grad, want.reshape(x.shape))
    return score, plan, f, g, gs, gp


def assert_extreme_result_close(score, plan, gt_score, gt_plan, x, eps):
    """A float32 fused result on extreme scores ``x`` [..., M, N] (score and
    plan, any device) against the float64 reference's: finite, plan columns
    summing to 1/N after the last g half-step, and plan and score within the
    float32 error of potentials of size C/eps."""
    M, N = x.shape[-2:]
    score, plan = score.cpu(), plan.cpu()
    assert torch.isfinite(score).all() and torch.isfinite(plan).all()
    assert_close_report(plan.double().sum(-2) * N, torch.ones(plan.shape[:-2] + (N,), dtype=torch.float64),
                        atol=1e-5, what="column sums*N")
    rel = 1e-6 * max(1.0, float((1 - x.double()).abs().max()) / eps)
    assert_close_report(plan.double() * M * N, gt_plan * M * N, atol=rel * float((gt_plan * M * N).max()) + 1e-6,
                        what="plan*M*N")
    assert_close_report(score, gt_score, atol=rel * max(1.0, float(gt_score.abs().max())) * 10,
                        what="refined score")


def import_bench_script(name):
    """Import a script of bench/ (not a package) as a module."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)
