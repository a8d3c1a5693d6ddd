"""Loads the compiled extension ``otseg._C`` if it is there.

Importing otseg never fails because the extension is missing or broken: the
reason is kept and shown by ``otseg.ops.backends()``.
"""

import torch

_C = None
error = None
try:
    from . import _C  # noqa: F811  (registers the torch.ops.otseg operators)
except ImportError as exc:  # not built, or built against another torch
    error = f"the C++ extension otseg._C is not importable ({exc}); reinstall with `pip install --no-build-isolation -e .`"
else:
    built_for = getattr(_C, "torch_version", None)
    running = torch.__version__.split("+")[0]
    if built_for is not None and built_for != running:
        error = f"otseg._C was built against torch {built_for} but torch {running} is running; rebuild it"
        _C = None

available = _C is not None
with_cuda = bool(getattr(_C, "with_cuda", 0)) if available else False
# The instruction set of the CPU kernels here: "AVX-512", "AVX2", "SSE2" or
# "baseline" (csrc/cpu/mps_cpu.h; OTSEG_CPU_ISA=avx2|baseline narrows it).
cpu_isa = getattr(_C, "cpu_isa", None) if available else None
