"""CLIP for OTSeg, built on open_clip_torch: the frozen ViT-B/16 image encoder
with deep visual prompt tuning (SPEC section 3), the frozen text encoder, and a
checked loader for precomputed text embeddings.

open_clip is imported inside the functions and constructors that need it, so
``import otseg.model.clip`` works without it (``load_text_embeddings`` needs
only numpy); using an encoder without it raises an ImportError that names the
package. Weights come from local files only; nothing is downloaded.

    >>> enc = VPTImageEncoder(num_prompts=10, weights="ViT-B-16.pt")   # OpenAI's archive
    >>> g, patches, (h, w) = enc(images)        # images [B, 3, 512, 512], RGB 0-255
    >>> g.shape, patches.shape, (h, w)          # [B, 512], [B, 1024, 512], (32, 32)
    >>> text = load_text_embeddings("voc12_k20_n6.npy")                # [20, 6, 512]
"""

import contextlib
import logging
import math
import numbers
import os
import warnings
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import data

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VPTImageEncoder",
    "CLIPTextEncoder",
    "encode_text",
    "load_clip",
    "load_text_embeddings",
    "resize_positional_embedding",
]

# SPEC section 3 (and the authors' mmseg configs): ImageNet statistics on RGB
# values in 0-255, not CLIP's own statistics on 0-1.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

# Keys that only OpenAI's CLIP state dicts carry (open_clip drops them when it
# converts one); they tell an OpenAI state dict from an open_clip one.
_OPENAI_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")


def _import_open_clip():
    try:
        import open_clip
    except ImportError as e:
        raise ImportError(
            "otseg.model.clip needs the package open_clip_torch for the CLIP encoders: "
            "pip install open_clip_torch (or pip install 'otseg[model]'). Precomputed text "
            "embeddings load without it (otseg.model.clip.load_text_embeddings)."
        ) from e
    return open_clip


