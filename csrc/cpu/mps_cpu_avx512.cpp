// The CPU kernels compiled for AVX-512 (x86-64-v4, 16 floats a vector) (mps_cpu.h).
#include "mps_cpu_kernels.h"

#ifdef OTSEG_X86_DISPATCH
namespace otseg {
namespace cpu {

template <typename scalar_t, typename acc_t>
OTSEG_TARGET("arch=x86-64-v4") bool forward_avx512(const ForwardArgs<scalar_t, acc_t>& a) {
  return forward_chunk<64>(a);
}
template <typename scalar_t, typename acc_t>
OTSEG_TARGET("arch=x86-64-v4") void backward_avx512(const BackwardArgs<scalar_t, acc_t>& a) {
  backward_chunk<64>(a);
}
OTSEG_CPU_ENTRY_POINTS(avx512)

}  // namespace cpu
}  // namespace otseg
#endif
