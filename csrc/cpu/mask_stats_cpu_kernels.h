// The segmentation loss's per-mask sums on the CPU, fused with the bilinear
// upsampling of the logits: templates on the vector width, compiled per
// instruction set like the Sinkhorn's kernels (mask_stats_cpu.h).
//
// The losses of SPEC section 3 compare [B, K, H, W] logits, upsampled from
// the [B, K, h, w] token grid, with a [B, H, W] label map. Here the upsampled
// logits never exist: each mask (b, k) is done by one thread, which
// interpolates its h rows to the W output columns once (an [h, W] buffer in
// cache), then for every output row blends two of those rows and scores the
// pixels against the labels in the same pass, with one exp and one log per
// pixel. The backward recomputes the same terms, accumulates the pixel
// gradients into the [h, W] buffer (the transpose of the row blend) and
// applies the transpose of the column interpolation once per mask.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "mask_stats_cpu.h"
#include "vec.h"

namespace otseg {
namespace cpu {
namespace {

template <typename acc_t, int B>
struct MaskLanes {
  using V = typename vec::Vec<acc_t, B>::V;
  using I = typename vec::Vec<acc_t, B>::I;
  static constexpr int L = vec::Vec<acc_t, B>::W;
  typedef int16_t Labels __attribute__((vector_size(L * 2)));
};

// The focal and dice terms of a vector of logits v: s = sigmoid(v), q = 1 - s
// (each as e/(1+e) or 1/(1+e), e = exp(-|v|), so neither loses precision),
// sp = softplus(v) = -log(1 - s), sn = softplus(-v) = -log(s), and the focal
// factors sg = s^gamma, qg = (1 - s)^gamma.
template <bool kGamma2, typename V>
struct FocalTerms {
  V s, q, sp, sn, sg, qg;

