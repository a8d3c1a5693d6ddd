"""otseg.model: relation descriptor, MPS path, head, ensemble and the OTSeg
model (with a small fake encoder of the CLIP encoder's interface): shapes,
what trains, backends against the reference (outputs, gradients, a few AdamW
steps), torch.compile, and the state_dict / save-load round trip.

Tolerances between backends as in test_nn.py: about 1e-4 relative at the
default tol (1e-6), allowed 2e-3; after 3 AdamW steps (lr 2e-4, whose
normalised updates amplify small gradient differences where a gradient is
near 0) parameters agree to 1e-5 absolute.
"""

import copy
import dataclasses
import io
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import otseg
from otseg.data import class_splits, load_text_embeddings
from otseg.model import (
    OTSeg,
    OTSegConfig,
    OTSegHead,
    RelationDescriptor,
    class_probabilities,
    ensemble_logits,
    otseg_loss,
)
from otseg.nn import set_backend, sinkhorn_modules

from helpers import OTHER_BACKENDS, assert_close_report, cpu_backend_or_skip, rel_err

D = 16


class FakeEncoder(nn.Module):
    """The CLIP VPT encoder's interface at toy size: a frozen patch embedding
    and projection ("CLIP"), trainable prompt tokens and LayerNorm."""

    def __init__(self, dim=D, patch=4, num_prompts=2):
        super().__init__()
        self.patch = patch
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.proj = nn.Linear(dim, dim)
        for p in list(self.patch_embed.parameters()) + list(self.proj.parameters()):
            p.requires_grad_(False)
        self.prompts = nn.Parameter(0.02 * torch.randn(num_prompts, dim))
        self.prompt_norm = nn.LayerNorm(dim)

    def forward(self, images):
        x = self.patch_embed(images / 255.0)
        h, w = x.shape[-2:]
        x = self.prompt_norm(x.flatten(2).transpose(1, 2) + self.prompts.mean(0))
        g = F.normalize(self.proj(x.mean(1)), dim=-1)
        return g, self.proj(x), (h, w)


def text_embeddings(K=5, N=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(K, N, D, generator=g, dtype=dtype), dim=-1)


def small_config(**kw):
    return OTSegConfig(**{**dict(dim=D, ffn_dim=32, dataset="voc20"), **kw})


def make_model(backend="reference", K=5, seed=0, **kw):
    torch.manual_seed(seed)
    return OTSeg(FakeEncoder(), text_embeddings(K), small_config(backend=backend, **kw), seen=[0, 1, 2])


