// Fused Multi-Prompts Sinkhorn on the CPU: the kernels, as templates on the
// vector width, included by the one translation unit per instruction set
// that compiles them (mps_cpu_avx512.cpp, ...; see mps_cpu.h). Everything
// here has internal linkage, so that no function compiled for one
// instruction set is shared with (or chosen by the linker for) another.
//
// Each (b, k) problem is solved by one thread from start to finish while its
// M x N tile sits in cache: S is read once, every iteration and the
// per-problem stopping test run on the tile, and the refined score (and the
// plan when asked) is written once. Threads (at::parallel_for) take problems
// one at a time from a shared counter. The inner loop runs in the scaling
// domain (two matrix-vector products per iteration, no exp) with log-domain
// absorption; see otseg/ops/mps/README.md for the scheme and the backward
// derivation.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/fast_math.h"
#include "../common/gauge_solve.h"
#include "mps_cpu.h"
#include "vec.h"

// Every kernel below is a template on the vector width B (bytes) and is
// force-inlined into the entry point of one instruction set, compiled for
// that set with its register width (mps_cpu.h).
#define OTSEG_INLINE inline __attribute__((always_inline))

namespace otseg {
namespace cpu {
namespace {

// Scalings leaving [e^-kAbsorb, e^kAbsorb] are absorbed into the log
// potentials and the kernel matrix is rebuilt in the log domain. Entries of the
// rebuilt kernel are at most 1, so products K*u*v stay far from overflow, and
// an entry that underflowed (< e^-87 in float) carries a plan mass below
// e^(2*30-87) ~ 1e-12 relative to the marginals.
constexpr double kAbsorb = 30.0;

template <typename acc_t, int B>
using VecOf = typename vec::Vec<acc_t, B>::V;

// Lanes of the widest vector: tiles and per-lane buffers are laid out for it,
// which also suits every narrower one.
template <typename acc_t>
constexpr int kMaxLanes = 64 / static_cast<int>(sizeof(acc_t));

// The prompt counts with code specialised at compile time (registers sized
// for them, unrolled transpositions): calls f(std::integral_constant<int, NC>)
// with NC = N for N = 6, 8, 16, else with NC = 0 (the general code). The
// lambdas passed here are force-inlined (OTSEG_LAMBDA_INLINE): a lambda left
// out of line would be compiled for the baseline ISA, not the entry point's.
#define OTSEG_LAMBDA_INLINE __attribute__((always_inline))
template <typename F>
OTSEG_INLINE decltype(auto) with_prompt_count(int64_t N, F&& f) {
  switch (N) {
    case 6:
      return f(std::integral_constant<int, 6>{});
    case 8:
      return f(std::integral_constant<int, 8>{});
    case 16:
      return f(std::integral_constant<int, 16>{});
    default:
      return f(std::integral_constant<int, 0>{});
  }
}

// Leading dimension of the transposed tiles: M rounded up to whole vectors,
// plus one vector so that the N rows of a tile do not map to the same cache
// sets (M = 1024 floats is exactly 4 KiB).
template <typename acc_t>
int64_t tile_ld(int64_t M) {
  constexpr int64_t W = kMaxLanes<acc_t>;
  return ((M + W - 1) / W) * W + W;
}

// Software prefetch (into L2) of a range, a few cache lines per block of
// pixels while a problem computes. A large batch does not fit in the caches,
// so each problem's first pass would wait on memory: the hardware prefetcher
// follows the reads within a problem but does not run ahead into the next
// one. The forward prefetches the next problem's scores while it iterates
// (coco clip, 21 MB of scores, 1 thread: 1.49 -> 1.25 ns per element); the
// backward, the rows it will write and the next problem's scores. Only
// problems stored as one contiguous range (contiguous rows) are prefetched,
// and scores only when the batch's scores exceed kPrefetchScoresAbove: smaller
// batches stay in the caches (on the 2-core machine, prefetching voc clip's
// 1.9 MB cost 2% of the forward and 3% of the backward).
constexpr int64_t kPrefetchScoresAbove = int64_t(4) << 20;  // bytes

class Prefetch {
 public:
  // Cover `bytes` from `base` (nullptr: nothing) in about `blocks` calls of step().
  void reset(const void* base, int64_t bytes, int64_t blocks) {
    p_ = static_cast<const char*>(base);
    left_ = base == nullptr ? 0 : (bytes + 63) / 64;
    per_block_ = blocks > 0 ? (left_ + blocks - 1) / blocks : left_;
  }
  OTSEG_INLINE void step() {
    for (int64_t i = 0; i < per_block_ && left_ > 0; ++i, --left_, p_ += 64) __builtin_prefetch(p_, 0, 2);
  }

 private:
  const char* p_ = nullptr;
  int64_t left_ = 0, per_block_ = 0;
};

template <typename acc_t>
struct ForwardWorkspace {
  static constexpr int W = kMaxLanes<acc_t>;
  int64_t ld;
  // Transposed tiles [N, ld]: the scores S and the kernel K (zero padding).
  vec::Buffer<acc_t> St, K;
  // Per pixel [ld]: absorbed potential alpha (in units of eps), scaling u, the
  // full potential f/eps of the previous and of the current iteration.
  vec::Buffer<acc_t> alpha, u, f_prev, f_new;
  // [N, W]: per-lane column sums, and one block of outputs before it is
  // written row-major.
  vec::Buffer<acc_t> zacc, blk;
  // Per prompt [N]: absorbed potential beta (in units of eps), scaling v, and
  // the column products K^T u.
  std::vector<acc_t> beta, v, z;
  acc_t inv_eps = 1;
  Prefetch next;  // the next problem's scores

