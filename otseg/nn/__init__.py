"""Neural-network modules on top of the MPS operator: Multi-Prompts Sinkhorn
Attention and the OTSeg decoder (SPEC section 2). See README.md beside this file."""

from .mpsa import (
    BACKENDS,
    MPSADecoder,
    MPSADecoderLayer,
    MultiPromptSinkhornAttention,
    SinkhornModule,
    fuse_masks,
    set_backend,
    sinkhorn_modules,
    to_image,
)

__all__ = [
    "BACKENDS",
    "SinkhornModule",
    "MultiPromptSinkhornAttention",
    "MPSADecoderLayer",
    "MPSADecoder",
    "fuse_masks",
    "to_image",
    "set_backend",
    "sinkhorn_modules",
]
