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


def load_text_embeddings(dataset, path=None):
    """Text embeddings ``[K, N, 512]`` float32 for ``dataset``.

    Args:
        dataset: "voc20" (K=20, N=6), "context59" (59, 8) or "cocostuff171" (171, 8).
        path: a ``.npy`` file to load instead of the shipped copy.

    Raises:
        ValueError: unknown dataset, or a file of the wrong shape.
        FileNotFoundError: ``path`` does not exist.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    meta = class_splits()[dataset]
    if path is None:
        path = os.path.join(_HERE, "text_embeddings", os.path.basename(meta["text_embeddings"]))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text embeddings file not found: {path}")
    emb = np.load(path)
    K, N = len(meta["classes"]), meta["n_prompts"]
    if emb.ndim != 3 or emb.shape[:2] != (K, N):
        raise ValueError(f"{path}: expected shape [{K}, {N}, D] for {dataset}, got {list(emb.shape)}")
    return torch.from_numpy(emb.astype(np.float32))
