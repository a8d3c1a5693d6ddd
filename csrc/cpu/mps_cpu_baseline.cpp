// The CPU kernels compiled for the compiler's baseline (mps_cpu.h): SSE2, 4
// floats a vector, on x86-64, where the wider sets have their own units;
// elsewhere the widest vectors the compiler flags allow.
#include "mps_cpu_kernels.h"

namespace otseg {
namespace cpu {

#ifdef OTSEG_X86_DISPATCH
constexpr int kBaselineBytes = 16;  // SSE2, part of every x86-64 CPU
#elif defined(__AVX512F__)
constexpr int kBaselineBytes = 64;
#elif defined(__AVX2__) || defined(__AVX__)
constexpr int kBaselineBytes = 32;
#else
constexpr int kBaselineBytes = 16;  // SSE2, NEON
#endif

template <typename scalar_t, typename acc_t>
bool forward_baseline(const ForwardArgs<scalar_t, acc_t>& a) {
  return forward_chunk<kBaselineBytes>(a);
}
template <typename scalar_t, typename acc_t>
void backward_baseline(const BackwardArgs<scalar_t, acc_t>& a) {
  backward_chunk<kBaselineBytes>(a);
}
OTSEG_CPU_ENTRY_POINTS(baseline)

}  // namespace cpu
}  // namespace otseg