@contextlib.contextmanager
def _quiet_open_clip():
    """Silence open_clip's root-logger warning "No pretrained weights loaded",
    which it logs for every model it builds without a pretrained tag, even when
    we load the weights right after; our own warning covers random init."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _is_torchscript_archive(path):
    """Whether ``path`` is a TorchScript zip: unlike ``torch.save`` files these
    hold the compiled code (``code/``) and ``constants.pkl``."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n or n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _read_checkpoint(path):
    """The state dict in ``path`` and its format, "openai" or "open_clip".

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: neither a TorchScript archive nor a ``torch.save`` file
            holding a state dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"CLIP weights file not found: {path} (expected OpenAI's TorchScript archive, e.g. "
            "ViT-B-16.pt, or a torch.save'd open_clip state dict; nothing is downloaded)"
        )
    # OpenAI ships TorchScript archives (ViT-B-16.pt).
    if _is_torchscript_archive(path):
        try:
            with warnings.catch_warnings():
                # torch.jit is deprecated in recent torch, but it is the only reader of these files.
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                archive = torch.jit.load(path, map_location="cpu")
        except Exception as e:
            raise ValueError(
                f"{path}: a TorchScript archive that torch.jit.load cannot read ({type(e).__name__}: {e})"
            ) from e
        return dict(archive.state_dict()), "openai"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's own message (chained below) suggests weights_only=False, which
        # would run arbitrary pickled code: say what is wrong instead.
        raise ValueError(
            f"{path}: not readable as CLIP weights ({type(e).__name__}); expected OpenAI's TorchScript "
            "archive (ViT-B-16.pt) or a torch.save'd open_clip state dict of tensors (it is read with "
            "weights_only=True, so a file holding other Python objects is refused: re-save the state dict alone)"
        ) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{path}: expected a state dict (a dict of tensors, possibly under 'state_dict'), "
            f"got {type(obj).__name__}"
        )
    # Checkpoints saved from DistributedDataParallel prefix every key.
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    fmt = "openai" if any(k in obj for k in _OPENAI_ONLY_KEYS) else "open_clip"
    return dict(obj), fmt


def load_clip(weights=None, model_name="ViT-B-16"):
    """An open_clip CLIP model in float32, eval mode, from a local file.

    Args:
        weights: path of OpenAI's TorchScript archive (``ViT-B-16.pt``; also an
            OpenAI state dict saved with ``torch.save``) or of an open_clip state
            dict (``torch.save(model.state_dict())``, possibly nested under
            ``"state_dict"`` and with DDP's ``module.`` prefixes). None: random
            initialisation, with a warning.
        model_name: open_clip architecture for random init and open_clip state
            dicts (default "ViT-B-16", which uses GELU; state dicts converted
            from OpenAI weights need "ViT-B-16-quickgelu"). Not used to build
            from OpenAI files, whose architecture is read from the weights,
            with QuickGELU (``tower_architecture`` tells whether the name
            describes it).

    Raises:
        ImportError: open_clip_torch is not installed.
        FileNotFoundError: no file at ``weights``.
        ValueError: an unreadable file, weights that do not fit ``model_name``,
            or an unknown ``model_name``.
    """
    return _load_clip(weights, model_name)[0]


def _load_clip(weights, model_name, quick_gelu=False):
    """``load_clip`` and the format read: "openai", "open_clip" or "random"
    (``quick_gelu``: random init with QuickGELU)."""
    open_clip = _import_open_clip()
    if weights is None:
        model = _create_model(open_clip, model_name, quick_gelu)
        warnings.warn(
            f"no CLIP weights given: {model_name} is randomly initialised (fine for tests; pass the "
            "path of OpenAI's ViT-B-16.pt for real use)",
            stacklevel=3,
        )
        return model, "random"
    state_dict, fmt = _read_checkpoint(weights)
    if fmt == "openai":
        from open_clip.model import build_model_from_openai_state_dict

        # The text tower's causal mask is rebuilt by the model; archives scripted
        # from an open_clip model carry it although it is not a weight.
        state_dict.pop("attn_mask", None)

        try:
            with _quiet_open_clip():
                model = build_model_from_openai_state_dict(dict(state_dict), quick_gelu=True, cast_dtype=None)
        except (KeyError, RuntimeError, ValueError, AssertionError) as e:
            raise ValueError(f"{weights}: not an OpenAI CLIP checkpoint ({type(e).__name__}: {e})") from e
        # open_clip rounds OpenAI weights to float16 on the way in (they ship in
        # float16); reloading in float32 keeps float32 files exact.
        model.float()
        for key in _OPENAI_ONLY_KEYS:
            state_dict.pop(key, None)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
        return model.eval(), fmt
    model = _create_model(open_clip, model_name, quick_gelu)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{weights}: the state dict does not fit open_clip's {model_name!r} "
            f"(pass the matching model_name): {str(e)[:2000]}"
        ) from e
    return model.eval(), fmt


def _check_local_model_name(model_name):
    """``model_name`` as open_clip spells its configs ("ViT-B/16" -> "ViT-B-16");
    ValueError for a name that open_clip resolves on the network."""
    if not isinstance(model_name, str):
        raise TypeError(f"model_name must be an open_clip architecture name, got {type(model_name).__name__}")
    if model_name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"model_name {model_name!r} names a hub model or directory, which open_clip fetches (and, for "
            "hf-hub, downloads) itself; otseg reads weights from a local file only: pass weights=PATH and an "
            "architecture name such as 'ViT-B-16' or 'ViT-B-16-quickgelu'"
        )
    return model_name.replace("/", "-")


def _create_model(open_clip, model_name, quick_gelu=False):
    model_name = _check_local_model_name(model_name)
    cfg = open_clip.get_model_config(model_name) or {}
    if (cfg.get("text_cfg") or {}).get("hf_model_name"):
        raise ValueError(
            f"open_clip model {model_name!r} has a Hugging Face text tower, which open_clip downloads to build; "
            "otseg builds CLIP from local files only (e.g. 'ViT-B-16')"
        )
    try:
        with _quiet_open_clip():
            # pretrained=None: never download; weights come from local files only.
            model = open_clip.create_model(model_name, pretrained=None, device="cpu", precision="fp32",
                                           force_quick_gelu=bool(quick_gelu))
    except RuntimeError as e:
        raise ValueError(
            f"unknown open_clip model {model_name!r} (e.g. 'ViT-B-16', 'ViT-B-16-quickgelu'; "
            "open_clip.list_models() lists them)"
        ) from e
    return model.eval()


def resize_positional_embedding(pos, grid, new_grid):
    """CLIP's positional embeddings for another token grid.

    The class token's row is kept; the patch rows, a ``grid`` image, are
    resized bilinearly (``align_corners=False``, no antialiasing, as the OTSeg
    code does). At ``new_grid == grid`` this is exactly the identity.

    Args:
        pos: ``[1 + h0*w0, W]`` embeddings of a ``grid = (h0, w0)`` token grid.
        grid: ``(h0, w0)``, the grid ``pos`` was trained on (14x14 for ViT-B/16).
        new_grid: ``(h, w)``, the grid wanted.

    Returns:
        ``[1 + h*w, W]``.
    """
    h0, w0 = grid
    h, w = new_grid
    if pos.dim() != 2 or pos.shape[0] != 1 + h0 * w0:
        raise ValueError(f"pos must have shape [1 + {h0}*{w0}, W], got {tuple(pos.shape)}")
    cls_pos, patch_pos = pos[:1], pos[1:]
    patch_pos = patch_pos.reshape(1, h0, w0, -1).permute(0, 3, 1, 2)  # [1, W, h0, w0]
    patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bilinear", align_corners=False)
    return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(h * w, -1)], dim=0)


def tower_architecture(visual, model_name):
    """The open_clip architecture that rebuilds the image tower ``visual``:
    (``model_name`` if its open_clip config has the tower's width, layers,
    patch and image size and output dim, else None; whether the tower uses
    QuickGELU, as OpenAI's weights do).

    OpenAI's files build their tower from their weights, whatever
    ``model_name`` says; None then means the name does not describe it, and a
    checkpoint of it needs the weights file again (``OTSeg.load``).
    """
    quick = any(type(m).__name__ == "QuickGELU" for m in visual.modules())
    if not isinstance(model_name, str) or model_name.startswith(("hf-hub:", "local-dir:")):
        return None, quick
    model_name = model_name.replace("/", "-")
    cfg = _import_open_clip().get_model_config(model_name)
    # A "-quickgelu" config builds QuickGELU whatever the flag says: not a GELU tower's name.
    if not cfg or "vision_cfg" not in cfg or (cfg.get("quick_gelu") and not quick):
        return None, quick
    v = cfg["vision_cfg"]

    def pair(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    want = (v.get("width"), v.get("layers"), pair(v.get("patch_size")), pair(v.get("image_size")), cfg.get("embed_dim"))
    have = (visual.conv1.out_channels, len(visual.transformer.resblocks), pair(visual.patch_size),
            pair(visual.image_size), visual.proj.shape[1])
    return (model_name if want == have else None), quick


def _check_vision_tower(visual, model_name):
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"{model_name!r}: deep visual prompt tuning needs a ViT image tower, got {type(visual).__name__}"
        )
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        raise ValueError(
            f"{model_name!r}: the image tower must pool the class token after ln_post (as OpenAI's CLIP does); "
            "attentional or average pooling is not supported"
        )


class VPTImageEncoder(nn.Module):
    """CLIP's image encoder, frozen, with deep visual prompt tuning (SPEC section 3).

    Per block of CLIP's ViT (12 for ViT-B/16, width W = 768), the tokens are
    ``[class, P prompts, M patches]``: P learnable prompts are inserted after
    the class token before block 0 (``prompt_embeddings``) and replaced, not
    accumulated, before each of blocks 1..11 (``deep_prompt_embeddings``,
    ``[11, P, 768]``). Every prompt goes through one shared
    ``prompt_proj`` (Linear 768->768) and dropout. After the last block a
    trainable LayerNorm (``prompt_norm``, eps 1e-6), then CLIP's ln_post and
    projection, are applied to all tokens, as in the OTSeg code. The names and
    initialisation follow the authors' code (uniform prompts with Xavier's
    bound for 16x16 patches, Kaiming-normal ``prompt_proj``).

    Trainable: ``prompt_embeddings``, ``deep_prompt_embeddings``,
    ``prompt_proj`` and ``prompt_norm``. Every CLIP weight (``visual``) has
    ``requires_grad=False`` and stays in eval mode under ``train()``: it is
    frozen, and eval mode keeps open_clip's patch dropout (off in ViT-B/16,
    which has no dropout or batch norm) from dropping tokens of the grid.
    ``prompt_dropout`` follows ``train()``/``eval()``.

    Outputs (a choice; the authors' backbone with ``out_indices=[11]`` does
    the same): ``g`` is the class token after ln_post and the projection,
    L2-normalised; ``patches`` are the projected patch tokens, also
    L2-normalised per token. In the authors' head the MPS path normalises
    them again (no change) and the decoder reads them as they are (its input
    projection is off), so the decoder's keys and values see unit vectors.

    The authors' code differs in two details we do not copy: it adds CLIP's
    class embedding twice to the class token (once as the token, once to its
    positional embedding), and it runs the frozen blocks with drop path 0.1
    while training. Here the class token is CLIP's, so with P = 0 and
    ``prompt_norm`` removed the encoder is exactly open_clip's at 224x224.

    Args:
        num_prompts: P, prompts per block (default 10; 100 for COCO-Stuff).
            0 gives plain CLIP plus ``prompt_norm``.
        weights: local CLIP weights, see ``load_clip``; None: random init
            with a warning.
        prompt_dropout: dropout on the projected prompts (default 0.1).
        model_name: open_clip architecture (default "ViT-B-16"), see ``load_clip``.
        clip_model: an open_clip CLIP model to take the image tower from
            instead of loading ``weights``; its parameters are shared and frozen.

        quick_gelu: with ``weights=None``, build ``model_name`` with QuickGELU
            (as ``OTSeg.load`` rebuilds a tower from OpenAI's weights).

    Attributes:
        model_name, quick_gelu: the open_clip architecture and activation
            that rebuild the image tower (``tower_architecture``); model_name
            None where ``model_name`` does not describe the tower.
    """

    def __init__(self, num_prompts=10, weights=None, prompt_dropout=0.1, model_name="ViT-B-16", clip_model=None,
                 quick_gelu=False):
        super().__init__()
        _import_open_clip()
        model_name = _check_local_model_name(model_name)
        if isinstance(num_prompts, bool) or not isinstance(num_prompts, numbers.Integral) or num_prompts < 0:
            raise ValueError(f"num_prompts must be an integer >= 0, got {num_prompts!r}")
        num_prompts = int(num_prompts)
        if not 0.0 <= float(prompt_dropout) < 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {prompt_dropout!r}")
        if clip_model is None:
            clip_model, _ = _load_clip(weights, model_name, quick_gelu)
        elif weights is not None:
            raise ValueError("pass either weights or clip_model, not both")
        visual = clip_model.visual
        _check_vision_tower(visual, model_name)
        for p in visual.parameters():
            p.requires_grad_(False)
        self.visual = visual.eval()
        # The open_clip architecture that rebuilds this tower (OpenAI's weights
        # bring QuickGELU whatever model_name says): what OTSeg.load builds
        # before loading a checkpoint's weights into it.
        self.model_name, self.quick_gelu = tower_architecture(visual, model_name)

        width = visual.conv1.out_channels
        layers = len(visual.transformer.resblocks)
        self.patch_size = tuple(visual.patch_size)
        self.grid_size = tuple(visual.grid_size)
        self.num_prompts = num_prompts
        self.width = width
        self.embed_dim = visual.proj.shape[1]

        if num_prompts > 0:
            # The authors' init: Xavier-uniform bound for a patch_size**2 * 3 -> width map.
            bound = math.sqrt(6.0 / float(3 * self.patch_size[0] * self.patch_size[1] + width))
            self.prompt_embeddings = nn.Parameter(torch.empty(1, num_prompts, width).uniform_(-bound, bound))
            self.deep_prompt_embeddings = nn.Parameter(
                torch.empty(layers - 1, num_prompts, width).uniform_(-bound, bound)
            )
            self.prompt_proj = nn.Linear(width, width)
            nn.init.kaiming_normal_(self.prompt_proj.weight, a=0, mode="fan_out")
        else:
            self.prompt_embeddings = None
            self.deep_prompt_embeddings = None
            self.prompt_proj = None
        self.prompt_dropout = nn.Dropout(prompt_dropout)
        self.prompt_norm = nn.LayerNorm(width, eps=1e-6)

        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):
        """Set training mode for the prompt path; the frozen CLIP tower stays in eval mode."""
        super().train(mode)
        self.visual.eval()
        return self

    def _check_images(self, images, name):
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
            raise ValueError(f"{name} must have shape [B, 3, H, W] with B >= 1 (RGB), got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        ph, pw = self.patch_size
        if H == 0 or W == 0 or H % ph or W % pw:
            raise ValueError(
                f"{name}: H and W must be positive multiples of the patch size {ph}x{pw}, got {H}x{W}"
            )
        return H // ph, W // pw

    def normalize(self, images):
        """``(images - mean) / std`` with ImageNet statistics on RGB 0-255 (SPEC section 3).

        Args:
            images: ``[B, 3, H, W]`` RGB in 0-255, any real dtype (uint8 too).
        """
        self._check_images(images, "images")
        dtype = self.visual.conv1.weight.dtype
        return (images.to(dtype) - self.pixel_mean.to(dtype)) / self.pixel_std.to(dtype)

    def forward(self, images):
        """Encode RGB images.

        Args:
            images: ``[B, 3, H, W]`` RGB in 0-255; H and W multiples of 16.

        Returns:
            ``(g, patches, (h, w))``: ``g`` ``[B, 512]`` and ``patches``
            ``[B, M, 512]``, both L2-normalised, M = h*w tokens in row-major
            order of the ``h = H/16`` by ``w = W/16`` grid.
        """
        return self.encode_normalized(self.normalize(images))

    def encode_normalized(self, x):
        """``forward`` for images already normalised (``self.normalize``).

        Args:
            x: ``[B, 3, H, W]`` normalised pixels; H and W multiples of 16.
        """
        h, w = self._check_images(x, "x")
        visual = self.visual
        x = x.to(visual.conv1.weight.dtype)
        B = x.shape[0]
        P = self.num_prompts

        x = visual.conv1(x).flatten(2).transpose(1, 2)  # [B, M, W]
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(B, -1, -1)
        pos = resize_positional_embedding(visual.positional_embedding, self.grid_size, (h, w))
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)  # [B, 1 + M, W]
        x = visual.ln_pre(x)

        batch_first = visual.transformer.batch_first
        for i, block in enumerate(visual.transformer.resblocks):
            if P > 0:
                prompts = self.prompt_embeddings[0] if i == 0 else self.deep_prompt_embeddings[i - 1]
                # Dropout after the expansion: an own mask per image, as in the authors' code.
                prompts = self.prompt_proj(prompts).to(x.dtype).unsqueeze(0).expand(B, -1, -1)
                prompts = self.prompt_dropout(prompts)  # [B, P, W]
                # Block 0 gets the prompts inserted; later blocks get last block's prompt outputs replaced.
                rest = x[:, 1:] if i == 0 else x[:, 1 + P:]
                x = torch.cat([x[:, :1], prompts, rest], dim=1)  # [B, 1 + P + M, W]
            x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)

        x = visual.ln_post(self.prompt_norm(x))
        x = x @ visual.proj  # [B, 1 + P + M, 512]
        g = F.normalize(x[:, 0], dim=-1)
        patches = F.normalize(x[:, 1 + P:], dim=-1)
        return g, patches, (h, w)


class CLIPTextEncoder(nn.Module):
    """CLIP's text encoder, frozen: one embedding per class and template.

    Uses open_clip's tokenizer (``SimpleTokenizer``, whose BPE vocabulary
    ships inside the package: no network). Always in eval mode, no gradients.

    Args:
        weights: local CLIP weights, see ``load_clip``; None: random init with
            a warning.
        model_name: open_clip architecture (default "ViT-B-16"), see ``load_clip``.
        clip_model: an open_clip CLIP model to use instead of loading
            ``weights`` (shared, frozen).
    """

    def __init__(self, weights=None, model_name="ViT-B-16", clip_model=None):
        super().__init__()
        open_clip = _import_open_clip()
        model_name = _check_local_model_name(model_name)  # the tokenizer below looks it up too
        if clip_model is None:
            clip_model, fmt = _load_clip(weights, model_name)
            # Text only: drop the image tower we own (86M parameters for ViT-B/16).
            clip_model.visual = None
        elif weights is not None:
            raise ValueError("pass either weights or clip_model, not both")
        else:
            fmt = "open_clip"
        for p in clip_model.parameters():
            p.requires_grad_(False)
        self.clip = clip_model.eval()
        if fmt == "openai":
            # OpenAI's CLIP uses this tokenizer whatever model_name says.
            self.tokenizer = open_clip.tokenizer.SimpleTokenizer()
        else:
            try:
                self.tokenizer = open_clip.get_tokenizer(model_name)
            except Exception as e:
                raise RuntimeError(
                    f"cannot build open_clip's tokenizer for {model_name!r} offline ({type(e).__name__}: {e}); "
                    "ViT-B-16 uses SimpleTokenizer, which needs no network"
                ) from e

    def train(self, mode=True):
        """Keep the frozen text encoder in eval mode whatever ``mode`` is."""
        super().train(mode)
        self.clip.eval()
        return self

    @torch.no_grad()
    def forward(self, class_names, templates, batch_size=256):
        """Embed every ``template.format(class_name)``.

        Args:
            class_names: K class names, e.g. ``["aeroplane", "bicycle"]``.
            templates: N templates with one ``{}``, e.g. ``["a photo of a {}."]``
                (``otseg.data.class_splits()["templates_6"]``).
            batch_size: prompts per text-encoder call (default 256).

        Returns:
            ``[K, N, 512]`` float32, each row L2-normalised (not averaged over
            templates).
        """
        class_names = _check_strings(class_names, "class_names")
        templates = _check_strings(templates, "templates")
        for t in templates:
            if "{}" not in t:
                raise ValueError(f"every template needs a '{{}}' for the class name, got {t!r}")
        texts = [t.format(c) for c in class_names for t in templates]  # class-major: [K * N]
        device = next(self.clip.parameters()).device
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[start:start + batch_size]).to(device)
            out.append(self.clip.encode_text(tokens).float())
        emb = F.normalize(torch.cat(out), dim=-1)
        return emb.reshape(len(class_names), len(templates), -1)


def _check_strings(values, name):
    if isinstance(values, str):
        raise TypeError(f"{name} must be a list of strings, not one string ({values!r})")
    values = list(values)
    if not values or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{name} must be a non-empty list of strings, got {values!r}")
    return values


def encode_text(class_names, templates, weights=None, model_name="ViT-B-16"):
    """Text embeddings ``[K, N, 512]`` float32, normalised, with a fresh
    ``CLIPTextEncoder(weights, model_name)``; see ``CLIPTextEncoder.forward``."""
    return CLIPTextEncoder(weights, model_name)(class_names, templates)


def load_text_embeddings(path, dataset=None, embed_dim=512):
    """Precomputed text embeddings from a ``.npy`` file, checked.

    Args:
        path: a ``.npy`` file ``[K, N, D]`` (float16/32/64), one L2-normalised
            embedding per class and template, like
            ``data/text_embeddings/voc12_k20_n6.npy``.
        dataset: if given ("voc20", "context59", "cocostuff171"), K and N must
            match it (``otseg.data.load_text_embeddings``; the file's checks
            are ``otseg.data.read_text_embeddings``).
        embed_dim: D the model expects (default 512, CLIP ViT-B/16).

    Returns:
        ``[K, N, D]`` float32.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a numeric ``.npy`` file, not 3 dims, D != ``embed_dim``,
            an empty axis, NaN/inf, or rows whose norm is not 1 (to 1e-2).
    """
    if dataset is not None:
        return data.load_text_embeddings(dataset, path, embed_dim)
    return data.read_text_embeddings(path, embed_dim)