  ForwardWorkspace(int64_t M, int64_t N)
      : ld(tile_ld<acc_t>(M)), St(ld * N), K(ld * N), alpha(ld), u(ld), f_prev(ld), f_new(ld), zacc(N * W),
        blk(N * W), beta(N), v(N), z(N) {}
};

// Rows [rows, NC] (row stride sM, contiguous) into columns dst[n * ld + r].
template <int NC, typename scalar_t, typename acc_t>
OTSEG_INLINE void rows_to_columns(const scalar_t* __restrict src, int64_t sM, int rows,
                                                           acc_t* __restrict dst, int64_t ld) {
  for (int r = 0; r < rows; ++r)
    for (int n = 0; n < NC; ++n) dst[n * ld + r] = static_cast<acc_t>(src[r * sM + n]);
}

// One block of W pixels of a problem's [M, N] input (any strides) into the
// transposed layout dst[n * ld + r], in the compute type; lanes past `rows`
// are set to 0.
template <int B, typename scalar_t, typename acc_t>
OTSEG_INLINE void load_block(const scalar_t* src, int64_t sM, int64_t sN, int rows,
                                                      int64_t N, acc_t* dst, int64_t ld) {
  constexpr int W = vec::Vec<acc_t, B>::W;
  if (sN == 1) {
    with_prompt_count(N, [&](auto nc) OTSEG_LAMBDA_INLINE {
      constexpr int NC = decltype(nc)::value;
      if constexpr (NC == 0) {
        for (int r = 0; r < rows; ++r)
          for (int64_t n = 0; n < N; ++n) dst[n * ld + r] = static_cast<acc_t>(src[r * sM + n]);
      } else {
#ifdef OTSEG_HAVE_SHUFFLES
        // A whole block of contiguous rows in the compute type: register shuffles.
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          if (sM == NC && rows == W) return vec::BlockTranspose<acc_t, NC, B>::rows_to_columns(src, dst, ld);
        }
#endif
        // Unrolled: NC sequential reads per row.
        rows_to_columns<NC>(src, sM, rows, dst, ld);
      }
    });
  } else {
    for (int64_t n = 0; n < N; ++n)
      for (int r = 0; r < rows; ++r) dst[n * ld + r] = static_cast<acc_t>(src[r * sM + n * sN]);
  }
  if (rows < W)
    for (int64_t n = 0; n < N; ++n)
      for (int r = rows; r < W; ++r) dst[n * ld + r] = acc_t(0);
}

// A block [NC, W] (lane stride 1) into `rows` contiguous rows of NC values.
template <int B, int NC, typename acc_t, typename scalar_t>
OTSEG_INLINE void columns_to_rows(const acc_t* __restrict src, int rows,
                                                           scalar_t* __restrict dst) {
  constexpr int W = vec::Vec<acc_t, B>::W;
  for (int r = 0; r < rows; ++r)
    for (int n = 0; n < NC; ++n) dst[r * NC + n] = static_cast<scalar_t>(src[n * W + r]);
}

// A block [N, W] (lane stride 1) into `rows` contiguous rows of N values, for
// the prompt counts without specialised code (the others go through
// store_columns from registers).
template <int B, typename acc_t, typename scalar_t>
OTSEG_INLINE void store_block(const acc_t* src, int rows, int64_t N, scalar_t* dst) {
  constexpr int W = vec::Vec<acc_t, B>::W;
  for (int r = 0; r < rows; ++r)
    for (int64_t n = 0; n < N; ++n) dst[r * N + n] = static_cast<scalar_t>(src[n * W + r]);
}

// NC column vectors (registers) of one block into `rows` contiguous rows of
// NC values: register shuffles for a whole block in the compute type, else
// through `via` ([NC, W]).
template <int B, int NC, typename acc_t, typename scalar_t>
OTSEG_INLINE void store_columns(const VecOf<acc_t, B>* cols, int rows, scalar_t* dst, acc_t* via) {
  constexpr int W = vec::Vec<acc_t, B>::W;
#ifdef OTSEG_HAVE_SHUFFLES
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (rows == W) return vec::BlockTranspose<acc_t, NC, B>::rows(cols, dst);
  }
#endif
  for (int n = 0; n < NC; ++n) vec::store(via + n * W, cols[n]);
  columns_to_rows<B, NC>(via, rows, dst);
}

// The f half-step in the log domain from beta (v = 1): alpha and K with
// K[n, m] = exp(alpha_m + beta_n - C[m, n]/eps), rows of K summing to mu, and
// the column sums z = K^T 1 for the g half-step; the summed |change| of the
// potential against f_prev into *change, and f_prev <- alpha. With S (the
// first iteration) it also reads the scores into St, block by block, so that
// every block is used from L1 while it is fresh. Returns false if
// check_finite and S holds NaN or inf.
template <int B, typename scalar_t, typename acc_t>
OTSEG_INLINE bool log_rows(ForwardWorkspace<acc_t>& w, int64_t M, int64_t N, const scalar_t* S, int64_t sM,
                                 int64_t sN, bool check_finite, acc_t* change) {
  using V = VecOf<acc_t, B>;
  constexpr int W = vec::Vec<acc_t, B>::W;
  const int64_t ld = w.ld;
  const acc_t ie = w.inv_eps, mu = acc_t(1) / acc_t(M), log_mu = -std::log(acc_t(M));
  acc_t* __restrict St = w.St.data();
  acc_t* __restrict K = w.K.data();
  acc_t* __restrict zacc = w.zacc.data();
  for (int64_t n = 0; n < N; ++n) vec::store(zacc + n * W, V{});
  V nonfinite = {}, total = {};
  // S is read one block ahead: the transposing scalar stores have retired by
  // the time the block is loaded as vectors (a vector load right after them
  // would stall on store forwarding).
  if (S != nullptr) load_block<B>(S, sM, sN, static_cast<int>(std::min<int64_t>(W, M)), N, St, ld);
  for (int64_t m0 = 0; m0 < M; m0 += W) {
    const int rows = static_cast<int>(std::min<int64_t>(W, M - m0));
    if (S != nullptr && m0 + W < M)
      load_block<B>(S + (m0 + W) * sM, sM, sN, static_cast<int>(std::min<int64_t>(W, M - m0 - W)), N, St + m0 + W, ld);
    const V valid = vec::first_lanes<V>(rows);
    // -C/eps = (S - 1)/eps, formed on the fly.
    V rmax = vec::splat<V>(-std::numeric_limits<acc_t>::infinity());
    for (int64_t n = 0; n < N; ++n) {
      const V s = vec::load<V>(St + n * ld + m0);
      // x * 0 is NaN exactly for NaN and inf.
      nonfinite += s * acc_t(0);
      rmax = vec::vmax(rmax, s * ie + (w.beta[n] - ie));
    }
    V rsum = {};
    for (int64_t n = 0; n < N; ++n) {
      const V k = vec::exp</*kNonPositive=*/true>(vec::load<V>(St + n * ld + m0) * ie + (w.beta[n] - ie) - rmax);
      vec::store(K + n * ld + m0, k);
      rsum += k;
    }
    const V a = (log_mu - rmax - vec::log(rsum)) * valid;
    const V scale = (mu / rsum) * valid;
    vec::store(w.alpha.data() + m0, a);
    total += vec::vabs(a - vec::load<V>(w.f_prev.data() + m0));
    vec::store(w.f_prev.data() + m0, a);
    for (int64_t n = 0; n < N; ++n) {
      const V k = vec::load<V>(K + n * ld + m0) * scale;
      vec::store(K + n * ld + m0, k);
      vec::store(zacc + n * W, vec::load<V>(zacc + n * W) + k);
    }
  }
  for (int64_t n = 0; n < N; ++n) w.z[n] = vec::hsum<acc_t>(vec::load<V>(zacc + n * W));
  *change = vec::hsum<acc_t>(total);
  return !check_finite || vec::hsum<acc_t>(nonfinite) == acc_t(0);
}

// U consecutive blocks of log_rows_n from pixel m0 (rows[u] valid rows in
// block u), written phase by phase so that the U blocks' dependency chains
// (row max, exponentials, row sums, log) interleave: one block alone is a
// chain about 200 cycles long that the out-of-order window cannot overlap
// with the next block's.
template <int B, int NC, int U, typename scalar_t, typename acc_t>
OTSEG_INLINE void log_rows_blocks(ForwardWorkspace<acc_t>& w, int64_t M, const scalar_t* S, int64_t sM, int64_t sN,
                                  int64_t m0, const acc_t* shift, bool check_finite, VecOf<acc_t, B>* zreg,
                                  VecOf<acc_t, B>& nonfinite, VecOf<acc_t, B>& total) {
  using V = VecOf<acc_t, B>;
  constexpr int W = vec::Vec<acc_t, B>::W;
  const int64_t ld = w.ld;
  const acc_t ie = w.inv_eps, mu = acc_t(1) / acc_t(M), log_mu = -std::log(acc_t(M));
  acc_t* __restrict St = w.St.data();
  acc_t* __restrict K = w.K.data();
  V s[U][NC];
  for (int u = 0; u < U; ++u) {
    const int64_t mb = m0 + u * W;
    const int rows = static_cast<int>(std::min<int64_t>(W, M - mb));
    bool in_registers = false;
#ifdef OTSEG_HAVE_SHUFFLES
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (S != nullptr && sN == 1 && sM == NC && rows == W) {
        vec::BlockTranspose<acc_t, NC, B>::columns(S + mb * sM, s[u]);
        for (int n = 0; n < NC; ++n) vec::store(St + n * ld + mb, s[u][n]);
        in_registers = true;
      }
    }
#endif
    if (!in_registers) {
      if (S != nullptr) load_block<B>(S + mb * sM, sM, sN, rows, NC, St + mb, ld);
      for (int n = 0; n < NC; ++n) s[u][n] = vec::load<V>(St + n * ld + mb);
    }
  }
  // -C/eps = (S - 1)/eps; x * 0 is NaN exactly for NaN and inf.
  V rmax[U], rsum[U];
  for (int u = 0; u < U; ++u) rmax[u] = vec::splat<V>(-std::numeric_limits<acc_t>::infinity());
  for (int n = 0; n < NC; ++n)
    for (int u = 0; u < U; ++u) {
      if (check_finite) nonfinite += s[u][n] * acc_t(0);
      s[u][n] = s[u][n] * ie + shift[n];
      rmax[u] = vec::vmax(rmax[u], s[u][n]);
    }
  for (int u = 0; u < U; ++u) rsum[u] = V{};
  for (int n = 0; n < NC; ++n)
    for (int u = 0; u < U; ++u) {
      s[u][n] = vec::exp</*kNonPositive=*/true>(s[u][n] - rmax[u]);
      rsum[u] += s[u][n];
    }
  for (int u = 0; u < U; ++u) {
    const int64_t mb = m0 + u * W;
    const V valid = vec::first_lanes<V>(static_cast<int>(std::min<int64_t>(W, M - mb)));
    const V a = (log_mu - rmax[u] - vec::log(rsum[u])) * valid;
    rsum[u] = (mu / rsum[u]) * valid;  // now the row scale
    vec::store(w.alpha.data() + mb, a);
    total += vec::vabs(a - vec::load<V>(w.f_prev.data() + mb));
    vec::store(w.f_prev.data() + mb, a);
  }
  for (int n = 0; n < NC; ++n)
    for (int u = 0; u < U; ++u) {
      const V k = s[u][n] * rsum[u];
      vec::store(K + n * ld + m0 + u * W, k);
      zreg[n] += k;
    }
}