def images(B=2, H=16, W=20, seed=0, dtype=torch.float32):
    return 255 * torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def head_inputs(B=2, K=5, N=4, h=3, w=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    glob = F.normalize(torch.randn(B, D, generator=g, dtype=dtype), dim=-1)
    patches = torch.randn(B, h * w, D, generator=g, dtype=dtype)
    labels = torch.randint(0, K, (B, 2 * h, 2 * w), generator=g)
    labels[:, 0] = 255
    return glob, patches, text_embeddings(K, N, seed, dtype), (h, w), labels


# ------------------------------------------------------------------- pieces


def test_relation_descriptor_formula():
    torch.manual_seed(0)
    rel = RelationDescriptor(D).double()
    g, _, t, _, _ = head_inputs()
    q = rel(g, t)
    assert q.shape == (2, 5, 4, D)
    expected = rel.proj(torch.cat([g[:, None, None] * t, t.expand(2, -1, -1, -1)], -1))
    assert_close_report(q, expected, atol=1e-14)
    with pytest.raises(ValueError, match="relation descriptor takes"):
        rel(g, t[..., :8])


def test_head_paths_and_shapes():
    torch.manual_seed(0)
    head = OTSegHead(D, ffn_dim=32, backend="reference").double().eval()
    g, p, t, grid, _ = head_inputs()
    out = head(g, p, t, grid, (6, 10))
    assert out.dec.shape == out.mps.shape == (2, 5, 6, 10) and out.dec.dtype == torch.float64
    # MPS path: refined score of the normalised patch-query cosines, upsampled.
    S = torch.einsum("bmd,bknd->bkmn", F.normalize(p, dim=-1), F.normalize(head.relation(g, t), dim=-1))
    expected = F.interpolate(otseg.ops.mps(S, backend="reference").reshape(2, 5, 3, 5), size=(6, 10),
                             mode="bilinear", align_corners=False)
    assert_close_report(out.mps, expected, atol=1e-12, what="Y_mps")
    dec, _ = head.decoder(head.relation(g, t), p, grid, (6, 10))
    assert_close_report(out.dec, dec, atol=1e-12, what="Y_dec")
    assert head(g, p, t).dec.shape == (2, 5, 15)
    with pytest.raises(ValueError, match="same B and D|must have D"):
        head(g, p[..., :8], t, grid)


def test_ensemble_and_seen_bias():
    g = torch.Generator().manual_seed(0)
    dec, mps = torch.randn(2, 5, 3, 4, generator=g), torch.randn(2, 5, 3, 4, generator=g)
    assert_close_report(ensemble_logits(dec, mps), 0.5 * dec + 0.5 * mps, atol=0)
    assert_close_report(ensemble_logits(dec, mps, 0.3), 0.3 * dec + 0.7 * mps, atol=1e-7)
    p = class_probabilities(dec, mps, seen=[0, 3])
    expected = torch.sigmoid(0.5 * dec + 0.5 * mps)
    expected[:, [0, 3]] -= 0.1
    assert_close_report(p, expected, atol=1e-7)
    assert_close_report(class_probabilities(dec, mode="otseg"), torch.sigmoid(dec), atol=0)
    assert_close_report(class_probabilities(dec, mps, mode="mps"), torch.sigmoid(mps), atol=0)
    with pytest.raises(ValueError, match="unknown mode"):
        class_probabilities(dec, mps, mode="both")


# -------------------------------------------------- backends against reference


def _head_run(head, inputs):
    g, p, t, grid, labels = inputs
    g, p = g.clone().requires_grad_(), p.clone().requires_grad_()
    out = head(g, p, t, grid, labels.shape[-2:])
    loss = otseg_loss(out, labels).total
    loss.backward()
    grads = {n: q.grad for n, q in head.named_parameters() if q.grad is not None}
    return out, loss.detach(), g.grad, p.grad, grads


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_head_matches_reference_outputs_and_gradients(backend):
    cpu_backend_or_skip(backend)
    torch.manual_seed(0)
    head = OTSegHead(D, ffn_dim=32, backend="reference").double().eval()
    other = copy.deepcopy(head)
    other.backend = backend
    assert other.backend == backend and head.backend == "reference"
    inputs = head_inputs()
    ref, got = _head_run(head, inputs), _head_run(other, inputs)
    assert rel_err(got[0].dec, ref[0].dec) < 2e-3 and rel_err(got[0].mps, ref[0].mps) < 2e-3
    assert rel_err(got[1], ref[1]) < 2e-3
    assert rel_err(got[2], ref[2]) < 2e-3 and rel_err(got[3], ref[3]) < 2e-3
    assert got[4].keys() == ref[4].keys() and "relation.proj.weight" in ref[4]
    for name in ref[4]:
        assert rel_err(got[4][name], ref[4][name]) < 2e-3, name


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_three_adamw_steps_same_losses_and_parameters(backend):
    cpu_backend_or_skip(backend)
    base = make_model("reference", dropout=0.0).double()
    runs = {}
    for name in ("reference", backend):
        model = copy.deepcopy(base)
        model.backend = name
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=2e-4, weight_decay=0.01)
        losses = []
        for step in range(3):
            x = images(seed=step, dtype=torch.float64)
            labels = torch.randint(0, 5, (2, 16, 20), generator=torch.Generator().manual_seed(step))
            labels[:, :2] = 255
            opt.zero_grad()
            out = model(x, upsample=False)  # token grid: the loss upsamples (fused with the cpu backend)
            result = model.loss(out, labels)
            assert result.backend == ("reference" if name == "reference" else "cpu")
            loss = result.total
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        runs[name] = (losses, dict(model.named_parameters()))
    (ref_losses, ref_params), (losses, params) = runs["reference"], runs[backend]
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    assert ref_losses[0] != ref_losses[2]
    # The last decoder layer's mask comes from its input queries, so its
    # values, output projection, norms and FFN feed nothing (SPEC section 2).
    last = "head.decoder.layers.2."
    unused = {n for n in ref_params if n.startswith(last) and not n.startswith((last + "attn.q_proj",
                                                                              last + "attn.k_proj"))}
    for name, p in ref_params.items():
        assert_close_report(params[name], p, atol=1e-5, what=name)
        trained = not torch.equal(p, dict(base.named_parameters())[name])
        assert trained == (p.requires_grad and name not in unused), name


