// The CUDA backend's forward kernel and its launch (launch_mps_forward,
// mps_cuda.h); shared device code in mps_cuda_device.cuh.
//
// One block per (b, k) problem. Each thread owns a few pixel rows (fwd_rows),
// keeps their kernel entries in registers and, up to 32 KB a block, their
// scores in shared memory (fwd_scores_in_smem; larger blocks read them again
// from global memory where a log-domain rebuild and the refined score need
// them), so every iteration, the per-problem stopping test included, runs on
// chip with no host synchronisation. The iteration is the CPU kernel's
// (otseg/ops/mps/README.md): scaling domain, u = mu / (K v) per row in
// registers and z = K^T u by one block reduction, with log-domain absorption
// when a scaling leaves [e^-30, e^30].
#include <type_traits>

#include "mps_cuda_device.cuh"

namespace otseg {
namespace cuda {
namespace {

constexpr float kAbsorb = 30.0f;  // scalings outside [e^-30, e^30] are absorbed

// Blocks of kThreads the forward asks to fit on one SM (65536 registers),
// for the kernel of float32 x4 rows where `f32x4`: three of 128 threads, at
// most 168 registers a thread; four up to 4 prompts, and for the float32 x4
// kernel of 8 prompts, at most 128. The registers hold the kernel matrix,
// not the scores, which leaves a thread of 8 rows x 8 prompts about 110 live
// values (sm_90: 150 registers budgeted for three blocks, 128 for four, no
// spills; the float32 x4 kernel then issued 395 instructions an iteration
// against 381 (403 since its first rebuild got its own code), and on an
// H200, commit aecf88a, its graph times were level
// on coco and 1.06-1.07x shorter on coco16 than with three, bitwise the same
// outputs: bench/GPU_RUNS.md; the other rows' code needs more registers).
// With the scores in registers too, Nsight Compute on an H100 (commit
// 8667a72) found 255 registers, 164 B of spills and two blocks an SM (12.5%
// occupancy), limited by registers.
__host__ __device__ constexpr int fwd_min_blocks(int NP, int threads, bool f32x4) {
  return threads > 128 ? 1 : (NP <= 4 || (NP == 8 && f32x4) ? 4 : 3);
}

// Where the forward keeps the scores after reading them once: in shared
// memory, each thread's own rows, read back where a log-domain half-step
// rebuilds K and for the refined score, when the tile takes at most 32 KB
// (M <= 1024 pixels for up to 8 prompts, M <= 512 for 16, M <= 2048 for 4).
// Three blocks of 128 threads then take 3 x (32.3 or 32.6 + 1 reserved) KB of
// an SM's shared memory (bench/cuda_ptxas.py): about 100 KB of 228 on an H100
// and 164 on an A100, but all of the 100 KB of an sm_86 GPU (a 3090), with
// 160 B to spare for 8 prompts (33056 B a block) and 208 B for 16 (33040 B,
// one reduction buffer). Four blocks (fwd_min_blocks) take about 133
// KB: an H100's or A100's fit them, a 3090's does not, and there the
// four-block budget costs 14 instructions an iteration for no more blocks
// (measured on an H200 only). Larger tiles read the scores again from global
// memory (L2), as spilled registers would be.
__host__ __device__ constexpr bool fwd_scores_in_smem(int NP, int threads) {
  return fwd_rows(NP) * NP * threads * 4 <= 32 * 1024;
}

// Two reduction buffers (one barrier a reduction) except for 16 prompts,
// whose larger buffers would cost an sm_86 GPU its third block an SM.
template <int NP, int kThreads>
using FwdReducer = BlockReducer<kThreads, NP + 1, NP <= 8 ? 2 : 1>;

// The forward of one problem (the block's), its rows accessed through Rows
// (AnyRows, F32Vec4Rows, F32Vec2Rows or F32Vec2Rows6). red: the reductions' shared
// memory; s_tile: the scores' tile (tile4_at) where kSmem. kFull: launched
// only for M = kRows kThreads (fwd_full_tile), so that every row of every
// thread is a pixel, decided at compile time: no per-row test of r < n_live
// (sm_90, the float32 x4 kernel of 8 prompts: 403 -> 357 instructions an
// ordinary iteration, 695 -> 656 in the first; 4 prompts: 275 -> 238 and
// 431 -> 395; 16 prompts: 479 -> 459 and 751 -> 742; the float32 x2 kernel,
// whose twin also fixes N = 6: 428 -> 330 and 815 -> 550;
// bench/cuda_ptxas.py). M = 1024, the 32 x 32 token grid of a 512 x 512
// crop, is the case of every benchmark and of the model.
template <int NP, int kThreads, class Rows, bool kFull>
__device__ __forceinline__ void mps_fwd_body(const ForwardArgs& a, float* red, float4* s_tile) {
  constexpr int kRows = fwd_rows(NP);
  constexpr bool kSmem = fwd_scores_in_smem(NP, kThreads);
  FwdReducer<NP, kThreads> reduce{red};
  const int64_t p = blockIdx.x;
  // The float32 x4 kernel is launched for full rows only (N = NP, LaunchFwd),
  // and the float32 x2 full-tile twin for N = 6 only (Rows::kN), so that
  // every test n < N is decided at compile time: a run-time N cost sm_90
  // code a branch and about 12 instructions a prompt where v is scaled.
  const int M = a.M, N = Rows::kN > 0 ? Rows::kN : a.N;
  // This thread's rows m = threadIdx.x + r kThreads below M: r < n_live. One
  // register and a compare with a constant a row, where testing m < M kept
  // each row's m (or its flag, packed into a register) live.
  const int n_live = kFull ? kRows : min(kRows, max(0, (M - static_cast<int>(threadIdx.x) + kThreads - 1) / kThreads));
  const float ie = 1.0f / a.eps;
  const float ie2 = ie * kLog2e;  // 1/eps in units of log2(e)
  const float mu = 1.0f / M, nu = 1.0f / N;
  const float log_mu = -logf(static_cast<float>(M)), log_nu = -logf(static_cast<float>(N));
  const float lo_ok = expf(-kAbsorb), hi_ok = expf(kAbsorb);

  // Registers, for this thread's rows: the kernel k, the absorbed potential
  // alpha, the scaling u and its log (all in units of eps; the full
  // potential f/eps is alpha + log_u). Per prompt, replicated in every
  // thread: beta and v.
  float k[kRows][NP], alpha[kRows], u[kRows], log_u[kRows];
  float beta[NP], v[NP];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    alpha[r] = 0.0f;
    u[r] = 1.0f;
    log_u[r] = 0.0f;
  }
#pragma unroll
  for (int n = 0; n < NP; ++n) {
    beta[n] = 0.0f;
    v[n] = 1.0f;
  }
  // The check for NaN and inf scores, when asked for (the same in every
  // thread): the sum of s 2^-10 over this thread's entries, which is finite
  // if and only if every entry is (at most 64 entries a thread, fwd_rows:
  // no finite sum reaches FLT_MAX; +inf and -inf together make a NaN). One
  // FMA an entry, under a branch the whole block takes alike, where testing
  // each entry issued about 5 instructions an entry, predicated off but
  // issued all the same without the check (sm_90, 8 prompts, 128 threads:
  // about 320 a thread).
  const bool check = a.nonfinite != nullptr;
  float finite_sum = 0.0f;
  constexpr float kFiniteScale = 0x1p-10f;
  if constexpr (kSmem) {
    // The scores read once, every row at once, and kept in s_tile.
    stage_rows<NP, kRows, kThreads, kFull>(
        M, [&](int m, float(&x)[NP]) { Rows::load(a.S, p * a.sP + m * a.sM, a.sN, N, a.dtype, a.s_vec, x); },
        [&](int r, const float(&x)[NP]) { tile4_store<NP, kThreads>(s_tile, r, x); });
    if (check) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float x[NP];
        tile4_load<NP, kThreads>(s_tile, r, x);
#pragma unroll
        for (int n = 0; n < NP; ++n) finite_sum = fmaf(x[n], kFiniteScale, finite_sum);
      }
    }
  }
  // The scores of row r of this thread (0 past M and past N): from s_tile
  // where kSmem, else from memory.
  auto load_scores = [&](int r, float (&x)[NP]) {
    if constexpr (kSmem) {
      tile4_load<NP, kThreads>(s_tile, r, x);
      return;
    }
    const int m = threadIdx.x + r * kThreads;
    if (kFull || m < M) {
      // Strides made opaque to the compiler here: else it computes the 64-bit
      // address of every score once, before the loop, and holds them all
      // (sm_90, 8 x 8, 128 threads: 168 registers and 1.1 KB of spill stores
      // instead of 167 and none).
      int64_t sM = a.sM, sN = a.sN;
      asm volatile("" : "+l"(sM), "+l"(sN));
      Rows::load(a.S, p * a.sP + m * sM, sN, N, a.dtype, a.s_vec, x);
    } else {
#pragma unroll
      for (int n = 0; n < NP; ++n) x[n] = 0.0f;
    }
  };

