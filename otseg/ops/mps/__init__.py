"""Multi-Prompts Sinkhorn: public functions and backend dispatch.

Backends (see ``backends()``):

- ``reference``: the published algorithm in plain PyTorch (``naive.py``),
  any device; the correctness reference and the speed baseline.
- ``cpu``: fused C++ kernel (``csrc/cpu/mps_cpu.cpp``), CPU tensors.
- ``cuda``: fused CUDA kernel (``csrc/cuda/``), CUDA tensors.
- ``triton``: fused Triton kernel (``kernels/``), CUDA tensors.
"""

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ... import _extension
from .._checks import check_finite_values, check_inputs
from . import fused, naive

__all__ = ["sinkhorn", "mps", "backends", "resolve_backend", "BackendStatus", "SinkhornInfo"]

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")


@dataclass(frozen=True)
class BackendStatus:
    """One backend: where it runs, whether it is available here, and why not."""

    name: str
    available: bool
    devices: tuple
    reason: str

    def __str__(self):
        state = "available" if self.available else "unavailable"
        return f"{self.name:<10} {state:<12} devices={','.join(self.devices):<9} {self.reason}"


class SinkhornInfo(NamedTuple):
    """What a call did.

    Attributes:
        n_iter: [...] int32, iterations each problem ran (the batch dims of the
            input). The reference stops the whole batch together, so its
            entries are all equal; fused backends stop each problem on its own.
        backend: the backend that ran.
    """

    n_iter: torch.Tensor
    backend: str


def _status(name):
    if name == "reference":
        return True, ("cpu", "cuda"), "published algorithm in plain PyTorch (baseline, autograd through the loop)"
    if name == "cpu":
        if _extension.available:
            return True, ("cpu",), "fused C++ kernel, implicit backward"
        return False, ("cpu",), _extension.error
    if name == "cuda":
        return False, ("cuda",), "not implemented in this version (fused CUDA kernel: issue 5)"
    if name == "triton":
        return False, ("cuda",), "not implemented in this version (fused Triton kernel: issue 4)"
    raise AssertionError(name)


def backends():
    """Every backend, whether it is available here, and why not when it is not.

    Returns:
        list of BackendStatus, in the order ``reference, cpu, cuda, triton``.
    """
    return [BackendStatus(n, *_status(n)) for n in BACKEND_NAMES]


# Preference of "auto" per device type, fastest first.
_AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
_warned_fallback = set()


def resolve_backend(backend, device):
    """The backend that ``backend`` means for tensors on ``device``.

    "auto" picks the fastest available fused backend for the device; when none
    is available it uses the reference and warns once, saying why.

    Raises:
        ValueError: unknown backend, unavailable backend, or one that does not
            run on this device. The message lists what is available.
    """
    device = torch.device(device)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ()):
            if _status(name)[0]:
                return name
        if device.type not in _warned_fallback:
            _warned_fallback.add(device.type)
            why = "; ".join(f"{n}: {_status(n)[2]}" for n in _AUTO_ORDER.get(device.type, ()))
            warnings.warn(
                f"otseg: no fused backend is available for {device.type} tensors, backend='auto' runs the "
                f"slow reference ({why or 'no fused backend for this device'})",
                RuntimeWarning,
                stacklevel=3,
            )
        return "reference"
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {_available_text()}")
    available, devices, reason = _status(backend)
    if not available:
        raise ValueError(f"backend {backend!r} is unavailable here: {reason}. Available: {_available_text()}")
    if device.type not in devices:
        raise ValueError(
            f"backend {backend!r} runs on {'/'.join(devices)} tensors, got a {device.type} tensor. "
            f"Available: {_available_text()}"
        )
    return backend


def _available_text():
    return ", ".join(f"{s.name!r} ({'/'.join(s.devices)})" for s in backends() if s.available)


def _solve(x, name, eps, max_iter, tol, backend, check_finite, want_score, want_plan):
    if check_finite and torch.compiler.is_compiling():
        # A data-dependent check would break the graph; compiled callers skip it.
        check_finite = False
    check_inputs(x, name, eps, max_iter, tol)
    chosen = resolve_backend(backend, x.device)
    # Fused kernels check finiteness while they read the input; the reference
    # needs a separate pass.
    if check_finite and chosen == "reference":
        check_finite_values(x, name)
    scores = x if name == "scores" else 1 - x
    if chosen == "reference":
        if name == "scores":
            score, plan, n = naive.mps(scores, eps, max_iter, tol)
        else:
            plan, n = naive.sinkhorn_log(x, eps, max_iter, tol)
            score = None
        n_iter = torch.full(x.shape[:-2], n, dtype=torch.int32, device=x.device)
    else:
        score, plan, n_iter = fused.mps_forward(scores, eps, max_iter, tol, want_plan, check_finite)
    return score, plan, SinkhornInfo(n_iter, chosen)


def sinkhorn(cost, eps=0.05, max_iter=100, tol=1e-6, *, backend="auto", return_info=False, check_finite=True):
    """Entropic optimal transport plans between uniform marginals, batched.

    Log-domain Sinkhorn (SPEC section 1): potentials f [..., M] then g [..., N]
    from zero; stops when ``mean_m |f_t - f_(t-1)|`` < ``tol`` or after
    ``max_iter`` iterations. Fused backends test each problem on its own; the
    reference tests the batch mean, as the published code does.

    Args:
        cost: [..., M, N] costs, any number of batch dims; float16, bfloat16,
            float32 or float64.
        eps: entropic regularisation, > 0. Default 0.05.
        max_iter: most iterations, >= 1. Default 100.
        tol: stopping tolerance, >= 0; 0 runs exactly ``max_iter``. Default 1e-6.
        backend: "auto" (default: fastest available for the tensor's device),
            "reference", "cpu", "cuda" or "triton".
        return_info: also return a SinkhornInfo (iterations run per problem,
            backend used).
        check_finite: raise on NaN/inf in ``cost`` (default True). The check
            costs a host sync on a GPU; it is skipped inside torch.compile.

    Returns:
        plan [..., M, N] (columns sum to 1/N, rows to about 1/M), or
        (plan, info) with ``return_info``.

    Gradients: the reference differentiates through the unrolled loop; fused
    backends use the implicit gradient of the converged plan, which differs
    from the unrolled one when the iterations stop far from convergence.
    """
    _, plan, info = _solve(cost, "cost", eps, max_iter, tol, backend, check_finite, False, True)
    return (plan, info) if return_info else plan


def mps(scores, eps=0.05, max_iter=100, tol=1e-6, *, return_plan=False, backend="auto", return_info=False,
        check_finite=True):
    """Multi-Prompts Sinkhorn refined score ``S* = M*N*sum_n T*S``, ``T = Sinkhorn(1 - S)``.

    Args:
        scores: [..., M, N] cosine similarities between M pixels and the N
            prompts of a class, e.g. [B, K, M, N]; float16, bfloat16, float32
            or float64 (half types compute in float32 on fused backends).
        eps, max_iter, tol, backend, check_finite: as in ``sinkhorn``.
        return_plan: also return the plan T [..., M, N].
        return_info: also return a SinkhornInfo, last.

    Returns:
        refined score [..., M]; ``(score, plan)`` with ``return_plan``;
        ``(score, info)`` or ``(score, plan, info)`` with ``return_info``.
    """
    score, plan, info = _solve(scores, "scores", eps, max_iter, tol, backend, check_finite, True, return_plan)
    out = (score,) + ((plan,) if return_plan else ()) + ((info,) if return_info else ())
    return out[0] if len(out) == 1 else out
