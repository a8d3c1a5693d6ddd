"""The fused loss kernel (``otseg.ops.mask_stats``, backend "cpu") against the
PyTorch path (``F.interpolate``, then the chunked sums) in float64: odd sizes,
up- and downsampling, strides, dtypes, focal parameters, gradients, opcheck,
torch.compile and errors."""

import pytest
import torch

import otseg.model.losses as losses

from helpers import assert_close_report
FUSED_CASES = [
    # B, K, h, w, H, W
    (2, 3, 4, 5, 17, 23),    # odd upsampling
    (1, 5, 7, 3, 7, 3),      # same size
    (2, 4, 9, 8, 5, 6),      # downsampling
    (1, 2, 1, 1, 3, 33),     # one token; rows longer than a vector, not a multiple of one
    (3, 7, 8, 8, 128, 128),  # 16x, as the model (32 -> 512)
    (2, 1, 3, 2, 1, 9),      # one class; one output row
    (1, 2, 4, 1, 6, 1),      # one input and one output column
]


def fused_problem(B, K, h, w, H, W, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(B, K, h, w, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, K, (B, H, W), generator=g)
    labels[torch.rand(B, H, W, generator=g) < 0.2] = 255
    return logits, labels


def reference_stats_and_grad(logits, labels, alpha, gamma, grad_stats):
    x = logits.detach().double().requires_grad_()
    stats = losses.mask_statistics(x, labels, alpha, gamma, backend="reference")
    (grad,) = torch.autograd.grad(stats, x, grad_stats.double())
    return stats.detach(), grad


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (None, 0.0), (0.4, 1.5)])
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "x".join(map(str, c)))
def test_fused_matches_reference(case, alpha, gamma):
    logits, labels = fused_problem(*case)
    grad_stats = torch.randn(4, *logits.shape[:2], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want, want_grad = reference_stats_and_grad(logits, labels, alpha, gamma, grad_stats)
    for dtype, tol in ((torch.float64, 1e-11), (torch.float32, 2e-5)):
        x = logits.to(dtype).requires_grad_()
        got = losses.mask_statistics(x, labels, alpha, gamma, backend="cpu")
        assert got.dtype == dtype
        (grad,) = torch.autograd.grad(got, x, grad_stats.to(dtype))
        assert grad.dtype == dtype and grad.shape == x.shape
        assert_close_report(got.double(), want, rtol=tol, atol=tol * float(want.abs().max()))
        assert_close_report(grad.double(), want_grad, rtol=tol, atol=tol * float(want_grad.abs().max()))


def test_fused_takes_any_strides_half_and_integer_label_types():
    logits, labels = fused_problem(2, 6, 5, 7, 19, 12)
    grad_stats = torch.randn(4, 2, 3, dtype=torch.float64)
    strided = logits.transpose(2, 3).contiguous().transpose(2, 3)[:, ::2]  # non-contiguous, every other class
    labels3 = torch.where(labels >= 3, 255, labels)
    assert not strided.is_contiguous()
    want, want_grad = reference_stats_and_grad(strided, labels3, 0.25, 2.0, grad_stats)
    for lab in (labels3, labels3.int(), labels3.to(torch.uint8)):
        x = strided.clone().requires_grad_()
        got = losses.mask_statistics(x, lab, backend="cpu")
        (grad,) = torch.autograd.grad(got, x, grad_stats)
        assert_close_report(got, want, rtol=1e-11, atol=1e-11)
        assert_close_report(grad, want_grad, rtol=1e-11, atol=1e-11 * float(want_grad.abs().max()))
    for dtype in (torch.float16, torch.bfloat16):  # computed in float32
        got = losses.mask_statistics(strided.to(dtype), labels3, backend="cpu")
        assert got.dtype == torch.float32
        assert_close_report(got.double(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


def test_fused_gradcheck_and_opcheck():
    logits, labels = fused_problem(2, 3, 3, 4, 7, 5)
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: losses.mask_statistics(t, labels, backend="cpu")[:3], (x,))
    assert torch.autograd.gradcheck(lambda t: losses.segmentation_loss(t, labels, backend="cpu").total, (x,))
    torch.library.opcheck(torch.ops.otseg.mask_stats.default, (x, labels, 0.25, 2.0, 255))
    grad_stats = torch.randn(4, 2, 3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.otseg.mask_stats_backward.default, (grad_stats, logits, labels, 0.25, 2.0, 255))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_extreme_and_non_finite_logits_as_the_reference(dtype):
    """Logits of +-1e4 give the reference's sums and gradients; a NaN logit
    makes its masks' sums NaN, as in PyTorch (not hidden by a clamp)."""
    logits, labels = fused_problem(2, 3, 4, 5, 9, 11, seed=5)
    logits = logits.sign() * 1e4
    logits[0, 0] = torch.linspace(-100, 100, 20, dtype=torch.float64).view(4, 5)
    grad_stats = torch.randn(4, 2, 3, dtype=torch.float64)
    want, want_grad = reference_stats_and_grad(logits, labels, 0.25, 2.0, grad_stats)
    x = logits.to(dtype).requires_grad_()
    got = losses.mask_statistics(x, labels, backend="cpu")
    (grad,) = torch.autograd.grad(got, x, grad_stats.to(dtype))
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    assert_close_report(got.double(), want, rtol=tol, atol=tol * float(want.abs().max()))
    assert_close_report(grad.double(), want_grad, rtol=tol, atol=tol * float(want_grad.abs().max()))
    nan = logits.to(dtype).clone()
    nan[1, 2, 1, 3] = float("nan")
    got = losses.mask_statistics(nan, labels, backend="cpu")
    want = losses.mask_statistics(nan, labels, backend="reference")
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan()[:, 1, 2].any()


def test_more_classes_than_the_cpu_kernel_takes_runs_the_reference():
    from otseg.ops import mask_stats as fused

    K = fused._CPU_MAX_K + 1
    logits = torch.randn(1, K, 1, 1, dtype=torch.float64)
    labels = torch.tensor([[[K - 1, 255]]])
    fused._warned.clear()
    with pytest.warns(RuntimeWarning, match="does not take more than 32766 classes"):
        out = losses.segmentation_loss(logits, labels)
    assert out.backend == "reference"
    assert_close_report(out.total, losses.segmentation_loss(logits, labels, backend="reference").total, rtol=1e-14,
                        atol=0)


def test_fused_loss_compiles():
    logits, labels = fused_problem(2, 3, 4, 4, 16, 16, dtype=torch.float32)
    f = torch.compile(lambda t: losses.segmentation_loss(t, labels, backend="cpu").total, fullgraph=True)
    x = logits.clone().requires_grad_()
    got = f(x)
    got.backward()
    y = logits.clone().requires_grad_()
    want = losses.segmentation_loss(y, labels, backend="cpu").total
    want.backward()
    assert_close_report(got, want, rtol=1e-6, atol=0)
    assert_close_report(x.grad, y.grad, rtol=1e-6, atol=1e-9)


def test_fused_errors_are_clear():
    logits, labels = fused_problem(2, 3, 4, 4, 8, 8)
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\) or ignore_index=255, found 9"):
        torch.ops.otseg.mask_stats(logits, torch.where(labels == 1, 9, labels), 0.25, 2.0, 255)
    with pytest.raises(ValueError, match="gamma must be finite and >= 0"):
        torch.ops.otseg.mask_stats(logits, labels, 0.25, -1.0, 255)
    with pytest.raises(ValueError, match="empty grid"):
        torch.ops.otseg.mask_stats(logits[:, :, :0], labels, 0.25, 2.0, 255)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        losses.segmentation_loss(logits, labels, backend="gpu")
    with pytest.raises(RuntimeError, match="second derivatives of the fused loss"):
        x = logits.clone().requires_grad_()
        (g,) = torch.autograd.grad(losses.segmentation_loss(x, labels, backend="cpu").total, x, create_graph=True)
        g.sum().backward()
    # Empty batches and label maps give zeros, as the reference does.
    assert losses.mask_statistics(logits[:0], labels[:0], backend="cpu").shape == (4, 0, 3)
    assert (losses.mask_statistics(logits, labels[:, :0], backend="cpu") == 0).all()


def test_loss_backend_resolution():
    """The loss follows the model's backend: the C++ kernel for CPU tensors,
    the Triton one for CUDA tensors, PyTorch with a warning where no fused
    kernel can run here."""
    from otseg.ops import mask_stats as fused

    assert fused.loss_backend("auto", "cpu") == "cpu"
    assert fused.loss_backend("reference", "cpu") == "reference"
    with pytest.raises(ValueError, match="runs on cpu tensors, got a cuda tensor"):
        fused.loss_backend("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown backend 'gpu'; choose 'auto' or one of reference, cpu"):
        fused.loss_backend("gpu", "cpu")
    for name in ("auto", "cuda", "triton"):
        if fused._triton.available:
            assert fused.loss_backend(name, "cuda") == "triton"
        else:  # this machine: no GPU, Triton's kernels not loaded
            fused._warned.discard((name, "cuda"))
            with pytest.warns(RuntimeWarning, match="no fused loss kernel for cuda tensors here"):
                assert fused.loss_backend(name, "cuda") == "reference"
    if not fused._triton.interpreted:
        fused._warned.discard(("triton", "cpu"))
        with pytest.warns(RuntimeWarning, match="no fused loss kernel for cpu tensors"):
            assert fused.loss_backend("triton", "cpu") == "reference"
