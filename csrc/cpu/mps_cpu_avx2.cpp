// The CPU kernels compiled for AVX2 + FMA (x86-64-v3, 8 floats a vector) (mps_cpu.h).
#include "mask_stats_cpu_kernels.h"
#include "mps_cpu_kernels.h"

#ifdef OTSEG_X86_DISPATCH
namespace otseg {
namespace cpu {

OTSEG_CPU_DEFINE_ENTRY_POINTS(avx2, OTSEG_TARGET("arch=x86-64-v3"), 32)
OTSEG_MASK_STATS_DEFINE_ENTRY_POINTS(avx2, OTSEG_TARGET("arch=x86-64-v3"), 32)

}  // namespace cpu
}  // namespace otseg
#endif
