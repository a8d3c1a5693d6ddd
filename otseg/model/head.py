"""The OTSeg head (SPEC section 3): everything after the image encoder.

The relation descriptor turns the text embeddings into per-image queries;
they feed the MPS path (refined score of the patch-query cosines) and the MPSA
decoder; at inference the two paths are ensembled (OTSeg+), or the decoder is
used alone (OTSeg).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.mpsa import MPSADecoder, SinkhornModule, set_backend, sinkhorn_modules, to_image

__all__ = ["HeadOutput", "RelationDescriptor", "MPSPath", "OTSegHead", "ensemble_logits", "class_probabilities",
           "MODES"]

MODES = ("otseg+", "otseg", "mps")


class HeadOutput(NamedTuple):
    """Logits of the two paths.

    Attributes:
        dec: decoder path ``Y_dec`` [B, K, H, W].
        mps: MPS path ``Y_mps`` [B, K, H, W].
    """

    dec: torch.Tensor
    mps: torch.Tensor


class RelationDescriptor(nn.Module):
    """Per-image queries from the text: ``q = Linear(2D -> D)(concat(g * t, t))``.

    Args:
        dim: D, the embedding width. Default 512.
    """

    def __init__(self, dim=512):
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(2 * dim, dim)

    def forward(self, g, text):
        """
        Args:
            g: [B, D] global image embedding (projected, normalised class token).
            text: [K, N, D] text embeddings.

        Returns:
            queries [B, K, N, D].
        """
        if g.dim() != 2 or text.dim() != 3 or g.shape[-1] != self.dim or text.shape[-1] != self.dim:
            raise ValueError(f"relation descriptor takes g [B, {self.dim}] and text [K, N, {self.dim}], got "
                             f"{tuple(g.shape)} and {tuple(text.shape)}")
        t = text.unsqueeze(0).expand(g.shape[0], -1, -1, -1)
        return self.proj(torch.cat([g[:, None, None, :] * t, t], dim=-1))


class MPSPath(SinkhornModule):
    """The MPS path: refined score ``S*`` of ``S = <normalize(patches), normalize(q)>``.

    Args:
        eps, max_iter, tol, backend: the Sinkhorn settings (SinkhornModule).
    """

    def forward(self, patches, queries, grid=None, out_size=None):
        """
        Args:
            patches: [B, M, D] patch tokens.
            queries: [B, K, N, D] relation-descriptor queries.
            grid: (h, w) token grid, h*w = M; None keeps [B, K, M].
            out_size: (H, W) to upsample to; None keeps (h, w).

        Returns:
            logits ``Y_mps`` [B, K, H, W].
        """
        if patches.dim() != 3 or queries.dim() != 4 or patches.shape[0] != queries.shape[0] \
                or patches.shape[-1] != queries.shape[-1]:
            raise ValueError(f"MPS path takes patches [B, M, D] and queries [B, K, N, D] with the same B and D, "
                             f"got {tuple(patches.shape)} and {tuple(queries.shape)}")
        scores = torch.einsum("bmd,bknd->bkmn", F.normalize(patches, dim=-1), F.normalize(queries, dim=-1))
        scores = scores.contiguous()
        return to_image(self.sinkhorn(scores), grid, out_size)


class OTSegHead(nn.Module):
    """Relation descriptor, MPSA decoder and MPS path.

    Args:
        dim: D. Default 512.
        num_layers: decoder layers. Default 3.
        ffn_dim: decoder FFN width. Default 2048.
        dropout: decoder dropout. Default 0.1.
        eps, max_iter, tol: settings of every Sinkhorn. Default 0.05, 100, 1e-6.
        backend: backend of every Sinkhorn. Default "auto".
    """

    def __init__(self, dim=512, num_layers=3, ffn_dim=2048, dropout=0.1, eps=0.05, max_iter=100, tol=1e-6,
                 backend="auto"):
        super().__init__()
        self.relation = RelationDescriptor(dim)
        self.decoder = MPSADecoder(dim, num_layers, ffn_dim, dropout, eps, max_iter, tol, backend)
        self.mps_path = MPSPath(eps, max_iter, tol, backend)

    @property
    def backend(self):
        """The backend of the Sinkhorns; setting it switches all of them."""
        names = {m.backend for m in sinkhorn_modules(self)}
        return names.pop() if len(names) == 1 else tuple(sorted(names))

    @backend.setter
    def backend(self, value):
        set_backend(self, value)

    def forward(self, g, patches, text, grid=None, out_size=None):
        """
        Args:
            g: [B, D] global image embedding.
            patches: [B, M, D] patch tokens.
            text: [K, N, D] text embeddings.
            grid: (h, w) token grid; None keeps per-token logits [B, K, M].
            out_size: (H, W) to upsample to; None keeps (h, w).

        Returns:
            HeadOutput(dec, mps), logits [B, K, H, W].
        """
        queries = self.relation(g, text)
        dec, _ = self.decoder(queries, patches, grid, out_size)
        return HeadOutput(dec, self.mps_path(patches, queries, grid, out_size))


def ensemble_logits(dec, mps, weight=0.5):
    """OTSeg+ logits ``weight * Y_dec + (1 - weight) * Y_mps`` (weight is λ, default 0.5)."""
    return weight * dec + (1 - weight) * mps


def class_indices(classes, num_classes, what="classes"):
    """Class indices as an int64 tensor [C] (on the CPU when given as a list).

    Args:
        classes: indices in [0, K) (a sequence or an integer tensor) or a
            bool mask [K]; empty gives an empty tensor.
        num_classes: K.
        what: the argument's name in error messages.

    Raises:
        TypeError: neither integers nor a bool mask.
        ValueError: a mask not of shape [K], or an index outside [0, K).
            Indices on a GPU, and any under torch.compile, are not
            range-checked: the check would read them on the host.
    """
    idx = classes if isinstance(classes, torch.Tensor) else torch.as_tensor(classes)
    if idx.dtype == torch.bool:
        if idx.shape != (num_classes,):
            raise ValueError(f"{what}: a bool mask must have shape [{num_classes}] (one entry a class), "
                             f"got {tuple(idx.shape)}")
        return idx.nonzero().flatten()
    if idx.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=idx.device)
    if idx.dtype.is_floating_point or idx.dtype.is_complex:
        raise TypeError(f"{what} must be class indices (integers) or a bool mask [K], got {idx.dtype}")
    if idx.dim() > 1:
        raise ValueError(f"{what} must be a list of class indices, got shape {tuple(idx.shape)}")
    idx = idx.reshape(-1).long()
    if idx.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (idx < 0) | (idx >= num_classes)
        if bad.any():
            raise ValueError(f"{what} must be class indices in [0, {num_classes}), got {idx[bad].tolist()}")
    return idx


def class_probabilities(dec, mps=None, mode="otseg+", weight=0.5, seen=None, seen_bias=0.1):
    """Class probabilities at inference.

    Args:
        dec, mps: logits of the two paths [B, K, H, W].
        mode: "otseg+" (``sigmoid`` of the ensemble, default), "otseg" (the
            decoder alone) or "mps" (the MPS path alone).
        weight: λ of the ensemble. Default 0.5.
        seen: indices (or a bool mask [K]) of the seen classes; their
            probabilities are lowered by ``seen_bias`` (the inductive setting).
            None or empty: no bias.
        seen_bias: Default 0.1.

    Returns:
        [B, K, H, W] probabilities (minus the bias on seen classes).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode != "otseg" and mps is None:
        raise ValueError(f"mode {mode!r} needs the MPS path's logits")
    logits = dec if mode == "otseg" else mps if mode == "mps" else ensemble_logits(dec, mps, weight)
    probs = torch.sigmoid(logits)
    if seen is None or not seen_bias:
        return probs
    seen = class_indices(seen, probs.shape[1], "seen")
    bias = torch.zeros(probs.shape[1], dtype=probs.dtype, device=probs.device)
    bias[seen.to(probs.device)] = seen_bias
    return probs - bias.view(1, -1, 1, 1)
