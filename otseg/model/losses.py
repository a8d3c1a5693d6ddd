"""OTSeg training losses (SPEC section 3): sigmoid focal loss and dice loss of
per-class mask logits against a label map, on each of the two paths.

For every image b and class k the target is the binary mask ``labels == k``;
pixels labelled ``ignore_index`` count for no class. Per mask (b, k):

- focal: ``mean over the valid pixels of alpha_t * BCE(x, y) * (1 - p_t)^gamma``
  with ``p = sigmoid(x)``, ``p_t = p y + (1 - p)(1 - y)``,
  ``alpha_t = alpha y + (1 - alpha)(1 - y)`` (alpha 0.25, gamma 2);
- dice: ``1 - (2 sum p y + 1) / (sum p + sum y + 1)`` over the valid pixels.

Both are summed over every (image, class) pair, present or not, and divided by
the number of (image, present class) pairs (at least 1). That is the
published code's form (MaskFormer's ``sigmoid_focal_loss`` / ``dice_loss``; the
dice is smoothed by 1 and uses plain sums, not the squares of the paper's
eq. 21). Unlike the published code, which makes ignored pixels negatives of
every class, ignored pixels here take no part in either loss.

Logits on the token grid are upsampled bilinearly to the labels' size inside
the loss. With the fused loss (``otseg.ops.mask_stats``: backend ``"cpu"``
on CPU tensors, ``"cuda"`` and ``"triton"`` on CUDA tensors, ``"auto"`` on
either) the upsampled logits are never formed: at 512 x 512 labels and 171
classes they are 700 MB per path for a batch of 4. The PyTorch path (backend
``"reference"``, or where no fused kernel can run) upsamples with ``F.interpolate`` and runs the per-mask sums in one autograd
Function that keeps only the logits and the labels for its backward (the
elementwise graph autograd would keep is several times the logits).
"""

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..ops import mask_stats as _fused

__all__ = ["SegLosses", "mask_statistics", "segmentation_loss", "otseg_loss", "remap_labels"]

class SegLosses(NamedTuple):
    """Losses of one or both paths.

    Attributes:
        total: the weighted sum, a scalar to backpropagate.
        focal: the focal loss (before its weight), summed over the paths.
        dice: the dice loss (before its weight), summed over the paths.
        num_masks: (image, present class) pairs the losses are divided by.
        backend: the loss implementation that ran: "cpu" or "triton" (fused), or "reference" (PyTorch).
    """

    total: torch.Tensor
    focal: torch.Tensor
    dice: torch.Tensor
    num_masks: torch.Tensor
    backend: str = "reference"


# Elements handled at once by the loss Function on the CPU: a few MB per
# temporary, so a chunk's dozen elementwise passes run in cache rather than
# from memory (2-3x faster on CPU than whole-tensor passes at 512 x 512
# labels). On a GPU each pass is a kernel launch, so there an image is one chunk.
_CHUNK_ELEMENTS = 1 << 20


