"""CLIP encoders of the OTSeg model (otseg/model/clip.py) against open_clip.

Random-init ViT-B/16 with small crops keeps this file fast on a CPU. The
whole file skips where open_clip_torch is not installed.
"""

import os
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from otseg.data import class_splits  # noqa: E402
from otseg.model import clip  # noqa: E402
from otseg.model.clip import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    CLIPTextEncoder,
    VPTImageEncoder,
    encode_text,
    load_clip,
    load_text_embeddings,
    resize_positional_embedding,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_EMB = os.path.join(ROOT, "..", "shared", "data", "text_embeddings")
TRAINABLE = {
    "prompt_embeddings",
    "deep_prompt_embeddings",
    "prompt_proj.weight",
    "prompt_proj.bias",
    "prompt_norm.weight",
    "prompt_norm.bias",
}


def _quiet_create(name):
    """A random open_clip model without its "no pretrained weights" log line."""
    with clip._quiet_open_clip():
        return open_clip.create_model(name, pretrained=None).eval()


def _images(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 255


def _normalize(images):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def _open_clip_outputs(model, x):
    """open_clip's normalised image embedding and normalised projected patch tokens."""
    visual = model.visual
    with torch.no_grad():
        g = model.encode_image(x, normalize=True)
        visual.output_tokens = True
        try:
            _, tokens = visual(x)
        finally:
            visual.output_tokens = False
    return g, F.normalize(tokens @ visual.proj, dim=-1)


def _openai_archive(path, model):
    """``model`` written to ``path`` as OpenAI ships CLIP: a TorchScript
    archive (skips the test where this torch cannot script)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(model).save(str(path))
    except Exception as e:  # torch.jit is deprecated; a future torch may drop it
        pytest.skip(f"cannot write a TorchScript archive here: {type(e).__name__}: {e}")
    return path


def _plain(encoder):
    """Drop the prompt LayerNorm: with P = 0 what is left is CLIP's own encoder."""
    encoder.prompt_norm = torch.nn.Identity()
    return encoder.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these forwards are many small ops, which a second
    thread slows down on a shared 2-core machine (several times, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def oc_model():
    torch.manual_seed(0)
    return _quiet_create("ViT-B-16")


@pytest.fixture(scope="module")
def oc_checkpoint(oc_model, tmp_path_factory):
    """oc_model's state dict as open_clip's training code saves it: under
    "state_dict", with DistributedDataParallel's "module." prefixes."""
    path = tmp_path_factory.mktemp("ckpt") / "open_clip_vit_b16.pt"
    sd = {"module." + k: v for k, v in oc_model.state_dict().items()}
    torch.save({"epoch": 1, "state_dict": sd}, path)
    yield path
    os.remove(path)


def _no_random_init_warning(record):
    return not any("randomly initialised" in str(w.message) for w in record)


# ----------------------------------------------------------------- image side


@pytest.mark.parametrize("hw", [(32, 32), (64, 64), (32, 48)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_output_shapes(oc_model, hw):
    H, W = hw
    enc = VPTImageEncoder(num_prompts=10, clip_model=oc_model).eval()
    with torch.no_grad():
        g, patches, grid = enc(_images((2, 3, H, W)))
    h, w = H // 16, W // 16
    assert grid == (h, w)
    assert g.shape == (2, 512) and g.dtype == torch.float32
    assert patches.shape == (2, h * w, 512) and patches.dtype == torch.float32
    torch.testing.assert_close(g.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(patches.norm(dim=-1), torch.ones(2, h * w))


def test_uint8_images(oc_model):
    enc = VPTImageEncoder(num_prompts=2, clip_model=oc_model).eval()
    images = _images((1, 3, 32, 32)).round()
    with torch.no_grad():
        g8, p8, _ = enc(images.to(torch.uint8))
        g, p, _ = enc(images)
    torch.testing.assert_close(g8, g)
    torch.testing.assert_close(p8, p)


def test_positional_embedding_resize():
    pos = torch.randn(1 + 14 * 14, 768)
    assert torch.equal(resize_positional_embedding(pos, (14, 14), (14, 14)), pos)
    out = resize_positional_embedding(pos, (14, 14), (2, 3))
    assert out.shape == (1 + 6, 768)
    assert torch.equal(out[0], pos[0])
    # A constant grid stays constant under bilinear resizing.
    const = torch.cat([pos[:1], torch.ones(196, 1).expand(196, 768)])
    torch.testing.assert_close(resize_positional_embedding(const, (14, 14), (4, 7))[1:], torch.ones(28, 768))
    with pytest.raises(ValueError, match="shape"):
        resize_positional_embedding(pos[:100], (14, 14), (2, 2))


def test_matches_open_clip_at_native_grid(oc_model):
    """P = 0 without the prompt LayerNorm is open_clip's encoder: the class
    token after ln_post @ proj (encode_image) and the projected patch tokens."""
    images = _images((2, 3, 224, 224))
    ref_g, ref_patches = _open_clip_outputs(oc_model, _normalize(images))
    enc = _plain(VPTImageEncoder(num_prompts=0, clip_model=oc_model))
    with torch.no_grad():
        g, patches, grid = enc(images)
    assert grid == (14, 14)
    torch.testing.assert_close(g, ref_g, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(patches, ref_patches, atol=1e-5, rtol=1e-5)
    # With the (freshly initialised) prompt LayerNorm kept, ln_post sees
    # LN(x) instead of x: the same up to the two LayerNorms' eps.
    enc = VPTImageEncoder(num_prompts=0, clip_model=oc_model).eval()
    with torch.no_grad():
        g, patches, _ = enc(images)
    torch.testing.assert_close(g, ref_g, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(patches, ref_patches, atol=1e-4, rtol=1e-4)


def test_trainable_parameters_and_gradients(oc_model):
    enc = VPTImageEncoder(num_prompts=4, clip_model=oc_model)
    enc.train()
    assert enc.prompt_dropout.training
    assert not enc.visual.training and not any(m.training for m in enc.visual.modules())
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == TRAINABLE
    assert enc.deep_prompt_embeddings.shape == (11, 4, 768)
    assert enc.prompt_embeddings.shape == (1, 4, 768)

    g, patches, _ = enc(_images((2, 3, 32, 48)))
    (g.square().sum() + patches[..., :7].sum()).backward()
    for name, p in enc.named_parameters():
        if name in TRAINABLE:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_prompts_replaced_per_block(oc_model):
    """Each block sees [class, P prompts, M patches]: block 0 the inserted
    prompts, block i >= 1 the i-th deep prompts instead of the previous
    block's prompt outputs; class and patch tokens pass through."""
    P, (H, W) = 3, (32, 48)
    M = (H // 16) * (W // 16)
    enc = VPTImageEncoder(num_prompts=P, clip_model=oc_model).eval()
    inputs, outputs = [], []

    def record(module, args, out):
        inputs.append(args[0])
        outputs.append(out)

    hooks = [block.register_forward_hook(record) for block in enc.visual.transformer.resblocks]
    try:
        with torch.no_grad():
            enc(_images((2, 3, H, W)))
            expected = [enc.prompt_proj(enc.prompt_embeddings[0])]
            expected += [enc.prompt_proj(d) for d in enc.deep_prompt_embeddings]
    finally:
        for hk in hooks:
            hk.remove()
    assert len(inputs) == 12
    for i, x in enumerate(inputs):
        assert x.shape == (2, 1 + P + M, 768), i
        torch.testing.assert_close(x[:, 1:1 + P], expected[i].expand(2, -1, -1))
        if i > 0:
            prev = outputs[i - 1]
            assert torch.equal(x[:, :1], prev[:, :1])
            assert torch.equal(x[:, 1 + P:], prev[:, 1 + P:])
    assert outputs[-1].shape == (2, 1 + P + M, 768)


def test_prompt_dropout_in_training_only(oc_model):
    enc = VPTImageEncoder(num_prompts=4, clip_model=oc_model, prompt_dropout=0.5)
    images = _images((1, 3, 32, 32))
    with torch.no_grad():
        enc.eval()
        a, b = enc(images)[0], enc(images)[0]
        assert torch.equal(a, b)
        enc.train()
        torch.manual_seed(0)
        c = enc(images)[0]
        torch.manual_seed(1)
        d = enc(images)[0]
    assert not torch.equal(c, d)


def test_load_open_clip_checkpoint(oc_model, oc_checkpoint):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        enc = VPTImageEncoder(num_prompts=2, weights=oc_checkpoint).eval()
    assert _no_random_init_warning(record)
    ref = oc_model.visual.state_dict()
    got = enc.visual.state_dict()
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    # Same weights, same outputs as the encoder on oc_model itself (which
    # test_matches_open_clip_at_native_grid checks against open_clip).
    twin = VPTImageEncoder(num_prompts=2, clip_model=oc_model).eval()
    twin.load_state_dict(enc.state_dict())
    images = _images((2, 3, 32, 48))
    with torch.no_grad():
        for a, b in zip(enc(images)[:2], twin(images)[:2]):
            assert torch.equal(a, b)


def test_load_checkpoint_of_another_architecture(tmp_path, oc_model):
    path = tmp_path / "not_vit_b16.pt"
    torch.save({"visual.conv1.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match="does not fit open_clip's 'ViT-B-16'"):
        VPTImageEncoder(weights=path)


def test_load_openai_torchscript_archive(tmp_path):
    """An OpenAI-format archive: a TorchScript CLIP with QuickGELU, weights in
    float16 (OpenAI's ViT-B-16.pt is one), scripted here from open_clip."""
    from open_clip.model import convert_weights_to_fp16

    torch.manual_seed(1)
    model = _quiet_create("ViT-B-16-quickgelu")
    convert_weights_to_fp16(model)
    path = _openai_archive(tmp_path / "ViT-B-16.pt", model)
    # OpenAI's state dict format, torch.save'd: its extra keys mark it.
    sd_path = tmp_path / "openai_state_dict.pt"
    extra = {
        "input_resolution": torch.tensor(224),
        "context_length": torch.tensor(77),
        "vocab_size": torch.tensor(49408),
    }
    torch.save({**model.state_dict(), **extra}, sd_path)
    model.float()
    ref = model.state_dict()
    try:
        loaded = load_clip(path)
        from_sd = load_clip(sd_path)
    finally:
        os.remove(path)
        os.remove(sd_path)
    for m in (loaded, from_sd):
        assert m.state_dict().keys() == ref.keys()
        assert all(torch.equal(v, ref[k]) for k, v in m.state_dict().items())
    enc = _plain(VPTImageEncoder(num_prompts=0, clip_model=loaded))
    blocks = enc.visual.transformer.resblocks
    assert all(isinstance(b.mlp.gelu, open_clip.transformer.QuickGELU) for b in blocks)
    images = _images((1, 3, 224, 224))
    ref_g, ref_patches = _open_clip_outputs(model, _normalize(images))
    with torch.no_grad():
        g, patches, _ = enc(images)
    torch.testing.assert_close(g, ref_g, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(patches, ref_patches, atol=1e-5, rtol=1e-5)
    # The same weights feed the text encoder.
    tokens = open_clip.tokenize(["a photo of a cat."])
    with torch.no_grad():
        ref_t = model.encode_text(tokens, normalize=True)
    text = CLIPTextEncoder(clip_model=loaded)
    torch.testing.assert_close(text(["cat"], ["a photo of a {}."])[:, 0], ref_t, atol=1e-5, rtol=1e-5)


def test_missing_and_corrupt_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_file.pt"):
        VPTImageEncoder(weights=tmp_path / "no_such_file.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="corrupt.pt: not readable as CLIP weights"):
        VPTImageEncoder(weights=bad)
    with pytest.raises(ValueError, match="corrupt.pt: not readable as CLIP weights"):
        load_clip(bad)
    # A zip laid out like a TorchScript archive, with garbage inside.
    fake = tmp_path / "fake_script.pt"
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr("archive/constants.pkl", b"not a pickle")
        z.writestr("archive/code/__torch__/model.py", "garbage")
    with pytest.raises(ValueError, match="fake_script.pt: a TorchScript archive that torch.jit.load cannot read"):
        load_clip(fake)
    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(ValueError, match="expected a state dict"):
        CLIPTextEncoder(weights=not_a_dict)


def test_bad_images(oc_model):
    enc = VPTImageEncoder(num_prompts=2, clip_model=oc_model).eval()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        enc(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        enc(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="multiples of the patch size 16x16, got 33x32"):
        enc(torch.zeros(1, 3, 33, 32))
    with pytest.raises(ValueError, match="multiples of the patch size 16x16, got 32x40"):
        enc(torch.zeros(1, 3, 32, 40))
    with pytest.raises(TypeError, match="torch.Tensor"):
        enc(np.zeros((1, 3, 32, 32)))


def test_bad_arguments(oc_model):
    with pytest.raises(ValueError, match="num_prompts"):
        VPTImageEncoder(num_prompts=-1, clip_model=oc_model)
    with pytest.raises(ValueError, match="prompt_dropout"):
        VPTImageEncoder(prompt_dropout=1.0, clip_model=oc_model)
    with pytest.raises(ValueError, match="either weights or clip_model"):
        VPTImageEncoder(weights="ViT-B-16.pt", clip_model=oc_model)
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-X'"):
        load_clip(None, model_name="ViT-X")


def test_random_init_warns():
    with pytest.warns(UserWarning, match="randomly initialised"):
        enc = VPTImageEncoder(num_prompts=1)
    assert {n for n, p in enc.named_parameters() if p.requires_grad} == TRAINABLE


def test_missing_open_clip_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ImportError, match="open_clip_torch"):
        VPTImageEncoder()
    with pytest.raises(ImportError, match="open_clip_torch"):
        encode_text(["cat"], ["a {}."])


@pytest.mark.parametrize("cls", [VPTImageEncoder, CLIPTextEncoder], ids=["image", "text"])
def test_hub_model_names_are_refused_before_any_network_access(cls, monkeypatch):
    # open_clip resolves "hf-hub:" names on the network (and downloads their
    # weights even with pretrained=None); weights come from local files only.
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(ValueError, match="names a hub model.*local file only"):
        cls(model_name="hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K")
    # A Hugging Face text tower is downloaded to build the model.
    if "roberta-ViT-B-32" in open_clip.list_models():
        with pytest.raises(ValueError, match="Hugging Face text tower"):
            cls(model_name="roberta-ViT-B-32")


def test_saved_model_loads_without_the_clip_weights_file(tmp_path):
    """The checkpoint holds CLIP's weights: load() rebuilds the architecture
    the config names (QuickGELU for OpenAI's files) and reads no weights
    file; a model built from an OpenAI archive then gives the same outputs."""
    from open_clip.model import convert_weights_to_fp16

    from otseg.model import OTSeg

    torch.manual_seed(2)
    oc = _quiet_create("ViT-B-16-quickgelu")
    convert_weights_to_fp16(oc)
    archive = _openai_archive(tmp_path / "ViT-B-16.pt", oc)
    model = OTSeg.from_config("voc20", num_prompts=1, clip_weights=archive, ffn_dim=64, num_layers=1,
                              backend="reference").eval()
    assert (model.config.clip_model, model.config.clip_quick_gelu) == ("ViT-B-16", True)
    assert model.config.clip_weights == str(archive)
    model.save(tmp_path / "otseg.pt")
    os.remove(archive)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "randomly initialised" warning: the weights are the checkpoint's
        loaded = OTSeg.load(tmp_path / "otseg.pt").eval()
    blocks = loaded.encoder.visual.transformer.resblocks
    assert all(isinstance(b.mlp.gelu, open_clip.transformer.QuickGELU) for b in blocks)
    assert loaded.config == model.config
    x = _images((1, 3, 32, 48))
    a, b = model(x), loaded(x)
    assert torch.equal(a.dec, b.dec) and torch.equal(a.mps, b.mps)

    # A QuickGELU tower given as the encoder is recorded the same way.
    encoder = VPTImageEncoder(num_prompts=1, clip_model=_quiet_create("ViT-B-16-quickgelu"))
    assert (encoder.model_name, encoder.quick_gelu) == ("ViT-B-16", True)
    given = OTSeg.from_config("voc20", encoder=encoder, ffn_dim=64, num_layers=1, backend="reference").eval()
    assert (given.config.clip_model, given.config.clip_quick_gelu) == ("ViT-B-16", True)
    given.save(tmp_path / "given.pt")
    again = OTSeg.load(tmp_path / "given.pt").eval()
    blocks = again.encoder.visual.transformer.resblocks
    assert all(isinstance(b.mlp.gelu, open_clip.transformer.QuickGELU) for b in blocks)
    a, b = given(x), again(x)
    assert torch.equal(a.dec, b.dec) and torch.equal(a.mps, b.mps)


def test_recorded_architecture_follows_the_tower(tmp_path):
    from otseg.model import OTSeg

    torch.manual_seed(4)
    quick = _quiet_create("ViT-B-16-quickgelu")
    # OpenAI's weights saved as an open_clip state dict: the flag builds QuickGELU for them.
    sd = tmp_path / "quickgelu_state_dict.pt"
    torch.save(quick.state_dict(), sd)
    enc = VPTImageEncoder(num_prompts=0, weights=sd, quick_gelu=True)
    assert (enc.model_name, enc.quick_gelu) == ("ViT-B-16", True)
    assert all(isinstance(b.mlp.gelu, open_clip.transformer.QuickGELU) for b in enc.visual.transformer.resblocks)
    # open_clip's spelling with a slash is its config's name.
    assert VPTImageEncoder(num_prompts=0, clip_model=quick, model_name="ViT-B/16").model_name == "ViT-B-16"
    # A GELU tower under a "-quickgelu" name: no name describes it, and with
    # neither a weights file nor an encoder a checkpoint cannot be rebuilt.
    gelu = VPTImageEncoder(num_prompts=1, clip_model=_quiet_create("ViT-B-16"), model_name="ViT-B-16-quickgelu")
    assert (gelu.model_name, gelu.quick_gelu) == (None, False)
    model = OTSeg.from_config("voc20", encoder=gelu, ffn_dim=64, num_layers=1, backend="reference")
    assert model.config.clip_model is None and model.config.num_prompts == 1
    model.save(tmp_path / "unnamed.pt")
    with pytest.raises(ValueError, match="names no open_clip architecture.*pass encoder="):
        OTSeg.load(tmp_path / "unnamed.pt")
    again = OTSeg.load(tmp_path / "unnamed.pt", encoder=VPTImageEncoder(num_prompts=1,
                                                                        clip_model=_quiet_create("ViT-B-16")))
    x = _images((1, 3, 32, 32))
    assert torch.equal(again.eval()(x).dec, model.eval()(x).dec)


def test_a_tower_its_model_name_does_not_describe_reloads_from_its_weights(tmp_path):
    """OpenAI's files build their own architecture: a ViT-B/32 one under the
    default model_name "ViT-B-16" is recorded as no open_clip name (clip_model
    None) and reloads from its weights file; named, it reloads without it."""
    from otseg.model import OTSeg

    torch.manual_seed(3)
    archive = _openai_archive(tmp_path / "ViT-B-32.pt", _quiet_create("ViT-B-32-quickgelu"))
    x = _images((1, 3, 64, 64))
    unnamed = OTSeg.from_config("voc20", num_prompts=1, clip_weights=archive, ffn_dim=64, num_layers=1,
                                backend="reference").eval()
    assert (unnamed.config.clip_model, unnamed.config.clip_quick_gelu) == (None, True)
    unnamed.save(tmp_path / "unnamed.pt")
    assert torch.equal(OTSeg.load(tmp_path / "unnamed.pt").eval()(x).dec, unnamed(x).dec)
    named = OTSeg.from_config("voc20", num_prompts=1, clip_weights=archive, clip_model="ViT-B-32", ffn_dim=64,
                              num_layers=1, backend="reference").eval()
    assert (named.config.clip_model, named.config.clip_quick_gelu) == ("ViT-B-32", True)
    named.save(tmp_path / "named.pt")
    os.remove(archive)
    assert torch.equal(OTSeg.load(tmp_path / "named.pt").eval()(x).dec, named(x).dec)


def test_import_does_not_need_open_clip():
    code = "import sys, otseg.model.clip; assert 'open_clip' not in sys.modules, 'imported open_clip'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


# ------------------------------------------------------------------ text side


def test_text_encoder(oc_model):
    templates = class_splits()["templates_6"][:3]
    names = ["aeroplane", "traffic light"]
    text = CLIPTextEncoder(clip_model=oc_model)
    assert isinstance(text.tokenizer, open_clip.tokenizer.SimpleTokenizer)
    assert oc_model.visual is not None  # a shared model is not stripped
    emb = text(names, templates)
    assert emb.shape == (2, 3, 512) and emb.dtype == torch.float32
    assert not emb.requires_grad
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2, 3))
    # Not averaged over templates, in [class, template] order.
    tokens = open_clip.tokenize([t.format(n) for n in names for t in templates])
    with torch.no_grad():
        ref = oc_model.encode_text(tokens, normalize=True).reshape(2, 3, 512)
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
    # Batching does not change the result.
    torch.testing.assert_close(text(names, templates, batch_size=2), emb, atol=1e-5, rtol=1e-5)
    assert not emb[0, 0].allclose(emb[0, 1])


def test_text_encoder_bad_arguments(oc_model):
    text = CLIPTextEncoder(clip_model=oc_model)
    with pytest.raises(ValueError, match="'{}'"):
        text(["cat"], ["a photo of a cat."])
    with pytest.raises(TypeError, match="list of strings"):
        text("cat", ["a {}."])
    with pytest.raises(ValueError, match="non-empty"):
        text([], ["a {}."])


def test_encode_text_random_init_warns():
    with pytest.warns(UserWarning, match="randomly initialised"):
        emb = encode_text(["cat", "dog"], ["a {}.", "a photo of a {}.", "a part of a {}."])
    assert emb.shape == (2, 3, 512)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2, 3))


# ------------------------------------------------------- precomputed embeddings


@pytest.mark.parametrize(
    "dataset, filename, shape",
    [
        ("voc20", "voc12_k20_n6.npy", (20, 6, 512)),
        ("context59", "context59_k59_n8.npy", (59, 8, 512)),
        ("cocostuff171", "cocostuff171_k171_n8.npy", (171, 8, 512)),
    ],
    ids=["voc20", "context59", "cocostuff171"],
)
def test_load_shared_text_embeddings(dataset, filename, shape):
    # The project's shared data when the checkout sits beside it, else the
    # copies shipped in the package (the same files).
    path = os.path.join(SHARED_EMB, filename)
    if not os.path.isfile(path):
        import otseg.data

        path = os.path.join(os.path.dirname(otseg.data.__file__), "text_embeddings", filename)
    emb = load_text_embeddings(path)
    assert emb.shape == shape and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(shape[:2]), atol=1e-3, rtol=0)
    assert torch.equal(load_text_embeddings(path, dataset=dataset), emb)
    assert torch.equal(emb, torch.from_numpy(np.load(path).astype(np.float32)))


def _save(tmp_path, name, array):
    path = tmp_path / name
    np.save(path, array)
    return path


def test_load_text_embeddings_bad_files(tmp_path):
    rng = np.random.default_rng(0)
    good = rng.standard_normal((2, 3, 512)).astype(np.float32)
    good /= np.linalg.norm(good, axis=-1, keepdims=True)
    assert load_text_embeddings(_save(tmp_path, "good.npy", good)).shape == (2, 3, 512)

    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_text_embeddings(tmp_path / "missing.npy")
    junk = tmp_path / "junk.npy"
    junk.write_bytes(rng.bytes(1000))
    with pytest.raises(ValueError, match="junk.npy: not a readable .npy"):
        load_text_embeddings(junk)
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a readable .npy"):
        load_text_embeddings(pickled)
    with pytest.raises(ValueError, match=r"expected shape \[K, N, 512\]"):
        load_text_embeddings(_save(tmp_path, "two_dims.npy", good[0]))
    with pytest.raises(ValueError, match=r"expected shape \[K, N, 512\].*\[2, 3, 256\]"):
        load_text_embeddings(_save(tmp_path, "d256.npy", good[..., :256]))
    with pytest.raises(ValueError, match="float array"):
        load_text_embeddings(_save(tmp_path, "ints.npy", np.ones((2, 3, 512), dtype=np.int64)))
    nan = good.copy()
    nan[1, 2, 5] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        load_text_embeddings(_save(tmp_path, "nan.npy", nan))
    with pytest.raises(ValueError, match="L2-normalised"):
        load_text_embeddings(_save(tmp_path, "unnormalised.npy", good * 3))
    with pytest.raises(ValueError, match=r"expected shape \[20, 6, D\] for voc20"):
        load_text_embeddings(_save(tmp_path, "wrong_k.npy", good), dataset="voc20")
    d768 = np.full((2, 3, 768), 1 / np.sqrt(768), dtype=np.float16)
    assert load_text_embeddings(_save(tmp_path, "d768.npy", d768), embed_dim=768).shape == (2, 3, 768)