  // Log-domain f half-step from beta (v = 1): alpha and K with rows summing
  // to mu. Returns this thread's part of sum_m |f/eps - previous f/eps|.
  // `first`: the first iteration (beta = 0), as std::true_type or
  // std::false_type in the kernels of a compile-time N (Rows::kN: float32 x4,
  // and the float32 x2 twin of N = 6) with the scores in shared memory (two
  // copies of this code, the first one shorter: kFirst; sm_90, 8 prompts:
  // 695 instructions a thread in the first iteration instead of 751 with one
  // copy, and 403 instead of 397 in every other; the x2 twin: 550 instead of
  // 586, 330 in either case), else as a
  // bool (one copy: two cost the other 128-thread kernels up to 18
  // instructions an iteration, and the larger blocks spills); where the
  // scores are not in shared memory, it is also their first read, which
  // adds them to finite_sum when the check is asked for.
  auto rebuild_rows = [&](auto first) {
    constexpr bool kFirst = std::is_same_v<decltype(first), std::true_type>;
    const bool first_read = !kSmem && static_cast<bool>(first);
    // K's entry is 2^(S ie2 + c2 - max), c2 = (beta - 1/eps) log2(e): the
    // exponentials as exp2f of arguments in units of log2(e) (kLog2e;
    // sm_90, 8 prompts, float32 rows: 5768 -> 5480 instructions of code,
    // 168 -> 158 registers).
    auto c2 = [&](int n) { return fmaf(beta[n], kLog2e, -ie2); };
    float change = 0.0f;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const bool live = r < n_live;
      float s[NP];
      load_scores(r, s);
      // z = S ie2 + c2 - max, the exponent of each entry.
      float z[NP];
      float mx = -INFINITY;
      if (first_read && check) {
#pragma unroll
        for (int n = 0; n < NP; ++n) finite_sum = fmaf(s[n], kFiniteScale, finite_sum);
      }
      if constexpr (kFirst) {
        // beta = 0: every c2 is -ie2, so the largest exponent is that of the
        // row's largest score (fmaf is monotone in s), and z - max =
        // S ie2 - s_max ie2 is one FMA an entry instead of an FMA and a
        // subtraction (64 instructions a thread for 8 x 8 rows).
        float smax = -INFINITY;
#pragma unroll
        for (int n = 0; n < NP; ++n)
          if (n < N) smax = fmaxf(smax, s[n]);
        mx = fmaf(smax, ie2, -ie2);
        const float off = -smax * ie2;
#pragma unroll
        for (int n = 0; n < NP; ++n) z[n] = fmaf(s[n], ie2, off);
      } else {
#pragma unroll
        for (int n = 0; n < NP; ++n) {
          z[n] = fmaf(s[n], ie2, c2(n));
          if (n < N) mx = fmaxf(mx, z[n]);
        }
#pragma unroll
        for (int n = 0; n < NP; ++n) z[n] -= mx;
      }
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < NP; ++n) {
        k[r][n] = n < N ? exp2f(z[n]) : 0.0f;
        sum += k[r][n];
      }
      const float a_new = log_mu - mx * kLn2 - __logf(sum);
      if (live) change += fabsf(a_new - (alpha[r] + log_u[r]));
      alpha[r] = a_new;
      // Rows past M (s = 0 there) must stay out of every column sum:
      // K is 0 on them, as rebuild_cols and the sweep assume.
      const float scale = live ? mu / sum : 0.0f;
#pragma unroll
      for (int n = 0; n < NP; ++n) k[r][n] *= scale;
      u[r] = 1.0f;
      log_u[r] = 0.0f;
    }
