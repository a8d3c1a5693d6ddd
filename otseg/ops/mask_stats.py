"""The per-mask sums of the segmentation losses, fused with the bilinear
upsampling of the logits: ``torch.ops.otseg.mask_stats`` (C++ kernel in
``csrc/cpu/mask_stats_cpu*``) and its autograd and fake registrations.

The OTSeg losses (SPEC section 3) score [B, K, H, W] logits, upsampled from
the [B, K, h, w] token grid, against [B, H, W] labels. At COCO-Stuff sizes
(K = 171, 512 x 512 labels) the upsampled logits of one path are 700 MB
(float32) per batch of 4, and upsampling them, their sigmoid, log and powers
and the backward of all that are most of a CPU training step's non-matmul
time. The fused kernel never forms them: per mask it interpolates on the fly,
scores each pixel in the same pass, and its backward recomputes the terms and
applies the transpose of the interpolation.

Backends of the loss (``loss_backend``): ``"cpu"`` is the fused kernel (CPU
tensors); ``"reference"`` is PyTorch (``F.interpolate``, then the chunked
sums of ``otseg.model.losses``). There is no fused loss kernel for CUDA
tensors yet: there, ``"auto"`` and the Sinkhorn backends ``"cuda"`` and
``"triton"`` run the PyTorch loss, and the loss result says so.
"""

import warnings

import torch

from .. import _extension
from .mps import BACKEND_NAMES

__all__ = ["mask_stats", "loss_backend", "LOSS_BACKENDS"]

# Loss backends with a fused kernel, and the devices they run on.
LOSS_BACKENDS = {"cpu": ("cpu",)}
# Sinkhorn backends with no loss kernel: "cuda", "triton".
_SINKHORN_ONLY = tuple(n for n in BACKEND_NAMES if n != "reference" and n not in LOSS_BACKENDS)
_warned = set()


def loss_backend(backend, device):
    """The loss backend that ``backend`` (a model's backend name) means for
    logits on ``device``: ``"cpu"`` (fused) or ``"reference"`` (PyTorch).

    ``"auto"`` takes the fused kernel where there is one (CPU tensors, with
    the extension built); ``"cuda"`` and ``"triton"``, which have Sinkhorn
    kernels but no loss kernel, run the PyTorch loss and warn once.

    Raises:
        ValueError: unknown backend, or ``"cpu"`` for CUDA tensors or without
            the extension.
    """
    device = torch.device(device)
    if backend == "reference":
        return "reference"
    if backend == "auto":
        return "cpu" if device.type == "cpu" and _extension.available else "reference"
    if backend in _SINKHORN_ONLY:
        if backend not in _warned:
            _warned.add(backend)
            warnings.warn(f"otseg: backend {backend!r} has no fused loss kernel; the segmentation loss runs in "
                          "PyTorch (reference)", RuntimeWarning, stacklevel=3)
        return "reference"
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {', '.join(BACKEND_NAMES)}")
    if not _extension.available:
        raise ValueError(f"backend {backend!r} is unavailable here: {_extension.error}")
    if device.type not in LOSS_BACKENDS[backend]:
        raise ValueError(f"the fused loss of backend {backend!r} runs on {'/'.join(LOSS_BACKENDS[backend])} tensors, "
                         f"got a {device.type} tensor")
    return backend


def mask_stats(logits, labels, alpha=0.25, gamma=2.0, ignore_index=255):
    """Per-mask sums of ``logits`` upsampled to the labels' size, fused (differentiable in ``logits``).

    Args:
        logits: [B, K, h, w] float32 or float64 CPU tensor (any strides).
        labels: [B, H, W] integer class indices in [0, K) or ``ignore_index``.
        alpha: focal weight of positives (None or < 0: no weighting).
        gamma: focal exponent (>= 0).
        ignore_index: label of pixels that count for no class.

    Returns:
        [4, B, K] in the logits' dtype: focal sum, ``sum p y``, ``sum p``,
        ``sum y`` over the labelled pixels of each upsampled mask
        (``otseg.model.losses.mask_statistics``).
    """
    alpha = -1.0 if alpha is None or alpha < 0 else float(alpha)
    return torch.ops.otseg.mask_stats(logits, labels, alpha, float(gamma), int(ignore_index))


if _extension.available:

    @torch.library.register_fake("otseg::mask_stats")
    def _mask_stats_fake(logits, labels, alpha, gamma, ignore_index):
        return logits.new_empty(4, logits.shape[0], logits.shape[1])

    @torch.library.register_fake("otseg::mask_stats_backward")
    def _mask_stats_backward_fake(grad_stats, logits, labels, alpha, gamma, ignore_index):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    def _setup_context(ctx, inputs, output):
        logits, labels, ctx.alpha, ctx.gamma, ctx.ignore_index = inputs
        ctx.save_for_backward(logits, labels)

    def _backward(ctx, grad_stats):
        logits, labels = ctx.saved_tensors
        grad = torch.ops.otseg.mask_stats_backward(grad_stats, logits, labels, ctx.alpha, ctx.gamma,
                                                   ctx.ignore_index)
        return grad, None, None, None, None

    torch.library.register_autograd("otseg::mask_stats", _backward, setup_context=_setup_context)

    def _no_double_backward(ctx, *grads):
        raise RuntimeError("otseg: second derivatives of the fused loss are not implemented; use the reference loss")

    torch.library.register_autograd("otseg::mask_stats_backward", _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)
