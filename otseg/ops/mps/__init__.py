"""Multi-Prompts Sinkhorn: public functions and backend dispatch.

Backends (see ``backends()``):

- ``reference``: the published algorithm in plain PyTorch (``naive.py``),
  any device; the correctness reference and the speed baseline.
- ``cpu``: fused C++ kernel (``csrc/cpu/``), CPU tensors.
- ``cuda``: fused CUDA kernel (``csrc/cuda/``), CUDA tensors.
- ``triton``: fused Triton kernel (``kernels/``), CUDA tensors; also CPU
  tensors when ``TRITON_INTERPRET=1`` was set before Triton was imported
  (Triton's interpreter, slow, for testing). "auto" never picks it for CPU
  tensors.
"""

import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ... import _extension
from .._checks import check_finite_values, check_inputs
from . import fused, naive
from . import triton as triton_backend

__all__ = ["sinkhorn", "mps", "backends", "resolve_backend", "BackendStatus", "SinkhornInfo"]

logger = logging.getLogger("otseg")

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
            return True, ("cpu",), f"fused C++ kernel ({_extension.cpu_isa}), implicit backward"
        return False, ("cpu",), _extension.error
    if name == "cuda":
        if not _extension.available:
            return False, ("cuda",), _extension.error
        if not _extension.with_cuda:
            return False, ("cuda",), (
                "otseg._C was built without CUDA (no CUDA toolkit or a CPU build of torch when it was built, "
                "or OTSEG_NO_CUDA=1)"
            )
        if not torch.cuda.is_available():
            return False, ("cuda",), "built with CUDA, but no CUDA GPU is visible (torch.cuda.is_available() is False)"
        return True, ("cuda",), "fused CUDA kernel, implicit backward (M <= 4096, N <= 16; float32/float16/bfloat16)"
    if name == "triton":
        if not triton_backend.available:
            return False, ("cuda",), triton_backend.error
        if triton_backend.interpreted:
            devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
            return True, devices, "fused Triton kernel in Triton's interpreter (TRITON_INTERPRET=1; CPU tensors, slow)"
        if torch.cuda.is_available():
            route = triton_backend.cpp_launch_error
            route = ("launched from C++ after each kernel variant's first call" if route is None
                     else f"launched from Python: {route}")
            return True, ("cuda",), f"fused Triton kernel, implicit backward (M <= 4096, N <= 16); {route}"
        why = "no CUDA GPU is visible (torch.cuda.is_available() is False)"
        if triton_backend.interpreter_requested():
            why += "; TRITON_INTERPRET=1 was set after Triton was imported, so it has no effect"
        return False, ("cuda",), why + "; TRITON_INTERPRET=1 runs the kernels on CPU tensors, for testing"
    raise AssertionError(name)


def backends():
    """Every backend, whether it is available here, and why not when it is not.

    Returns:
        list of BackendStatus, in the order ``reference, cpu, cuda, triton``.
    """
    return [BackendStatus(n, *_status(n)) for n in BACKEND_NAMES]


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + os.sep