// log_rows for a prompt count NC known at compile time, with the blocks'
// scores, exponentials and column sums in registers; whole blocks of
// contiguous rows are transposed by shuffles straight into registers. Two
// blocks at a time where the registers allow (NC <= 8).
template <int B, int NC, typename scalar_t, typename acc_t>
OTSEG_INLINE bool log_rows_n(ForwardWorkspace<acc_t>& w, int64_t M, const scalar_t* S, int64_t sM, int64_t sN,
                             bool check_finite, acc_t* change) {
  using V = VecOf<acc_t, B>;
  constexpr int W = vec::Vec<acc_t, B>::W;
  constexpr int U = NC <= 8 ? 2 : 1;
  const acc_t ie = w.inv_eps;
  acc_t shift[NC];
  for (int n = 0; n < NC; ++n) shift[n] = w.beta[n] - ie;
  V zreg[NC];
  for (int n = 0; n < NC; ++n) zreg[n] = V{};
  V nonfinite = {}, total = {};
  int64_t m0 = 0;
  for (; m0 + U * W <= M; m0 += U * W)
    log_rows_blocks<B, NC, U>(w, M, S, sM, sN, m0, shift, check_finite, zreg, nonfinite, total);
  for (; m0 < M; m0 += W)
    log_rows_blocks<B, NC, 1>(w, M, S, sM, sN, m0, shift, check_finite, zreg, nonfinite, total);
  for (int n = 0; n < NC; ++n) w.z[n] = vec::hsum<acc_t>(zreg[n]);
  *change = vec::hsum<acc_t>(total);
  return !check_finite || vec::hsum<acc_t>(nonfinite) == acc_t(0);
}