def _compiled_head_step(compile_backend):
    torch.manual_seed(0)
    head = OTSegHead(D, ffn_dim=32, backend="cpu").eval()
    g, p, t, grid, labels = head_inputs(dtype=torch.float32)

    def step(g, p):
        out = head(g, p, t, grid)  # token grid; the (fused) loss upsamples to the labels
        return otseg_loss(out, labels, backend="cpu").total, out.dec, out.mps

    results = {}
    for name, fn in (("eager", step), ("compiled", torch.compile(step, fullgraph=True, backend=compile_backend))):
        pp = p.clone().requires_grad_()
        head.zero_grad()
        loss, dec, mps = fn(g, pp)
        loss.backward()
        results[name] = (loss.detach(), dec.detach(), mps.detach(), pp.grad, head.decoder.layers[0].attn.q_proj.weight.grad)
    for a, b in zip(results["compiled"], results["eager"]):
        assert_close_report(a, b, atol=1e-5, rtol=1e-4)


def test_torch_compile_fullgraph_head_with_cpu_backend_aot_eager():
    """Full-graph capture of head + loss + backward, through AOT autograd (fast)."""
    cpu_backend_or_skip("cpu")
    _compiled_head_step("aot_eager")


@pytest.mark.slow
def test_torch_compile_fullgraph_head_with_cpu_backend_inductor():
    """The same through inductor (about 40 s the first time, under 10 s from its cache)."""
    cpu_backend_or_skip("cpu")
    _compiled_head_step("inductor")


# -------------------------------------------------------------------- model


def test_model_shapes_and_what_trains():
    model = make_model()
    out = model(images())
    assert out.dec.shape == out.mps.shape == (2, 5, 16, 20)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if n.startswith(("head.", "encoder.prompts", "encoder.prompt_norm"))}
    assert "text" in dict(model.named_buffers()) and "text" not in dict(model.named_parameters())
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.parameters() if p.requires_grad}
    # A class subset (e.g. the seen classes while training inductively).
    assert model(images(), classes=[0, 2]).dec.shape == (2, 2, 16, 20)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_loss_of_token_grid_logits_equals_loss_of_upsampled_ones(backend):
    cpu_backend_or_skip(backend)
    model = make_model(backend).eval().double()
    x = images(dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 16, 20), generator=torch.Generator().manual_seed(3))
    labels[:, :3] = 255
    small, full = model(x, upsample=False), model(x)
    assert small.dec.shape[-2:] != full.dec.shape[-2:] and full.dec.shape[-2:] == labels.shape[-2:]
    a, b = model.loss(small, labels), model.loss(full, labels)
    assert a.backend == b.backend == backend
    assert_close_report(a.total, b.total, rtol=1e-12, atol=0)