#pragma unroll
    for (int n = 0; n < NP; ++n) v[n] = 1.0f;
    return change;
  };
  // Log-domain g half-step from alpha (u = 1): beta and K with columns
  // summing to nu. K holds S/eps + alpha between the two passes (natural
  // units here: scaled to log2(e) units like rebuild_rows, the 16-prompt
  // kernel spilled 24 B instead of 16, bench/cuda_ptxas.py).
  auto rebuild_cols = [&]() {
    float mx[NP];
#pragma unroll
    for (int n = 0; n < NP; ++n) mx[n] = -INFINITY;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const bool live = r < n_live;
      float s[NP];
      load_scores(r, s);
#pragma unroll
      for (int n = 0; n < NP; ++n) {
        k[r][n] = live && n < N ? s[n] * ie + alpha[r] : -INFINITY;
        mx[n] = fmaxf(mx[n], k[r][n]);
      }
    }
    reduce.template operator()<true>(mx);
    float sum[NP];
#pragma unroll
    for (int n = 0; n < NP; ++n) {
      sum[n] = 0.0f;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const bool live = r < n_live && n < N;
        k[r][n] = live ? __expf(k[r][n] - mx[n]) : 0.0f;
        sum[n] += k[r][n];
      }
    }
    reduce.template operator()<false>(sum);
