"""otseg.nn: the MPSA layer and decoder do what SPEC section 2 says, on every
available backend, with the same outputs and gradients as the reference.

Tolerances: the fused backends stop each problem on its own error and
differentiate the converged plan implicitly; the reference stops the batch on
its mean error and unrolls the loop. At the default tol (1e-6) the outputs and
gradients then differ by about 1e-4 relative (measured 2e-5 to 3e-4 on these
problems), so the comparison allows 2e-3; with tol 1e-12 both reach the same
fixed point and agree to about 1e-9, and the comparison allows 1e-7.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import otseg
from otseg.nn import (
    MPSADecoder,
    MPSADecoderLayer,
    MultiPromptSinkhornAttention,
    fuse_masks,
    set_backend,
    set_check_finite,
    sinkhorn_modules,
    to_image,
)
from otseg.model import OTSegHead

from helpers import OTHER_BACKENDS, assert_close_report, cpu_backend_or_skip, rel_err

def inputs(B=2, K=3, N=4, M=15, D=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(B, K, N, D, generator=g, dtype=dtype)
    tokens = torch.randn(B, M, D, generator=g, dtype=dtype)
    return queries, tokens


# --------------------------------------------------------------- semantics


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 15, 16), (1, 5, 6, 37, 8)], ids=["B2K3N4M15", "B1K5N6M37"])
def test_attention_shapes_and_dtypes(shape, dtype):
    B, K, N, M, D = shape
    attn = MultiPromptSinkhornAttention(D, backend="reference").to(dtype)
    q, z = inputs(B, K, N, M, D, dtype)
    out, mask = attn(q, z)
    assert out.shape == (B, K, N, D) and out.dtype == dtype
    assert mask.shape == (B, K, M) and mask.dtype == dtype
    layer = MPSADecoderLayer(D, ffn_dim=32, backend="reference").to(dtype)
    x, mask = layer(q, z)
    assert x.shape == (B, K, N, D) and mask.shape == (B, K, M) and x.dtype == dtype


def test_attention_is_spec_section_2():
    """Mask = M N sum_n T S and O = W_o(sum_m T V), from the op's own plan."""
    torch.manual_seed(0)
    attn = MultiPromptSinkhornAttention(16, backend="reference").double().eval()
    q, z = inputs()
    out, mask = attn(q, z)
    qn = F.normalize(attn.q_proj(q), dim=-1)
    kn = F.normalize(attn.k_proj(z), dim=-1)
    S = torch.einsum("bmd,bknd->bkmn", kn, qn)
    score, plan = otseg.ops.mps(S, return_plan=True, backend="reference")
    M, N = S.shape[-2:]
    assert_close_report(mask, M * N * (plan * S).sum(-1), atol=1e-12, what="mask")
    assert_close_report(mask, score, atol=1e-12, what="mask vs op")
    values = attn.v_proj(z)
    expected = attn.out_proj(torch.einsum("bkmn,bmd->bknd", plan, values))
    assert_close_report(out, expected, atol=1e-12, what="attention output")


def test_decoder_layer_post_norm_residuals():
    torch.manual_seed(0)
    layer = MPSADecoderLayer(16, ffn_dim=32, backend="reference").double().eval()
    q, z = inputs()
    x, _ = layer(q, z)
    out, _ = layer.attn(q, z)
    h = layer.norm1(q + out)
    expected = layer.norm2(h + layer.linear2(F.relu(layer.linear1(h))))
    assert_close_report(x, expected, atol=1e-12, what="layer output")


def test_fuse_masks_sigmoid_power():
    g = torch.Generator().manual_seed(0)
    masks = [torch.randn(2, 3, 5, generator=g, dtype=torch.float64) * 5 for _ in range(3)]
    expected = masks[2] * torch.sigmoid(masks[0]) ** 0.5 * torch.sigmoid(masks[1]) ** 0.5
    assert_close_report(fuse_masks(masks), expected, atol=1e-14, what="fused")
    assert fuse_masks(masks[:1]) is masks[0]
    # Very negative earlier logits: the gate underflows to 0 without NaN.
    assert torch.isfinite(fuse_masks([torch.full((2,), -1e4), torch.ones(2)])).all()