def test_model_predict_modes_and_seen_bias():
    model = make_model().eval()
    x = images()
    out = model(x)
    proba = model.predict_proba(x)
    expected = torch.sigmoid(0.5 * out.dec + 0.5 * out.mps)
    expected[:, :3] -= 0.1
    assert_close_report(proba, expected, atol=1e-6)
    assert_close_report(model.predict_proba(x, mode="otseg")[:, 3:], torch.sigmoid(out.dec)[:, 3:], atol=1e-6)
    assert torch.equal(model.predict(x), expected.argmax(1))
    supervised = copy.deepcopy(model)
    supervised.config.setting = "supervised"
    assert_close_report(supervised.predict_proba(x), torch.sigmoid(0.5 * out.dec + 0.5 * out.mps), atol=1e-6)
    # Sliding windows that cover the image once reproduce the whole-image result.
    assert_close_report(model.predict_proba(x, crop=20, stride=20), proba, atol=1e-6)
    assert model.predict_proba(images(H=24, W=28), crop=16, stride=12).shape == (2, 5, 24, 28)


def test_state_dict_round_trip(tmp_path):
    model = make_model(seed=0).eval()
    other = make_model(seed=1).eval()
    x = images()
    assert not torch.equal(model(x).dec, other(x).dec)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    a, b = model(x), other(x)
    assert torch.equal(a.dec, b.dec) and torch.equal(a.mps, b.mps)
    # save/load: the config travels with the weights.
    model.save(tmp_path / "otseg.pt")
    loaded = OTSeg.load(tmp_path / "otseg.pt", encoder=FakeEncoder()).eval()
    assert loaded.config == model.config and torch.equal(loaded.seen, model.seen)
    c = loaded(x)
    assert torch.equal(a.dec, c.dec) and torch.equal(a.mps, c.mps)


def test_every_backend_switch_reaches_the_loss_and_save(tmp_path):
    cpu_backend_or_skip("cpu")
    model = make_model("cpu").eval()
    x = images()
    labels = torch.randint(0, 5, (2, 16, 20), generator=torch.Generator().manual_seed(4))
    switches = [
        ("reference", lambda m, b: set_backend(m, b)),
        ("cpu", lambda m, b: setattr(m.head, "backend", b)),
        ("reference", lambda m, b: setattr(m, "backend", b)),
    ]
    for backend, switch in switches:
        switch(model, backend)
        assert model.backend == model.config.backend == backend
        out = model(x, upsample=False)
        losses = model.loss(out, labels)
        expected = otseg_loss(out, labels, backend=backend)
        assert losses.backend == expected.backend == backend
        assert_close_report(losses.total, expected.total, atol=0.0, what=f"loss with {backend}")
        model.save(tmp_path / "otseg.pt")
        assert OTSeg.load(tmp_path / "otseg.pt", encoder=FakeEncoder()).backend == backend
    # An assigned config's backend switches the Sinkhorns too.
    model.config = dataclasses.replace(model.config, backend="cpu")
    assert model.backend == model.config.backend == "cpu"
    assert model.loss(model(x, upsample=False), labels).backend == "cpu"
    # The Sinkhorn settings apply too; fields that made the modules cannot change.
    model.config = dataclasses.replace(model.config, eps=0.1, max_iter=7, tol=0.0)
    assert {(m.eps, m.max_iter, m.tol) for m in sinkhorn_modules(model)} == {(0.1, 7, 0.0)}
    before = model.config
    with pytest.raises(ValueError, match=r"config fields \['ffn_dim'\] are fixed"):
        model.config = dataclasses.replace(model.config, ffn_dim=64)
    with pytest.raises(ValueError, match="unknown backend"):
        model.config = dataclasses.replace(model.config, backend="gpu", seen_bias=0.9)
    assert model.config is before and model.config.seen_bias == 0.1
    # Assigning a config applies only the settings it changes: a layer's own stays.
    model.head.decoder.layers[0].attn.eps = 0.2
    model.config = dataclasses.replace(model.config, seen_bias=0.2)
    assert model.head.decoder.layers[0].attn.eps == 0.2 and model.config.seen_bias == 0.2
    # A Path set after construction is saved as str (load reads with weights_only=True).
    model.config.text_embeddings = tmp_path / "emb.npy"
    model.save(tmp_path / "otseg.pt")
    assert OTSeg.load(tmp_path / "otseg.pt", encoder=FakeEncoder()).config.text_embeddings == str(tmp_path / "emb.npy")
    # A whole-model pickle that kept the config as a plain attribute still loads.
    state = model.__dict__.copy()
    state["config"] = state.pop("_config")
    old = OTSeg.__new__(OTSeg)
    old.__setstate__(state)
    assert old.config == model.config and old.backend == "cpu"


