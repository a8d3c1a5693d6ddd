"""The per-mask sums of the segmentation losses, fused with the bilinear
upsampling of the logits: ``torch.ops.otseg.mask_stats`` (C++ kernel,
``csrc/cpu/mask_stats_cpu*``, CPU tensors) and ``torch.ops.otseg.
mask_stats_triton`` (Triton kernels, ``kernels/mask_stats.py``, CUDA tensors),
with their autograd and fake registrations.

The OTSeg losses (SPEC section 3) score [B, K, H, W] logits, upsampled from
the [B, K, h, w] token grid, against [B, H, W] labels. At COCO-Stuff sizes
(K = 171, 512 x 512 labels) the upsampled logits of one path are 700 MB
(float32) per batch of 4, and upsampling them, their sigmoid, log and powers
and the backward of all that are most of a CPU training step's non-matmul
time. The fused kernels never form them: per mask they interpolate on the
fly, score each pixel in the same pass, and the backward recomputes the terms
and applies the transpose of the interpolation.

Backends of the loss (``loss_backend``): ``"cpu"`` (CPU tensors) and
``"triton"`` (CUDA tensors, for the model backends ``auto``, ``cuda`` and
``triton``; CPU tensors under ``TRITON_INTERPRET=1`` when asked for by name)
are fused; ``"reference"`` is PyTorch (``F.interpolate``, then the sums of
``otseg.model.losses``). Where no fused kernel can run (no Triton, or a grid
the Triton kernel does not take), the loss runs in PyTorch, warns once, and
the loss result names what ran.
"""

import functools
import warnings

import torch

from .. import _extension
from .mps import BACKEND_NAMES
from .mps import triton as _triton

__all__ = ["mask_stats", "loss_backend", "fused_takes"]

_warned = set()


def warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def loss_backend(backend, device):
    """The loss backend that ``backend`` (a model's backend name) means for
    logits on ``device``: ``"cpu"``, ``"triton"`` (fused) or ``"reference"`` (PyTorch).

    ``"auto"``, ``"cuda"`` and ``"triton"`` take the Triton kernel for CUDA
    tensors (``"triton"`` also for CPU tensors under ``TRITON_INTERPRET=1``),
    ``"auto"`` and ``"cpu"`` the C++ kernel for CPU tensors; where that
    kernel cannot run here, the PyTorch loss runs with a warning (once).

    Raises:
        ValueError: unknown backend, or ``"cpu"`` for CUDA tensors or without
            the extension.
    """
    device = torch.device(device)
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {', '.join(BACKEND_NAMES)}")
    if backend == "reference":
        return "reference"
    if backend == "cpu" or (backend == "auto" and device.type == "cpu"):
        if device.type != "cpu":
            raise ValueError(f"the fused loss of backend 'cpu' runs on cpu tensors, got a {device.type} tensor")
        if _extension.available:
            return "cpu"
        if backend == "cpu":
            raise ValueError(f"backend 'cpu' is unavailable here: {_extension.error}")
        why = _extension.error
    elif _triton.available and (device.type == "cuda" or (_triton.interpreted and backend == "triton")):
        return "triton"
    else:
        why = _triton.error or f"the Triton loss kernel does not run on {device.type} tensors"
    warn_once((backend, device.type), f"otseg: backend {backend!r} has no fused loss kernel for {device.type} "
                                      f"tensors here ({why}); the segmentation loss runs in PyTorch (reference)")
    return "reference"


def mask_stats(logits, labels, alpha=0.25, gamma=2.0, ignore_index=255, backend="cpu"):
    """Per-mask sums of ``logits`` upsampled to the labels' size, fused (differentiable in ``logits``).

    Args:
        logits: [B, K, h, w] float32 or float64 (any strides): CPU tensors
            for ``backend="cpu"``, CUDA tensors for ``"triton"``.
        labels: [B, H, W] integer class indices in [0, K) or ``ignore_index``.
        alpha: focal weight of positives (None or < 0: no weighting).
        gamma: focal exponent (>= 0).
        ignore_index: label of pixels that count for no class.
        backend: "cpu" or "triton" (``loss_backend`` picks one).

    Returns:
        [4, B, K] in the logits' dtype: focal sum, ``sum p y``, ``sum p``,
        ``sum y`` over the labelled pixels of each upsampled mask
        (``otseg.model.losses.mask_statistics``).
    """
    alpha = -1.0 if alpha is None or alpha < 0 else float(alpha)
    op = torch.ops.otseg.mask_stats if backend == "cpu" else torch.ops.otseg.mask_stats_triton
    return op(logits, labels, alpha, float(gamma), int(ignore_index))