  OTSEG_VEC_INLINE FocalTerms(V v, vec::lane_t<V> gamma) {
    using T = vec::lane_t<V>;
    using I = typename vec::Vec<T, sizeof(V)>::I;
    const V one = vec::splat<V>(T(1));
    const V e = vec::exp<true>(-vec::vabs(v));
    const V l = vec::log(one + e);
    const V r = one / (one + e);
    const V er = e * r;
    const I pos = v >= V{};
    s = __builtin_bit_cast(V, (__builtin_bit_cast(I, r) & pos) | (__builtin_bit_cast(I, er) & ~pos));
    q = __builtin_bit_cast(V, (__builtin_bit_cast(I, er) & pos) | (__builtin_bit_cast(I, r) & ~pos));
    sp = vec::vmax(V{}, v) + l;  // v second: a NaN logit gives NaN sums, as in PyTorch
    sn = vec::vmax(V{}, -v) + l;
    if constexpr (kGamma2) {
      sg = s * s;
      qg = q * q;
    } else {
      sg = vec::exp<true>(-gamma * sn);
      qg = vec::exp<true>(-gamma * sp);
    }
  }
};

// Mask p's logits interpolated along the columns: R[y, c] for the h input
// rows and the Wp output columns (0 past W).
template <typename acc_t>
OTSEG_VEC_INLINE void interpolate_columns(const MaskStatsArgs<acc_t>& a, const acc_t* x, acc_t* R) {
  for (int64_t y = 0; y < a.h; ++y) {
    const acc_t* row = x + y * a.w;
    acc_t* out = R + y * a.Wp;
    for (int64_t c = 0; c < a.W; ++c) out[c] = (1 - a.lx[c]) * row[a.x0[c]] + a.lx[c] * row[a.x1[c]];
    std::fill(out + a.W, out + a.Wp, acc_t(0));
  }
}

// The transpose of interpolate_columns: gx[y, x0[c]] += (1 - lx[c]) G[y, c], ...
template <typename acc_t>
OTSEG_VEC_INLINE void interpolate_columns_transposed(const MaskStatsArgs<acc_t>& a, const acc_t* G, acc_t* gx) {
  std::fill(gx, gx + a.h * a.w, acc_t(0));
  for (int64_t y = 0; y < a.h; ++y) {
    const acc_t* row = G + y * a.Wp;
    acc_t* out = gx + y * a.w;
    for (int64_t c = 0; c < a.W; ++c) {
      out[a.x0[c]] += (1 - a.lx[c]) * row[c];
      out[a.x1[c]] += a.lx[c] * row[c];
    }
  }
}

// One mask: its four sums (forward) or the gradient of its logits (backward).
// buf holds h * Wp values (2 h Wp for the backward).
template <int B, bool kBackward, bool kGamma2, typename acc_t>
OTSEG_VEC_INLINE void mask_stats_one(const MaskStatsArgs<acc_t>& a, int64_t p, acc_t* buf) {
  using Lanes = MaskLanes<acc_t, B>;
  using V = typename Lanes::V;
  using I = typename Lanes::I;
  constexpr int L = Lanes::L;
  const int64_t b = p / a.K;
  const I k = I{} + static_cast<typename vec::Vec<acc_t, B>::IntLane>(p % a.K);
  const acc_t* x = a.logits + p * a.h * a.w;
  const V an = vec::splat<V>(a.alpha_neg), ap = vec::splat<V>(a.alpha_pos);
  const acc_t gamma = a.gamma;

  // buf: the column-interpolated logits R [h, Wp], then (backward) the
  // gradients G [h, Wp] of R.
  const acc_t* R = buf;
  acc_t* G = buf + a.h * a.Wp;
  interpolate_columns(a, x, buf);
  if constexpr (kBackward) std::fill(G, G + a.h * a.Wp, acc_t(0));
  V gf{}, gi{}, gp{};
  if constexpr (kBackward) {
    gf = vec::splat<V>(a.grad_stats[p]);
    gi = vec::splat<V>(a.grad_stats[a.P + p]);
    gp = vec::splat<V>(a.grad_stats[2 * a.P + p]);
  }
  double focal = 0, inter = 0, prob = 0, count = 0;
  for (int64_t i = 0; i < a.H; ++i) {
    const acc_t* r0 = R + a.y0[i] * a.Wp;
    const acc_t* r1 = R + a.y1[i] * a.Wp;
    const V l1 = vec::splat<V>(a.ly[i]), l0 = vec::splat<V>(acc_t(1) - a.ly[i]);
    const int16_t* lab = a.labels + (b * a.H + i) * a.Wp;
    V vfocal{}, vinter{}, vprob{}, vcount{};
    for (int64_t c = 0; c < a.Wp; c += L) {
      const V v = l0 * vec::load<V>(r0 + c) + l1 * vec::load<V>(r1 + c);
      const I li = __builtin_convertvector(vec::load<typename Lanes::Labels>(lab + c), I);
      const V valid = -__builtin_convertvector(li >= I{}, V);  // 1 on labelled pixels
      const V y = -__builtin_convertvector(li == k, V);        // 1 on this class's pixels
      const FocalTerms<kGamma2, V> t(v, gamma);
      if constexpr (!kBackward) {
        const V fneg = an * t.sp * t.sg, fpos = ap * t.sn * t.qg;
        vfocal += valid * fneg + y * (fpos - fneg);
        vinter += y * t.s;
        vprob += valid * t.s;
        vcount += y;
      } else {
        const V ds = t.s * t.q;
        const V dneg = an * gf * t.sg * (t.s + gamma * t.sp * t.q);
        const V dpos = -(ap * gf) * t.qg * (t.q + gamma * t.sn * t.s);
        const V dv = valid * (dneg + gp * ds) + y * (dpos - dneg + gi * ds);
        acc_t* g0 = G + a.y0[i] * a.Wp + c;
        vec::store(g0, vec::load<V>(g0) + l0 * dv);
        acc_t* g1 = G + a.y1[i] * a.Wp + c;
        vec::store(g1, vec::load<V>(g1) + l1 * dv);
      }
    }
    if constexpr (!kBackward) {
      focal += vec::hsum<acc_t>(vfocal);
      inter += vec::hsum<acc_t>(vinter);
      prob += vec::hsum<acc_t>(vprob);
      count += vec::hsum<acc_t>(vcount);
    }
  }
  if constexpr (kBackward) {
    interpolate_columns_transposed(a, G, a.out + p * a.h * a.w);
  } else {
    a.out[p] = static_cast<acc_t>(focal);
    a.out[a.P + p] = static_cast<acc_t>(inter);
    a.out[2 * a.P + p] = static_cast<acc_t>(prob);
    a.out[3 * a.P + p] = static_cast<acc_t>(count);
  }
}

template <int B, bool kBackward, typename acc_t>
OTSEG_VEC_INLINE void mask_stats_chunk(const MaskStatsArgs<acc_t>& a) {
  std::vector<acc_t> buf((kBackward ? 2 : 1) * a.h * a.Wp);
  const bool gamma2 = a.gamma == acc_t(2);
  for (int64_t p = a.begin; p < a.end; ++p) {
    if (gamma2)
      mask_stats_one<B, kBackward, true>(a, p, buf.data());
    else
      mask_stats_one<B, kBackward, false>(a, p, buf.data());
  }
}

}  // namespace
}  // namespace cpu
}  // namespace otseg