def _chunks(B, K, P, device):
    """(b, k0, k1): rows of one image, about _CHUNK_ELEMENTS elements each on
    the CPU (one chunk per image on other devices and under torch.compile,
    which fuses the passes itself)."""
    whole = torch.compiler.is_compiling() or device.type != "cpu"
    rows = K if whole else max(1, min(K, _CHUNK_ELEMENTS // max(1, P)))
    return [(b, k, min(K, k + rows)) for b in range(B) for k in range(0, K, rows)]


def _softplus(x, s, gamma):
    """softplus(x) from ``s = sigmoid(x)``: ``x - log(s)``, one log instead of
    softplus's exp and log1p (softplus is most of the loss's time on CPU).

    Where s underflows (x below about -87 in float32) the clamp keeps the value
    finite but too large; the focal factor ``s^gamma`` is 0 there, so only
    gamma = 0 needs the exact softplus.
    """
    if gamma == 0:
        return F.softplus(x)
    return x - torch.log(s.clamp_min(torch.finfo(s.dtype).tiny))


def _focal_terms(x, gamma):
    """(sigmoid(x), softplus(x) * sigmoid(x)^gamma): the focal term of a negative, unweighted."""
    s = torch.sigmoid(x)
    return s, _softplus(x, s, gamma).mul_(s.pow(gamma))


def _focal_term_grads(x, gamma, positive=False):
    """(d/dx of the focal term of a negative, and of a positive if asked (else None); sigmoid(x)), unweighted.

    Negative: ``softplus(x) s^gamma``, derivative ``s^gamma (s + gamma softplus(x) (1 - s))``;
    positive: ``softplus(-x) (1 - s)^gamma``, derivative ``-(1 - s)^gamma ((1 - s) + gamma softplus(-x) s)``.
    """
    s = torch.sigmoid(x)
    one_minus = 1 - s
    neg = _softplus(x, s, gamma).mul_(one_minus).mul_(gamma).add_(s).mul_(s.pow(gamma))
    pos = -one_minus.pow(gamma) * (one_minus + gamma * F.softplus(-x) * s) if positive else None
    return neg, pos, s


class _MaskStatistics(torch.autograd.Function):
    """Per (b, k): focal sum, sum p y, sum p, sum y over the valid pixels.

    Every class is first scored as a negative on every valid pixel (one pass
    over [B, K, H*W], in chunks, the sums as matrix-vector products with the
    valid mask); each valid pixel's own class is then corrected from negative
    to positive, on [B, H*W] values gathered at the labels. The backward
    recomputes the terms from the saved logits and labels.
    """

    @staticmethod
    def forward(ctx, logits, labels, alpha, gamma, ignore_index):
        B, K, H, W = logits.shape
        x = logits.reshape(B, K, H * W)
        valid = labels.reshape(B, H * W) != ignore_index
        weight = valid.to(x.dtype)
        neg, prob = x.new_empty(B, K), x.new_empty(B, K)
        for b, k0, k1 in _chunks(B, K, H * W, x.device):
            s, focal = _focal_terms(x[b, k0:k1], gamma)
            prob[b, k0:k1] = s @ weight[b]
            neg[b, k0:k1] = focal @ weight[b]
        # The class of each valid pixel (ignored pixels point at class 0 with weight 0).
        y = torch.where(valid, labels.reshape(B, H * W).long(), 0)
        xy = x.gather(1, y.unsqueeze(1)).squeeze(1)
        sy, focal_neg_y = _focal_terms(xy, gamma)
        focal_pos_y = F.softplus(-xy) * (1 - sy).pow(gamma)
        a_pos, a_neg = (1.0, 1.0) if alpha is None else (alpha, 1 - alpha)
        focal = (a_neg * neg).scatter_add(1, y, (a_pos * focal_pos_y - a_neg * focal_neg_y) * weight)
        inter = x.new_zeros(B, K).scatter_add_(1, y, sy * weight)
        count = x.new_zeros(B, K).scatter_add_(1, y, weight)
        ctx.save_for_backward(logits, labels)
        ctx.alpha, ctx.gamma, ctx.ignore_index = alpha, gamma, ignore_index
        return torch.stack([focal, inter, prob, count])

    @staticmethod
    def backward(ctx, grad_stats):
        logits, labels = ctx.saved_tensors
        alpha, gamma = ctx.alpha, ctx.gamma
        a_pos, a_neg = (1.0, 1.0) if alpha is None else (alpha, 1 - alpha)
        B, K, H, W = logits.shape
        x = logits.reshape(B, K, H * W)
        valid = labels.reshape(B, H * W) != ctx.ignore_index
        weight = valid.to(x.dtype)
        g_focal, g_inter, g_prob = grad_stats[0], grad_stats[1], grad_stats[2]
        grad = torch.empty_like(x)
        for b, k0, k1 in _chunks(B, K, H * W, x.device):
            d, _, s = _focal_term_grads(x[b, k0:k1], gamma)
            # d = a_neg g_focal d_neg + g_prob s (1 - s), in place.
            d.mul_(a_neg * g_focal[b, k0:k1, None]).addcmul_(torch.addcmul(s, s, s, value=-1), g_prob[b, k0:k1, None])
            torch.mul(d, weight[b], out=grad[b, k0:k1])
        y = torch.where(valid, labels.reshape(B, H * W).long(), 0)
        d_neg_y, d_pos_y, sy = _focal_term_grads(x.gather(1, y.unsqueeze(1)).squeeze(1), gamma, positive=True)
        fix = g_focal.gather(1, y) * (a_pos * d_pos_y - a_neg * d_neg_y) + g_inter.gather(1, y) * (sy * (1 - sy))
        grad.scatter_add_(1, y.unsqueeze(1), (fix * weight).unsqueeze(1))
        return grad.view_as(logits), None, None, None, None


def _check_labels(logits, labels):
    """Shapes and dtype (the values: ``_check_label_values``)."""
    if logits.dim() != 4:
        raise ValueError(f"logits must have shape [B, K, H, W], got shape {tuple(logits.shape)}")
    if labels.dim() != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must have shape [B, H, W] with B = {logits.shape[0]} (the logits' "
                         f"[B, K, H, W] = {tuple(logits.shape)}), got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class indices, got {labels.dtype}")


def _check_label_values(logits, labels, ignore_index):
    """Every label is a class index in [0, K) or ignore_index."""
    # A data-dependent check: skipped under torch.compile, where it would break the graph.
    if not torch.compiler.is_compiling() and labels.numel() > 0:
        K = logits.shape[1]
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= K))
        if bool(bad.any()):
            value = int(labels[bad][0])
            raise ValueError(f"labels must be class indices in [0, {K}) or ignore_index={ignore_index}, "
                             f"found {value}")


