"""otseg: fused Multi-Prompts Sinkhorn (OTSeg) for CPU, CUDA and Triton.

    >>> import torch, otseg
    >>> scores = torch.rand(4, 20, 1024, 6) * 2 - 1      # [B, K, M, N] cosine scores
    >>> refined = otseg.ops.mps(scores)                  # [B, K, M]
    >>> otseg.ops.backends()                             # what runs here, and why not
"""

from ._version import __version__
from . import ops

__all__ = ["__version__", "ops"]