#pragma unroll
    for (int n = 0; n < NP; ++n) {
      beta[n] = n < N ? log_nu + ie - mx[n] - __logf(sum[n]) : 0.0f;
      const float scale = n < N ? nu / sum[n] : 0.0f;
#pragma unroll
      for (int r = 0; r < kRows; ++r) k[r][n] *= scale;
      v[n] = 1.0f;
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      u[r] = 1.0f;
      log_u[r] = 0.0f;
    }
  };
  // v = nu / z from the first NP entries of z, the column products K^T u;
  // false when a scaling left the safe range.
  auto scale_v = [&](const auto& z) {
    bool ok = true;
#pragma unroll
    for (int n = 0; n < NP; ++n) {
      if (n < N) {
        v[n] = nu / z[n];
        ok = ok && v[n] >= lo_ok && v[n] <= hi_ok;
      }
    }
    return ok;
  };
  // v = nu / (K^T u), and `extra` summed over the block in the same
  // reduction (one barrier for both); false when a scaling left the safe range.
  auto scale_cols = [&](float& extra) {
    float z[NP + 1];
#pragma unroll
    for (int n = 0; n < NP; ++n) {
      z[n] = 0.0f;
#pragma unroll
      for (int r = 0; r < kRows; ++r) z[n] += k[r][n] * u[r];
    }
    z[NP] = extra;
    reduce.template operator()<false>(z);
    extra = z[NP];
    return scale_v(z);
  };

  int it = 0;
  bool have_kernel = false;
  while (it < a.max_iter) {
    ++it;
    float change;
    bool sweep_ok = false;
    if (have_kernel) {
      // One pass over the registers: u = mu / (K v), the change of the full
      // potential (while alpha is unchanged, that of log u alone: no
      // cancellation against a large alpha) and the partial column products
      // K^T u, all in one reduction (whose sums are dropped when a scaling
      // is out of range). A scaling out of range (or NaN) adds inf to the
      // change, so the change tells it too: a finite change sums at most
      // 60 a row (log u in [-30, 30]), far below FLT_MAX, and a sum with an
      // inf term is inf. One value fewer to reduce than a separate count.
      float acc[NP + 1];
#pragma unroll
      for (int n = 0; n < NP + 1; ++n) acc[n] = 0.0f;
      float lu_new[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const bool live = r < n_live;
        float kv = 0.0f;
#pragma unroll
        for (int n = 0; n < NP; ++n) kv += k[r][n] * v[n];
        // A row past M keeps K = 0, u = 1 and log u = 0 (the rebuilds set
        // them so, and so does this sweep: not from __logf(1), whose
        // exactness is not documented), so it adds exactly 0 to every sum
        // below: one select a row instead of one per entry.
        const float um = live ? mu / kv : 1.0f;
        lu_new[r] = live ? __logf(um) : 0.0f;
        // u in [e^-30, e^30] where |log u| <= 30: one test, which the log
        // of 0, inf or NaN (-inf, inf, NaN) fails too.
        acc[NP] += fabsf(lu_new[r]) <= kAbsorb ? fabsf(lu_new[r] - log_u[r]) : INFINITY;
        u[r] = um;
#pragma unroll
        for (int n = 0; n < NP; ++n) acc[n] += k[r][n] * um;
      }
      reduce.template operator()<false>(acc);
      if (acc[NP] < INFINITY) {
        sweep_ok = true;
        change = acc[NP];
#pragma unroll
        for (int r = 0; r < kRows; ++r) log_u[r] = lu_new[r];
        if (!scale_v(acc)) {
          // Absorb u into alpha and redo the g half-step in the log domain.
#pragma unroll
          for (int r = 0; r < kRows; ++r) alpha[r] += log_u[r];
          rebuild_cols();
        }
      }
    }
    if (!sweep_ok) {
      // First iteration, or u left the safe range: absorb v, the f half-step
      // in the log domain (checking the scores the first time, when asked),
      // then the g half-step.
      if (have_kernel) {
#pragma unroll
        for (int n = 0; n < NP; ++n) beta[n] += n < N ? __logf(v[n]) : 0.0f;
      }
      if constexpr (kSmem && Rows::kN > 0) {
        if (have_kernel) {
          change = rebuild_rows(std::false_type{});
        } else {
          change = rebuild_rows(std::true_type{});
        }
      } else {
        change = rebuild_rows(!have_kernel);
      }
      // The pointer is the same in every thread, so the barrier is reached by all or none.
      if (!have_kernel && check && __syncthreads_or(!isfinite(finite_sum))) {
        if (threadIdx.x == 0) atomicExch(a.nonfinite, 1);
      }
      have_kernel = true;
      // The change summed over the block with the column products.
      if (!scale_cols(change)) rebuild_cols();
    }
    if (a.eps * change / M < a.tol) break;
  }

  // Outputs: f = eps * (alpha + log u), g = eps * (beta + log v), the refined
  // score and the plan.
  const float mn = static_cast<float>(M) * static_cast<float>(N);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int m = threadIdx.x + r * kThreads;
    if (!kFull && m >= M) continue;
    a.f[p * M + m] = a.eps * (alpha[r] + log_u[r]);
    float s[NP];
    load_scores(r, s);
    float t[NP];
    float acc = 0.0f;