def mask_statistics(logits, labels, alpha=0.25, gamma=2.0, ignore_index=255, backend="auto"):
    """Per-mask sums behind the losses, differentiable in ``logits``.

    Args:
        logits: [B, K, h, w] mask logits, upsampled bilinearly
            (``align_corners=False``) to the labels' size when it differs
            (compute in float32, or float64 for float64).
        labels: [B, H, W] integer class indices in [0, K), or ``ignore_index``.
        alpha: focal weight of positives (None: no weighting). Default 0.25.
        gamma: focal exponent. Default 2.
        ignore_index: label of pixels that belong to no class. Default 255.
        backend: a model backend name: "auto" (default), "cpu", "cuda",
            "triton" (the fused kernel for the logits' device: C++ on CPU
            tensors, Triton on CUDA tensors) or "reference" (PyTorch);
            ``otseg.ops.mask_stats.loss_backend``.

    Returns:
        [4, B, K]: focal sum, ``sum p y``, ``sum p``, ``sum y`` over the valid
        pixels of each (upsampled) mask.
    """
    return _statistics(logits, labels, alpha, gamma, ignore_index, backend)[0]


def _focal_parameter(name, value):
    """A focal parameter as a real number (a one-element tensor is read as
    one); TypeError otherwise. Its range is checked by comparisons, which NaN
    fails and which torch.compile guards on."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not (value.dtype.is_complex
                                                                       or value.dtype == torch.bool):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return value


def _statistics(logits, labels, alpha=0.25, gamma=2.0, ignore_index=255, backend="auto"):
    """(mask_statistics, the loss backend that ran)."""
    gamma = _focal_parameter("gamma", gamma)
    if not (0 <= gamma < math.inf):
        raise ValueError(f"gamma must be finite and >= 0, got {gamma!r}")
    if alpha is not None:
        alpha = _focal_parameter("alpha", alpha)
        if not (-math.inf < alpha < math.inf):
            raise ValueError(f"alpha must be finite (negative or None: no weighting), got {alpha!r}")
    name = _fused.loss_backend(backend, logits.device)
    _check_labels(logits, labels)
    if name != "reference":
        why = _fused.fused_takes(name, logits, labels)
        if why is not None:
            _fused.warn_once((name, why), f"otseg: the {name} loss kernel does not take {why}; the "
                                          "segmentation loss runs in PyTorch (reference)")
            name = "reference"
    if name != "cpu":
        # The C++ kernel checks the label values itself, with the same message,
        # while it converts them (no separate pass there).
        _check_label_values(logits, labels, ignore_index)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    alpha = None if alpha is None or alpha < 0 else float(alpha)
    if name != "reference":
        return _fused.mask_stats(logits, labels, alpha, gamma, ignore_index, backend=name), name
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return _MaskStatistics.apply(logits, labels, alpha, float(gamma), int(ignore_index)), name


def segmentation_loss(logits, labels, focal_weight=100.0, dice_weight=1.0, alpha=0.25, gamma=2.0,
                      ignore_index=255, backend="auto"):
    """Focal + dice loss of one path, normalised by the (image, present class) pairs.

    Args:
        logits: [B, K, h, w] mask logits; upsampled bilinearly to the labels'
            size when it differs (pass the token-grid logits: with the fused
            loss the upsampled ones are never formed).
        labels: [B, H, W] class indices in [0, K) or ``ignore_index``.
        focal_weight: weight of the focal loss. Default 100.
        dice_weight: weight of the dice loss. Default 1.
        alpha, gamma: focal parameters. Default 0.25, 2.
        ignore_index: label of unlabelled (or, in the inductive setting,
            unseen) pixels. Default 255.
        backend: implementation of the sums (``mask_statistics``). Default "auto".

    Returns:
        SegLosses(total, focal, dice, num_masks, backend).
    """
    stats, name = _statistics(logits, labels, alpha, gamma, ignore_index, backend)
    focal_sum, inter, prob_sum, target_sum = stats
    valid_pixels = (labels != ignore_index).sum((-2, -1)).clamp(min=1)
    num_masks = (target_sum > 0).sum().clamp(min=1)
    focal = (focal_sum / valid_pixels.unsqueeze(1)).sum() / num_masks
    dice = (1 - (2 * inter + 1) / (prob_sum + target_sum + 1)).sum() / num_masks
    return SegLosses(focal_weight * focal + dice_weight * dice, focal, dice, num_masks, name)


def otseg_loss(outputs, labels, **kwargs):
    """The OTSeg loss: ``segmentation_loss`` of the decoder path plus that of the MPS path.

    Args:
        outputs: (decoder logits, MPS logits), each [B, K, h, w] (an OTSeg
            or head output; token-grid logits are upsampled inside).
        labels: [B, H, W].
        kwargs: weights, focal parameters and backend of ``segmentation_loss``.

    Returns:
        SegLosses with the totals of both paths (focal and dice summed over
        the paths; num_masks is the same for both).
    """
    dec, mps = outputs[0], outputs[1]
    a = segmentation_loss(dec, labels, **kwargs)
    b = segmentation_loss(mps, labels, **kwargs)
    return SegLosses(a.total + b.total, a.focal + b.focal, a.dice + b.dice, a.num_masks, a.backend)


def remap_labels(labels, classes, ignore_index=255):
    """Labels of a class subset: class ``classes[i]`` becomes i, every other
    class ``ignore_index`` (e.g. unseen classes in the inductive setting).

    Args:
        labels: [B, H, W] dataset class indices or ``ignore_index``.
        classes: the kept dataset class indices, in the order of the logits,
            or a bool mask over the dataset's classes.
        ignore_index: Default 255.

    Returns:
        [B, H, W] int64 labels in [0, len(classes)) or ``ignore_index``.
    """
    classes = torch.as_tensor(classes, device=labels.device)
    if classes.dtype == torch.bool:  # a mask over the dataset's classes
        if classes.dim() != 1:
            raise ValueError(f"classes: a bool mask must have one dim (one entry a dataset class), got shape "
                             f"{tuple(classes.shape)}")
        classes = classes.nonzero().flatten()
    elif classes.numel() and (classes.dtype.is_floating_point or classes.dtype.is_complex):
        raise TypeError(f"classes must be dataset class indices (integers) or a bool mask, got {classes.dtype}")
    classes = classes.long().reshape(-1)
    if classes.numel() and int(classes.min()) < 0:
        raise ValueError(f"classes must be dataset class indices >= 0, got {classes.tolist()}")
    labels = labels.long()
    size = int(max(int(classes.max()) if classes.numel() else 0, int(labels.max()) if labels.numel() else 0)) + 1
    table = torch.full((size,), ignore_index, dtype=torch.long, device=labels.device)
    table[classes] = torch.arange(classes.numel(), device=labels.device)
    # Negative labels (e.g. ignore_index=-1 or -100) are no class: looked up,
    # they would index the table from its end.
    return torch.where(labels >= 0, table[labels.clamp(min=0)], ignore_index)