// The f half-step in the log domain: the register version for the usual
// prompt counts when the scores are contiguous rows in the compute type (or
// already loaded), else the general one.
template <int B, typename scalar_t, typename acc_t>
OTSEG_INLINE bool log_rows_any(ForwardWorkspace<acc_t>& w, int64_t M, int64_t N, const scalar_t* S, int64_t sM,
                               int64_t sN, bool check_finite, acc_t* change) {
  const bool fixed = S == nullptr || (std::is_same_v<scalar_t, acc_t> && sN == 1 && sM == N);
  return with_prompt_count(N, [&](auto nc) OTSEG_LAMBDA_INLINE {
    constexpr int NC = decltype(nc)::value;
    if constexpr (NC > 0) {
      if (fixed) return log_rows_n<B, NC>(w, M, S, sM, sN, check_finite, change);
    }
    return log_rows<B>(w, M, N, S, sM, sN, check_finite, change);
  });
}

// The g half-step in the log domain from alpha (u = 1): columns of K sum to nu.
template <typename acc_t>
OTSEG_INLINE void rebuild_cols(ForwardWorkspace<acc_t>& w, int64_t M, int64_t N, acc_t log_nu) {
  const acc_t* __restrict alpha = w.alpha.data();
  const acc_t nu = fast::exp(log_nu);
  const acc_t ie = w.inv_eps;
  for (int64_t n = 0; n < N; ++n) {
    const acc_t* __restrict st = w.St.data() + n * w.ld;
    acc_t* __restrict k = w.K.data() + n * w.ld;
    acc_t cmax = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : cmax)
    for (int64_t m = 0; m < M; ++m) cmax = std::max(cmax, st[m] * ie + alpha[m]);
    acc_t csum = 0;
    const acc_t shift = -cmax;  // max of alpha + S/eps; the -1/eps cancels here
#pragma omp simd reduction(+ : csum)
    for (int64_t m = 0; m < M; ++m) {
      k[m] = fast::exp(st[m] * ie + alpha[m] + shift);
      csum += k[m];
    }
    w.beta[n] = log_nu + ie - cmax - fast::log(csum);
    const acc_t s = nu / csum;
    for (int64_t m = 0; m < M; ++m) k[m] *= s;
  }
}

// v = nu / z for the column products z = K^T u; false when a scaling left
// the safe range (or z underflowed to 0, giving inf).
template <typename acc_t>
bool scale_cols(ForwardWorkspace<acc_t>& w, int64_t N, acc_t nu) {
  bool ok = true;
  for (int64_t n = 0; n < N; ++n) {
    const acc_t vn = nu / w.z[n];
    w.v[n] = vn;
    ok = ok && vn >= acc_t(std::exp(-kAbsorb)) && vn <= acc_t(std::exp(kAbsorb));
  }
  return ok;
}

// One whole iteration's products in a single sweep over K, W pixels at a
// time with the block's products in a register: u = mu / (K v), the new full
// potential alpha + log u into f_new with the summed |change| against f_prev
// into *change, and z = K^T u, accumulated per lane (in registers when the
// prompt count NC is a compile-time constant, else in memory) and reduced
// across lanes once. Returns false when u left the safe range (then f_new,
// *change and z are meaningless).
template <int B, int NC, typename acc_t>
OTSEG_INLINE bool sweep_n(ForwardWorkspace<acc_t>& w, int64_t M, int64_t N_any, acc_t* change) {
  using V = VecOf<acc_t, B>;
  constexpr int W = vec::Vec<acc_t, B>::W;
  const int64_t N = NC > 0 ? NC : N_any;
  const int64_t ld = w.ld;
  const acc_t mu = acc_t(1) / acc_t(M);
  const acc_t* __restrict K = w.K.data();
  const acc_t* __restrict v = w.v.data();
  acc_t* __restrict zacc = w.zacc.data();
  V zreg[NC > 0 ? NC : 1];
  if constexpr (NC > 0) {
    for (int n = 0; n < NC; ++n) zreg[n] = V{};
  } else {
    for (int64_t n = 0; n < N; ++n) vec::store(zacc + n * W, V{});
  }
  V lo = vec::splat<V>(std::numeric_limits<acc_t>::infinity()), hi = {}, total = {};
  for (int64_t m0 = 0; m0 < M; m0 += W) {
    const V valid = vec::first_lanes<V>(static_cast<int>(std::min<int64_t>(W, M - m0)));
    // 1 in the padding lanes, where K v = 0: u = mu there, masked to 0 after.
    const V pad = acc_t(1) - valid;
    w.next.step();
    V kv = vec::load<V>(K + m0) * v[0];
    for (int64_t n = 1; n < N; ++n) kv += vec::load<V>(K + n * ld + m0) * v[n];
    const V u_all = mu / (kv + pad);
    const V um = u_all * valid;
    lo = vec::vmin(lo, u_all);
    hi = vec::vmax(hi, u_all);
    vec::store(w.u.data() + m0, um);
    const V a = (vec::load<V>(w.alpha.data() + m0) + vec::log(u_all)) * valid;
    total += vec::vabs(a - vec::load<V>(w.f_prev.data() + m0));
    vec::store(w.f_new.data() + m0, a);
    if constexpr (NC > 0) {
      for (int n = 0; n < NC; ++n) zreg[n] += vec::load<V>(K + n * ld + m0) * um;
    } else {
      for (int64_t n = 0; n < N; ++n)
        vec::store(zacc + n * W, vec::load<V>(zacc + n * W) + vec::load<V>(K + n * ld + m0) * um);
    }
  }
  for (int64_t n = 0; n < N; ++n)
    w.z[n] = vec::hsum<acc_t>(NC > 0 ? zreg[NC > 0 ? n : 0] : vec::load<V>(zacc + n * W));
  *change = vec::hsum<acc_t>(total);
  return vec::hmin<acc_t>(lo) >= acc_t(std::exp(-kAbsorb)) && vec::hmax<acc_t>(hi) <= acc_t(std::exp(kAbsorb));
}