#pragma unroll
    for (int n = 0; n < NP; ++n) {
      t[n] = u[r] * k[r][n] * v[n];
      acc += k[r][n] * v[n] * s[n];
    }
    Rows::store1(a.score, p * M + m, mn * u[r] * acc, a.dtype);
    if (a.plan != nullptr) Rows::store(a.plan, (p * M + m) * N, N, a.dtype, a.plan_vec, t);
  }
  if (threadIdx.x == 0) {
    // Unrolled to NP: an index below a run-time bound would put beta and v in
    // local memory for the whole kernel.
#pragma unroll
    for (int n = 0; n < NP; ++n)
      if (n < N) a.g[p * N + n] = a.eps * (beta[n] + logf(v[n]));
    a.n_iter[p] = it;
  }
}

// kMinBlocks: the blocks an SM the registers are budgeted for (fwd_min_blocks);
// kFull: for M = kRows kThreads only (mps_fwd_body).
template <int NP, int kThreads, class Rows, int kMinBlocks, bool kFull>
__global__ void __launch_bounds__(kThreads, kMinBlocks) mps_fwd_kernel(ForwardArgs a) {
  __shared__ float red[FwdReducer<NP, kThreads>::kFloats];
  __shared__ float4 s_tile[fwd_scores_in_smem(NP, kThreads) ? fwd_rows(NP) * NP / 4 * kThreads : 1];
  mps_fwd_body<NP, kThreads, Rows, kFull>(a, red, s_tile);
}

