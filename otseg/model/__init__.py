"""The OTSeg model (SPEC section 3): head (relation descriptor, MPSA decoder,
MPS path, ensemble), losses, and the model that ties them to an image encoder.

The CLIP image encoder lives in ``otseg.model.clip``; it is imported only when
``OTSeg.from_config`` has to build one, so this package imports without it.
"""

from .head import (
    MODES,
    HeadOutput,
    MPSPath,
    OTSegHead,
    RelationDescriptor,
    class_probabilities,
    ensemble_logits,
)
from .losses import SegLosses, mask_statistics, otseg_loss, remap_labels, segmentation_loss
from .otseg import OTSeg, OTSegConfig

__all__ = [
    "OTSeg",
    "OTSegConfig",
    "OTSegHead",
    "HeadOutput",
    "RelationDescriptor",
    "MPSPath",
    "MODES",
    "ensemble_logits",
    "class_probabilities",
    "SegLosses",
    "segmentation_loss",
    "otseg_loss",
    "mask_statistics",
    "remap_labels",
]
