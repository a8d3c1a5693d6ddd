"""The OTSeg model (SPEC section 3): image encoder, text embeddings and head.

    >>> model = OTSeg.from_config("voc20")              # CLIP VPT encoder, shipped text embeddings
    >>> out = model(images, upsample=False)              # HeadOutput(dec, mps), [B, K, h, w] token-grid logits
    >>> loss = model.loss(out, labels).total             # upsampled to the labels inside (fused)
    >>> labels = model.predict(images)                   # OTSeg+ argmax [B, H, W]

The encoder (``otseg.model.clip.VPTImageEncoder``) is imported only when
``from_config`` has to build one; any module with its interface works:
``encoder(images [B, 3, H, W]) -> (g [B, D], patches [B, M, D], (h, w))``.
"""

import dataclasses
import numbers
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import data
from ..nn.mpsa import check_backend, set_backend, sinkhorn_modules
from ..ops._checks import check_params
from .head import MODES, OTSegHead, class_indices, class_probabilities
from .losses import otseg_loss

__all__ = ["OTSegConfig", "OTSeg"]

SETTINGS = ("inductive", "transductive", "supervised")


@dataclass
class OTSegConfig:
    """Everything that defines an OTSeg model (defaults: SPEC section 3).

    Attributes:
        dataset: "voc20", "context59" or "cocostuff171" (text embeddings, class splits).
        setting: "inductive" (seen-class bias at inference), "transductive" or "supervised".
        num_prompts: visual prompt tokens P of the encoder (10 VOC/Context, 100 COCO).
        prompt_dropout: dropout of the visual prompts. Default 0.1.
        clip_weights: CLIP ViT-B/16 weights for the encoder (None: random init, with a warning).
        clip_model, clip_quick_gelu: the encoder's open_clip architecture
            ("ViT-B-16") and whether it uses QuickGELU (OpenAI's weights do:
            set it, or name "ViT-B-16-quickgelu", for OpenAI's weights saved
            as an open_clip state dict). A model sets both, and
            ``num_prompts``, from the CLIP encoder it holds (OpenAI's own
            files, ``ViT-B-16.pt``, bring QuickGELU; clip_model None where no
            open_clip name describes the tower): ``OTSeg.load`` rebuilds
            that architecture.
        text_embeddings: a ``.npy`` file to load instead of the shipped embeddings.
        dim, num_layers, ffn_dim, dropout: the head (512, 3, 2048, 0.1).
        eps, max_iter, tol, backend: every Sinkhorn (0.05, 100, 1e-6, "auto").
        ensemble_weight: λ of OTSeg+. Default 0.5.
        seen_bias: subtracted from seen-class probabilities (inductive). Default 0.1.
        focal_weight, dice_weight, focal_alpha, focal_gamma: the loss (100, 1, 0.25, 2).
        ignore_index: label of unlabelled / unseen pixels. Default 255.
    """

    dataset: str = "voc20"
    setting: str = "inductive"
    num_prompts: int = 10
    prompt_dropout: float = 0.1
    clip_weights: Optional[str] = None
    clip_model: Optional[str] = "ViT-B-16"
    clip_quick_gelu: bool = False
    text_embeddings: Optional[str] = None
    dim: int = 512
    num_layers: int = 3
    ffn_dim: int = 2048
    dropout: float = 0.1
    eps: float = 0.05
    max_iter: int = 100
    tol: float = 1e-6
    backend: str = "auto"
    ensemble_weight: float = 0.5
    seen_bias: float = 0.1
    focal_weight: float = 100.0
    dice_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    ignore_index: int = 255

    @classmethod
    def for_dataset(cls, dataset, **overrides):
        """The SPEC defaults of ``dataset`` (100 visual prompts for COCO-Stuff), then ``overrides``."""
        defaults = dict(dataset=dataset, num_prompts=100 if dataset == "cocostuff171" else 10)
        return cls(**{**defaults, **overrides})

    @classmethod
    def from_dict(cls, values):
        """An OTSegConfig from a dict of its fields; unknown keys raise ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown OTSegConfig fields {unknown}; known: {sorted(names)}")
        return cls(**values)

    def __post_init__(self):
        # Paths as str: save() writes the config for torch.load(weights_only=True), which refuses Path objects.
        for name in ("clip_weights", "text_embeddings"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
        if self.dataset not in data.DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {data.DATASETS}")
        if self.setting not in SETTINGS:
            raise ValueError(f"unknown setting {self.setting!r}; choose one of {SETTINGS}")
        if not 0 <= self.ensemble_weight <= 1:
            raise ValueError(f"ensemble_weight must be in [0, 1], got {self.ensemble_weight}")


class OTSeg(nn.Module):
    """OTSeg / OTSeg+: a (prompt-tuned, frozen) image encoder, frozen text
    embeddings and the trainable head.

    Args:
        encoder: module ``images [B, 3, H, W] -> (g [B, D], patches [B, M, D],
            (h, w))``; its own ``requires_grad`` flags decide what of it trains.
        text_embeddings: [K, N, D] text embeddings (normalised here); a
            buffer, never trained.
        config: OTSegConfig (default: ``OTSegConfig()``); its ``dataset``
            names the class split (seen classes) unless ``seen`` is given.
        seen: indices (or a bool mask [K]) of the seen classes (for the
            inductive bias at inference); default: the config's dataset split
            when K matches it, else none.
    """

    def __init__(self, encoder, text_embeddings, config=None, seen=None):
        super().__init__()
        config = _with_encoder_architecture(config or OTSegConfig(), encoder)
        self.config = config
        text = torch.as_tensor(text_embeddings)
        if text.dim() != 3 or text.shape[-1] != config.dim:
            raise ValueError(f"text_embeddings must have shape [K, N, {config.dim}], got {tuple(text.shape)}")
        self.encoder = encoder
        self.register_buffer("text", F.normalize(text.float(), dim=-1))
        if seen is None:
            split = data.class_splits()[config.dataset]
            seen = split["seen"] if len(split["classes"]) == text.shape[0] else []
        self.register_buffer("seen", class_indices(seen, text.shape[0], "seen"))
        self.head = OTSegHead(config.dim, config.num_layers, config.ffn_dim, config.dropout, config.eps,
                              config.max_iter, config.tol, config.backend)

    @classmethod
    def from_config(cls, config="voc20", encoder=None, text_embeddings=None, seen=None, **overrides):
        """Build a model from a config.

        Args:
            config: an OTSegConfig, a dict of its fields, or a dataset name
                (that dataset's defaults, ``OTSegConfig.for_dataset``).
            encoder: an encoder module to use (e.g. a test double); None
                builds ``otseg.model.clip.VPTImageEncoder`` from the config.
            text_embeddings: [K, N, D] tensor; None loads the config's
                dataset embeddings (``otseg.data.load_text_embeddings``).
            seen: seen-class indices (default: the dataset's split, see OTSeg).
            overrides: config fields to change.
        """
        if isinstance(config, str):
            config = OTSegConfig.for_dataset(config, **overrides)
        elif isinstance(config, dict):
            config = OTSegConfig.from_dict({**config, **overrides})
        elif isinstance(config, OTSegConfig):
            config = dataclasses.replace(config, **overrides)
        else:
            raise TypeError(f"config must be an OTSegConfig, a dict or a dataset name, got {type(config).__name__}")
        if text_embeddings is None:
            text_embeddings = data.load_text_embeddings(config.dataset, config.text_embeddings, config.dim)
        if encoder is None:
            try:
                from .clip import VPTImageEncoder
            except ImportError as exc:
                raise ImportError(f"the CLIP image encoder (otseg.model.clip) cannot be imported: {exc}; "
                                  "pass encoder= to use another") from exc
            encoder = VPTImageEncoder(num_prompts=config.num_prompts, weights=config.clip_weights,
                                      prompt_dropout=config.prompt_dropout, model_name=config.clip_model or "ViT-B-16",
                                      quick_gelu=config.clip_quick_gelu)
        return cls(encoder, text_embeddings, config, seen)

    @property
    def config(self):
        """The OTSegConfig. Its backend is the Sinkhorns' own, however they
        were switched (``model.backend``, ``otseg.nn.set_backend``, the head's),
        whenever they share one: the loss and ``save`` read it from here."""
        head = self._modules.get("head")
        current = head.backend if head is not None else self._config.backend
        if isinstance(current, str) and current != self._config.backend:
            self._config = dataclasses.replace(self._config, backend=current)
        return self._config

    @config.setter
    def config(self, value):
        head = self._modules.get("head")
        if head is not None:
            # After construction: the fields read at use, and the Sinkhorns'
            # settings (applied to them, else the getter would undo the
            # backend); the others made the modules.
            if not isinstance(value, OTSegConfig):
                raise TypeError(f"config must be an OTSegConfig, got {type(value).__name__}")
            fixed = [f.name for f in dataclasses.fields(value)
                     if f.name not in _LIVE_FIELDS and getattr(value, f.name) != getattr(self._config, f.name)]
            if fixed:
                raise ValueError(f"config fields {fixed} are fixed once the model is built; build another "
                                 "(OTSeg.from_config)")
            check_backend(value.backend)
            check_params(value.eps, value.max_iter, value.tol)
            # Only what changed: settings given to single layers stay.
            current = self.config
            for name in ("eps", "max_iter", "tol", "backend"):
                if getattr(value, name) != getattr(current, name):
                    for m in sinkhorn_modules(head):
                        setattr(m, name, getattr(value, name))
        self._config = value

    def __setstate__(self, state):
        # Whole-model pickles from before config became a property kept it as
        # "config", and from before it named the encoder's architecture.
        if "config" in state and "_config" not in state:
            state["_config"] = state.pop("config")
        super().__setstate__(state)
        self._config = _with_encoder_architecture(self._config, self._modules.get("encoder"))

    @property
    def backend(self):
        """The backend of every Sinkhorn; setting it switches all of them."""
        return self.head.backend

    @backend.setter
    def backend(self, value):
        set_backend(self.head, value)

    @property
    def num_classes(self):
        return self.text.shape[0]

    def trainable_parameters(self):
        """The parameters that train: the encoder's trainable ones (visual
        prompts and their LayerNorm), the relation descriptor and the decoder."""
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, images, classes=None, upsample=True):
        """
        Args:
            images: [B, 3, H, W] RGB 0-255 (the encoder normalises).
            classes: indices (or a bool mask [K]) of the classes to score
                (e.g. the seen classes while training inductively); None: all K.
            upsample: True (default): logits at the input size; False: on
                the token grid [B, K', h, w], for training: ``loss``
                upsamples them to the labels itself, and the fused loss
                never forms the upsampled logits.

        Returns:
            HeadOutput(dec, mps): logits [B, K', H, W] at the input size (or [B, K', h, w]).
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
        if classes is not None:
            classes = class_indices(classes, self.num_classes)
            if classes.numel() == 0:
                raise ValueError("classes must name at least one class (None scores all of them)")
        g, patches, grid = self.encoder(images)
        text = self.text if classes is None else self.text[classes.to(self.text.device)]
        return self.head(g, patches, text.to(patches.dtype), grid, images.shape[-2:] if upsample else None)

    def loss(self, outputs, labels):
        """Focal + dice on both paths (``losses.otseg_loss`` with the config's
        weights and backend: the fused loss, C++ on CPU tensors and Triton on
        CUDA tensors, unless the backend is "reference").

        Args:
            outputs: HeadOutput of ``forward``, at the input size or (better
                for training) on the token grid (``upsample=False``).
            labels: [B, H, W] indices into the scored classes, or ignore_index.

        Returns:
            SegLosses(total, focal, dice, num_masks, backend).
        """
        c = self.config
        return otseg_loss(outputs, labels, focal_weight=c.focal_weight, dice_weight=c.dice_weight,
                          alpha=c.focal_alpha, gamma=c.focal_gamma, ignore_index=c.ignore_index, backend=c.backend)

    def _window_probabilities(self, images, mode):
        out = self(images)
        c = self._config  # fields other than the backend: no walk over the Sinkhorn modules
        seen = self.seen if c.setting == "inductive" and self.seen.numel() else None
        return class_probabilities(out.dec, out.mps, mode, c.ensemble_weight, seen, c.seen_bias)

    @torch.no_grad()
    def predict_proba(self, images, mode="otseg+", crop=None, stride=None):
        """Class probabilities at inference (seen-class bias in the inductive setting).

        Args:
            images: [B, 3, H, W] RGB 0-255, any real or integer dtype (uint8 too).
            mode: "otseg+" (ensemble, default), "otseg" (decoder) or "mps".
            crop: sliding-window size (e.g. 512), a positive integer; None
                runs the whole image.
            stride: sliding-window stride (e.g. 426), 1 to ``crop`` (larger
                would leave pixels no window covers); default ``crop``.

        Returns:
            [B, K, H, W] in the model's dtype, averaged over the windows that
            cover each pixel.
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if crop is None:
            if stride is not None:
                raise ValueError("stride needs crop (the sliding window's size)")
            return self._window_probabilities(images, mode)
        stride = crop if stride is None else stride
        for name, value in (("crop", crop), ("stride", stride)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be a positive integer, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if stride > crop:
            # Windows further apart than their size would leave pixels no window covers.
            raise ValueError(f"stride must be at most crop, got stride {stride} > crop {crop}")
        B, _, H, W = images.shape
        total = count = None
        for top in _window_starts(H, crop, stride):
            for left in _window_starts(W, crop, stride):
                window = images[:, :, top:top + crop, left:left + crop]
                probs = self._window_probabilities(window, mode)
                if total is None:
                    # The probabilities' dtype, not the images' (uint8 images).
                    total = probs.new_zeros(B, probs.shape[1], H, W)
                    count = probs.new_zeros(1, 1, H, W)
                total[:, :, top:top + crop, left:left + crop] += probs
                count[:, :, top:top + crop, left:left + crop] += 1
        return total / count

    @torch.no_grad()
    def predict(self, images, mode="otseg+", crop=None, stride=None):
        """Predicted class per pixel [B, H, W] (argmax of ``predict_proba``)."""
        return self.predict_proba(images, mode, crop, stride).argmax(1)

    def save(self, path):
        """Write the config and the state dict to ``path`` (``torch.save``)."""
        # Paths as str: load() reads with weights_only=True, which refuses Path objects.
        config = {k: os.fspath(v) if isinstance(v, os.PathLike) else v
                  for k, v in dataclasses.asdict(self.config).items()}
        torch.save({"config": config, "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path, encoder=None, map_location="cpu"):
        """A model written by ``save``: built with ``from_config`` (``encoder``
        as there), then the state dict loaded strictly.

        The checkpoint holds every weight, CLIP's included: without
        ``encoder``, the CLIP encoder is built in the architecture the config
        names (``clip_model``, ``clip_quick_gelu``), randomly initialised and
        without reading ``clip_weights``, then loaded. Checkpoints saved
        before the config named the architecture, and those whose tower no
        open_clip name describes (``clip_model`` None: an OpenAI file of
        another architecture than the name given, or a tower passed in as
        ``clip_model``), read ``clip_weights`` again, or need ``encoder``
        where there is none (ValueError).

        Args:
            map_location: where the checkpoint's tensors are read to; a
                device (str or torch.device) also moves the model there.
        """
        saved = torch.load(path, map_location=map_location, weights_only=True)
        state = saved["state_dict"]
        config = OTSegConfig.from_dict(saved["config"])
        if encoder is None and config.clip_model is None and config.clip_weights is None:
            raise ValueError(
                f"{os.fspath(path)}: the checkpoint names no open_clip architecture for its CLIP encoder "
                "(clip_model None: no open_clip name describes the tower it was saved with) and no clip_weights "
                "file to build it from; pass encoder= (an encoder of that architecture; the checkpoint's "
                "weights replace its own)"
            )
        if encoder is None and ("clip_model" in saved["config"] or config.clip_weights is None) \
                and config.clip_model is not None:
            from .clip import VPTImageEncoder

            with warnings.catch_warnings():
                # Not random in the end: the checkpoint's weights replace it below.
                warnings.filterwarnings("ignore", message="no CLIP weights given")
                encoder = VPTImageEncoder(num_prompts=config.num_prompts, weights=None,
                                          prompt_dropout=config.prompt_dropout, model_name=config.clip_model,
                                          quick_gelu=config.clip_quick_gelu)
        # Built on the CPU (the text buffer too), loaded, then moved as a whole.
        model = cls.from_config(config, encoder=encoder, text_embeddings=state["text"].cpu(),
                                seen=state["seen"].tolist())
        model.load_state_dict(saved["state_dict"])
        if isinstance(map_location, (str, torch.device)):
            model.to(map_location)
        return model


# Config fields a built model reads at use (or applies to its Sinkhorns):
# the only ones an assigned config may change.
_LIVE_FIELDS = {"setting", "backend", "eps", "max_iter", "tol", "ensemble_weight", "seen_bias", "focal_weight",
                "dice_weight", "focal_alpha", "focal_gamma", "ignore_index"}


def _with_encoder_architecture(config, encoder):
    """``config`` with clip_model / clip_quick_gelu of ``encoder``'s image
    tower (``clip.tower_architecture``) and its num_prompts, where it is a
    CLIP VPT encoder (what ``load`` rebuilds), else as is."""
    clip = sys.modules.get("otseg.model.clip")  # not imported: the encoder is not one of its encoders
    if clip is None or not isinstance(encoder, clip.VPTImageEncoder):
        return config
    # Encoders pickled before they recorded their architecture: the config's name, checked.
    name = getattr(encoder, "model_name", config.clip_model) if hasattr(encoder, "quick_gelu") else config.clip_model
    name, quick = clip.tower_architecture(encoder.visual, name)
    prompts = getattr(encoder, "num_prompts", config.num_prompts)
    if (name, quick, prompts) == (config.clip_model, config.clip_quick_gelu, config.num_prompts):
        return config
    return dataclasses.replace(config, clip_model=name, clip_quick_gelu=quick, num_prompts=prompts)


def _window_starts(size, crop, stride):
    """Top-left offsets of sliding windows covering ``size`` (the last one flush with the end)."""
    if size <= crop:
        return [0]
    starts = list(range(0, size - crop, stride))
    return starts + [size - crop]
