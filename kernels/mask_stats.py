"""Triton kernels of the segmentation loss's per-mask sums, fused with the
bilinear upsampling of the logits (the GPU counterpart of
``csrc/cpu/mask_stats_cpu_kernels.h``); launched by ``otseg/ops/mask_stats.py``.

Program (p, s) takes mask p = (b, k) and the output rows of split s. Each
output row is interpolated from the [h, w] logits on the fly (four gathers
from a tile that stays in cache, through the row and column tables of
``F.interpolate(..., mode="bilinear", align_corners=False)``) and scored
against its labels in the same pass; the upsampled logits never exist.

- Forward: the four sums (focal, sum p y, sum p, sum y) of the split's rows,
  one partial per program ([4, S, P], summed by the launcher: no atomics, so
  the result is the same on every launch).
- Backward: the pixel gradients of a row are reduced to the w input columns
  (the transpose of the column interpolation, a [BLOCK_w, BLOCK_W] weight
  tile built once per program) and spread over the two input rows of the row
  (the transpose of the row blend) in an [h, w] register tile, written once
  per program as a partial ([S, P, h, w], summed by the launcher).

Labels come compact: the class index, or -1 for ignored pixels. PARAMS holds
(alpha_pos, alpha_neg, gamma) in the compute dtype (Triton would pass Python
floats as float32).
"""

import triton
import triton.language as tl


@triton.jit
def _focal_terms(v, gamma, GAMMA2: tl.constexpr):
    """s = sigmoid(v), q = 1 - s (each as e/(1+e) or 1/(1+e), e = exp(-|v|)),
    sp = softplus(v), sn = softplus(-v), sg = s^gamma, qg = q^gamma."""
    e = tl.exp(-tl.abs(v))
    lg = tl.log(1.0 + e)
    r = 1.0 / (1.0 + e)
    er = e * r
    pos = v >= 0
    s = tl.where(pos, r, er)
    q = tl.where(pos, er, r)
    sp = tl.maximum(v, 0.0) + lg
    sn = tl.maximum(-v, 0.0) + lg
    if GAMMA2:
        sg = s * s
        qg = q * q
    else:
        sg = tl.exp(-gamma * sn)
        qg = tl.exp(-gamma * sp)
    return s, q, sp, sn, sg, qg


@triton.jit
def _upsampled_row(X, Y0, Y1, LY, i, x0, x1, lx, cmask, w):
    """Output row i of the upsampled mask whose logits start at X."""
    y0 = tl.load(Y0 + i)
    y1 = tl.load(Y1 + i)
    ly = tl.load(LY + i)
    a0 = tl.load(X + y0 * w + x0, mask=cmask, other=0.0)
    a1 = tl.load(X + y0 * w + x1, mask=cmask, other=0.0)
    b0 = tl.load(X + y1 * w + x0, mask=cmask, other=0.0)
    b1 = tl.load(X + y1 * w + x1, mask=cmask, other=0.0)
    v = (1.0 - ly) * ((1.0 - lx) * a0 + lx * a1) + ly * ((1.0 - lx) * b0 + lx * b1)
    return v, y0, y1, ly


@triton.jit
def _columns(X0, X1, LX, PARAMS, W, BLOCK_W: tl.constexpr):
    """What every program of both kernels reads first: the output columns, the
    two input columns and the weight of the second for each, and the focal
    parameters (alpha on positives, alpha on negatives, gamma)."""
    cols = tl.arange(0, BLOCK_W)
    cmask = cols < W
    x0 = tl.load(X0 + cols, mask=cmask, other=0)
    x1 = tl.load(X1 + cols, mask=cmask, other=0)
    lx = tl.load(LX + cols, mask=cmask, other=0.0)
    return cols, cmask, x0, x1, lx, tl.load(PARAMS), tl.load(PARAMS + 1), tl.load(PARAMS + 2)