// Whether a problem of M pixels takes the kFull twin of a kernel of kThreads:
// every row of every thread a pixel. Twins only for the float32 kernels of
// 128 threads: the float32 x4 ones (M = 1024 for 4 and 8 prompts, 512 for
// 16) and the float32 x2 one for N = 6 alone (F32Vec2Rows6: VOC's prompts,
// N known at compile time as in the x4 kernels); four more kernels to
// compile, where a twin of every kernel would be 21. (A twin of the float32
// x2 kernel with a run-time N took 428 -> 402 instructions an ordinary
// iteration, against 330 with N = 6, and branched around each prompt's
// exponentials on N, which left no path through its machine code that
// bench/sass_paths.py could call the sweep.)
template <int NP, int kThreads>
constexpr bool fwd_full_tile(int M) {
  return kThreads == 128 && M == fwd_rows(NP) * kThreads;
}

template <int NP, int T>
struct LaunchFwd {
  static constexpr int rows(int np) { return fwd_rows(np); }
  static void run(unsigned P, cudaStream_t stream, const ForwardArgs& a) {
    constexpr int kBlocks = fwd_min_blocks(NP, T, false);
    // The kernel for the rows' layout (AnyRows, F32Vec4Rows, F32Vec2Rows:
    // mps_cuda_device.cuh); float2 rows for 8 prompts only, where the rows
    // are whole float2s but not the float4 kernel's (N = 6; N = 8 only
    // 8-byte aligned, or with such a plan). Width 4 implies width 2.
    const bool f32 = a.dtype == Dtype::kFloat;
    const bool full = fwd_full_tile<NP, T>(a.M);
    if (f32 && a.s_vec == 4 && (a.plan == nullptr || a.plan_vec == 4) && a.N == NP) {
      constexpr int kBlocks4 = fwd_min_blocks(NP, T, true);
      if constexpr (T == 128) {
        if (full) {
          mps_fwd_kernel<NP, T, F32Vec4Rows<NP>, kBlocks4, true><<<P, T, 0, stream>>>(a);
          return;
        }
      }
      mps_fwd_kernel<NP, T, F32Vec4Rows<NP>, kBlocks4, false><<<P, T, 0, stream>>>(a);
      return;
    }
    if constexpr (NP == 8) {
      if (f32 && a.s_vec % 2 == 0 && (a.plan == nullptr || a.plan_vec % 2 == 0)) {
        if constexpr (T == 128) {
          if (full && a.N == 6) {
            mps_fwd_kernel<NP, T, F32Vec2Rows6, kBlocks, true><<<P, T, 0, stream>>>(a);
            return;
          }
        }
        mps_fwd_kernel<NP, T, F32Vec2Rows<NP>, kBlocks, false><<<P, T, 0, stream>>>(a);
        return;
      }
    }
    mps_fwd_kernel<NP, T, AnyRows<NP>, kBlocks, false><<<P, T, 0, stream>>>(a);
  }
};

}  // namespace

cudaError_t launch_mps_forward(const ForwardArgs& args, int64_t P, cudaStream_t stream) {
  return dispatch<LaunchFwd>(args.M, args.N, P, stream, args);
}

}  // namespace cuda
}  // namespace otseg