def test_decoder_fuses_layers_and_upsamples():
    torch.manual_seed(0)
    dec = MPSADecoder(16, num_layers=3, ffn_dim=32, backend="reference").double().eval()
    q, z = inputs(M=15)
    logits, masks = dec(q, z, grid=(3, 5), out_size=(12, 20))
    assert logits.shape == (2, 3, 12, 20) and len(masks) == 3
    expected = F.interpolate(fuse_masks(masks).reshape(2, 3, 3, 5), size=(12, 20), mode="bilinear",
                             align_corners=False)
    assert_close_report(logits, expected, atol=1e-12, what="decoder logits")
    flat, _ = dec(q, z)
    assert flat.shape == (2, 3, 15)
    assert dec(q, z, grid=(3, 5))[0].shape == (2, 3, 3, 5)


def test_to_image_checks_the_grid():
    with pytest.raises(ValueError, match="grid 4x4 does not match M = 15"):
        to_image(torch.zeros(1, 2, 15), (4, 4))
    with pytest.raises(ValueError, match="out_size needs the token grid"):
        to_image(torch.zeros(1, 2, 15), None, (8, 8))


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("q_shape, z_shape, match", [
    ((2, 3, 4, 16), (2, 15, 8), "same D|must have D"),
    ((2, 3, 4, 16), (3, 15, 16), "same batch"),
    ((2, 3, 16), (2, 15, 16), r"queries must have shape \[B, K, N, D\]"),
    ((2, 3, 4, 16), (2, 3, 15, 16), r"tokens must have shape \[B, M, D\]"),
    ((2, 3, 4, 8), (2, 15, 8), "must have D = 16"),
], ids=["D-mismatch", "B-mismatch", "queries-3d", "tokens-4d", "wrong-D"])
def test_bad_shapes_raise_clear_errors(q_shape, z_shape, match):
    layer = MPSADecoderLayer(16, ffn_dim=32, backend="reference")
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(q_shape), torch.randn(z_shape))


def test_backend_switch():
    dec = MPSADecoder(16, num_layers=2, ffn_dim=32)
    assert [m.backend for m in sinkhorn_modules(dec)] == ["auto", "auto"]
    set_backend(dec, "reference")
    assert [m.backend for m in sinkhorn_modules(dec)] == ["reference", "reference"]
    assert "backend='reference'" in repr(dec)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        set_backend(dec, "fast")
    with pytest.raises(ValueError, match="unknown backend"):
        MultiPromptSinkhornAttention(16, backend="gpu")


@pytest.mark.parametrize("name,value,exc", [("eps", 0.0, ValueError), ("eps", -1.0, ValueError),
                                            ("max_iter", 0, ValueError), ("max_iter", 2.0, TypeError),
                                            ("tol", -1e-6, ValueError), ("tol", float("nan"), ValueError)])
def test_bad_sinkhorn_settings_raise_at_construction(name, value, exc):
    with pytest.raises(exc, match=name):
        MultiPromptSinkhornAttention(16, **{name: value})
    with pytest.raises(exc, match=name):
        MPSADecoder(16, num_layers=2, ffn_dim=32, **{name: value})
    with pytest.raises(exc, match=name):
        OTSegHead(16, num_layers=1, ffn_dim=32, **{name: value})


def test_unavailable_backend_says_why_at_call_time():
    unavailable = [s for s in otseg.ops.backends() if not s.available or "cpu" not in s.devices]
    if not unavailable:
        pytest.skip("every backend runs on CPU tensors here")
    attn = MultiPromptSinkhornAttention(16, backend=unavailable[0].name).double()
    with pytest.raises(ValueError, match="unavailable|runs on"):
        attn(*inputs())


