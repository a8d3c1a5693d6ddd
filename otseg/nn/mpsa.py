"""Multi-Prompts Sinkhorn Attention (MPSA) and the OTSeg decoder (SPEC section 2).

Every Sinkhorn runs through ``otseg.ops.mps``; each module that calls it holds
its own settings (``eps``, ``max_iter``, ``tol``) and ``backend``, and
``set_backend`` switches a whole model at once.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops._checks import check_params
from ..ops.mps import BACKEND_NAMES

__all__ = [
    "BACKENDS",
    "SinkhornModule",
    "MultiPromptSinkhornAttention",
    "MPSADecoderLayer",
    "MPSADecoder",
    "fuse_masks",
    "to_image",
    "set_backend",
    "set_check_finite",
    "sinkhorn_modules",
]

BACKENDS = ("auto",) + BACKEND_NAMES


def check_backend(backend):
    """``backend`` if it names a backend (availability is checked at call time), else ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


class SinkhornModule(nn.Module):
    """Base of the modules that call ``otseg.ops.mps``: the Sinkhorn settings
    and the backend switch.

    Args:
        eps: entropic regularisation. Default 0.05.
        max_iter: most Sinkhorn iterations. Default 100.
        tol: stopping tolerance on ``mean_m |f_t - f_(t-1)|``. Default 1e-6.
        backend: "auto" (default), "reference", "cpu", "cuda" or "triton"
            (see ``otseg.ops.backends()``).

    Attributes:
        record_info: when True, each call keeps the op's SinkhornInfo
            (iterations per problem, backend that ran) in ``last_info``.
            Off by default (a side effect that torch.compile need not trace).
        check_finite: raise on NaN or inf scores (default True, as
            ``otseg.ops.mps``). The cpu kernel checks as it reads; on a GPU the
            check is a separate pass and a host synchronisation per call, so
            a GPU training loop (or a CUDA graph capture) may turn it off
            (``set_check_finite``).
    """

    def __init__(self, eps=0.05, max_iter=100, tol=1e-6, backend="auto"):
        super().__init__()
        # At construction, not at the first forward.
        check_params(eps, max_iter, tol)
        self.eps, self.max_iter, self.tol = eps, max_iter, tol
        self.backend = backend
        self.record_info = False
        self.check_finite = True
        self.last_info = None

    @property
    def backend(self):
        return self._backend

    @backend.setter
    def backend(self, value):
        self._backend = check_backend(value)

    def sinkhorn(self, scores, return_plan=False):
        """``otseg.ops.mps`` with this module's settings: refined score [..., M]
        (and plan [..., M, N] with ``return_plan``) of scores [..., M, N]."""
        out = ops.mps(scores, self.eps, self.max_iter, self.tol, return_plan=return_plan, backend=self.backend,
                      return_info=self.record_info, check_finite=self.check_finite)
        if not self.record_info:
            return out
        self.last_info = out[-1]
        return out[:-1] if return_plan else out[0]

    def extra_repr(self):
        return f"eps={self.eps}, max_iter={self.max_iter}, tol={self.tol}, backend={self.backend!r}"


def sinkhorn_modules(module):
    """The SinkhornModules inside ``module`` (itself included), in order."""
    return [m for m in module.modules() if isinstance(m, SinkhornModule)]


def set_backend(module, backend):
    """Switch every Sinkhorn of ``module`` (itself included) to ``backend``.

    Returns:
        ``module``.
    """
    check_backend(backend)
    for m in sinkhorn_modules(module):
        m.backend = backend
    return module


def set_check_finite(module, enabled):
    """Turn the NaN / inf check of every Sinkhorn of ``module`` (itself
    included) on or off (``SinkhornModule.check_finite``).

    Returns:
        ``module``.
    """
    for m in sinkhorn_modules(module):
        m.check_finite = bool(enabled)
    return module


def _check_queries_tokens(queries, tokens, dim=None):
    if queries.dim() != 4:
        raise ValueError(f"queries must have shape [B, K, N, D], got shape {tuple(queries.shape)}")
    if tokens.dim() != 3:
        raise ValueError(f"tokens must have shape [B, M, D], got shape {tuple(tokens.shape)}")
    if queries.shape[0] != tokens.shape[0]:
        raise ValueError(f"queries [B, K, N, D] and tokens [B, M, D] must have the same batch B, got "
                         f"{tuple(queries.shape)} and {tuple(tokens.shape)}")
    if queries.shape[-1] != tokens.shape[-1] or (dim is not None and queries.shape[-1] != dim):
        raise ValueError(f"queries [B, K, N, D] and tokens [B, M, D] must have D = {dim or queries.shape[-1]}, "
                         f"got {tuple(queries.shape)} and {tuple(tokens.shape)}")