template <int B, typename acc_t>
OTSEG_INLINE bool sweep(ForwardWorkspace<acc_t>& w, int64_t M, int64_t N, acc_t* change) {
  return with_prompt_count(
      N, [&](auto nc) OTSEG_LAMBDA_INLINE { return sweep_n<B, decltype(nc)::value>(w, M, N, change); });
}

// Refined score M*N*u_m*sum_n K[n, m] v_n S[m, n], and the plan u_m K[n, m] v_n,
// for a prompt count NC known at compile time (NC = 0: any N, the plan
// through the block buffer).
template <int B, int NC, typename scalar_t, typename acc_t>
OTSEG_INLINE void write_outputs_n(ForwardWorkspace<acc_t>& w, int64_t M, int64_t N_any, scalar_t* score,
                                  scalar_t* plan) {
  using V = VecOf<acc_t, B>;
  constexpr int W = vec::Vec<acc_t, B>::W;
  const int64_t N = NC > 0 ? NC : N_any;
  const int64_t ld = w.ld;
  const acc_t* __restrict K = w.K.data();
  const acc_t* __restrict St = w.St.data();
  const acc_t* __restrict v = w.v.data();
  acc_t* __restrict blk = w.blk.data();
  const acc_t scale = acc_t(M) * acc_t(N);
  for (int64_t m0 = 0; m0 < M; m0 += W) {
    const int rows = static_cast<int>(std::min<int64_t>(W, M - m0));
    const V um = vec::load<V>(w.u.data() + m0);
    w.next.step();
    V acc = {};
    for (int64_t n = 0; n < N; ++n) acc += vec::load<V>(K + n * ld + m0) * vec::load<V>(St + n * ld + m0) * v[n];
    vec::store_partial(score + m0, scale * um * acc, rows);
    if (plan == nullptr) continue;
    if constexpr (NC > 0) {
      V p[NC];
      for (int n = 0; n < NC; ++n) p[n] = um * vec::load<V>(K + n * ld + m0) * v[n];
      store_columns<B, NC>(p, rows, plan + m0 * NC, blk);
    } else {
      for (int64_t n = 0; n < N; ++n) vec::store(blk + n * W, um * vec::load<V>(K + n * ld + m0) * v[n]);
      store_block<B>(blk, rows, N, plan + m0 * N);
    }
  }
}

template <int B, typename scalar_t, typename acc_t>
OTSEG_INLINE void write_outputs(ForwardWorkspace<acc_t>& w, int64_t M, int64_t N, scalar_t* score, scalar_t* plan) {
  with_prompt_count(N, [&](auto nc) OTSEG_LAMBDA_INLINE {
    write_outputs_n<B, decltype(nc)::value>(w, M, N, score, plan);
  });
}

// One problem from S to outputs. Returns false (writing nothing) if S holds
// NaN or inf and check_finite is set.
template <int B, typename scalar_t, typename acc_t>
OTSEG_INLINE bool forward_problem(const scalar_t* S, int64_t sM, int64_t sN, int64_t M, int64_t N, acc_t eps,
                     int64_t max_iter, acc_t tol, bool check_finite, scalar_t* score, scalar_t* plan,
                     acc_t* f_out, acc_t* g_out, int32_t* n_iter_out, ForwardWorkspace<acc_t>& w) {
  w.inv_eps = acc_t(1) / eps;
  const acc_t log_nu = -std::log(acc_t(N)), nu = acc_t(1) / acc_t(N);
  std::fill(w.beta.begin(), w.beta.end(), acc_t(0));
  std::fill(w.v.begin(), w.v.end(), acc_t(1));
  std::fill_n(w.f_prev.data(), w.ld, acc_t(0));

  int64_t it = 0;
  bool have_kernel = false;
  while (it < max_iter) {
    ++it;
    acc_t change = 0;
    if (have_kernel && sweep<B>(w, M, N, &change)) {
      // The common case: one sweep over K. alpha + log u is the new f/eps.
      w.f_prev.swap(w.f_new);
      if (!scale_cols(w, N, nu)) {
        // Absorb u (alpha + log u is in f_prev) and redo the g half-step in
        // the log domain.
        std::copy_n(w.f_prev.data(), M, w.alpha.data());
        rebuild_cols(w, M, N, log_nu);
        std::fill_n(w.u.data(), w.ld, acc_t(1));
        std::fill(w.v.begin(), w.v.end(), acc_t(1));
      }
    } else {
      // First iteration (reading S), or the f scalings left the safe range:
      // the f half-step in the log domain (rebuilding K), then the g half-step.
      if (have_kernel)
        for (int64_t n = 0; n < N; ++n) w.beta[n] += fast::log(w.v[n]);
      if (!log_rows_any<B>(w, M, N, have_kernel ? nullptr : S, sM, sN, check_finite && !have_kernel, &change))
        return false;
      have_kernel = true;
      std::fill_n(w.u.data(), w.ld, acc_t(1));
      if (!scale_cols(w, N, nu)) {
        rebuild_cols(w, M, N, log_nu);
        std::fill(w.v.begin(), w.v.end(), acc_t(1));
      }
    }
    if (eps * change / acc_t(M) < tol) break;
  }
  *n_iter_out = static_cast<int32_t>(it);
  // f_prev holds the full f/eps.
  for (int64_t m = 0; m < M; ++m) f_out[m] = eps * w.f_prev.data()[m];
  for (int64_t n = 0; n < N; ++n) g_out[n] = eps * (w.beta[n] + std::log(w.v[n]));
  write_outputs<B>(w, M, N, score, plan);
  return true;
}