def test_torch_compile_fullgraph_model_with_a_class_subset():
    # Class indices are not read on the host under torch.compile (no graph break).
    cpu_backend_or_skip("cpu")
    model = make_model("cpu").eval()
    x = images()
    fn = torch.compile(lambda im: model(im, classes=[0, 2], upsample=False).dec, fullgraph=True, backend="aot_eager")
    assert_close_report(fn(x), model(x, classes=[0, 2], upsample=False).dec, atol=1e-6)


def test_class_subsets_as_indices_or_masks():
    model = make_model().eval()
    x = images()
    full = model(x)
    mask = torch.tensor([True, False, True, False, False])
    sub = model(x, classes=[0, 2])
    # The reference stops on the batch's mean error, so a subset's iterations may differ a little.
    assert_close_report(sub.dec, full.dec[:, [0, 2]], atol=1e-4, what="decoder logits of the subset")
    for classes in (torch.tensor([0, 2]), mask):
        assert torch.equal(model(x, classes=classes).dec, sub.dec)
    with pytest.raises(ValueError, match="classes must name at least one class"):
        model(x, classes=[])
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\), got \[5\]"):
        model(x, classes=[0, 5])
    with pytest.raises(ValueError, match=r"a bool mask must have shape \[5\]"):
        model(x, classes=[True, False])
    with pytest.raises(TypeError, match="class indices"):
        model(x, classes=[0.0, 1.0])
    # seen: a bool mask is the same as its indices; empty means no bias.
    by_mask = OTSeg(FakeEncoder(), text_embeddings(), small_config(), seen=mask)
    assert by_mask.seen.tolist() == [0, 2]
    probs = class_probabilities(full.dec, full.mps, seen=[])
    assert torch.equal(probs, class_probabilities(full.dec, full.mps, seen=None))
    assert torch.equal(class_probabilities(full.dec, full.mps, seen=mask),
                       class_probabilities(full.dec, full.mps, seen=[0, 2]))


def test_sliding_windows_take_any_image_dtype_and_check_crop_and_stride():
    model = make_model().eval()
    x = images(H=24, W=28).round()
    expected = model.predict_proba(x, crop=16, stride=12)
    assert expected.dtype == torch.float32
    as_bytes = model.predict_proba(x.to(torch.uint8), crop=16, stride=12)
    assert as_bytes.dtype == torch.float32
    assert_close_report(as_bytes, expected, atol=1e-6, what="uint8 images")
    assert torch.equal(model.predict(x.to(torch.uint8), crop=16), model.predict(x, crop=16))
    for crop, stride, says in ((16, 20, "stride must be at most crop"), (16, 0, "stride must be a positive integer"),
                               (0, None, "crop must be a positive integer"), (None, 8, "stride needs crop")):
        with pytest.raises(ValueError, match=says):
            model.predict_proba(x, crop=crop, stride=stride)
    with pytest.raises(TypeError, match="crop must be a positive integer, got float"):
        model.predict_proba(x, crop=16.5)


def test_from_config_variants():
    enc = FakeEncoder()
    text = text_embeddings()
    model = OTSeg.from_config(small_config(), encoder=enc, text_embeddings=text, backend="reference")
    assert model.encoder is enc and model.backend == "reference" and model.config.backend == "reference"
    model.backend = "auto"
    assert {m.backend for m in sinkhorn_modules(model)} == {"auto"} and model.config.backend == "auto"
    model = OTSeg.from_config(dict(dim=D, ffn_dim=32, dataset="context59"), encoder=enc, text_embeddings=text)
    assert model.config.dataset == "context59" and model.seen.numel() == 0  # K=5 is not Context's 59
    # A dataset name: its defaults and its shipped text embeddings.
    model = OTSeg.from_config("voc20", encoder=FakeEncoder(dim=512), ffn_dim=64, num_layers=1)
    assert model.text.shape == (20, 6, 512) and model.config.num_prompts == 10
    assert torch.equal(model.text, F.normalize(load_text_embeddings("voc20"), dim=-1))
    assert model.seen.tolist() == class_splits()["voc20"]["seen"]
    assert OTSegConfig.for_dataset("cocostuff171").num_prompts == 100
    with pytest.raises(ValueError, match="unknown OTSegConfig fields"):
        OTSeg.from_config(dict(dims=3), encoder=enc, text_embeddings=text)
    with pytest.raises(ValueError, match="unknown dataset"):
        OTSegConfig(dataset="ade20k")