@triton.jit
def _mask_stats_fwd_kernel(
    X, LAB, Y0, Y1, LY, X0, X1, LX, OUT,
    K, h, w, H, W, P, rows_per,
    PARAMS,
    GAMMA2: tl.constexpr, BLOCK_W: tl.constexpr,
):
    p = tl.program_id(0)
    split = tl.program_id(1)
    S = tl.num_programs(1)
    b = p // K
    k = p % K
    cols, cmask, x0, x1, lx, alpha_pos, alpha_neg, gamma = _columns(X0, X1, LX, PARAMS, W, BLOCK_W)
    xp = X + p.to(tl.int64) * h * w
    acc_f = tl.zeros([BLOCK_W], dtype=lx.dtype)
    acc_i = tl.zeros([BLOCK_W], dtype=lx.dtype)
    acc_p = tl.zeros([BLOCK_W], dtype=lx.dtype)
    acc_c = tl.zeros([BLOCK_W], dtype=lx.dtype)
    i_start = split * rows_per
    i_end = tl.minimum(i_start + rows_per, H)
    for i in range(i_start, i_end):
        v, y0, y1, ly = _upsampled_row(xp, Y0, Y1, LY, i, x0, x1, lx, cmask, w)
        lab = tl.load(LAB + (b.to(tl.int64) * H + i) * W + cols, mask=cmask, other=-1)
        valid = lab >= 0
        y = lab == k
        s, q, sp, sn, sg, qg = _focal_terms(v, gamma, GAMMA2)
        fneg = alpha_neg * sp * sg
        fpos = alpha_pos * sn * qg
        acc_f += tl.where(y, fpos, tl.where(valid, fneg, 0.0))
        acc_i += tl.where(y, s, 0.0)
        acc_p += tl.where(valid, s, 0.0)
        acc_c += tl.where(y, 1.0, 0.0)
    base = split * P + p
    tl.store(OUT + base, tl.sum(acc_f, axis=0))
    tl.store(OUT + S * P + base, tl.sum(acc_i, axis=0))
    tl.store(OUT + 2 * S * P + base, tl.sum(acc_p, axis=0))
    tl.store(OUT + 3 * S * P + base, tl.sum(acc_c, axis=0))


@triton.jit
def _mask_stats_bwd_kernel(
    X, LAB, Y0, Y1, LY, X0, X1, LX, GS, OUT,
    K, h, w, H, W, P, rows_per,
    PARAMS,
    GAMMA2: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_H_IN: tl.constexpr, BLOCK_W_IN: tl.constexpr,
):
    p = tl.program_id(0)
    split = tl.program_id(1)
    b = p // K
    k = p % K
    cols, cmask, x0, x1, lx, alpha_pos, alpha_neg, gamma = _columns(X0, X1, LX, PARAMS, W, BLOCK_W)
    # wx[j, c]: the weight of input column j in output column c.
    jj = tl.arange(0, BLOCK_W_IN)
    wx = tl.where(jj[:, None] == x0[None, :], 1.0 - lx[None, :], 0.0) + tl.where(jj[:, None] == x1[None, :],
                                                                                 lx[None, :], 0.0)
    wx = tl.where(cmask[None, :], wx, 0.0)
    yy = tl.arange(0, BLOCK_H_IN)
    gf = tl.load(GS + p)
    gi = tl.load(GS + P + p)
    gp = tl.load(GS + 2 * P + p)
    xp = X + p.to(tl.int64) * h * w
    G = tl.zeros([BLOCK_H_IN, BLOCK_W_IN], dtype=lx.dtype)
    i_start = split * rows_per
    i_end = tl.minimum(i_start + rows_per, H)
    for i in range(i_start, i_end):
        v, y0, y1, ly = _upsampled_row(xp, Y0, Y1, LY, i, x0, x1, lx, cmask, w)
        lab = tl.load(LAB + (b.to(tl.int64) * H + i) * W + cols, mask=cmask, other=-1)
        valid = lab >= 0
        y = lab == k
        s, q, sp, sn, sg, qg = _focal_terms(v, gamma, GAMMA2)
        ds = s * q
        dneg = alpha_neg * gf * sg * (s + gamma * sp * q) + gp * ds
        dpos = -alpha_pos * gf * qg * (q + gamma * sn * s) + (gp + gi) * ds
        dv = tl.where(y, dpos, tl.where(valid, dneg, 0.0))
        row = tl.sum(wx * dv[None, :], axis=1)  # [BLOCK_W_IN]: the row's gradient on the input columns
        wy = tl.where(yy == y0, 1.0 - ly, 0.0) + tl.where(yy == y1, ly, 0.0)
        G += wy[:, None] * row[None, :]
    out = OUT + (split * P + p).to(tl.int64) * h * w
    tl.store(out + yy[:, None] * w + jj[None, :], G, mask=(yy[:, None] < h) & (jj[None, :] < w))