class MultiPromptSinkhornAttention(SinkhornModule):
    """Multi-Prompts Sinkhorn Attention, single head (SPEC section 2, steps 1-4).

    Per image b and class k, the plan ``T = Sinkhorn(1 - S)`` between the M
    tokens and the N prompt queries replaces the softmax of cross-attention:
    ``S = <normalize(W_k Z), normalize(W_q X)>``, the mask logit is the refined
    score ``A = M N sum_n T * S`` and each query gathers the values with the
    raw plan, ``O = W_o (sum_m dropout(T)[m, n] V_m)``.

    Args:
        dim: D, the width of queries and tokens.
        dropout: dropout on the plan before it gathers the values. Default 0.1.
        eps, max_iter, tol, backend: the Sinkhorn settings (SinkhornModule).
    """

    def __init__(self, dim, dropout=0.1, eps=0.05, max_iter=100, tol=1e-6, backend="auto"):
        super().__init__(eps, max_iter, tol, backend)
        self.dim = dim
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.plan_dropout = nn.Dropout(dropout)

    def forward(self, queries, tokens):
        """
        Args:
            queries: X [B, K, N, D], one per class and prompt.
            tokens: Z [B, M, D] image tokens.

        Returns:
            (attention output O [B, K, N, D], mask logits A [B, K, M]).
        """
        _check_queries_tokens(queries, tokens, self.dim)
        q = F.normalize(self.q_proj(queries), dim=-1)
        k = F.normalize(self.k_proj(tokens), dim=-1)
        v = self.v_proj(tokens)
        # One copy to [B, K, M, N] order (the einsum gives [B, M, K, N] strides): each problem's tile is then
        # contiguous, which the reference's passes over M and N and the fused kernels' reads want.
        scores = torch.einsum("bmd,bknd->bkmn", k, q).contiguous()
        mask, plan = self.sinkhorn(scores, return_plan=True)
        out = torch.einsum("bkmn,bmd->bknd", self.plan_dropout(plan), v)
        return self.out_proj(out), mask


class MPSADecoderLayer(nn.Module):
    """One decoder layer: MPSA, then post-norm residuals around it and a ReLU
    FFN (SPEC section 2, step 5); no self-attention.

    Args:
        dim: D. ffn_dim: hidden width of the FFN. Default 2048.
        dropout: on the plan, the residual branches and inside the FFN. Default 0.1.
        eps, max_iter, tol, backend: the Sinkhorn settings of the attention.
    """

    def __init__(self, dim, ffn_dim=2048, dropout=0.1, eps=0.05, max_iter=100, tol=1e-6, backend="auto"):
        super().__init__()
        self.attn = MultiPromptSinkhornAttention(dim, dropout, eps, max_iter, tol, backend)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, queries, tokens):
        """
        Args:
            queries: X [B, K, N, D]. tokens: Z [B, M, D].

        Returns:
            (updated queries [B, K, N, D], mask logits [B, K, M]).
        """
        out, mask = self.attn(queries, tokens)
        x = self.norm1(queries + self.dropout1(out))
        x = self.norm2(x + self.dropout3(self.linear2(self.dropout2(F.relu(self.linear1(x))))))
        return x, mask


def fuse_masks(masks):
    """The decoder's logit from the layers' mask logits A_1..A_L: the last
    mask times ``sigmoid(A_l)^(1/(L-1))`` for each earlier layer l.

    Args:
        masks: list of L mask logits, each [B, K, M] (or any equal shape).

    Returns:
        fused logits, the shape of one mask.
    """
    if len(masks) == 1:
        return masks[0]
    # The product of powers as exp(mean log-sigmoid): no underflow for very negative logits.
    gate = torch.stack([F.logsigmoid(m) for m in masks[:-1]]).mean(0).exp()
    return masks[-1] * gate


def to_image(logits, grid=None, out_size=None):
    """Per-token logits [B, K, M] as maps [B, K, h, w], upsampled bilinearly
    (``align_corners=False``) to ``out_size``.

    Args:
        logits: [B, K, M].
        grid: (h, w) with h*w = M; None returns ``logits`` unchanged.
        out_size: (H, W) of the output; None keeps (h, w).
    """
    if grid is None:
        if out_size is not None:
            raise ValueError("out_size needs the token grid (h, w)")
        return logits
    h, w = int(grid[0]), int(grid[1])
    B, K, M = logits.shape
    if h * w != M:
        raise ValueError(f"grid {h}x{w} does not match M = {M} tokens")
    maps = logits.reshape(B, K, h, w)
    if out_size is not None and tuple(out_size) != (h, w):
        maps = F.interpolate(maps, size=tuple(int(s) for s in out_size), mode="bilinear", align_corners=False)
    return maps


class MPSADecoder(nn.Module):
    """The OTSeg decoder: L MPSA decoder layers over the same image tokens and
    the fusion of their masks (SPEC section 2).

    Args:
        dim: D. Default 512.
        num_layers: L. Default 3.
        ffn_dim: FFN width. Default 2048.
        dropout: Default 0.1.
        eps, max_iter, tol, backend: the Sinkhorn settings of every layer.
    """

    def __init__(self, dim=512, num_layers=3, ffn_dim=2048, dropout=0.1, eps=0.05, max_iter=100, tol=1e-6,
                 backend="auto"):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.layers = nn.ModuleList(
            MPSADecoderLayer(dim, ffn_dim, dropout, eps, max_iter, tol, backend) for _ in range(num_layers)
        )

    def forward(self, queries, tokens, grid=None, out_size=None):
        """
        Args:
            queries: [B, K, N, D]. tokens: [B, M, D].
            grid: the token grid (h, w), h*w = M; None keeps the logits per token.
            out_size: (H, W) to upsample to (the input image); None keeps (h, w).

        Returns:
            (logits ``Y_dec`` [B, K, H, W] (or [B, K, h, w], or [B, K, M]
            without grid), list of the L layers' mask logits [B, K, M]).
        """
        masks = []
        x = queries
        for layer in self.layers:
            x, mask = layer(x, tokens)
            masks.append(mask)
        return to_image(fuse_masks(masks), grid, out_size), masks

