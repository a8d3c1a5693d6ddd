"""Backend "triton": launchers, operator registration and autograd glue of the
fused Triton MPS kernels (``kernels/mps.py``, installed as ``otseg.kernels``).

Two operators, ``torch.ops.otseg.mps_forward_triton`` and
``torch.ops.otseg.mps_backward_triton``, registered with
``torch.library.triton_op`` (launches through ``wrap_triton``) so that
``torch.compile`` sees the kernels and ``opcheck`` passes. The backward is the
implicit gradient at the fixed point (README.md beside this file), one program
per problem from the scores and the final potentials.

Under ``TRITON_INTERPRET=1`` (set before Triton is imported) the kernels run in
Triton's interpreter on CPU tensors, for testing without a GPU. The
interpreter's kernels cannot be traced (``wrap_triton`` hands them back
unwrapped and they cannot run on fake tensors), so there the same functions are
registered with ``torch.library.custom_op`` and an explicit fake instead.

Launches from C++: once a kernel variant has been compiled and launched here,
it is registered with the C++ extension (``csrc/triton/launch.h``), which
launches it itself on later calls whose arguments Triton would specialise the
same way: the host's work per call drops from Python's (the custom-op
dispatch, this module, Triton's binder and launcher) to that of the cuda
backend's C++ operator. ``launch_stats()`` counts both routes;
``set_cpp_launch(False)`` (or ``OTSEG_TRITON_LAUNCH=python`` in the
environment) keeps every launch in Python.

Limits: one problem is one register block, so M <= 4096 pixels and N <= 16
prompts. float64 scores compute in float64; every other dtype in float32.
Importing this module never fails: ``available`` and ``error`` say whether the
backend can run here. Without a GPU and without the interpreter it loads
neither the kernels nor Triton's torch glue (``available`` is then False).
"""

import contextlib
import functools
import logging
import math
import os
import re
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ... import _extension
from ... import kernels as _kernels
from .fused import _acc_dtype, autograd_pair, empty_outputs, no_context, no_double_backward, vmap_rule

__all__ = [
    "available", "error", "interpreted", "interpreter_requested", "MAX_M", "MAX_N", "check_limits",
    "launch_forward", "launch_backward", "mps_forward", "launch_stats", "set_cpp_launch", "cpp_launch_error",
]

_log = logging.getLogger("otseg")

MAX_M = 4096
MAX_N = 16

available = _kernels.available
error = _kernels.error
interpreted = False
CompiledKernel = ()  # Triton's, where the kernels load