def test_text_embeddings_files_are_checked_where_the_model_loads_them(tmp_path):
    # from_config reads config.text_embeddings through otseg.data, which
    # checks the file and names it in every error.
    np = pytest.importorskip("numpy")
    good = F.normalize(torch.randn(20, 6, D, generator=torch.Generator().manual_seed(0)), dim=-1).numpy()
    bad = {
        "nan.npy": (np.where(np.arange(D) == 3, np.nan, good), "NaN or inf"),
        "ints.npy": (np.ones((20, 6, D), dtype=np.int32), "float array"),
        "d8.npy": (good[..., :8], r"expected shape \[K, N, 16\]"),
        "k5.npy": (good[:5], r"expected shape \[20, 6, D\] for voc20"),
        "scaled.npy": (3 * good, "L2-normalised"),
    }
    for name, (array, says) in bad.items():
        np.save(tmp_path / name, array)
        with pytest.raises(ValueError, match=f"{name}: .*{says}"):
            OTSeg.from_config(small_config(text_embeddings=str(tmp_path / name)), encoder=FakeEncoder())
    (tmp_path / "empty.npy").write_bytes(b"")
    np.savez(tmp_path / "arrays.npz", good)
    unreadable = (("empty.npy", "not a readable .npy array"),
                  ("arrays.npz", r"expected a float array .* \(a .npy file\), got NpzFile"))
    for name, says in unreadable:
        with pytest.raises(ValueError, match=f"{name}: {says}"):
            OTSeg.from_config(small_config(text_embeddings=tmp_path / name), encoder=FakeEncoder())
    np.save(tmp_path / "good.npy", good)
    model = OTSeg.from_config(small_config(text_embeddings=tmp_path / "good.npy"), encoder=FakeEncoder())
    assert_close_report(model.text, torch.from_numpy(good), atol=1e-6, what="embeddings")
    # A pathlib.Path is kept as str, so the saved config loads with weights_only=True.
    assert model.config.text_embeddings == str(tmp_path / "good.npy")
    model.save(tmp_path / "model.pt")
    assert OTSeg.load(tmp_path / "model.pt", encoder=FakeEncoder()).config == model.config


def test_an_encoder_of_another_clip_is_taken_as_it_is():
    # Only otseg's CLIP encoder has its architecture recorded: another with a
    # CLIP-like tower (e.g. OpenAI's clip package) is left alone, copies too.
    encoder = FakeEncoder()
    encoder.visual = nn.Module()
    encoder.visual.conv1, encoder.visual.transformer = nn.Conv2d(3, 4, 2), nn.Identity()
    model = OTSeg(encoder, text_embeddings(), small_config()).eval()
    assert model.config == small_config()
    twin = copy.deepcopy(model)
    assert twin.config == model.config and torch.equal(twin(images()).dec, model(images()).dec)


def test_model_errors():
    with pytest.raises(ValueError, match=r"text_embeddings must have shape \[K, N, 16\]"):
        OTSeg(FakeEncoder(), torch.randn(5, 4, 8), small_config())
    with pytest.raises(ValueError, match=r"images must have shape \[B, 3, H, W\]"):
        make_model()(torch.rand(2, 1, 16, 20))


def test_importing_otseg_model_does_not_import_clip():
    code = "import sys, otseg.model, otseg.nn; print('otseg.model.clip' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