template <typename acc_t>
struct BackwardWorkspace {
  static constexpr int W = kMaxLanes<acc_t>;
  int64_t ld;
  vec::Buffer<acc_t> T, H;         // transposed tiles [N, ld]
  vec::Buffer<acc_t> r, inv_a;     // [ld]
  vec::Buffer<acc_t> blk;          // [N, W]: one block of dS before it is written row-major
  vec::Buffer<acc_t> racc, wacc;   // per-lane sums: [N, W] right-hand side, [N * N, W] prompt weights
  std::vector<double> weights, rhs, y, scratch;  // [N, N], [N], [N], [N]
  // During pass 1, the gradient rows pass 2 will write (they are then in the
  // cache, owned, when written: coco clip backward 12% faster); over both
  // passes, the next problem's scores (see backward_chunk).
  Prefetch out, next;
  BackwardWorkspace(int64_t M, int64_t N)
      : ld(tile_ld<acc_t>(M)), T(N * ld), H(N * ld), r(ld), inv_a(ld), blk(N * W), racc(N * W),
        wacc(N * N * W), weights(N * N), rhs(N), y(N), scratch(N) {}
};

// Pass 1 of the backward (README.md beside otseg/ops/mps): T = exp((f + g -
// C)/eps) and H = -(T * G)/eps with G = G_plan + M N S dS* into the tiles,
// r = H 1 and 1/a = 1/(T 1), and the sums the N x N system needs: the
// right-hand side s - T^T (r / a) into w.rhs and the prompt weights
// W_nk = sum_m T_mn T_mk / a_m into w.weights (sums of positive terms,
// accurate in float), accumulated per lane and reduced once. This version
// takes any N (sums in memory).
template <int B, typename scalar_t, typename acc_t>
OTSEG_INLINE void backward_sums(const scalar_t* dscore, const scalar_t* dplan, int64_t dpM, int64_t dpN,
                                const scalar_t* S, int64_t sM, int64_t sN, const acc_t* f, const acc_t* g,
                                int64_t M, int64_t N, acc_t eps, BackwardWorkspace<acc_t>& w) {
  using V = VecOf<acc_t, B>;
  constexpr int W = vec::Vec<acc_t, B>::W;
  const acc_t ie = acc_t(1) / eps;
  const acc_t mn = acc_t(M) * acc_t(N);
  const int64_t ld = w.ld;
  acc_t* __restrict T = w.T.data();
  acc_t* __restrict H = w.H.data();
  acc_t* __restrict racc = w.racc.data();
  acc_t* __restrict wacc = w.wacc.data();
  for (int64_t n = 0; n < N; ++n) {
    vec::store(racc + n * W, V{});
    for (int64_t k = n + 1; k < N; ++k) vec::store(wacc + (n * N + k) * W, V{});
  }
  // S (and G_plan) are read one block ahead into the T (and H) tile, where
  // they are overwritten (a vector load right after the transposing stores
  // would stall).
  // (Not a lambda: a lambda is a function of its own, compiled for the
  // baseline ISA instead of being inlined into this entry point's.)
  load_block<B>(S, sM, sN, static_cast<int>(std::min<int64_t>(W, M)), N, T, ld);
  if (dplan != nullptr) load_block<B>(dplan, dpM, dpN, static_cast<int>(std::min<int64_t>(W, M)), N, H, ld);
  for (int64_t m0 = 0; m0 < M; m0 += W) {
    const int rows = static_cast<int>(std::min<int64_t>(W, M - m0));
    const V valid = vec::first_lanes<V>(rows);
    w.out.step();
    w.next.step();
    if (m0 + W < M) {
      const int next = static_cast<int>(std::min<int64_t>(W, M - m0 - W));
      load_block<B>(S + (m0 + W) * sM, sM, sN, next, N, T + m0 + W, ld);
      if (dplan != nullptr) load_block<B>(dplan + (m0 + W) * dpM, dpM, dpN, next, N, H + m0 + W, ld);
    }
    const V fe = vec::load_partial<V>(f + m0, rows) * ie;
    const V ds = dscore != nullptr ? vec::load_partial<V>(dscore + m0, rows) * mn : V{};
    V a = {}, r = {};
    for (int64_t n = 0; n < N; ++n) {
      const V s = vec::load<V>(T + n * ld + m0);
      // Padding lanes (S = 0, f = 0) get a finite t that 1/a = 0 keeps out
      // of every sum below; H is 0 there.
      const V t = vec::exp(fe + s * ie + (g[n] - acc_t(1)) * ie);
      V gv = dplan != nullptr ? vec::load<V>(H + n * ld + m0) : V{};
      if (dscore != nullptr) gv += s * ds;
      const V h = -(t * gv) * ie;
      vec::store(T + n * ld + m0, t);
      vec::store(H + n * ld + m0, h);
      a += t;
      r += h;
    }
    // a >= N e^-87 > 0: exp never returns 0.
    const V ia = valid / a;
    vec::store(w.inv_a.data() + m0, ia);
    vec::store(w.r.data() + m0, r);
    const V x = r * ia;
    for (int64_t n = 0; n < N; ++n) {
      const V t = vec::load<V>(T + n * ld + m0);
      vec::store(racc + n * W, vec::load<V>(racc + n * W) + vec::load<V>(H + n * ld + m0) - t * x);
      const V tw = t * ia;
      for (int64_t k = n + 1; k < N; ++k) {
        acc_t* acc = wacc + (n * N + k) * W;
        vec::store(acc, vec::load<V>(acc) + tw * vec::load<V>(T + k * ld + m0));
      }
    }
  }
  for (int64_t n = 0; n < N; ++n) {
    w.rhs[n] = vec::hsum<acc_t>(vec::load<V>(racc + n * W));
    for (int64_t k = n + 1; k < N; ++k) {
      const double wk = vec::hsum<acc_t>(vec::load<V>(wacc + (n * N + k) * W));
      w.weights[n * N + k] = wk;
      w.weights[k * N + n] = wk;
    }
  }
}