def interpreter_requested():
    """True when the environment asks for Triton's interpreter (TRITON_INTERPRET)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


if available and not (torch.cuda.is_available() or interpreter_requested()):
    # Nothing here can launch the kernels, so neither the kernels nor Triton's
    # torch glue are loaded: torch.library.wrap_triton pulls in torch._inductor,
    # about 2 s at every `import otseg` on a machine without a GPU.
    available = False
    error = ("no CUDA GPU is visible (torch.cuda.is_available() is False); TRITON_INTERPRET=1, set before "
             "otseg is imported, runs the kernels on CPU tensors, for testing")

if available:
    try:
        from torch.library import wrap_triton

        from ...kernels.mps import _mps_bwd_kernel, _mps_fwd_kernel
    except Exception as exc:  # a Triton that does not match this torch, say
        available = False
        error = f"the Triton kernels do not load ({type(exc).__name__}: {exc})"
    else:
        try:
            from triton.runtime.interpreter import InterpretedFunction
        except ImportError:
            InterpretedFunction = ()
        interpreted = isinstance(_mps_fwd_kernel, InterpretedFunction)
        try:
            from triton.compiler import CompiledKernel
        except ImportError:
            CompiledKernel = ()


# The forward's variant: the scores read again where needed rather than held
# in registers (kernels/mps.py, HOLD_S=False) and, on eager launches, a cap of
# 168 registers a thread, which fits three programs of 4 warps an SM instead
# of two. bench/gpu_profile.py's table on an H200, coco16 (1024 x 8), CUDA-graph
# times, clip / hard scores: 116.7 / 630.5 us (commit 0b64572) and 115.5 /
# 623.6 us (1ce472b), against 119.5 / 774.9 and 119.7 / 764.7 us with the
# scores held and no cap (255 registers). The cap changes no result (every
# output bitwise the same with and without it, in both runs): torch.compile's
# tracing of a launch, which would take a cap for a kernel argument, launches
# the same variant without it, so compiled and eager calls agree (opcheck);
# the scores held instead differ in the last bits and, where a problem ends
# at its tolerance, by an iteration. The cap applies only where the program's
# threads can have it (FWD_MAXNREG * 32 * warps <= 65536 registers an SM:
# up to 12 warps; the largest problems launch 32).
FWD_HOLD_S = False
FWD_MAXNREG = 168
_REGISTERS_PER_SM = 65536
_DEFAULT = object()


def _fwd_variant(warps, traced):
    """(HOLD_S, register cap) of a forward launch of ``warps`` warps:
    FWD_HOLD_S, and FWD_MAXNREG where the launch runs eagerly (not
    ``traced``) and its threads can have that many registers."""
    fits = FWD_MAXNREG * 32 * warps <= _REGISTERS_PER_SM
    return FWD_HOLD_S, (FWD_MAXNREG if fits and not traced else None)


def _traced_launch(x):
    """True where a launch on ``x`` may be recorded rather than run:
    torch.compile's tracing (fake or functional tensors) or any other
    dispatch mode."""
    return type(x) is not torch.Tensor or is_in_torch_dispatch_mode()


def check_limits(M, N):
    """Raise ValueError when one problem does not fit the kernel's register block."""
    if N > MAX_N:
        raise ValueError(
            f"backend='triton' handles at most N={MAX_N} prompts per class (one register block per problem), "
            f"got N={N}; use backend='cpu' (CPU tensors) or backend='reference'"
        )
    if M > MAX_M:
        raise ValueError(
            f"backend='triton' handles at most M={MAX_M} pixels per problem (one register block per problem), "
            f"got M={M}; use backend='cpu' (CPU tensors) or backend='reference'"
        )


def _check_device(x):
    if x.device.type == "cuda" or interpreted or x.device.type == "meta":
        return
    raise ValueError(
        f"backend='triton' runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1), got a "
        f"{x.device.type} tensor"
    )


@functools.lru_cache(maxsize=64)
def _split(x):
    """A Python float as float32 hi + lo (exact to about 2^-48 when summed in
    float64): Triton passes Python floats to kernels as float32."""
    with np.errstate(over="ignore", under="ignore"):
        hi = float(np.float32(x))
        lo = float(np.float32(x - hi)) if math.isfinite(hi) else 0.0
    return hi, lo


class _Blocks(NamedTuple):
    """The launch configuration of [M, N] problems (``_blocks``)."""

    block_m: int
    block_n: int
    fwd_warps: int
    bwd_warps: int
    one_pass: bool  # the backward sums its N x N weights in one pass (W_ONE_PASS)