# ------------------------------------------------------------------ Triton

# The Triton kernels keep a [next_pow2(w), next_pow2(W)] weight tile and an
# [next_pow2(h), next_pow2(w)] gradient tile in registers.
_MAX_WEIGHT_TILE = 1 << 15
_MAX_GRAD_TILE = 1 << 12
_MAX_W = 4096


def _pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


# The C++ kernel keeps labels as int16, -1 for ignored pixels.
_CPU_MAX_K = 32766


def fused_takes(backend, logits, labels):
    """Why the fused loss kernel of ``backend`` ("cpu" or "triton") cannot take
    these logits [B, K, h, w] and labels [B, H, W], or None."""
    if backend == "cpu":
        K = logits.shape[1]
        return None if K <= _CPU_MAX_K else f"more than {_CPU_MAX_K} classes (got K = {K})"
    h, w = logits.shape[-2:]
    W = labels.shape[-1]
    if _pow2(W) > _MAX_W:
        return f"labels wider than {_MAX_W} pixels (got {W})"
    if _pow2(w) * _pow2(W) > _MAX_WEIGHT_TILE or _pow2(h) * _pow2(w) > _MAX_GRAD_TILE:
        return f"an [h, w] = [{h}, {w}] grid upsampled to width {W} (the kernels take grids up to about 64 x 64)"
    return None


@functools.lru_cache(maxsize=32)
def _axis_values(n_in, n_out):
    """Interpolation tables of torch's bilinear upsampling (align_corners=False),
    as the C++ kernel computes them: output o reads inputs i0[o], i1[o] with
    weights 1 - l1[o], l1[o]."""
    i0, i1, l1 = [], [], []
    for o in range(n_out):
        src = max((o + 0.5) * (n_in / n_out) - 0.5, 0.0)
        lo = min(int(src), n_in - 1)
        i0.append(lo)
        i1.append(lo + 1 if lo < n_in - 1 else lo)
        l1.append(src - lo)
    return i0, i1, l1


def _axis(n_in, n_out, dtype, device):
    # Built from Python values on every call (cached values, not tensors: a
    # cached tensor would leak from a fake-tensor trace into eager calls).
    i0, i1, l1 = _axis_values(int(n_in), int(n_out))
    return (torch.tensor(i0, dtype=torch.int32, device=device), torch.tensor(i1, dtype=torch.int32, device=device),
            torch.tensor(l1, dtype=dtype, device=device))


def _check_triton_args(logits, labels, alpha, gamma):
    if logits.dim() != 4 or labels.dim() != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"logits must have shape [B, K, h, w] and labels [B, H, W], got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    if logits.shape[0] * logits.shape[1] * labels.shape[1] * labels.shape[2] and 0 in logits.shape[2:]:
        raise ValueError(f"logits have an empty grid {tuple(logits.shape)} for labels of size {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"logits and labels must be on the same device, got {logits.device} and {labels.device}")
    if logits.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"mask_stats_triton takes float32 or float64 logits, got {logits.dtype}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class indices, got {labels.dtype}")
    if not gamma >= 0 or gamma == float("inf"):
        raise ValueError(f"gamma must be finite and >= 0, got {gamma}")
    why = fused_takes("triton", logits, labels)
    if why is not None:
        raise ValueError(f"the Triton loss kernel does not take {why}; use backend='reference'")
    if logits.device.type != "cuda" and not (_triton.interpreted or logits.device.type == "meta"):
        raise ValueError(f"mask_stats_triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got "
                         f"a {logits.device.type} tensor")


