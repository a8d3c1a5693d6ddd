"""Fake (meta) registrations of the fused ``torch.ops.otseg`` MPS operators,
whose kernels (and, for speed, the autograd of ``mps_forward``) live in
``csrc/``; the autograd glue shared with the Triton operator.

The backward is the implicit gradient at the fixed point (README.md beside this
file): one pass per problem from the scores and the final potentials, never an
unrolled loop.
"""

import torch

from ... import _extension


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_outputs(scores, return_plan):
    """Uninitialised outputs of a fused forward on scores [..., M, N]: score
    [..., M], plan [..., M, N] (or [0]), f [..., M], g [..., N] in the compute
    dtype, n_iter [...] int32."""
    *batch, M, N = scores.shape
    acc = _acc_dtype(scores.dtype)
    return (
        scores.new_empty(*batch, M),
        scores.new_empty(*batch, M, N) if return_plan else scores.new_empty(0),
        scores.new_empty(*batch, M, dtype=acc),
        scores.new_empty(*batch, N, dtype=acc),
        scores.new_empty(batch, dtype=torch.int32),
    )


def autograd_pair(backward_op):
    """(setup_context, backward) for a fused MPS forward operator.

    The operator takes ``(scores, eps, max_iter, tol, return_plan, ...)`` and
    returns ``(score, plan, f, g, n_iter)``; ``backward_op(grad_score,
    grad_plan, scores, f, g, eps)`` is its implicit backward. Shared by the C++
    (cpu, cuda) and the Triton operators.
    """

    def setup_context(ctx, inputs, output):
        scores, eps, _max_iter, _tol, return_plan = inputs[:5]
        _score, _plan, f, g, n_iter = output
        ctx.eps = eps
        ctx.return_plan = return_plan
        ctx.n_inputs = len(inputs)
        ctx.save_for_backward(scores, f, g)
        ctx.mark_non_differentiable(f, g, n_iter)

    def backward(ctx, grad_score, grad_plan, _grad_f, _grad_g, _grad_n_iter):
        scores, f, g = ctx.saved_tensors
        grad = backward_op(grad_score, grad_plan if ctx.return_plan else None, scores, f, g, ctx.eps)
        return (grad,) + (None,) * (ctx.n_inputs - 1)

    return setup_context, backward


def vmap_rule(op):
    """The ``torch.vmap`` rule of a fused MPS forward operator ``(scores, eps,
    max_iter, tol, return_plan, ...)``, which takes any batch dims itself: the
    mapped dim moves to the front and one call solves every problem (instead
    of functorch's fallback, one call per element)."""

    def rule(info, in_dims, scores, eps, max_iter, tol, return_plan, *rest):
        out = op(scores.movedim(in_dims[0], 0), eps, max_iter, tol, return_plan, *rest)
        # Without return_plan the plan output is an empty placeholder.
        return out, (0, 0 if return_plan else None, 0, 0, 0)

    return rule


def no_double_backward(ctx, *grads):
    """Autograd of an implicit backward operator: refuses second derivatives."""
    raise RuntimeError(
        "otseg: second derivatives through the fused MPS backward are not implemented; "
        "use backend='reference' for double backward"
    )


def no_context(ctx, inputs, output):
    """setup_context of ``no_double_backward``: nothing to keep."""


# The operator's one overload, bound once: calling it skips the overload
# packet's lookups on every call.
_forward_op = torch.ops.otseg.mps_forward.default if _extension.available else None

if _extension.available:

    @torch.library.register_fake("otseg::mps_forward")
    def _mps_forward_fake(scores, eps, max_iter, tol, return_plan, check_finite):
        return empty_outputs(scores, return_plan)

    @torch.library.register_fake("otseg::mps_backward")
    def _mps_backward_fake(grad_score, grad_plan, scores, f, g, eps):
        return torch.empty_like(scores, memory_format=torch.contiguous_format)

    # The autograd of otseg::mps_forward is registered in C++ (csrc/autograd.cpp:
    # the Python route costs about 90 us a call); the same (setup_context,
    # backward) pair in Python serves the Triton operator.

    torch.library.register_vmap("otseg::mps_forward", vmap_rule(_forward_op))

    # Without this, autograd would silently treat the backward as constant.
    torch.library.register_autograd(
        "otseg::mps_backward", no_double_backward, setup_context=no_context
    )


def mps_forward(scores, eps, max_iter, tol, return_plan, check_finite):
    """Run the fused forward on scores of any batch shape [..., M, N].

    The operator takes the batch dims itself (no reshape here: each would be
    a dispatch and an autograd node per call). The kernel checks finiteness
    while it reads the scores (``check_finite``).

    Returns (refined score [..., M], plan [..., M, N] or None, iterations [...]).
    """
    score, plan, _f, _g, n_iter = _forward_op(
        scores, float(eps), int(max_iter), float(tol), bool(return_plan), bool(check_finite)
    )
    return score, plan if return_plan else None, n_iter
