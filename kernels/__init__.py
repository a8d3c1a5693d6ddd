"""Triton kernels of otseg, installed as ``otseg.kernels``.

Importing this package never fails when Triton is missing: ``available`` and
``error`` say whether the kernels can run here.
"""

try:
    import triton  # noqa: F401
except ImportError as exc:
    available = False
    error = f"triton is not importable ({exc})"
else:
    available = True
    error = None
