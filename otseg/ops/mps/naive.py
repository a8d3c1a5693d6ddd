"""The reference: the published Multi-Prompts Sinkhorn as it runs in PyTorch.

This is the correctness reference (tests run it in float64) and the speed
baseline of every benchmark (SPEC section 4). It is deliberately the published
algorithm, not a fast one:

- log-domain iterations with potentials in cost units, f then g, from zero;
- a transposed copy of the cost for the column step;
- one stopping test for the whole batch, on the batch-mean error
  ``mean |f_t - f_(t-1)|``, read on the host after every iteration;
- gradients by autograd through the unrolled loop.

Import it, never copy it.
"""

import math

import torch


def sinkhorn_log(cost, eps, max_iter, tol):
    """Entropic OT between uniform marginals, published algorithm.

    Args:
        cost: [..., M, N] costs.
        eps: entropic regularisation (> 0).
        max_iter: most iterations (>= 1).
        tol: stop when the batch-mean ``mean_m |f_t - f_(t-1)|`` is below it;
            0 runs exactly ``max_iter`` iterations.

    Returns:
        (plan [..., M, N], iterations run: int, the same for every problem).
    """
    M, N = cost.shape[-2:]
    log_mu = math.log(1.0 / M)
    log_nu = math.log(1.0 / N)
    f = cost.new_zeros(cost.shape[:-1])
    g = cost.new_zeros(cost.shape[:-2] + (N,))
    cost_t = cost.transpose(-1, -2).contiguous()
    n_iter = 0
    for _ in range(max_iter):
        f_prev = f
        f = eps * log_mu - eps * torch.logsumexp((g.unsqueeze(-2) - cost) / eps, dim=-1)
        g = eps * log_nu - eps * torch.logsumexp((f.unsqueeze(-2) - cost_t) / eps, dim=-1)
        n_iter += 1
        err = (f - f_prev).abs().mean()
        if err.item() < tol:
            break
    plan = torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - cost) / eps)
    return plan, n_iter


def mps(scores, eps, max_iter, tol):
    """Refined score ``M*N*sum_n T*S`` with ``T = Sinkhorn(1 - S)``.

    Args:
        scores: [..., M, N] cosine similarities S.

    Returns:
        (refined score [..., M], plan [..., M, N], iterations run: int).
    """
    M, N = scores.shape[-2:]
    plan, n_iter = sinkhorn_log(1 - scores, eps, max_iter, tol)
    return M * N * (plan * scores).sum(-1), plan, n_iter
