// The CPU kernels compiled for the compiler's baseline (mps_cpu.h): SSE2, 4
// floats a vector, on x86-64, where the wider sets have their own units;
// elsewhere the widest vectors the compiler flags allow.
#include "mask_stats_cpu_kernels.h"
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

OTSEG_CPU_DEFINE_ENTRY_POINTS(baseline, , kBaselineBytes)
OTSEG_MASK_STATS_DEFINE_ENTRY_POINTS(baseline, , kBaselineBytes)

}  // namespace cpu
}  // namespace otseg