// A block [NC, W] of a problem's [M, NC] input in registers: shuffles for a
// whole block of contiguous rows in the compute type, else through the tile
// `via` (transposing stores, then loads: this path stalls on store
// forwarding, but only the last block or strided / half-precision inputs
// take it).
template <int B, int NC, typename scalar_t, typename acc_t>
OTSEG_INLINE void load_columns(const scalar_t* src, int64_t sM, int64_t sN, int rows, acc_t* via, int64_t ld,
                               VecOf<acc_t, B>* out) {
#ifdef OTSEG_HAVE_SHUFFLES
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (sN == 1 && sM == NC && rows == vec::Vec<acc_t, B>::W) return vec::BlockTranspose<acc_t, NC, B>::columns(src, out);
  }
#endif
  load_block<B>(src, sM, sN, rows, NC, via, ld);
  for (int n = 0; n < NC; ++n) out[n] = vec::load<VecOf<acc_t, B>>(via + n * ld);
}

// backward_sums for a prompt count NC known at compile time: the block's
// scores, T, and every sum in registers (NC (NC - 1) / 2 weight sums: used for
// NC <= 8), whole blocks of contiguous rows transposed by shuffles straight
// into registers.
template <int B, int NC, bool kPlanGrad, typename scalar_t, typename acc_t>
OTSEG_INLINE void backward_sums_n(const scalar_t* dscore, const scalar_t* dplan, int64_t dpM, int64_t dpN,
                                  const scalar_t* S, int64_t sM, int64_t sN, const acc_t* f, const acc_t* g,
                                  int64_t M, acc_t eps, BackwardWorkspace<acc_t>& w) {
  using V = VecOf<acc_t, B>;
  constexpr int W = vec::Vec<acc_t, B>::W;
  constexpr int NP = NC * (NC - 1) / 2;
  const acc_t ie = acc_t(1) / eps;
  const acc_t mn = acc_t(M) * acc_t(NC);
  const int64_t ld = w.ld;
  acc_t* __restrict T = w.T.data();
  acc_t* __restrict H = w.H.data();
  acc_t gshift[NC];
  for (int n = 0; n < NC; ++n) gshift[n] = (g[n] - acc_t(1)) * ie;
  V racc[NC], wreg[NP];
  for (int n = 0; n < NC; ++n) racc[n] = V{};
  for (int i = 0; i < NP; ++i) wreg[i] = V{};
  for (int64_t m0 = 0; m0 < M; m0 += W) {
    const int rows = static_cast<int>(std::min<int64_t>(W, M - m0));
    const V valid = vec::first_lanes<V>(rows);
    V s[NC], t[NC];
    w.out.step();
    w.next.step();
    load_columns<B, NC>(S + m0 * sM, sM, sN, rows, T + m0, ld, s);
    V gp[kPlanGrad ? NC : 1];
    if constexpr (kPlanGrad) load_columns<B, NC>(dplan + m0 * dpM, dpM, dpN, rows, H + m0, ld, gp);
    const V fe = vec::load_partial<V>(f + m0, rows) * ie;
    const V ds = dscore != nullptr ? vec::load_partial<V>(dscore + m0, rows) * mn : V{};
    V a = {}, r = {};
    for (int n = 0; n < NC; ++n) {
      // Padding lanes (S = 0, f = 0) get a finite t that 1/a = 0 keeps out
      // of every sum below; H is 0 there.
      t[n] = vec::exp(fe + s[n] * ie + gshift[n]);
      // (ds is 0 without a score gradient.)
      V gv = s[n] * ds;
      if constexpr (kPlanGrad) gv += gp[n];
      const V h = -(t[n] * gv) * ie;
      vec::store(T + n * ld + m0, t[n]);
      vec::store(H + n * ld + m0, h);
      a += t[n];
      r += h;
      racc[n] += h;
    }
    // a >= N e^-87 > 0: exp never returns 0.
    const V ia = valid / a;
    vec::store(w.inv_a.data() + m0, ia);
    vec::store(w.r.data() + m0, r);
    const V x = r * ia;
    int i = 0;
    for (int n = 0; n < NC; ++n) {
      racc[n] -= t[n] * x;
      const V tw = t[n] * ia;
      for (int k = n + 1; k < NC; ++k) wreg[i++] += tw * t[k];
    }
  }
  int i = 0;
  for (int n = 0; n < NC; ++n) {
    w.rhs[n] = vec::hsum<acc_t>(racc[n]);
    for (int k = n + 1; k < NC; ++k) {
      const double wk = vec::hsum<acc_t>(wreg[i++]);
      w.weights[n * NC + k] = wk;
      w.weights[k * NC + n] = wk;
    }
  }
}

// Pass 2 of the backward: x = (r - T y)/a; dS = -dC + M N T dS* = T (x + y +
// M N dS*) - H, written row-major a block at a time; for a prompt count NC
// known at compile time the block stays in registers (NC = 0: any N, through
// the block buffer).
template <int B, int NC, typename scalar_t, typename acc_t>
OTSEG_INLINE void backward_write_n(const scalar_t* dscore, int64_t M, int64_t N_any, scalar_t* dS,
                                   BackwardWorkspace<acc_t>& w) {
  using V = VecOf<acc_t, B>;
  constexpr int W = vec::Vec<acc_t, B>::W;
  const int64_t N = NC > 0 ? NC : N_any;
  const acc_t mn = acc_t(M) * acc_t(N);
  const int64_t ld = w.ld;
  const acc_t* __restrict T = w.T.data();
  const acc_t* __restrict H = w.H.data();
  acc_t* __restrict blk = w.blk.data();
  acc_t y[NC > 0 ? NC : 1];
  if constexpr (NC > 0)
    for (int n = 0; n < NC; ++n) y[n] = static_cast<acc_t>(w.y[n]);
  for (int64_t m0 = 0; m0 < M; m0 += W) {
    const int rows = static_cast<int>(std::min<int64_t>(W, M - m0));
    w.next.step();
    V x = vec::load<V>(w.r.data() + m0);
    if constexpr (NC > 0) {
      V t[NC];
      for (int n = 0; n < NC; ++n) {
        t[n] = vec::load<V>(T + n * ld + m0);
        x -= t[n] * y[n];
      }
      x *= vec::load<V>(w.inv_a.data() + m0);
      if (dscore != nullptr) x += vec::load_partial<V>(dscore + m0, rows) * mn;
      for (int n = 0; n < NC; ++n) t[n] = t[n] * (x + y[n]) - vec::load<V>(H + n * ld + m0);
      store_columns<B, NC>(t, rows, dS + m0 * NC, blk);
    } else {
      for (int64_t n = 0; n < N; ++n) x -= vec::load<V>(T + n * ld + m0) * static_cast<acc_t>(w.y[n]);
      x *= vec::load<V>(w.inv_a.data() + m0);
      if (dscore != nullptr) x += vec::load_partial<V>(dscore + m0, rows) * mn;
      for (int64_t n = 0; n < N; ++n) {
        const acc_t yn = static_cast<acc_t>(w.y[n]);
        vec::store(blk + n * W, vec::load<V>(T + n * ld + m0) * (x + yn) - vec::load<V>(H + n * ld + m0));
      }
      store_block<B>(blk, rows, N, dS + m0 * N);
    }
  }
}

