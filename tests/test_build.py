"""The build: the C++ extension is there, and its CUDA kernels were compiled
whenever this machine has a CUDA toolkit and a CUDA build of torch (no GPU is
needed to compile them), so a silently dropped CUDA build fails here."""

import os
import shutil

import pytest
import torch

from otseg import _extension


def test_cpu_extension_loaded():
    assert _extension.available, _extension.error
    for op in ("mps_forward", "mps_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"otseg::{op}", "CPU")


@pytest.mark.skipif(
    not (shutil.which("nvcc") and torch.version.cuda) or os.environ.get("OTSEG_NO_CUDA") == "1",
    reason="no CUDA toolkit or a CPU build of torch: the CUDA kernels are not expected",
)
def test_cuda_kernels_compiled_when_a_toolkit_is_present():
    assert _extension.with_cuda, "nvcc and a CUDA torch are present, but otseg._C was built without CUDA"
    for op in ("mps_forward", "mps_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"otseg::{op}", "CUDA")