@functools.lru_cache(maxsize=64)
def _blocks(M, N, wide=False):
    """The ``_Blocks`` of [M, N] problems (ints); ``wide``: float64 compute."""
    block_m = max(16, 1 << (M - 1).bit_length())
    block_n = max(2, 1 << (N - 1).bit_length())
    # Threads along the pixels, each holding whole rows: 64 values of each
    # tile a thread (32 in float64), 4 warps for 1024 x 8. Measured on an H100
    # (bench/gpu_profile.py's sweep, coco16, triton 3.6, commit 41c01fa): 4
    # warps against 8 and 16, forward 119 / 191 / 205 us on the clip scores
    # and 755 / 1428 / 1536 us on the hard ones, backward 103 / 147 / 201 us.
    # Fewer threads a problem make its sums over pixels (two a forward
    # iteration) cheaper and leave room for two problems on an SM.
    per_warp = 1024 if wide else 2048
    fwd_warps = min(32, max(1, block_m // 32), max(1, (block_m * block_n) // per_warp))
    # Backward: the same share a thread. Its one-pass weights hold BLOCK_N^2
    # accumulators a thread: up to 8 x 8 in float32.
    bwd_warps = min(32, max(1, (block_m * block_n) // per_warp))
    return _Blocks(block_m, block_n, fwd_warps, bwd_warps, block_n <= 8 and not wide)


def _vector_width(x, N):
    """Prompts per vector read of a tile: 4 (or 2) when ``x`` [P, M, N] is
    contiguous, N is a multiple and the data starts at a multiple of it in
    its storage; else 1 (any strides). The vector never exceeds 16 bytes.

    Only the storage offset is looked at, never the data pointer, which fake
    tensors (torch.compile's tracing of the operators) do not have. The
    choice is one of layout, not of correctness: the kernel's addresses are
    exact for any VEC the contiguity allows, and Triton issues vector loads
    only where it knows the pointer is aligned."""
    if N < 2 or not x.is_contiguous():
        return 1
    for vec in (4, 2):
        width = vec * x.element_size()
        if N % vec == 0 and width <= 16 and x.storage_offset() * x.element_size() % width == 0:
            return vec
    return 1


def _check_scores(scores):
    if scores.dim() < 2:
        raise ValueError(f"scores must have shape [..., M, N], got {tuple(scores.shape)}")
    if not scores.dtype.is_floating_point:
        raise TypeError(f"scores must be float16, bfloat16, float32 or float64, got {scores.dtype}")
    check_limits(scores.shape[-2], scores.shape[-1])
    _check_device(scores)


def _flat(x, *tail):
    """``x`` [..., *tail] as [P, *tail] (a view where the batch dims merge).
    Inside the operators, so that it adds no autograd node."""
    return x.reshape(-1, *tail)


def full_tile_flags(M, N, blocks):
    """The forward's EVEN_M and EVEN_N for [M, N] problems in the tile of
    ``blocks`` (``_blocks``): the problem fills the tile along the pixels
    (M = BLOCK_M) and the prompts (N = BLOCK_N), so that there are no padding
    rows or prompts and the kernel's masks are decided at compile time.
    Functions of M and N, which the C++ launcher's keys carry
    (csrc/triton/launch.cpp, common_tags): a key names one variant either way."""
    return {"EVEN_M": int(M) == blocks.block_m, "EVEN_N": int(N) == blocks.block_n}


def launch_forward(scores, eps, max_iter, tol, score, plan, f, g, n_iter, num_warps=None, hold_scores=_DEFAULT,
                   maxnreg=_DEFAULT, kernel=None, full_tile=True):
    """Run ``_mps_fwd_kernel`` into given outputs (``plan`` may be None).

    Args:
        scores: [P, M, N], any strides.
        score: [P, M] contiguous; plan: [P, M, N] contiguous or None;
        f: [P, M], g: [P, N] contiguous in the compute type; n_iter: [P] int32.
        The outputs are used as pointers: any shape with those contiguous
        layouts will do (e.g. [..., M] for score).
        num_warps: overrides the launch's warp count (bench/gpu_profile.py
            compares them); None: the one ``_blocks`` picks.
        hold_scores: the kernel's HOLD_S (kernels/mps.py): keep the scores
            in registers for all iterations, or read them again where
            needed, with fewer registers. Default: FWD_HOLD_S.
        maxnreg: a register cap per thread for the compiler (None: none),
            which fits more problems on an SM. Default: FWD_MAXNREG where the
            launch runs eagerly and its threads can have that many registers,
            else None (torch.compile's tracing would take the cap for a
            kernel argument; passing one there raises).
        kernel: the Triton forward kernel to launch, with
            ``_mps_fwd_kernel``'s arguments (default: that one);
            bench/gpu_profile.py times another version's against it. One
            without EVEN_M and EVEN_N (an older version) is launched without
            them.
        full_tile: True (default): the kernel's EVEN_M and EVEN_N where the
            problem fills its tile (``full_tile_flags``); False: never (the
            same arithmetic with run-time masks, for comparisons).

    Returns:
        what Triton's launch returns: its CompiledKernel on a GPU (None when
        P == 0, under the interpreter or while torch.compile traces).
    """
    P, M, N = scores.shape
    if P == 0:
        return None
    # int(): sizes may be symbolic under torch.compile (the cache hashes them).
    blocks = _blocks(int(M), int(N), f.dtype == torch.float64)
    vec = _vector_width(scores, N)
    eps_hi, eps_lo = _split(float(eps))
    tol_hi, tol_lo = _split(float(tol))
    # n_iter is int32; a larger budget would never finish anyway.
    max_iter = min(int(max_iter), 2**31 - 1)
    traced = _traced_launch(scores)
    warps = num_warps or blocks.fwd_warps
    default_hold, default_cap = _fwd_variant(warps, traced)
    hold_scores = default_hold if hold_scores is _DEFAULT else hold_scores
    maxnreg = default_cap if maxnreg is _DEFAULT else maxnreg
    if maxnreg is not None and traced:
        raise ValueError("launch_forward: torch.compile's tracing of the launch cannot pass a register cap (maxnreg)")
    options = {} if maxnreg is None else {"maxnreg": int(maxnreg)}
    kernel = kernel or _mps_fwd_kernel
    # A kernel without the full tile's flags (another version's) is launched
    # without them.
    if "EVEN_M" in kernel.arg_names:
        options.update({k: full_tile and v for k, v in full_tile_flags(M, N, blocks).items()})
    # Without a plan, PLAN is never touched; it gets a read-only input rather
    # than an output, so that no output is passed twice.
    return wrap_triton(kernel)[(P,)](
        scores, score, plan if plan is not None else scores, f, g, n_iter,
        scores.stride(0), scores.stride(1), scores.stride(2),
        M, N, max_iter,
        eps_hi, eps_lo, tol_hi, tol_lo,
        HAS_PLAN=plan is not None, BLOCK_M=blocks.block_m, NG=blocks.block_n // vec, VEC=vec,
        HOLD_S=bool(hold_scores), num_warps=warps, **options,
    )


def launch_backward(grad_score, grad_plan, scores, f, g, eps, grad, num_warps=None):
    """Run ``_mps_bwd_kernel`` into ``grad`` [P, M, N] (contiguous; used as a
    pointer, so any shape with that layout will do).

    Args:
        grad_score: [P, M] or None; grad_plan: [P, M, N] or None (any strides).
        scores: [P, M, N], any strides; f: [P, M], g: [P, N] contiguous.
        num_warps: as in ``launch_forward``.

    Returns:
        as ``launch_forward``.
    """
    P, M, N = scores.shape
    if P == 0:
        return None
    blocks = _blocks(int(M), int(N), f.dtype == torch.float64)
    vec = _vector_width(scores, N)
    eps_hi, eps_lo = _split(float(eps))
    # Absent upstream gradients are never read; any input stands in.
    ds = grad_score if grad_score is not None else scores
    dp = grad_plan if grad_plan is not None else scores
    ds_strides = (ds.stride(0), ds.stride(1)) if grad_score is not None else (0, 0)
    dp_strides = (dp.stride(0), dp.stride(1), dp.stride(2)) if grad_plan is not None else (0, 0, 0)
    return wrap_triton(_mps_bwd_kernel)[(P,)](
        scores, f, g, ds, dp, grad,
        scores.stride(0), scores.stride(1), scores.stride(2),
        *ds_strides,
        *dp_strides,
        M, N,
        eps_hi, eps_lo,
        HAS_DSCORE=grad_score is not None, HAS_DPLAN=grad_plan is not None,
        BLOCK_M=blocks.block_m, NG=blocks.block_n // vec, VEC=vec, W_ONE_PASS=blocks.one_pass,
        num_warps=num_warps or blocks.bwd_warps,
    )


def _on_device(x):
    """The device of CUDA tensor ``x`` made current, where it is not: Triton
    compiles for, loads into and launches on the current device."""
    if x.device.type != "cuda" or x.device.index is None or x.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(x.device)


def _mps_forward_triton(
    scores: torch.Tensor, eps: float, max_iter: int, tol: float, return_plan: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_scores(scores)
    # Outputs with the batch dims of the scores [..., M, N]; the kernel sees
    # them as [P, ...] (contiguous) and the scores flattened.
    score, plan, f, g, n_iter = empty_outputs(scores, return_plan)
    flat = _flat(scores, *scores.shape[-2:])
    plan_out = plan if return_plan else None
    with _on_device(flat):  # registration too: it loads the kernel for the current device
        compiled = launch_forward(flat, eps, max_iter, tol, score, plan_out, f, g, n_iter)
        if _launched(compiled, "python_forward"):
            _register(compiled, torch.ops.otseg.triton_launch_args_forward, flat,
                      (flat, score, plan_out, f, g, n_iter, int(max_iter), float(eps), float(tol)))
    return score, plan, f, g, n_iter


def _mps_forward_triton_fake(scores, eps, max_iter, tol, return_plan):
    _check_scores(scores)
    return empty_outputs(scores, return_plan)


def _check_backward_args(grad_score, grad_plan, scores, f, g):
    _check_scores(scores)
    *batch, M, N = scores.shape
    batch = tuple(batch)
    acc = _acc_dtype(scores.dtype)
    if f.shape != (*batch, M) or g.shape != (*batch, N) or f.dtype != acc or g.dtype != acc:
        raise ValueError(f"f [..., M] and g [..., N] must be {acc} for scores of shape {tuple(scores.shape)}")
    if grad_score is not None and grad_score.shape != (*batch, M):
        raise ValueError(f"grad_score must have shape {(*batch, M)}, got {tuple(grad_score.shape)}")
    if grad_plan is not None and grad_plan.shape != (*batch, M, N):
        raise ValueError(f"grad_plan must have shape {(*batch, M, N)}, got {tuple(grad_plan.shape)}")


def _mps_backward_triton(
    grad_score: Optional[torch.Tensor],
    grad_plan: Optional[torch.Tensor],
    scores: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    _check_backward_args(grad_score, grad_plan, scores, f, g)
    if grad_score is None and grad_plan is None:
        return torch.zeros_like(scores, memory_format=torch.contiguous_format)
    M, N = scores.shape[-2:]
    grad = torch.empty_like(scores, memory_format=torch.contiguous_format)
    ds = None if grad_score is None else _flat(grad_score, M)
    dp = None if grad_plan is None else _flat(grad_plan, M, N)
    flat, f, g = _flat(scores, M, N), f.contiguous(), g.contiguous()
    with _on_device(flat):  # registration too: it loads the kernel for the current device
        compiled = launch_backward(ds, dp, flat, f, g, eps, grad)
        if _launched(compiled, "python_backward"):
            _register(compiled, torch.ops.otseg.triton_launch_args_backward, flat,
                      (ds, dp, flat, f, g, grad, float(eps)))
    return grad


def _cpp_launch_status():
    """None when the C++ extension can launch registered kernels, else why not."""
    if not available or interpreted:
        return "the kernels run in Triton's interpreter" if interpreted else error
    if not _extension.available:
        return _extension.error
    if not _extension.with_cuda:
        return "otseg._C was built without CUDA"
    if not hasattr(torch.ops.otseg, "triton_launch_register"):
        return "otseg._C predates the C++ launches of Triton kernels; rebuild it"
    route = os.environ.get("OTSEG_TRITON_LAUNCH", "").strip().lower()
    if route == "python":
        return "OTSEG_TRITON_LAUNCH=python"
    if route not in ("", "cpp", "c++"):
        _log.warning("otseg: OTSEG_TRITON_LAUNCH=%s is neither 'python' nor 'cpp'; launching from C++", route)
    return None


# Why launches stay in Python (None: they move to C++ after each variant's
# first call); set_cpp_launch changes it.
cpp_launch_error = _cpp_launch_status()
# Launches through Python, by kernel ("python_forward", "python_backward").
_python_launches = {"python_forward": 0, "python_backward": 0}
# Per key of a launch (csrc/triton/launch.cpp): the CompiledKernel registered
# with C++ (kept here so that its module stays loaded), or why it was not.
_registered = {}


def _launched(compiled, counter):
    """Count a launch through Python; True when it ran a compiled GPU kernel
    that may be registered (not under the interpreter or torch.compile's
    tracing, where Triton returns no CompiledKernel)."""
    if not isinstance(compiled, CompiledKernel):
        return False
    _python_launches[counter] += 1
    return cpp_launch_error is None


def _ptx_param_sizes(ptx):
    """Byte sizes of the parameters of the PTX's kernel entry, one character
    each ("8", "4", ...; "?" for any other kind), in order."""
    entry = re.search(r"\.entry\s+[\w$]+\s*\((.*?)\)", ptx, re.S)
    if entry is None:
        return ""
    sizes = []
    for decl in entry.group(1).split(","):
        m = re.fullmatch(r"\s*\.param\s+\.[a-z]+(8|16|32|64)\b.*", decl, re.S)
        if m is None or "[" in decl:
            sizes.append("?")
        else:
            sizes.append(str(int(m.group(1)) // 8))
    return "".join(sizes)


def _triton_settings():
    """Why Triton's own launcher must run each launch (None: it need not):
    launch hooks (e.g. Proton's), or debug or instrumentation modes, which C++
    would bypass or not see change."""
    try:
        from triton import knobs
    except ImportError:
        return None
    runtime = knobs.runtime
    for name in ("launch_enter_hook", "launch_exit_hook"):
        hook = getattr(runtime, name, None)
        # A HookChain (triton 3.6, 3.8) with hooks in it, or a plain hook.
        active = bool(hook.calls) if hasattr(hook, "calls") else hook is not None
        if active:
            return f"triton.knobs.runtime.{name} is set"
    if getattr(runtime, "debug", False):
        return "Triton's debug mode (TRITON_DEBUG) is on"
    if getattr(getattr(knobs, "compilation", None), "instrumentation_mode", ""):
        return "Triton's instrumentation mode (TRITON_INSTRUMENTATION_MODE) is on"
    return None


def _unregistrable(compiled):
    """Why a CompiledKernel cannot be launched from C++ (None: it can)."""
    settings = _triton_settings()
    if settings is not None:
        return settings
    meta = compiled.metadata
    if getattr(meta, "num_ctas", 1) != 1:
        return f"it runs in clusters of {meta.num_ctas} CTAs"
    if getattr(meta, "launch_cooperative_grid", False) or getattr(meta, "launch_pdl", False):
        return "it needs a cooperative or programmatic-dependent launch"
    if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
        return "it needs Triton's scratch memory"
    if "ptx" not in compiled.asm:
        return "Triton kept no PTX of it"
    return None


def _register(compiled, args_op, flat, args):
    """Register the kernel of a Python launch with C++, under the key that
    ``args_op`` (the extension's view of the launch, from the same tensors)
    gives, once per key; log, once, why one cannot be. Called on the tensors'
    device (``_on_device``), the device the kernel is loaded for."""
    key, sizes, vec = args_op(*args)
    if key in _registered:
        return
    if getattr(compiled, "function", None) is None:
        compiled._init_handles()
    why = _unregistrable(compiled)
    python_vec = _vector_width(flat, flat.shape[-1])
    if why is None and vec != python_vec:
        why = (f"the C++ and Python launchers disagree on the vector width of scores of shape "
               f"{tuple(flat.shape)} and strides {flat.stride()} ({vec} against {python_vec}); please report this")
    if why is None:
        why = torch.ops.otseg.triton_launch_register(
            key, sizes, _ptx_param_sizes(compiled.asm["ptx"]), int(compiled.function),
            int(compiled.metadata.num_warps), int(compiled.metadata.shared)) or None
    _registered[key] = compiled if why is None else why
    if why is not None:
        _log.warning("otseg: the triton backend launches %s from Python (slower on the host): %s",
                     compiled.metadata.name if hasattr(compiled.metadata, "name") else "a kernel", why)


def launch_stats():
    """How the triton backend's kernels have been launched in this process.

    Returns:
        dict: ``route`` (where launches go after each kernel variant's first
        call: "C++", or "Python" and why; with the number of variants that
        could not be registered), ``kernels`` (variants registered with C++),
        ``refused`` (variants that could not be, with the reason), and the
        launch counts ``cpp_forward``, ``cpp_backward``, ``cpp_failed`` (each
        unregisters its kernel), ``python_forward``, ``python_backward``.
    """
    kernels, cpp_fwd, cpp_bwd, failed = (torch.ops.otseg.triton_launch_stats()
                                         if hasattr(torch.ops.otseg, "triton_launch_stats") else (0, 0, 0, 0))
    refused = {k: v for k, v in _registered.items() if isinstance(v, str)}
    route = "C++" if cpp_launch_error is None else f"Python ({cpp_launch_error})"
    if cpp_launch_error is None and refused:
        route += f", except {len(refused)} kernel variant(s) launched from Python (see 'refused')"
    return {
        "route": route,
        "kernels": kernels,
        "refused": refused,
        "cpp_forward": cpp_fwd,
        "cpp_backward": cpp_bwd,
        "cpp_failed": failed,
        **_python_launches,
    }


def set_cpp_launch(enabled):
    """Let launches move to C++ (True, the default where the extension can)
    or keep them all in Python (False), e.g. to compare the host's work of
    the two routes. Either way forgets the registered kernels and the counts.

    Returns:
        None when C++ launches are on, else why not.
    """
    global cpp_launch_error
    if hasattr(torch.ops.otseg, "triton_launch_clear"):
        torch.ops.otseg.triton_launch_clear()
    _registered.clear()
    _python_launches.update(python_forward=0, python_backward=0)
    cpp_launch_error = _cpp_launch_status() if enabled else "set_cpp_launch(False)"
    return cpp_launch_error


def _mps_backward_triton_fake(grad_score, grad_plan, scores, f, g, eps):
    _check_backward_args(grad_score, grad_plan, scores, f, g)
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


if available:
    if interpreted:
        _fwd_op = torch.library.custom_op("otseg::mps_forward_triton", mutates_args=())(_mps_forward_triton)
        _fwd_op.register_fake(_mps_forward_triton_fake)
        _bwd_op = torch.library.custom_op("otseg::mps_backward_triton", mutates_args=())(_mps_backward_triton)
        _bwd_op.register_fake(_mps_backward_triton_fake)
    else:
        _fwd_op = torch.library.triton_op("otseg::mps_forward_triton", mutates_args=())(_mps_forward_triton)
        _bwd_op = torch.library.triton_op("otseg::mps_backward_triton", mutates_args=())(_mps_backward_triton)
    _setup_context, _backward = autograd_pair(lambda *args: torch.ops.otseg.mps_backward_triton(*args))
    _fwd_op.register_autograd(_backward, setup_context=_setup_context)
    _bwd_op.register_autograd(no_double_backward, setup_context=no_context)
    # The backend's differentiable entry: otseg::mps_triton glues the two
    # operators with an autograd in C++ (csrc/autograd.cpp), which saves the
    # Python autograd's interpreter work (about 60 us a forward + backward on
    # a 2-core CPU machine, bench/host_overhead.py); without the C++
    # extension, mps_forward_triton with the same glue in Python.
    if _extension.available and hasattr(torch.ops.otseg, "mps_triton"):
        torch.library.register_fake("otseg::mps_triton")(_mps_forward_triton_fake)
        _entry = torch.ops.otseg.mps_triton.default  # the one overload, bound once
        torch.library.register_vmap("otseg::mps_triton", vmap_rule(_entry))
        if hasattr(torch.ops.otseg, "mps_triton_backward"):
            # No autograd of its own (a Python one would add its interpreter
            # work to every call): torch's fallback refuses to differentiate it.
            torch.library.register_fake("otseg::mps_triton_backward")(_mps_backward_triton_fake)
    else:
        _entry = torch.ops.otseg.mps_forward_triton.default


def mps_forward(scores, eps, max_iter, tol, return_plan):
    """Run the fused Triton forward on scores of any batch shape [..., M, N].

    Raises:
        ValueError: M > 4096 or N > 16 (use backend "cpu" or "reference").

    Returns (refined score [..., M], plan [..., M, N] or None, iterations [...] int32).
    """
    check_limits(*scores.shape[-2:])
    # The operator takes the batch dims itself: no reshape (and so no
    # autograd node) around it.
    score, plan, _f, _g, n_iter = _entry(scores, float(eps), int(max_iter), float(tol), bool(return_plan))
    return score, plan if return_plan else None, n_iter
