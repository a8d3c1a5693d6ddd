"""Data shipped with otseg: CLIP ViT-B/16 text embeddings of the three
zero-shot benchmarks (one per class and prompt template, L2-normalised) and
their class splits. Copies of the files published with the OTSeg authors'
training code; see ``class_splits.json`` for names, splits and templates.
"""

import json
import os

import numpy as np
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
DATASETS = ("voc20", "context59", "cocostuff171")


def class_splits():
    """The parsed ``class_splits.json``: templates and, per dataset, classes,
    seen/unseen splits, prompts per class and embedding file name."""
    with open(os.path.join(_HERE, "class_splits.json")) as f:
        return json.load(f)


def read_text_embeddings(path, embed_dim=None):
    """Text embeddings ``[K, N, D]`` float32 from a ``.npy`` file, checked.

    Args:
        path: a ``.npy`` file ``[K, N, D]`` (float16/32/64), one L2-normalised
            embedding per class and template, like the shipped
            ``text_embeddings/voc12_k20_n6.npy``.
        embed_dim: D the caller expects (None: any).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a readable ``.npy`` array of floats, not 3 dims, D !=
            ``embed_dim``, an empty axis, NaN/inf, or rows whose norm is not 1
            (to 1e-2). Every message names the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text embeddings file not found: {path}")
    D = "D" if embed_dim is None else embed_dim
    try:
        emb = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(
            f"{path}: not a readable .npy array ({type(e).__name__}: {e}); expected [K, N, {D}] floats"
        ) from e
    if not isinstance(emb, np.ndarray) or emb.dtype.kind != "f":
        kind = getattr(emb, "dtype", type(emb).__name__)
        if hasattr(emb, "close"):  # an .npz archive holds its file open
            emb.close()
        raise ValueError(f"{path}: expected a float array [K, N, {D}] (a .npy file), got {kind}")
    if emb.ndim != 3 or (embed_dim is not None and emb.shape[-1] != embed_dim) or 0 in emb.shape:
        raise ValueError(f"{path}: expected shape [K, N, {D}] with K, N >= 1, got {list(emb.shape)}")
    emb = emb.astype(np.float32)
    if not np.isfinite(emb).all():
        raise ValueError(f"{path}: the embeddings contain NaN or inf")
    norms = np.linalg.norm(emb, axis=-1)
    # float16 files are normalised to about 5e-4; more means unnormalised embeddings.
    if np.abs(norms - 1.0).max() > 1e-2:
        raise ValueError(
            f"{path}: rows must be L2-normalised (norms {norms.min():.4g} to {norms.max():.4g}); "
            "normalise over the last axis first"
        )
    return torch.from_numpy(emb)


def load_text_embeddings(dataset, path=None, embed_dim=None):
    """Text embeddings ``[K, N, D]`` float32 for ``dataset`` (D = 512 in the shipped files).

    Args:
        dataset: "voc20" (K=20, N=6), "context59" (59, 8) or "cocostuff171" (171, 8).
        path: a ``.npy`` file to load instead of the shipped copy
            (``read_text_embeddings`` checks it).
        embed_dim: D the caller expects (None: any).

    Raises:
        ValueError: unknown dataset, a file of the wrong shape for the
            dataset, or one ``read_text_embeddings`` rejects.
        FileNotFoundError: ``path`` does not exist.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    meta = class_splits()[dataset]
    if path is None:
        path = os.path.join(_HERE, "text_embeddings", os.path.basename(meta["text_embeddings"]))
    emb = read_text_embeddings(path, embed_dim)
    K, N = len(meta["classes"]), meta["n_prompts"]
    if emb.shape[:2] != (K, N):
        raise ValueError(f"{os.fspath(path)}: expected shape [{K}, {N}, D] for {dataset}, got {list(emb.shape)}")
    return emb
