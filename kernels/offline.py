"""The MPS Triton kernels compiled for an NVIDIA GPU without one.

Triton's whole CUDA pipeline (front end, LLVM, ptxas) runs on any machine with
the Triton wheel; only launching needs a GPU. ``compile_mps_kernel`` builds
``_mps_fwd_kernel`` or ``_mps_bwd_kernel`` (``kernels/mps.py``) for a target
with the argument types and alignments Triton's launcher gives torch's
tensors, so that the machine code is the one a GPU would run. Used by the
sm_90 compile tests and ``bench/triton_sass.py``.
"""

from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile

_SCALARS = {"eps_hi": "fp32", "eps_lo": "fp32", "tol_hi": "fp32", "tol_lo": "fp32", "stride_sp": "i64"}


def compile_mps_kernel(kernel, consts, dtype="fp32", acc="fp32", num_warps=4, arch=90, float_args="fp32",
                       maxnreg=None):
    """Compile an MPS kernel for ``sm_<arch>``.

    Args:
        kernel: ``_mps_fwd_kernel`` or ``_mps_bwd_kernel``.
        consts: compile-time arguments (every constexpr, and any argument to
            fix, e.g. ``{"M": 1}``).
        dtype: Triton type of the score-shaped tensors ("fp32", "bf16", ...);
            acc: that of the potentials F and G (the compute type).
        float_args: type of the float scalars (eps, tol): "fp32" as Triton's
            launcher passes Python floats, "fp64" as Inductor does under
            torch.compile.
        maxnreg: a register cap per thread (None: none), as the launchers
            pass (otseg/ops/mps/triton.py, FWD_MAXNREG).

    Returns:
        Triton's CompiledKernel (``asm["ttgir"]``, ``asm["cubin"]``, ...).
    """
    # Constexprs with a default (the forward's EVEN_M, EVEN_N) take it
    # unless given.
    consts = {**{p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}, **consts}
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("M", "N"):
            sig[name] = "i32"
        elif name == "NITER":
            sig[name] = "*i32"
        elif name in ("F", "G"):
            sig[name] = f"*{acc}"
        elif name.isupper():
            sig[name] = f"*{dtype}"
        else:
            sig[name] = _SCALARS.get(name, "i32").replace("fp32", float_args)
    # Aligned pointers and a batch stride divisible by 16, as Triton's launcher
    # specialises them for torch's allocations.
    aligned = [n for n, t in sig.items() if t.startswith("*") or n == "stride_sp"]
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    options = {"num_warps": num_warps} if maxnreg is None else {"num_warps": num_warps, "maxnreg": int(maxnreg)}
    return triton_compile(src, target=GPUTarget("cuda", arch, 32), options=options)
