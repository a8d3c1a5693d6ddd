"""OTSeg losses against a direct float64 formula: focal (alpha 0.25, gamma 2)
and dice per (image, class) mask, ignored pixels left out, the sum divided by
the (image, present class) pairs. Every test runs with both loss backends:
the PyTorch one ("reference") and the fused kernel ("cpu", compared with the
reference case by case in test_fused_loss.py)."""

import functools
import math
import sys

import pytest
import torch

import otseg.model.losses as losses
from otseg.model import mask_statistics, otseg_loss, remap_labels, segmentation_loss

from helpers import assert_close_report

LOSS_BACKENDS = ("reference", "cpu")


@pytest.fixture(autouse=True, params=LOSS_BACKENDS)
def backend(request, monkeypatch):
    """Runs each test with the loss functions of this module bound to one backend."""
    module = sys.modules[__name__]
    for name in ("segmentation_loss", "mask_statistics", "otseg_loss"):
        monkeypatch.setattr(module, name, functools.partial(getattr(losses, name), backend=request.param))
    return request.param


def problem(B=2, K=4, H=5, W=6, seed=0, ignore=True, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(B, K, H, W, generator=g, dtype=torch.float64)
    # Image 0 has classes 0 and 2 only; image 1 every class; a band of ignored pixels.
    labels = torch.randint(0, K, (B, H, W), generator=g)
    labels[0] = torch.where(labels[0] % 2 == 0, 0, 2)
    if ignore:
        labels[:, 0, :] = 255
        labels[1, :, 0] = 255
    return logits, labels


def hand_loss(logits, labels, focal_weight=100.0, dice_weight=1.0, alpha=0.25, gamma=2.0, ignore_index=255):
    """Loops over images, classes and pixels, straight from the formulas (alpha None: no weighting)."""
    B, K, H, W = logits.shape
    focal_total = dice_total = 0.0
    present = 0
    for b in range(B):
        pixels = [(i, j) for i in range(H) for j in range(W) if int(labels[b, i, j]) != ignore_index]
        for k in range(K):
            f = inter = psum = ysum = 0.0
            for i, j in pixels:
                x = float(logits[b, k, i, j])
                y = 1.0 if int(labels[b, i, j]) == k else 0.0
                p = 1 / (1 + math.exp(-x))
                ce = -(y * math.log(p) + (1 - y) * math.log(1 - p))
                p_t = p * y + (1 - p) * (1 - y)
                a_t = 1.0 if alpha is None else alpha * y + (1 - alpha) * (1 - y)
                f += a_t * ce * (1 - p_t) ** gamma
                inter += p * y
                psum += p
                ysum += y
            focal_total += f / max(len(pixels), 1)
            dice_total += 1 - (2 * inter + 1) / (psum + ysum + 1)
            present += ysum > 0
    present = max(present, 1)
    focal, dice = focal_total / present, dice_total / present
    return focal_weight * focal + dice_weight * dice, focal, dice, present


@pytest.mark.parametrize("ignore", [True, False], ids=["with-ignored", "no-ignored"])
def test_loss_matches_hand_formula(ignore, backend):
    logits, labels = problem(ignore=ignore)
    got = segmentation_loss(logits, labels)
    assert got.backend == backend
    total, focal, dice, present = hand_loss(logits, labels)
    assert int(got.num_masks) == present
    assert abs(float(got.focal) - focal) < 1e-12 * max(1, abs(focal))
    assert abs(float(got.dice) - dice) < 1e-12 * max(1, abs(dice))
    assert abs(float(got.total) - total) < 1e-10 * max(1, abs(total))


def test_loss_weights_and_focal_parameters():
    logits, labels = problem(seed=3)
    got = segmentation_loss(logits, labels, focal_weight=20, dice_weight=2, alpha=0.4, gamma=1.5)
    total, *_ = hand_loss(logits, labels, 20, 2, 0.4, 1.5)
    assert abs(float(got.total) - total) < 1e-10 * abs(total)
    # gamma 0 (plain weighted BCE) takes the exact softplus.
    got = segmentation_loss(logits, labels, gamma=0.0)
    assert abs(float(got.total) - hand_loss(logits, labels, gamma=0.0)[0]) < 1e-10 * float(got.total)


def test_normalised_by_present_image_class_pairs():
    logits, labels = problem(ignore=False)
    # Image 0: classes 0, 2; image 1: all 4 (seeded, checked here).
    assert labels[1].unique().numel() == 4
    out = segmentation_loss(logits, labels)
    assert int(out.num_masks) == 6
    stats = mask_statistics(logits, labels)
    valid = torch.full((2, 1), 30.0, dtype=torch.float64)
    focal = (stats[0] / valid).sum() / 6
    dice = (1 - (2 * stats[1] + 1) / (stats[2] + stats[3] + 1)).sum() / 6
    assert_close_report(out.focal, focal, atol=1e-14)
    assert_close_report(out.dice, dice, atol=1e-14)
    # No present class at all: divided by 1, not 0.
    assert int(segmentation_loss(logits, torch.full_like(labels, 255)).num_masks) == 1


def test_ignored_pixels_do_not_count():
    logits, labels = problem()
    x = logits.clone().requires_grad_()
    out = segmentation_loss(x, labels)
    out.total.backward()
    ignored = (labels == 255).unsqueeze(1).expand_as(x)
    assert (x.grad[ignored] == 0).all() and (x.grad[~ignored] != 0).any()
    changed = logits.clone()
    changed[ignored] = 50.0
    assert float(segmentation_loss(changed, labels).total) == pytest.approx(float(out.total.detach()), rel=1e-14)


@pytest.mark.parametrize("chunk", [7, 1 << 20], ids=["small-chunks", "one-chunk"])
def test_gradcheck(chunk, monkeypatch):
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", chunk)
    logits, labels = problem(B=2, K=3, H=3, W=4, scale=2.0)
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: segmentation_loss(t, labels).total, (x,))
    assert torch.autograd.gradcheck(lambda t: mask_statistics(t, labels, alpha=None, gamma=1.5)[:3], (x,))


