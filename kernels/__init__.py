"""Triton kernels of otseg, installed as ``otseg.kernels``.

- ``mps``: the fused Multi-Prompts Sinkhorn forward and implicit backward
  (``_mps_fwd_kernel``, ``_mps_bwd_kernel``); launched by
  ``otseg/ops/mps/triton.py``.
- ``mask_stats``: the fused loss sums of upsampled logits and their gradient;
  launched by ``otseg/ops/mask_stats.py``.
- ``offline``: the MPS kernels compiled for a GPU target without a GPU (the
  sm_90 compile tests, ``bench/triton_sass.py``).

Importing this package never fails when Triton is missing: ``available`` and
``error`` say whether the kernels can run here. It does not import the kernel
modules themselves, which need Triton.
"""

try:
    import triton  # noqa: F401
except ImportError as exc:
    available = False
    error = f"triton is not importable ({exc})"
else:
    available = True
    error = None
