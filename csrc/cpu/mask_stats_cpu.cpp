// The segmentation loss's per-mask sums on the CPU, fused with the bilinear
// upsampling of the logits: the operators otseg::mask_stats and
// otseg::mask_stats_backward (argument checks, label and interpolation
// tables, one parallel region per call). The kernels are in
// mask_stats_cpu_kernels.h; the Python side is otseg/ops/mask_stats.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../common/checks.h"
#include "mask_stats_cpu.h"

namespace otseg {
namespace {

using cpu::MaskStatsArgs;

// Bilinear interpolation (align_corners=False) from `in` to `out` samples,
// as torch's upsample_bilinear2d computes it: output o reads i0[o] and i1[o]
// with weights 1 - l1[o], l1[o].
template <typename acc_t>
struct Axis {
  std::vector<int32_t> i0, i1;
  std::vector<acc_t> l1;

  Axis(int64_t in, int64_t out) : i0(out), i1(out), l1(out) {
    const double scale = static_cast<double>(in) / static_cast<double>(out);
    for (int64_t o = 0; o < out; ++o) {
      const double src = std::max((static_cast<double>(o) + 0.5) * scale - 0.5, 0.0);
      const int64_t lo = std::min<int64_t>(static_cast<int64_t>(src), in - 1);
      i0[o] = static_cast<int32_t>(lo);
      i1[o] = static_cast<int32_t>(lo < in - 1 ? lo + 1 : lo);
      l1[o] = static_cast<acc_t>(src - static_cast<double>(lo));
    }
  }
};

constexpr int64_t kRowAlign = 16;  // lanes of the widest vector of floats

struct Inputs {
  at::Tensor logits;  // [B, K, h, w] contiguous
  at::Tensor labels;  // [B, H, Wp] int16: class or -1
  int64_t B, K, h, w, H, W, Wp;
};

Inputs check_inputs(const at::Tensor& logits, const at::Tensor& labels, double alpha, double gamma,
                    int64_t ignore_index) {
  OTSEG_CHECK(logits.device().is_cpu() && labels.device().is_cpu(), "mask_stats (cpu): logits and labels must be "
              "CPU tensors, got ", logits.device(), " and ", labels.device());
  OTSEG_CHECK_VALUE(logits.dim() == 4, "logits must have shape [B, K, h, w], got ", logits.sizes());
  OTSEG_CHECK_VALUE(labels.dim() == 3 && labels.size(0) == logits.size(0), "labels must have shape [B, H, W] with B = ",
                    logits.size(0), ", got ", labels.sizes());
  OTSEG_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
                   "mask_stats (cpu) takes float32 or float64 logits, got ", logits.scalar_type());
  OTSEG_CHECK_TYPE(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
                   "labels must be an integer tensor of class indices, got ", labels.scalar_type());
  OTSEG_CHECK_VALUE(std::isfinite(gamma) && gamma >= 0, "gamma must be finite and >= 0, got ", gamma);
  OTSEG_CHECK_VALUE(std::isfinite(alpha), "alpha must be finite (negative: no weighting), got ", alpha);
  Inputs in;
  in.B = logits.size(0), in.K = logits.size(1), in.h = logits.size(2), in.w = logits.size(3);
  in.H = labels.size(1), in.W = labels.size(2);
  OTSEG_CHECK_VALUE(in.K < std::numeric_limits<int16_t>::max(), "mask_stats (cpu) takes at most ",
                    std::numeric_limits<int16_t>::max() - 1, " classes, got K = ", in.K);
  OTSEG_CHECK_VALUE(in.B * in.K * in.H * in.W == 0 || (in.h > 0 && in.w > 0),
                    "logits have an empty grid ", logits.sizes(), " for labels of size ", labels.sizes());
  in.Wp = (in.W + kRowAlign - 1) / kRowAlign * kRowAlign;
  in.logits = logits.contiguous();
  in.labels = at::empty({in.B, in.H, in.Wp}, labels.options().dtype(at::kShort));
  const at::Tensor src = labels.to(at::kLong).contiguous();
  const int64_t* s = src.const_data_ptr<int64_t>();
  int16_t* d = in.labels.mutable_data_ptr<int16_t>();
  int64_t bad = 0;
  bool found_bad = false;
  for (int64_t row = 0; row < in.B * in.H; ++row) {
    for (int64_t c = 0; c < in.W; ++c) {
      const int64_t v = s[row * in.W + c];
      const bool ignored = v == ignore_index, in_range = v >= 0 && v < in.K;
      if (!ignored && !in_range && !found_bad) {
        found_bad = true;
        bad = v;
      }
      d[row * in.Wp + c] = !ignored && in_range ? static_cast<int16_t>(v) : int16_t(-1);
    }
    std::fill(d + row * in.Wp + in.W, d + (row + 1) * in.Wp, int16_t(-1));
  }
  OTSEG_CHECK_VALUE(!found_bad, "labels must be class indices in [0, ", in.K, ") or ignore_index=", ignore_index,
                    ", found ", bad);
  return in;
}

template <typename acc_t>
void run(const MaskStatsArgs<acc_t>& a, bool backward) {
  switch (cpu::cpu_isa()) {
#ifdef OTSEG_X86_DISPATCH
    case cpu::Isa::avx512:
      return backward ? cpu::mask_stats_backward_avx512(a) : cpu::mask_stats_forward_avx512(a);
    case cpu::Isa::avx2:
      return backward ? cpu::mask_stats_backward_avx2(a) : cpu::mask_stats_forward_avx2(a);
#endif
    default:
      return backward ? cpu::mask_stats_backward_baseline(a) : cpu::mask_stats_forward_baseline(a);
  }
}

// The forward (grad_stats undefined: stats [4, B, K]) or the backward (the
// gradient [B, K, h, w] of the logits).
at::Tensor mask_stats_impl(const at::Tensor& grad_stats, const at::Tensor& logits, const at::Tensor& labels,
                           double alpha, double gamma, int64_t ignore_index) {
  const Inputs in = check_inputs(logits, labels, alpha, gamma, ignore_index);
  const bool backward = grad_stats.defined();
  const int64_t P = in.B * in.K;
  at::Tensor out = backward ? at::empty(in.logits.sizes(), in.logits.options())
                            : at::empty({4, in.B, in.K}, in.logits.options());
  at::Tensor gs;
  if (backward) {
    OTSEG_CHECK_VALUE(grad_stats.sizes() == at::IntArrayRef({4, in.B, in.K}), "grad_stats must have shape [4, ",
                      in.B, ", ", in.K, "], got ", grad_stats.sizes());
    gs = grad_stats.to(in.logits.scalar_type()).contiguous();
  }
  if (in.H * in.W == 0 || P == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES(in.logits.scalar_type(), "mask_stats_cpu", [&] {
    using acc_t = scalar_t;
    const Axis<acc_t> rows(in.h, in.H), cols(in.w, in.W);
    const bool weighted = alpha >= 0;
    MaskStatsArgs<acc_t> args{};
    args.logits = in.logits.const_data_ptr<acc_t>();
    args.labels = in.labels.const_data_ptr<int16_t>();
    args.K = in.K, args.h = in.h, args.w = in.w, args.H = in.H, args.W = in.W, args.Wp = in.Wp;
    args.y0 = rows.i0.data(), args.y1 = rows.i1.data(), args.ly = rows.l1.data();
    args.x0 = cols.i0.data(), args.x1 = cols.i1.data(), args.lx = cols.l1.data();
    args.alpha_pos = static_cast<acc_t>(weighted ? alpha : 1.0);
    args.alpha_neg = static_cast<acc_t>(weighted ? 1.0 - alpha : 1.0);
    args.gamma = static_cast<acc_t>(gamma);
    args.grad_stats = backward ? gs.const_data_ptr<acc_t>() : nullptr;
    args.out = out.mutable_data_ptr<acc_t>();
    args.P = P;
    at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
      MaskStatsArgs<acc_t> chunk = args;
      chunk.begin = begin, chunk.end = end;
      run(chunk, backward);
    });
  });
  return out;
}

at::Tensor mask_stats_cpu(const at::Tensor& logits, const at::Tensor& labels, double alpha, double gamma,
                          int64_t ignore_index) {
  return mask_stats_impl(at::Tensor(), logits, labels, alpha, gamma, ignore_index);
}

at::Tensor mask_stats_backward_cpu(const at::Tensor& grad_stats, const at::Tensor& logits, const at::Tensor& labels,
                                   double alpha, double gamma, int64_t ignore_index) {
  return mask_stats_impl(grad_stats, logits, labels, alpha, gamma, ignore_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(otseg, CPU, m) {
  m.impl("mask_stats", &mask_stats_cpu);
  m.impl("mask_stats_backward", &mask_stats_backward_cpu);
}

}  // namespace otseg