def _caller_stacklevel():
    """The ``stacklevel`` of ``warnings.warn``, called by the caller of this
    function, that names the first frame outside the otseg package: the
    user's line, however many otseg frames lie between."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


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
                stacklevel=_caller_stacklevel(),
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


# What each fused backend takes, beyond its device: (largest M, largest N,
# dtypes); None means no limit.
_TAKES = {
    "cpu": (None, 64, None),
    "cuda": (4096, 16, (torch.float32, torch.float16, torch.bfloat16)),
    "triton": (4096, 16, None),
}
_auto_choice = {}


def _cannot_take(name, x):
    """Why backend ``name`` cannot solve ``x``, as (exception type, message), or None."""
    max_m, max_n, dtypes = _TAKES[name]
    M, N = x.shape[-2:]
    if max_m is not None and M > max_m:
        return ValueError, f"{name} takes M <= {max_m} pixels per problem, got M = {M}"
    if max_n is not None and N > max_n:
        return ValueError, f"{name} takes N <= {max_n} prompts, got N = {N}"
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        return TypeError, f"{name} takes {names}, got {x.dtype}"
    return None


_F32 = torch.finfo(torch.float32)
_KERNEL_MAX_ITER = 2**31 - 1


def _check_eps_in_float32(name, eps):
    """Raise ValueError when ``eps`` lies outside the normal float32 numbers,
    which the fused kernels take it in (all but the cpu kernel on float64
    scores): there they would give NaN, not a solution."""
    if not (_F32.tiny <= eps <= _F32.max):
        hint = "float64 scores (computed in float64) or backend='reference'" if name == "cpu" else "backend='reference'"
        raise ValueError(
            f"eps = {eps} is outside the float32 range the {name} kernel takes it in "
            f"({_F32.tiny:.4g} to {_F32.max:.4g}); use {hint}"
        )


def _check_takes(name, x):
    """Raise the TypeError/ValueError of ``_cannot_take`` when backend
    ``name``, asked for by name, cannot take ``x`` (before any kernel sees it)."""
    why = _cannot_take(name, x)
    if why is not None:
        error, message = why
        other = "" if name == "cpu" else " (or 'cpu' for CPU tensors)"
        raise error(f"backend {message}; use backend='reference'{other}")


def _time_forward(name, x, want_plan):
    """Median milliseconds of one forward of backend ``name`` on ``x`` (CUDA events)."""
    fn = _FUSED[name]
    with torch.no_grad():
        fn(x, 0.05, 100, 1e-6, want_plan, False)
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x, 0.05, 100, 1e-6, want_plan, False)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[1]


def _auto_for(x, want_plan):
    """The fastest fused backend that takes ``x``: the first that fits in the
    device's order, or, where several fit on a GPU, the fastest measured on the
    first input of this (M, N, dtype); the reference (with a warning, once)
    when none fits."""
    device = x.device.type
    names = [n for n in _AUTO_ORDER.get(device, ()) if _status(n)[0] and device in _status(n)[1]]
    fits = [n for n in names if _cannot_take(n, x) is None]
    if not fits:
        why = "; ".join(_cannot_take(n, x)[1] for n in names)
        key = (device, why)
        if key not in _warned_fallback:
            _warned_fallback.add(key)
            warnings.warn(
                f"otseg: no fused backend takes this input ({why}); backend='auto' runs the slow reference",
                RuntimeWarning,
                stacklevel=_caller_stacklevel(),
            )
        return "reference"
    if len(fits) == 1:
        return fits[0]
    key = (device, tuple(x.shape[-2:]), x.dtype, bool(want_plan))
    if key not in _auto_choice:
        if torch.compiler.is_compiling():
            return fits[0]
        times = {n: _time_forward(n, x.reshape(-1, *x.shape[-2:]), want_plan) for n in fits}
        _auto_choice[key] = min(times, key=times.get)
        logger.info(
            "otseg: backend='auto' uses %s for [M=%d, N=%d] %s (measured forward: %s)",
            _auto_choice[key], x.shape[-2], x.shape[-1], x.dtype,
            ", ".join(f"{n} {t:.3f} ms" for n, t in times.items()),
        )
    return _auto_choice[key]


def _available_text():
    return ", ".join(f"{s.name!r} ({'/'.join(s.devices)})" for s in backends() if s.available)


# Fused forwards on [..., M, N] scores: (scores, eps, max_iter, tol, return_plan,
# check_finite) -> (score [..., M], plan or None, n_iter [...]).
_FUSED = {
    "cpu": fused.mps_forward,
    "cuda": fused.mps_forward,
    "triton": lambda s, eps, max_iter, tol, want_plan, _check: triton_backend.mps_forward(
        s, eps, max_iter, tol, want_plan
    ),
}


# What each call resolved to (``_resolve``), per everything about it but the
# values and batch shape of its tensor: repeated calls (each step of a training
# loop, each timed call of a benchmark) skip the argument checks and the backend
# choice, most of the host's work before a GPU kernel starts (about 5 us of 16
# for a tiny CPU call on a 2-core EPYC). Only calls that passed every check are
# here. ``forget_resolutions`` empties it (tests that change what is available).
_resolved = {}
_RESOLVED_MAX = 1024
# Exact tensor types the cache serves; subclasses (fake, functional tensors,
# ...) take the checked path.
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def forget_resolutions():
    """Forget the backend choices of earlier calls (after a change to what is
    available, e.g. a test's monkeypatch); the next calls check again."""
    _resolved.clear()


def _resolve(x, name, eps, max_iter, tol, backend, check_finite, want_plan):
    """Check a call's arguments and choose its backend.

    Returns:
        (backend to run, whether the scores need a separate finiteness pass
        before it; the cpu kernel checks as it reads, with ``check_finite``).
    """
    check_inputs(x, name, eps, max_iter, tol)
    chosen = resolve_backend(backend, x.device)
    if backend == "auto" and chosen != "reference":
        chosen = _auto_for(x, want_plan)
    elif chosen in ("cuda", "cpu"):
        # In Python, so that the kernel's own checks are a second line only
        # (and a limit is a ValueError, as the triton backend's).
        _check_takes(chosen, x)
    if chosen != "reference" and not (chosen == "cpu" and x.dtype == torch.float64):
        _check_eps_in_float32(chosen, eps)
    # The fused CPU kernel checks finiteness while it reads the input; the
    # reference and the Triton kernels (which never report to the host) need a
    # separate pass, and so, for now, does the cuda backend. It was given one
    # when C++ exceptions of its library crashed the process on a GPU; its own
    # check (a flag the kernel sets, read after it, in mps_cuda.cpp) raised
    # cleanly on the H200 runs of 0b64572 and 1ce472b (bench/gpu_errors.py,
    # probe cuda-forward-nan), and every check's message (OTSEG_CHECK) on the
    # H100 run of ea3ceed. The pass, one more read of the scores, can go in
    # a change of its own, with test_mps_checks_the_cuda_backend_before_its_kernel
    # (which expects it) and a GPU run.
    return chosen, bool(check_finite) and chosen in ("reference", "triton", "cuda")


def _remembered_resolve(x, name, eps, max_iter, tol, backend, check_finite, want_plan):
    """``_resolve``, answered from ``_resolved`` for a call like an earlier one."""
    key = None
    if type(x) in _PLAIN_TENSORS and x.dim() >= 2:
        # The types keep True apart from 1 (equal, and equally hashed).
        key = (name, backend, x.device, x.dtype, x.shape[-2:], eps, type(eps), max_iter, type(max_iter),
               tol, type(tol), bool(check_finite), bool(want_plan))
        try:
            hit = _resolved.get(key)
        except TypeError:  # an unhashable argument: the checks say what is wrong with it
            key = None
        else:
            if hit is not None:
                return hit
    hit = _resolve(x, name, eps, max_iter, tol, backend, check_finite, want_plan)
    if key is not None:
        if len(_resolved) >= _RESOLVED_MAX:
            _resolved.clear()
        _resolved[key] = hit
    return hit


def _under_vmap(x):
    """Whether ``x`` is batched by torch.vmap (at any level of functorch's wrappers)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(x):
        if functorch.is_batchedtensor(x):
            return True
        x = functorch.get_unwrapped(x)
    return False


def _solve(x, name, eps, max_iter, tol, backend, check_finite, want_score, want_plan):
    if torch.compiler.is_compiling():
        # A data-dependent check would break the graph; compiled callers skip
        # it. Traced calls always take the checked path.
        check_finite = False
        chosen, separate = _resolve(x, name, eps, max_iter, tol, backend, False, want_plan)
    else:
        chosen, separate = _remembered_resolve(x, name, eps, max_iter, tol, backend, check_finite, want_plan)
    if chosen == "reference" and not torch.compiler.is_compiling() and _under_vmap(x):
        raise RuntimeError(
            "the reference backend cannot run under torch.vmap: its stopping test reads the batch's error "
            "on the host every iteration, as the published code does; call it on the whole batch, or use a "
            "fused backend (backend='cpu' for CPU tensors)"
        )
    if separate:
        check_finite_values(x, name)
        check_finite = False
    if chosen == "reference":
        if name == "scores":
            score, plan, n = naive.mps(x, eps, max_iter, tol)
        else:
            plan, n = naive.sinkhorn_log(x, eps, max_iter, tol)
            score = None
        n_iter = torch.full(x.shape[:-2], n, dtype=torch.int32, device=x.device)
        return score, plan, SinkhornInfo(n_iter, chosen)
    if name == "scores":
        scores = x
    else:
        # Form S = 1 - C in the compute type, so half costs lose no bits here.
        scores = 1 - (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x)
    run = _FUSED[chosen]
    # The operators' int is 64 bits and the kernels count iterations in
    # int32: no problem runs 2^31 iterations, so a larger max_iter is capped.
    max_iter = min(max_iter, _KERNEL_MAX_ITER)
    if check_finite:  # the cpu kernel, checking as it reads
        try:
            score, plan, n_iter = run(scores, eps, max_iter, tol, want_plan, True)
        except ValueError as exc:
            if "NaN or inf" not in str(exc):
                raise
            raise ValueError(f"{name} contains NaN or inf; pass check_finite=False to skip this check") from None
    else:
        score, plan, n_iter = run(scores, eps, max_iter, tol, want_plan, False)
    if plan is not None and plan.dtype != x.dtype:
        plan = plan.to(x.dtype)
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
        eps: entropic regularisation, > 0. Default 0.05. The fused kernels
            take it in float32 (but the cpu kernel on float64 input): there
            it must lie in the normal float32 range (ValueError otherwise).
        max_iter: most iterations, >= 1 (the fused kernels run at most
            2^31 - 1). Default 100.
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
