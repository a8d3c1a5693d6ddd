// The CPU kernels compiled for AVX2 + FMA (x86-64-v3, 8 floats a vector) (mps_cpu.h).
#include "mps_cpu_kernels.h"

#ifdef OTSEG_X86_DISPATCH
namespace otseg {
namespace cpu {

template <typename scalar_t, typename acc_t>
OTSEG_TARGET("arch=x86-64-v3") bool forward_avx2(const ForwardArgs<scalar_t, acc_t>& a) {
  return forward_chunk<32>(a);
}
template <typename scalar_t, typename acc_t>
OTSEG_TARGET("arch=x86-64-v3") void backward_avx2(const BackwardArgs<scalar_t, acc_t>& a) {
  backward_chunk<32>(a);
}
OTSEG_CPU_ENTRY_POINTS(avx2)

}  // namespace cpu
}  // namespace otseg
#endif