def test_float32_and_extreme_logits_stay_finite():
    logits, labels = problem(scale=1.0)
    for value in (-200.0, 200.0):
        x = torch.full(logits.shape, value, dtype=torch.float32, requires_grad=True)
        out = segmentation_loss(x, labels)
        out.total.backward()
        assert torch.isfinite(out.total) and torch.isfinite(x.grad).all()
    got = segmentation_loss(logits.float(), labels).total
    assert abs(float(got) - hand_loss(logits, labels)[0]) < 1e-5 * float(got)


def test_logits_upsampled_to_the_labels():
    logits, labels = problem(H=4, W=6)
    big = torch.nn.functional.interpolate(logits, size=(8, 12), mode="bilinear", align_corners=False)
    labels8 = labels.repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert_close_report(segmentation_loss(logits, labels8).total, segmentation_loss(big, labels8).total, atol=1e-12)


def test_otseg_loss_sums_both_paths():
    logits, labels = problem()
    other = logits.flip(1)
    both = otseg_loss((logits, other), labels)
    a, b = segmentation_loss(logits, labels), segmentation_loss(other, labels)
    assert_close_report(both.total, a.total + b.total, atol=1e-12)
    assert_close_report(both.focal, a.focal + b.focal, atol=1e-12)


def test_bad_labels_raise_clear_errors():
    logits, labels = problem()
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\) or ignore_index=255, found 7"):
        segmentation_loss(logits, torch.where(labels == 1, 7, labels))
    with pytest.raises(ValueError, match=r"labels must have shape \[B, H, W\]"):
        segmentation_loss(logits, labels[:1])
    with pytest.raises(ValueError, match=r"logits must have shape \[B, K, H, W\]"):
        segmentation_loss(logits[0], labels)
    with pytest.raises(TypeError, match="integer tensor"):
        segmentation_loss(logits, labels.double())


def test_remap_labels_to_a_class_subset():
    labels = torch.tensor([[[0, 1, 2], [3, 255, 1]]])
    assert remap_labels(labels, [1, 3]).tolist() == [[[255, 0, 255], [1, 255, 0]]]



@pytest.mark.parametrize("ignore_index", [255, -1, -100])
def test_remap_labels_with_any_ignore_index(ignore_index):
    # Negative labels are never classes: looked up directly they would index
    # the table from its end.
    labels = torch.tensor([[[0, 1, 2, ignore_index], [3, 2, ignore_index, 0]]])
    out = remap_labels(labels, [2, 0], ignore_index=ignore_index)
    i = ignore_index
    assert out.tolist() == [[[1, i, 0, i], [i, 0, i, 1]]] and out.dtype == torch.long
    with pytest.raises(ValueError, match="classes must be dataset class indices >= 0"):
        remap_labels(labels, [0, -1], ignore_index=ignore_index)
    # A bool mask over the dataset's classes keeps them in their order.
    mask = torch.tensor([True, False, True, False])
    assert torch.equal(remap_labels(labels, mask, ignore_index=ignore_index),
                       remap_labels(labels, [0, 2], ignore_index=ignore_index))
    with pytest.raises(TypeError, match="class indices"):
        remap_labels(labels, [0.0, 2.0], ignore_index=ignore_index)
    with pytest.raises(ValueError, match="a bool mask must have one dim"):
        remap_labels(labels, mask.reshape(2, 2), ignore_index=ignore_index)


@pytest.mark.parametrize("name,value", [("gamma", -1.0), ("gamma", math.nan), ("gamma", math.inf),
                                        ("alpha", math.nan), ("alpha", math.inf), ("alpha", -math.inf)])
def test_bad_focal_parameters_raise_with_every_backend(backend, name, value):
    logits, labels = problem()
    says = "gamma must be finite and >= 0" if name == "gamma" else "alpha must be finite"
    with pytest.raises(ValueError, match=says):
        segmentation_loss(logits, labels, **{name: value})
    with pytest.raises(TypeError, match=f"{name} must be a real number"):
        segmentation_loss(logits, labels, **{name: "2"})
    # One-element tensors are read as numbers, integer ones too.
    assert torch.equal(segmentation_loss(logits, labels, gamma=torch.tensor(2)).total,
                       segmentation_loss(logits, labels, gamma=2.0).total)
    assert torch.equal(segmentation_loss(logits, labels, alpha=torch.tensor(0.3, dtype=torch.float64),
                                         gamma=torch.tensor(1.5, dtype=torch.float64)).total,
                       segmentation_loss(logits, labels, alpha=0.3, gamma=1.5).total)
    # A negative alpha (or None) means no weighting, on every backend.
    a = segmentation_loss(logits, labels, alpha=-1.0).total
    b = segmentation_loss(logits, labels, alpha=None).total
    assert torch.equal(a, b)
    assert_close_report(b, torch.tensor(hand_loss(logits, labels, alpha=None)[0], dtype=torch.float64), rtol=1e-10, atol=0)