// The implicit gradient of one problem (README.md beside otseg/ops/mps), W
// pixels at a time on transposed tiles: the sums of pass 1, the N x N
// Laplacian system solved in double without subtractions
// (csrc/common/gauge_solve.h), and dS.
template <int B, typename scalar_t, typename acc_t>
OTSEG_INLINE void backward_problem(const scalar_t* dscore, const scalar_t* dplan, int64_t dpM, int64_t dpN,
                                   const scalar_t* S, int64_t sM, int64_t sN, const acc_t* f, const acc_t* g,
                                   int64_t M, int64_t N, acc_t eps, scalar_t* dS, BackwardWorkspace<acc_t>& w) {
  with_prompt_count(N, [&](auto nc) OTSEG_LAMBDA_INLINE {
    // NC (NC - 1) / 2 weight sums in registers: up to NC = 8.
    constexpr int NC = decltype(nc)::value;
    if constexpr (NC > 0 && NC <= 8) {
      if (dplan != nullptr)
        backward_sums_n<B, NC, true>(dscore, dplan, dpM, dpN, S, sM, sN, f, g, M, eps, w);
      else
        backward_sums_n<B, NC, false>(dscore, dplan, dpM, dpN, S, sM, sN, f, g, M, eps, w);
    } else {
      backward_sums<B>(dscore, dplan, dpM, dpN, S, sM, sN, f, g, M, N, eps, w);
    }
    laplacian_gauge_solve(w.weights.data(), w.rhs.data(), w.y.data(), w.scratch.data(), static_cast<int>(N));
    backward_write_n<B, NC>(dscore, M, N, dS, w);
  });
}

// With `prefetch`, the problem after the one a thread starts is taken at
// once, so that its scores can be prefetched while this one computes; only
// while more problems are left than there are threads, so that near the end
// of a batch (or in a batch of about as many problems as threads) no thread
// waits for a problem another one holds. Returns the problem taken, or -1.
inline int64_t take_next_early(std::atomic<int64_t>* next, int64_t P, int64_t threads, bool prefetch) {
  if (!prefetch || P - next->load(std::memory_order_relaxed) <= threads) return -1;
  return next->fetch_add(1);
}

// One thread's share of the problems, with vectors of B bytes: each thread
// takes the next untaken problem until none is left, so a thread that starts
// late (woken from sleep) or runs slower leaves its share to the others
// instead of making them wait. Returns false if a problem's scores held NaN
// or inf (with check_finite).
template <int B, typename scalar_t, typename acc_t>
OTSEG_INLINE bool forward_chunk(const ForwardArgs<scalar_t, acc_t>& a) {
  ForwardWorkspace<acc_t> w(a.M, a.N);
  constexpr int W = vec::Vec<acc_t, B>::W;
  const int64_t bytes = a.M * a.N * int64_t(sizeof(scalar_t));
  const bool prefetch = a.sN == 1 && a.sM == a.N && a.P * bytes > kPrefetchScoresAbove;
  bool ok = true;
  int64_t p = a.next->fetch_add(1);
  while (p < a.P) {
    const int64_t q = take_next_early(a.next, a.P, a.threads, prefetch);
    w.next.reset(q >= 0 && q < a.P ? a.S + q * a.sP : nullptr, bytes, (a.M + W - 1) / W);
    ok &= forward_problem<B>(a.S + p * a.sP, a.sM, a.sN, a.M, a.N, a.eps, a.max_iter, a.tol, a.check_finite,
                             a.score + p * a.M, a.plan ? a.plan + p * a.M * a.N : nullptr, a.f + p * a.M,
                             a.g + p * a.N, a.n_iter + p, w);
    p = q >= 0 ? q : a.next->fetch_add(1);
  }
  return ok;
}

template <int B, typename scalar_t, typename acc_t>
OTSEG_INLINE void backward_chunk(const BackwardArgs<scalar_t, acc_t>& a) {
  BackwardWorkspace<acc_t> w(a.M, a.N);
  constexpr int W = vec::Vec<acc_t, B>::W;
  const int64_t blocks = (a.M + W - 1) / W, bytes = a.M * a.N * int64_t(sizeof(scalar_t));
  // (coco clip, 21 MB of scores: 7% faster with the prefetch of the next
  // problem's scores.)
  const bool prefetch_scores = a.sN == 1 && a.sM == a.N && a.P * bytes > kPrefetchScoresAbove;
  int64_t p = a.next->fetch_add(1);
  while (p < a.P) {
    const int64_t q = take_next_early(a.next, a.P, a.threads, prefetch_scores);
    w.out.reset(a.out + p * a.M * a.N, bytes, blocks);
    w.next.reset(q >= 0 && q < a.P ? a.S + q * a.sP : nullptr, bytes, 2 * blocks);
    backward_problem<B>(a.dscore ? a.dscore + p * a.M : nullptr, a.dplan ? a.dplan + p * a.dpP : nullptr, a.dpM,
                        a.dpN, a.S + p * a.sP, a.sM, a.sN, a.f + p * a.M, a.g + p * a.N, a.M, a.N, a.eps,
                        a.out + p * a.M * a.N, w);
    p = q >= 0 ? q : a.next->fetch_add(1);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace otseg