def _launch(kernel, logits, labels, alpha, gamma, ignore_index, grad_stats=None):
    """Run a mask-statistics kernel; returns its partials ([4, S, P] forward,
    [S, P, h, w] backward) and S."""
    from torch.library import wrap_triton

    B, K, h, w = logits.shape
    H, W = labels.shape[-2:]
    P = B * K
    x = logits.contiguous()
    lab = labels.to(torch.int32)  # before the -1: uint8 labels would wrap it to 255
    lab = torch.where(labels == ignore_index, -1, lab).contiguous()
    y0, y1, ly = _axis(h, H, x.dtype, x.device)
    x0, x1, lx = _axis(w, W, x.dtype, x.device)
    # Splits of the output rows, so that a small batch of masks still fills the GPU.
    rows_per = -(-H // max(1, min(H // 8, -(-1024 // P))))
    S = -(-H // rows_per)
    weighted = alpha >= 0
    params = torch.tensor([alpha if weighted else 1.0, 1.0 - alpha if weighted else 1.0, gamma], dtype=x.dtype,
                          device=x.device)
    args = [x, lab, y0, y1, ly, x0, x1, lx]
    if grad_stats is None:
        out = x.new_empty(4, S, P)
        consts = {}
    else:
        args.append(grad_stats.to(x.dtype).contiguous())
        out = x.new_empty(S, P, h, w)
        consts = dict(BLOCK_H_IN=_pow2(h), BLOCK_W_IN=_pow2(w))
    block_w = max(16, _pow2(W))
    wrap_triton(kernel)[(P, S)](
        *args, out, K, h, w, H, W, P, rows_per, params,
        GAMMA2=gamma == 2.0, BLOCK_W=block_w, **consts, num_warps=4 if block_w <= 256 else 8,
    )
    return out


def _mask_stats_triton(logits: torch.Tensor, labels: torch.Tensor, alpha: float, gamma: float,
                       ignore_index: int) -> torch.Tensor:
    _check_triton_args(logits, labels, alpha, gamma)
    B, K = logits.shape[:2]
    if B * K * labels.shape[1] * labels.shape[2] == 0:
        return logits.new_zeros(4, B, K)
    return _launch(_mask_stats_fwd_kernel, logits, labels, alpha, gamma, ignore_index).sum(1).view(4, B, K)


def _mask_stats_triton_fake(logits, labels, alpha, gamma, ignore_index):
    _check_triton_args(logits, labels, alpha, gamma)
    return logits.new_empty(4, logits.shape[0], logits.shape[1])


def _mask_stats_backward_triton(grad_stats: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, alpha: float,
                                gamma: float, ignore_index: int) -> torch.Tensor:
    _check_triton_args(logits, labels, alpha, gamma)
    B, K = logits.shape[:2]
    if grad_stats.shape != (4, B, K):
        raise ValueError(f"grad_stats must have shape {(4, B, K)}, got {tuple(grad_stats.shape)}")
    if B * K * labels.shape[1] * labels.shape[2] == 0:
        return torch.zeros_like(logits, memory_format=torch.contiguous_format)
    partial = _launch(_mask_stats_bwd_kernel, logits, labels, alpha, gamma, ignore_index, grad_stats)
    return partial.sum(0).view(logits.shape)


def _mask_stats_backward_triton_fake(grad_stats, logits, labels, alpha, gamma, ignore_index):
    _check_triton_args(logits, labels, alpha, gamma)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, labels, ctx.alpha, ctx.gamma, ctx.ignore_index = inputs
    ctx.save_for_backward(logits, labels)


def _backward_with(backward_op):
    def backward(ctx, grad_stats):
        logits, labels = ctx.saved_tensors
        grad = backward_op(grad_stats, logits, labels, ctx.alpha, ctx.gamma, ctx.ignore_index)
        return grad, None, None, None, None

    return backward


def _no_double_backward(ctx, *grads):
    raise RuntimeError("otseg: second derivatives of the fused loss are not implemented; use the reference loss")


def _no_context(ctx, inputs, output):
    return None


if _triton.available:
    from ..kernels.mask_stats import _mask_stats_bwd_kernel, _mask_stats_fwd_kernel

    # As the Triton MPS operators (otseg/ops/mps/triton.py): triton_op where the
    # kernels compile, custom_op with a fake under the interpreter.
    _register = torch.library.custom_op if _triton.interpreted else torch.library.triton_op
    _fwd = _register("otseg::mask_stats_triton", mutates_args=())(_mask_stats_triton)
    _bwd = _register("otseg::mask_stats_backward_triton", mutates_args=())(_mask_stats_backward_triton)
    if _triton.interpreted:
        _fwd.register_fake(_mask_stats_triton_fake)
        _bwd.register_fake(_mask_stats_backward_triton_fake)
    _fwd.register_autograd(_backward_with(torch.ops.otseg.mask_stats_backward_triton), setup_context=_setup_context)
    _bwd.register_autograd(_no_double_backward, setup_context=_no_context)


# --------------------------------------------------------------------- C++

if _extension.available:

    @torch.library.register_fake("otseg::mask_stats")
    def _mask_stats_fake(logits, labels, alpha, gamma, ignore_index):
        return logits.new_empty(4, logits.shape[0], logits.shape[1])

    @torch.library.register_fake("otseg::mask_stats_backward")
    def _mask_stats_backward_fake(grad_stats, logits, labels, alpha, gamma, ignore_index):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    torch.library.register_autograd("otseg::mask_stats", _backward_with(torch.ops.otseg.mask_stats_backward),
                                    setup_context=_setup_context)
    torch.library.register_autograd("otseg::mask_stats_backward", _no_double_backward, setup_context=_no_context)