def test_record_info_keeps_iterations_and_backend():
    dec = MPSADecoder(16, num_layers=2, ffn_dim=32, backend="reference").double()
    for m in sinkhorn_modules(dec):
        m.record_info = True
    dec(*inputs())
    for m in sinkhorn_modules(dec):
        assert m.last_info.backend == "reference" and m.last_info.n_iter.shape == (2, 3)
        assert int(m.last_info.n_iter.min()) >= 1


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_check_finite_switch(backend):
    # On by default, as in otseg.ops.mps; off, NaN scores pass through (a
    # GPU training loop saves a host synchronisation per Sinkhorn).
    cpu_backend_or_skip(backend)
    dec = MPSADecoder(16, num_layers=2, ffn_dim=32, backend=backend).double().eval()
    q, z = inputs()
    z[0, 1] = float("nan")
    assert all(m.check_finite for m in sinkhorn_modules(dec))
    with pytest.raises(ValueError, match="NaN or inf"):
        dec(q, z)
    assert set_check_finite(dec, False) is dec
    assert not any(m.check_finite for m in sinkhorn_modules(dec))
    logits, _ = dec(q, z)
    assert logits[0].isnan().any() and not logits[1].isnan().any()
    set_check_finite(dec, True)
    with pytest.raises(ValueError, match="NaN or inf"):
        dec(q, z)


# ------------------------------------------------- backends against reference


def _decoder_run(dec, q, z):
    q = q.clone().requires_grad_()
    z = z.clone().requires_grad_()
    logits, masks = dec(q, z, grid=(3, 5), out_size=(6, 10))
    w = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).reshape(logits.shape)
    ((logits * w).sum() + sum((m ** 2).mean() for m in masks)).backward()
    grads = {n: p.grad for n, p in dec.named_parameters() if p.grad is not None}
    return logits.detach(), q.grad, z.grad, grads


@pytest.mark.parametrize("tol, max_iter, rtol", [(1e-6, 100, 2e-3), (1e-12, 1000, 1e-7)],
                         ids=["default-tol", "tight-tol"])
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_decoder_matches_reference_outputs_and_gradients(backend, tol, max_iter, rtol):
    cpu_backend_or_skip(backend)
    torch.manual_seed(0)
    dec = MPSADecoder(16, num_layers=3, ffn_dim=32, tol=tol, max_iter=max_iter, backend="reference")
    dec = dec.double().eval()
    other = set_backend(copy.deepcopy(dec), backend)
    q, z = inputs(M=15)
    ref = _decoder_run(dec, q, z)
    got = _decoder_run(other, q, z)
    assert rel_err(got[0], ref[0]) < rtol
    assert rel_err(got[1], ref[1]) < rtol, "dL/dqueries"
    assert rel_err(got[2], ref[2]) < rtol, "dL/dtokens"
    assert got[3].keys() == ref[3].keys()
    for name in ref[3]:
        assert rel_err(got[3][name], ref[3][name]) < rtol, name
    # The last layer's values, output projection and FFN feed nothing: its
    # mask is computed from its input queries (SPEC section 2).
    assert not any(n.startswith("layers.2.attn.v_proj") or n.startswith("layers.2.linear") for n in ref[3])


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_float32_decoder_matches_float64_reference(backend):
    cpu_backend_or_skip(backend)
    torch.manual_seed(0)
    dec = MPSADecoder(16, num_layers=3, ffn_dim=32, backend="reference").double().eval()
    q, z = inputs(M=15)
    ref = _decoder_run(dec, q, z)
    got = _decoder_run(set_backend(copy.deepcopy(dec), backend).float(), q.float(), z.float())
    assert got[0].dtype == torch.float32
    # float32 rounding (1e-6) is below the stopping-rule difference above.
    assert rel_err(got[0], ref[0]) < 2e-3 and rel_err(got[2], ref[2]) < 2e-3
