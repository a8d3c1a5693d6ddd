// The fused CPU kernel's entry points: one per instruction set, each in its
// own translation unit (mps_cpu_avx512.cpp, mps_cpu_avx2.cpp,
// mps_cpu_baseline.cpp, all built from the templates of mps_cpu_kernels.h),
// so that a parallel build compiles them side by side; mps_cpu.cpp picks one
// at run time and registers the operators.
#pragma once

#include <atomic>
#include <cstdint>
#include <type_traits>

// The kernels are compiled for AVX-512 (B = 64 bytes), AVX2 + FMA (B = 32)
// and the x86-64 baseline (B = 16), and the widest this CPU has runs: one
// binary runs everywhere and uses the widest vectors there.
// (-DOTSEG_NO_MULTIVERSION builds only the baseline entry point for the
// compiler's -march, to test another ISA's code on this machine.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(OTSEG_NO_MULTIVERSION)
#define OTSEG_X86_DISPATCH 1
#define OTSEG_TARGET(arch) __attribute__((target(arch)))
#else
#define OTSEG_TARGET(arch)
#endif

namespace otseg {
namespace cpu {

// The instruction set whose entry points run: the widest this CPU supports,
// or a narrower one named by OTSEG_CPU_ISA (mps_cpu.cpp).
enum class Isa { avx512, avx2, baseline };
Isa cpu_isa();

// Half-precision inputs compute in float; float32 and float64 in their own type.
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t, typename acc_t>
struct ForwardArgs {
  const scalar_t* S;
  int64_t sP, sM, sN, M, N;
  acc_t eps;
  int64_t max_iter;
  acc_t tol;
  bool check_finite;
  scalar_t* score;
  scalar_t* plan;  // nullptr: no plan
  acc_t *f, *g;
  int32_t* n_iter;
  int64_t P, threads;          // problems, threads of the parallel region
  std::atomic<int64_t>* next;  // the next problem nobody has taken
};

template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  const scalar_t *dscore, *dplan;  // either may be nullptr
  int64_t dpP, dpM, dpN;
  const scalar_t* S;
  int64_t sP, sM, sN, M, N;
  const acc_t *f, *g;
  acc_t eps;
  scalar_t* out;
  int64_t P, threads;          // problems, threads of the parallel region
  std::atomic<int64_t>* next;  // the next problem nobody has taken
};

// A batch of problems for the threads of one parallel region; each thread
// calls one entry point, which takes problems until none is left. forward_*
// returns false if a problem's scores held NaN or inf (with check_finite).
#ifdef OTSEG_X86_DISPATCH
template <typename scalar_t, typename acc_t>
OTSEG_TARGET("arch=x86-64-v4") bool forward_avx512(const ForwardArgs<scalar_t, acc_t>& a);
template <typename scalar_t, typename acc_t>
OTSEG_TARGET("arch=x86-64-v4") void backward_avx512(const BackwardArgs<scalar_t, acc_t>& a);
template <typename scalar_t, typename acc_t>
OTSEG_TARGET("arch=x86-64-v3") bool forward_avx2(const ForwardArgs<scalar_t, acc_t>& a);
template <typename scalar_t, typename acc_t>
OTSEG_TARGET("arch=x86-64-v3") void backward_avx2(const BackwardArgs<scalar_t, acc_t>& a);
#endif
template <typename scalar_t, typename acc_t>
bool forward_baseline(const ForwardArgs<scalar_t, acc_t>& a);
template <typename scalar_t, typename acc_t>
void backward_baseline(const BackwardArgs<scalar_t, acc_t>& a);

// One instruction set's entry points (B-byte vectors, compiled with
// `target`), defined and instantiated in its translation unit for every input
// type the operators dispatch on; forward_chunk and backward_chunk are the
// kernels' (mps_cpu_kernels.h).
#define OTSEG_CPU_DEFINE_ENTRY_POINTS(isa, target, B)                    \
  template <typename scalar_t, typename acc_t>                           \
  target bool forward_##isa(const ForwardArgs<scalar_t, acc_t>& a) {     \
    return forward_chunk<B>(a);                                          \
  }                                                                      \
  template <typename scalar_t, typename acc_t>                           \
  target void backward_##isa(const BackwardArgs<scalar_t, acc_t>& a) {   \
    backward_chunk<B>(a);                                                \
  }                                                                      \
  OTSEG_CPU_ENTRY_POINTS(isa)

#define OTSEG_CPU_ENTRY_POINTS_FOR(isa, scalar_t)                                          \
  template bool forward_##isa(const ForwardArgs<scalar_t, acc_type_t<scalar_t>>& a); \
  template void backward_##isa(const BackwardArgs<scalar_t, acc_type_t<scalar_t>>& a);
#define OTSEG_CPU_ENTRY_POINTS(isa)              \
  OTSEG_CPU_ENTRY_POINTS_FOR(isa, float)         \
  OTSEG_CPU_ENTRY_POINTS_FOR(isa, double)        \
  OTSEG_CPU_ENTRY_POINTS_FOR(isa, c10::Half)     \
  OTSEG_CPU_ENTRY_POINTS_FOR(isa, c10::BFloat16)

}  // namespace cpu
}  // namespace otseg
