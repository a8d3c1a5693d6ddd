// The CPU kernels compiled for AVX-512 (x86-64-v4, 16 floats a vector) (mps_cpu.h).
#include "mask_stats_cpu_kernels.h"
#include "mps_cpu_kernels.h"

#ifdef OTSEG_X86_DISPATCH
namespace otseg {
namespace cpu {

OTSEG_CPU_DEFINE_ENTRY_POINTS(avx512, OTSEG_TARGET("arch=x86-64-v4"), 64)
OTSEG_MASK_STATS_DEFINE_ENTRY_POINTS(avx512, OTSEG_TARGET("arch=x86-64-v4"), 64)

}  // namespace cpu
}  // namespace otseg
#endif
