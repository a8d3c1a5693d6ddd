"""Validation of the public MPS/Sinkhorn arguments: one place, clear messages."""

import math
import numbers

import torch


def check_inputs(x, name, eps, max_iter, tol):
    """Raise TypeError/ValueError naming the argument and the expected form."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [..., M, N], got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [..., M, N] (at least 2 dims), got shape {tuple(x.shape)}")
    M, N = x.shape[-2:]
    if M == 0 or N == 0:
        raise ValueError(f"{name} must have M >= 1 pixels and N >= 1 prompts, got shape {tuple(x.shape)} (M={M}, N={N})")
    if x.dtype.is_complex or not x.dtype.is_floating_point:
        raise TypeError(
            f"{name} must be a real floating-point tensor (float16, bfloat16, float32 or float64), got {x.dtype}"
        )
    check_params(eps, max_iter, tol)


def check_params(eps, max_iter, tol):
    """Raise TypeError/ValueError naming a bad Sinkhorn setting."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    # Comparisons, not math.isfinite: under torch.compile a float argument
    # may be symbolic, and dynamo guards on a comparison (NaN fails it too).
    if not (0 < eps < math.inf):
        raise ValueError(f"eps must be a finite number > 0, got {eps}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral):
        raise TypeError(f"max_iter must be an integer, got {type(max_iter).__name__}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(f"tol must be a real number, got {type(tol).__name__}")
    if not (tol >= 0):
        raise ValueError(f"tol must be >= 0 (0 runs exactly max_iter iterations), got {tol}")


def check_finite_values(x, name):
    """Raise ValueError if ``x`` holds NaN or inf (one pass; a host sync on GPU)."""
    if x.numel() > 0 and not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{name} contains NaN or inf; pass check_finite=False to skip this check "
            "(it costs one host synchronisation on a GPU)"
        )
