// The fused CPU kernel of the segmentation loss's per-mask sums (focal, dice)
// of bilinearly upsampled logits: arguments and entry points, one per
// instruction set, compiled in the same translation units as the Sinkhorn's
// (mps_cpu_<isa>.cpp, from the templates of mask_stats_cpu_kernels.h);
// mask_stats_cpu.cpp registers the operators.
#pragma once

#include <cstdint>

#include "mps_cpu.h"

namespace otseg {
namespace cpu {

// Per mask p = (b, k) of P = B*K: the logits [h, w] upsampled bilinearly
// (align_corners=False) to the labels' [H, W] through the row tables
// (y0, y1, ly: output row i reads input rows y0[i], y1[i] with weights
// 1 - ly[i], ly[i]) and the column tables (x0, x1, lx). Labels are compact:
// the class index, or -1 for ignored pixels and for the padding of each row
// to Wp (a multiple of 16) columns.
template <typename acc_t>
struct MaskStatsArgs {
  const acc_t* logits;    // [P, h, w], contiguous
  const int16_t* labels;  // [B, H, Wp]
  int64_t K, h, w, H, W, Wp;
  const int32_t *y0, *y1, *x0, *x1;
  const acc_t *ly, *lx;
  acc_t alpha_pos, alpha_neg, gamma;
  const acc_t* grad_stats;  // backward: [4, P] upstream gradients (the count's is unused)
  acc_t* out;               // forward: stats [4, P] (focal, sum p y, sum p, sum y); backward: [P, h, w]
  int64_t P, begin, end;    // the masks [begin, end) of this call
};

#ifdef OTSEG_X86_DISPATCH
template <typename acc_t>
OTSEG_TARGET("arch=x86-64-v4") void mask_stats_forward_avx512(const MaskStatsArgs<acc_t>& a);
template <typename acc_t>
OTSEG_TARGET("arch=x86-64-v4") void mask_stats_backward_avx512(const MaskStatsArgs<acc_t>& a);
template <typename acc_t>
OTSEG_TARGET("arch=x86-64-v3") void mask_stats_forward_avx2(const MaskStatsArgs<acc_t>& a);
template <typename acc_t>
OTSEG_TARGET("arch=x86-64-v3") void mask_stats_backward_avx2(const MaskStatsArgs<acc_t>& a);
#endif
template <typename acc_t>
void mask_stats_forward_baseline(const MaskStatsArgs<acc_t>& a);
template <typename acc_t>
void mask_stats_backward_baseline(const MaskStatsArgs<acc_t>& a);

// One instruction set's entry points of the mask statistics (as
// OTSEG_CPU_DEFINE_ENTRY_POINTS for the Sinkhorn), for float and double.
#define OTSEG_MASK_STATS_DEFINE_ENTRY_POINTS(isa, target, B)                                      \
  template <typename acc_t>                                                                       \
  target void mask_stats_forward_##isa(const MaskStatsArgs<acc_t>& a) {                          \
    mask_stats_chunk<B, false>(a);                                                                \
  }                                                                                               \
  template <typename acc_t>                                                                       \
  target void mask_stats_backward_##isa(const MaskStatsArgs<acc_t>& a) {                         \
    mask_stats_chunk<B, true>(a);                                                                 \
  }                                                                                               \
  template void mask_stats_forward_##isa(const MaskStatsArgs<float>& a);                         \
  template void mask_stats_forward_##isa(const MaskStatsArgs<double>& a);                        \
  template void mask_stats_backward_##isa(const MaskStatsArgs<float>& a);                        \
  template void mask_stats_backward_##isa(const MaskStatsArgs<double>& a);

}  // namespace cpu
}  // namespace otseg
