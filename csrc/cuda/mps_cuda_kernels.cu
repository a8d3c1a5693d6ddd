// Fused Multi-Prompts Sinkhorn on CUDA: the kernels and their launches
// (launch_mps_forward / launch_mps_backward, mps_cuda.h). No ATen here: the
// host side (checks, outputs, streams, exceptions) is mps_cuda.cpp.
//
// One block per (b, k) problem. Each thread owns a few pixel rows (fwd_rows),
// keeps their kernel entries in registers and, up to 32 KB a block, their
// scores in shared memory (fwd_scores_in_smem; larger blocks read them again
// from global memory where a log-domain rebuild and the refined score need
// them), so every iteration, the per-problem stopping test included, runs on
// chip with no host synchronisation. The
// iteration is the CPU kernel's (otseg/ops/mps/README.md): scaling domain,
// u = mu / (K v) per row in registers and z = K^T u by one block reduction,
// with log-domain absorption when a scaling leaves [e^-30, e^30]. The
// backward is the implicit gradient, one block per problem; its small
// Laplacian solve is the CPU kernel's elimination run by one warp, lane i
// holding row i (csrc/common/gauge_solve.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "../common/gauge_solve.h"
#include "mps_cuda.h"

namespace otseg {
namespace cuda {
namespace {

constexpr float kAbsorb = 30.0f;    // scalings outside [e^-30, e^30] are absorbed

// Pixel rows per thread. The forward gives each thread 8 rows up to 8
// prompts: fewer threads a problem make its two block sums an iteration
// cheaper, and 128 threads for 1024 x 8 leave room for three problems an SM
// (fwd_min_blocks; the Triton forward ran 1.6-1.9x faster with 4 warps than with 8 on an
// H100: otseg/ops/mps/triton.py, _blocks). 16 prompts keep 4 rows (registers).
// The backward likewise (the Triton backward ran 1.4x faster with 4 warps than
// with 8 on an H100, while this kernel, at 4 rows and 256 threads for
// 1024 x 8, took twice the Triton backward's time): 203 registers, no
// spills, two blocks of 128 threads an SM for sm_90 (bench/cuda_ptxas.py).
__host__ __device__ constexpr int fwd_rows(int NP) { return NP <= 8 ? 8 : 4; }
__host__ __device__ constexpr int bwd_rows(int NP) { return NP <= 8 ? 8 : 4; }

// Loads and stores in the input's dtype (Dtype, mps_cuda.h), computing in
// float32; float16 and bfloat16 convert with round-to-nearest-even.
__device__ __forceinline__ float load_as_float(const void* base, int64_t i, Dtype dt) {
  switch (dt) {
    case Dtype::kHalf:
      return __half2float(static_cast<const __half*>(base)[i]);
    case Dtype::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    default:
      return static_cast<const float*>(base)[i];
  }
}

__device__ __forceinline__ void store_from_float(void* base, int64_t i, float x, Dtype dt) {
  switch (dt) {
    case Dtype::kHalf:
      static_cast<__half*>(base)[i] = __float2half_rn(x);
      break;
    case Dtype::kBFloat16:
      static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(x);
      break;
    default:
      static_cast<float*>(base)[i] = x;
  }
}

// V = 2, 4 or 8 contiguous elements at element i of `base` (aligned to V
// elements: the host's vector_width), as floats. 16-byte reads at most:
// float32 V <= 4, 16-bit types V <= 8.
template <int V>
__device__ __forceinline__ void load_vec(const void* base, int64_t i, Dtype dt, float* out) {
  static_assert(V == 2 || V == 4 || V == 8, "load_vec: V is 2, 4 or 8");
  if (dt == Dtype::kFloat) {
    const float* p = static_cast<const float*>(base) + i;
    if constexpr (V >= 4) {
#pragma unroll
      for (int c = 0; c < V / 4; ++c) {
        const float4 q = __ldg(reinterpret_cast<const float4*>(p) + c);
        out[4 * c] = q.x, out[4 * c + 1] = q.y, out[4 * c + 2] = q.z, out[4 * c + 3] = q.w;
      }
    } else {
      const float2 q = __ldg(reinterpret_cast<const float2*>(p));
      out[0] = q.x, out[1] = q.y;
    }
    return;
  }
  // 16-bit elements, read in pairs.
  unsigned raw[V / 2];
  const unsigned short* p = static_cast<const unsigned short*>(base) + i;
  if constexpr (V == 8) {
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
    raw[0] = q.x, raw[1] = q.y, raw[2] = q.z, raw[3] = q.w;
  } else if constexpr (V == 4) {
    const uint2 q = __ldg(reinterpret_cast<const uint2*>(p));
    raw[0] = q.x, raw[1] = q.y;
  } else {
    raw[0] = __ldg(reinterpret_cast<const unsigned*>(p));
  }
#pragma unroll
  for (int c = 0; c < V / 2; ++c) {
    const unsigned short lo = raw[c] & 0xffffu, hi = raw[c] >> 16;
    if (dt == Dtype::kHalf) {
      out[2 * c] = __half2float(__ushort_as_half(lo)), out[2 * c + 1] = __half2float(__ushort_as_half(hi));
    } else {
      out[2 * c] = __bfloat162float(__ushort_as_bfloat16(lo));
      out[2 * c + 1] = __bfloat162float(__ushort_as_bfloat16(hi));
    }
  }
}

// V = 2, 4 or 8 floats into V contiguous elements at element i of `base`
// (aligned to V elements), converted as store_from_float does.
template <int V>
__device__ __forceinline__ void store_vec(void* base, int64_t i, Dtype dt, const float* in) {
  static_assert(V == 2 || V == 4 || V == 8, "store_vec: V is 2, 4 or 8");
  if (dt == Dtype::kFloat) {
    float* p = static_cast<float*>(base) + i;
    if constexpr (V >= 4) {
#pragma unroll
      for (int c = 0; c < V / 4; ++c)
        reinterpret_cast<float4*>(p)[c] = make_float4(in[4 * c], in[4 * c + 1], in[4 * c + 2], in[4 * c + 3]);
    } else {
      *reinterpret_cast<float2*>(p) = make_float2(in[0], in[1]);
    }
    return;
  }
  unsigned raw[V / 2];
#pragma unroll
  for (int c = 0; c < V / 2; ++c) {
    unsigned short lo, hi;
    if (dt == Dtype::kHalf) {
      lo = __half_as_ushort(__float2half_rn(in[2 * c])), hi = __half_as_ushort(__float2half_rn(in[2 * c + 1]));
    } else {
      lo = __bfloat16_as_ushort(__float2bfloat16_rn(in[2 * c]));
      hi = __bfloat16_as_ushort(__float2bfloat16_rn(in[2 * c + 1]));
    }
    raw[c] = static_cast<unsigned>(lo) | (static_cast<unsigned>(hi) << 16);
  }
  unsigned short* p = static_cast<unsigned short*>(base) + i;
  if constexpr (V == 8) {
    *reinterpret_cast<uint4*>(p) = make_uint4(raw[0], raw[1], raw[2], raw[3]);
  } else if constexpr (V == 4) {
    *reinterpret_cast<uint2*>(p) = make_uint2(raw[0], raw[1]);
  } else {
    *reinterpret_cast<unsigned*>(p) = raw[0];
  }
}

// Vector widths V of a row of NP values: chunk c holds values c*V .. c*V+V-1,
// all below N or all past it (N is a multiple of V).
template <int NP, int V>
__device__ __forceinline__ void load_chunks(const void* base, int64_t i0, int N, Dtype dt, float (&x)[NP],
                                            float pad) {
#pragma unroll
  for (int c = 0; c < NP / V; ++c) {
    if (c * V < N) {
      load_vec<V>(base, i0 + c * V, dt, &x[c * V]);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) x[c * V + j] = pad;
    }
  }
}

template <int NP, int V>
__device__ __forceinline__ void store_chunks(void* base, int64_t i0, int N, Dtype dt, const float (&x)[NP]) {
#pragma unroll
  for (int c = 0; c < NP / V; ++c)
    if (c * V < N) store_vec<V>(base, i0 + c * V, dt, &x[c * V]);
}

// The NP values of one row, elements i0 + n * sN for n < N (`pad` for
// n >= N), read `vec` elements at a time where the host found the rows
// contiguous and aligned (vec > 1: sN = 1 and N a multiple of vec).
template <int NP>
__device__ __forceinline__ void load_row(const void* base, int64_t i0, int64_t sN, int N, Dtype dt, int vec,
                                         float (&x)[NP], float pad) {
  if constexpr (NP % 8 == 0) {
    if (vec == 8) return load_chunks<NP, 8>(base, i0, N, dt, x, pad);
  }
  if constexpr (NP % 4 == 0) {
    if (vec == 4) return load_chunks<NP, 4>(base, i0, N, dt, x, pad);
  }
  if constexpr (NP % 2 == 0) {
    if (vec == 2) return load_chunks<NP, 2>(base, i0, N, dt, x, pad);
  }
#pragma unroll
  for (int n = 0; n < NP; ++n) x[n] = n < N ? load_as_float(base, i0 + n * sN, dt) : pad;
}

// The first N of NP values into one contiguous row at element i0, `vec`
// elements at a time (vec > 1: N a multiple of vec and the row aligned).
template <int NP>
__device__ __forceinline__ void store_row(void* base, int64_t i0, int N, Dtype dt, int vec, const float (&x)[NP]) {
  if constexpr (NP % 8 == 0) {
    if (vec == 8) return store_chunks<NP, 8>(base, i0, N, dt, x);
  }
  if constexpr (NP % 4 == 0) {
    if (vec == 4) return store_chunks<NP, 4>(base, i0, N, dt, x);
  }
  if constexpr (NP % 2 == 0) {
    if (vec == 2) return store_chunks<NP, 2>(base, i0, N, dt, x);
  }
#pragma unroll
  for (int n = 0; n < NP; ++n)
    if (n < N) store_from_float(base, i0 + n, x[n], dt);
}

// Block-wide sum (or max) of V values per thread, result in every thread.
// smem holds (kThreads / 32) * V floats. Every thread combines the warp
// partials in the same order, so all threads get bitwise the same result and
// the decisions taken on it are uniform across the block. kTrailingSync: a
// barrier after the partials are read, so that smem can be written again at
// once (BlockReducer alternates two buffers instead).
template <int V, int kThreads, bool kMax, bool kTrailingSync = true>
__device__ __forceinline__ void block_reduce(float (&x)[V], float* smem) {
  constexpr int kWarps = kThreads / 32;
#pragma unroll
  for (int v = 0; v < V; ++v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float o = __shfl_xor_sync(0xffffffffu, x[v], off);
      x[v] = kMax ? fmaxf(x[v], o) : x[v] + o;
    }
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
#pragma unroll
    for (int v = 0; v < V; ++v) smem[warp * V + v] = x[v];
  }
  __syncthreads();
#pragma unroll
  for (int v = 0; v < V; ++v) {
    float acc = smem[v];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) acc = kMax ? fmaxf(acc, smem[w * V + v]) : acc + smem[w * V + v];
    x[v] = acc;
  }
  if constexpr (kTrailingSync) __syncthreads();
}

// Block reductions of up to kMaxV values. With kHalves = 2, one barrier
// each: consecutive reductions write alternate halves of smem (2 *
// (kThreads / 32) * kMaxV floats), so a thread writing one half has passed
// the barrier of the reduction in between, which every thread reaches only
// after reading that half. With kHalves = 1, one buffer and two barriers
// each. Every thread must make the same sequence of calls (uniform control
// flow), as with any block reduction.
template <int kThreads, int kMaxV, int kHalves>
struct BlockReducer {
  static constexpr int kFloats = kHalves * (kThreads / 32) * kMaxV;  // of smem
  float* smem;
  int half = 0;
  template <bool kMax, int V>
  __device__ __forceinline__ void operator()(float (&x)[V]) {
    static_assert(V <= kMaxV, "BlockReducer: too many values");
    if constexpr (kHalves == 2) {
      block_reduce<V, kThreads, kMax, false>(x, smem + half * (kThreads / 32) * kMaxV);
      half ^= 1;
    } else {
      block_reduce<V, kThreads, kMax, true>(x, smem);
    }
  }
};

// Blocks of kThreads the forward asks to fit on one SM (65536 registers):
// three of 128 threads, at most 168 registers a thread. The registers hold
// the kernel matrix, not the scores, which leaves a thread of 8 rows x 8
// prompts about 110 live values (sm_90: 168 registers, no spills). With the
// scores in registers too, Nsight Compute on an H100 (commit 8667a72) found
// 255 registers, 164 B of spills and two blocks an SM (12.5% occupancy),
// limited by registers.
__host__ __device__ constexpr int fwd_min_blocks(int threads) { return threads <= 128 ? 3 : 1; }

// Where the forward keeps the scores after reading them once: in shared
// memory, each thread's own rows, read back where a log-domain half-step
// rebuilds K and for the refined score, when the tile takes at most 32 KB
// (M <= 1024 pixels for up to 8 prompts, M <= 512 for 16, M <= 2048 for 4).
// Three blocks of 128 threads then take 3 x (32.3 or 32.6 + 1 reserved) KB of
// an SM's shared memory (bench/cuda_ptxas.py): about 100 KB of 228 on an H100
// and 164 on an A100, but all of the 100 KB of an sm_86 GPU (a 3090), with
// 64 B to spare for 8 prompts (33088 B a block) and 160 B for 16 (33056 B,
// one reduction buffer). Larger tiles read the scores again from global
// memory (L2), as spilled registers would be.
__host__ __device__ constexpr bool fwd_scores_in_smem(int NP, int threads) {
  return fwd_rows(NP) * NP * threads * 4 <= 32 * 1024;
}

template <int NP, int kThreads>
__global__ void __launch_bounds__(kThreads, fwd_min_blocks(kThreads)) mps_fwd_kernel(ForwardArgs a) {
  constexpr int kRows = fwd_rows(NP);
  constexpr bool kSmem = fwd_scores_in_smem(NP, kThreads);
  // Two reduction buffers (one barrier a reduction) except for 16 prompts,
  // whose larger buffers would cost an sm_86 GPU its third block an SM.
  using Reducer = BlockReducer<kThreads, NP + 2, NP <= 8 ? 2 : 1>;
  __shared__ float red[Reducer::kFloats];
  Reducer reduce{red};
  // Score (row r, prompt n) of thread t at [(r * NP + n) * kThreads + t]:
  // consecutive threads, consecutive words.
  __shared__ float s_tile[kSmem ? kRows * NP * kThreads : 1];
  const int64_t p = blockIdx.x;
  const int M = a.M, N = a.N;
  const float ie = 1.0f / a.eps;
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
  // The scores of row r of this thread (0 past M and past N): from memory
  // the first time (kept in s_tile where kSmem), then from s_tile.
  auto load_scores = [&](int r, float (&x)[NP], bool first) {
    if (kSmem && !first) {
#pragma unroll
      for (int n = 0; n < NP; ++n) x[n] = s_tile[(r * NP + n) * kThreads + threadIdx.x];
      return;
    }
    const int m = threadIdx.x + r * kThreads;
    if (m < M) {
      // Strides made opaque to the compiler here: else it computes the 64-bit
      // address of every score once, before the loop, and holds them all
      // (sm_90, 8 x 8, 128 threads: 168 registers and 1.1 KB of spill stores
      // instead of 167 and none).
      int64_t sM = a.sM, sN = a.sN;
      asm volatile("" : "+l"(sM), "+l"(sN));
      load_row<NP>(a.S, p * a.sP + m * sM, sN, N, a.dtype, a.s_vec, x, 0.0f);
    } else {
#pragma unroll
      for (int n = 0; n < NP; ++n) x[n] = 0.0f;
    }
    if (kSmem) {
#pragma unroll
      for (int n = 0; n < NP; ++n) s_tile[(r * NP + n) * kThreads + threadIdx.x] = x[n];
    }
  };

  // Log-domain f half-step from beta (v = 1): alpha and K with rows summing
  // to mu. Returns this thread's part of sum_m |f/eps - previous f/eps|;
  // `first`: the first read of the scores, which sets *bad when a score is
  // NaN or inf and the check is asked for.
  auto rebuild_rows = [&](bool first, bool* bad) {
    const bool check = first && a.nonfinite != nullptr;
    float change = 0.0f;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const bool live = threadIdx.x + r * kThreads < M;
      float s[NP];
      load_scores(r, s, first);
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < NP; ++n) {
        if (n < N) {
          if (check) *bad |= !isfinite(s[n]);
          mx = fmaxf(mx, s[n] * ie + beta[n] - ie);
        }
      }
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < NP; ++n) {
        k[r][n] = n < N ? __expf(s[n] * ie + beta[n] - ie - mx) : 0.0f;
        sum += k[r][n];
      }
      const float a_new = log_mu - mx - __logf(sum);
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
  // summing to nu. K holds S/eps + alpha between the two passes.
  auto rebuild_cols = [&]() {
    float mx[NP];
#pragma unroll
    for (int n = 0; n < NP; ++n) mx[n] = -INFINITY;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const bool live = threadIdx.x + r * kThreads < M;
      float s[NP];
      load_scores(r, s, false);
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
        const bool live = threadIdx.x + r * kThreads < M && n < N;
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
  // v = nu / (K^T u); false when a scaling left the safe range.
  auto scale_cols = [&]() {
    float z[NP];
#pragma unroll
    for (int n = 0; n < NP; ++n) {
      z[n] = 0.0f;
#pragma unroll
      for (int r = 0; r < kRows; ++r) z[n] += k[r][n] * u[r];
    }
    reduce.template operator()<false>(z);
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
      // cancellation against a large alpha), the partial column products
      // K^T u and the count of scalings out of range, all in one reduction
      // (whose sums are dropped when a scaling is out of range).
      float acc[NP + 2];
#pragma unroll
      for (int n = 0; n < NP + 2; ++n) acc[n] = 0.0f;
      float lu_new[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const bool live = threadIdx.x + r * kThreads < M;
        float kv = 0.0f;
#pragma unroll
        for (int n = 0; n < NP; ++n) kv += k[r][n] * v[n];
        const float um = live ? mu / kv : 1.0f;
        acc[NP + 1] += um >= lo_ok && um <= hi_ok ? 0.0f : 1.0f;
        lu_new[r] = __logf(um);
        acc[NP] += live ? fabsf(lu_new[r] - log_u[r]) : 0.0f;
        u[r] = um;
#pragma unroll
        for (int n = 0; n < NP; ++n) acc[n] += live ? k[r][n] * um : 0.0f;
      }
      reduce.template operator()<false>(acc);
      if (acc[NP + 1] == 0.0f) {
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
      bool bad = false;
      float c[1] = {rebuild_rows(!have_kernel, &bad)};
      // The pointer is the same in every thread, so the barrier is reached by all or none.
      if (!have_kernel && a.nonfinite != nullptr && __syncthreads_or(bad)) {
        if (threadIdx.x == 0) atomicExch(a.nonfinite, 1);
      }
      have_kernel = true;
      if (!scale_cols()) rebuild_cols();
      reduce.template operator()<false>(c);
      change = c[0];
    }
    if (a.eps * change / M < a.tol) break;
  }

  // Outputs: f = eps * (alpha + log u), g = eps * (beta + log v), the refined
  // score and the plan.
  const float mn = static_cast<float>(M) * static_cast<float>(N);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int m = threadIdx.x + r * kThreads;
    if (m >= M) continue;
    a.f[p * M + m] = a.eps * (alpha[r] + log_u[r]);
    float s[NP];
    load_scores(r, s, false);
    float t[NP];
    float acc = 0.0f;
#pragma unroll
    for (int n = 0; n < NP; ++n) {
      t[n] = u[r] * k[r][n] * v[n];
      acc += k[r][n] * v[n] * s[n];
    }
    store_from_float(a.score, p * M + m, mn * u[r] * acc, a.dtype);
    if (a.plan != nullptr) store_row<NP>(a.plan, (p * M + m) * N, N, a.dtype, a.plan_vec, t);
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

template <int NP, int kThreads>
__global__ void __launch_bounds__(kThreads) mps_bwd_kernel(BackwardArgs a) {
  constexpr int kRows = bwd_rows(NP);
  constexpr int kWarps = kThreads / 32;
  __shared__ float red[kWarps * NP];
  // Per warp, its partial sums of the prompt weights W[n][j] = sum_m
  // T_mn T_mj / a_m, then (W_s) their sum over the warps in a fixed order:
  // no atomics, so the gradient is the same on every launch.
  __shared__ float part[kWarps * NP * NP];
  __shared__ float W_s[NP * NP];
  __shared__ double y_s[NP];
  const int64_t p = blockIdx.x;
  const int M = a.M, N = a.N;
  const float ie = 1.0f / a.eps;
  const float mn = static_cast<float>(M) * static_cast<float>(N);

  float t[kRows][NP], h[kRows][NP], inv_a[kRows], rr[kRows], ds[kRows];
  float g[NP];
#pragma unroll
  for (int n = 0; n < NP; ++n) g[n] = n < N ? a.g[p * N + n] : 0.0f;
  // Pass 1: T, H = -(T * G) / eps; row sums a, r; the right-hand side
  // s - T^T (r / a) of the Laplacian system.
  float rhs[NP];
#pragma unroll
  for (int n = 0; n < NP; ++n) rhs[n] = 0.0f;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int m = threadIdx.x + r * kThreads;
    const bool live = m < M;
    const float fm = live ? a.f[p * M + m] : 0.0f;
    ds[r] = live && a.dscore != nullptr ? load_as_float(a.dscore, p * M + m, a.dtype) * mn : 0.0f;
    // Scores and the plan's upstream gradient of the row (0 past M and N).
    float s[NP], dp[NP];
#pragma unroll
    for (int n = 0; n < NP; ++n) s[n] = dp[n] = 0.0f;
    if (live) {
      load_row<NP>(a.S, p * a.sP + m * a.sM, a.sN, N, a.dtype, a.s_vec, s, 0.0f);
      if (a.dplan != nullptr) load_row<NP>(a.dplan, p * a.dpP + m * a.dpM, a.dpN, N, a.dtype, a.dp_vec, dp, 0.0f);
    }
    float row_a = 0.0f, row_r = 0.0f;
#pragma unroll
    for (int n = 0; n < NP; ++n) {
      float tv = 0.0f, hv = 0.0f;
      if (live && n < N) {
        tv = __expf((fm + g[n] - 1.0f + s[n]) * ie);
        hv = -tv * (s[n] * ds[r] + dp[n]) * ie;
      }
      t[r][n] = tv;
      h[r][n] = hv;
      row_a += tv;
      row_r += hv;
    }
    inv_a[r] = row_a > 0.0f ? 1.0f / row_a : 0.0f;
    rr[r] = row_r;
#pragma unroll
    for (int n = 0; n < NP; ++n) rhs[n] += h[r][n] - t[r][n] * inv_a[r] * row_r;
  }
  // The weights, sums of positive terms: the Laplacian L = diag(W 1) - W
  // equals diag(b) - T^T diag(1/a) T without its cancellations
  // (csrc/common/gauge_solve.h).
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int n = 0; n < NP; ++n) {
    if (n >= N) break;  // uniform across the block
    float row[NP];
#pragma unroll
    for (int j = 0; j < NP; ++j) {
      row[j] = 0.0f;
#pragma unroll
      for (int r = 0; r < kRows; ++r) row[j] += t[r][n] * t[r][j] * inv_a[r];
    }
#pragma unroll
    for (int j = 0; j < NP; ++j) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) row[j] += __shfl_xor_sync(0xffffffffu, row[j], off);
    }
    if (lane == 0) {
#pragma unroll
      for (int j = 0; j < NP; ++j) part[(warp * NP + n) * NP + j] = row[j];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < N * NP; i += kThreads) {
    float acc = 0.0f;
    for (int w = 0; w < kWarps; ++w) acc += part[w * NP * NP + i];
    W_s[i] = acc;
  }
  block_reduce<NP, kThreads, false>(rhs, red);  // its barriers also publish W_s
  if (warp == 0) {
    // The Laplacian solve by the first warp, lane i holding row i in
    // registers (csrc/common/gauge_solve.h); the other warps wait.
    double w_row[NP];
    double b = 0.0;
#pragma unroll
    for (int j = 0; j < NP; ++j) {
      w_row[j] = lane < N && j < N ? static_cast<double>(W_s[lane * NP + j]) : 0.0;
      if (j == lane && j < N) b = rhs[j];
    }
    const double y = laplacian_gauge_solve_warp<NP>(w_row, b, N);
    if (lane < NP) y_s[lane] = y;
  }
  __syncthreads();
  // Pass 2: x = (r - T y) / a; dS = -(H - T (x + y)) + M N T dS*.
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int m = threadIdx.x + r * kThreads;
    if (m >= M) continue;
    float ty = 0.0f;
#pragma unroll
    for (int n = 0; n < NP; ++n) ty += t[r][n] * static_cast<float>(y_s[n]);
    const float x = (rr[r] - ty) * inv_a[r];
    float out[NP];
#pragma unroll
    for (int n = 0; n < NP; ++n) {
      const float dc = h[r][n] - t[r][n] * (x + static_cast<float>(y_s[n]));
      out[n] = t[r][n] * ds[r] - dc;
    }
    store_row<NP>(a.grad, (p * M + m) * N, N, a.dtype, a.grad_vec, out);
  }
}

// The block shape for M pixels: rows per thread, at least 128 threads.
int threads_for(int M, int rows) {
  int threads = 128;
  while (threads * rows < M) threads *= 2;
  return threads;
}

// Launches Launch<NP, threads> for the problem's prompt bucket NP (4, 8, 16)
// and its block size; only the block sizes that M <= kMaxPixels can ask for
// are compiled (Launch::rows(NP) rows a thread).
template <template <int, int> class Launch, typename Args>
cudaError_t dispatch(int M, int N, int64_t P, cudaStream_t stream, const Args& args) {
  const int np = N <= 4 ? 4 : (N <= 8 ? 8 : 16);
  const int threads = threads_for(M, Launch<4, 128>::rows(np));
#define OTSEG_LAUNCH(NP_, T_)                                                              \
  if constexpr (T_ == 128 || T_ * Launch<NP_, T_>::rows(NP_) <= kMaxPixels) {               \
    if (np == NP_ && threads == T_) {                                                      \
      Launch<NP_, T_>::run(static_cast<unsigned>(P), stream, args);                        \
      return cudaGetLastError();                                                           \
    }                                                                                      \
  }
#define OTSEG_LAUNCH_NP(NP_) \
  OTSEG_LAUNCH(NP_, 128) OTSEG_LAUNCH(NP_, 256) OTSEG_LAUNCH(NP_, 512) OTSEG_LAUNCH(NP_, 1024)
  OTSEG_LAUNCH_NP(4)
  OTSEG_LAUNCH_NP(8)
  OTSEG_LAUNCH_NP(16)
#undef OTSEG_LAUNCH_NP
#undef OTSEG_LAUNCH
  return cudaErrorNotSupported;  // no kernel: a shape the host code lets through by mistake
}

template <int NP, int T>
struct LaunchFwd {
  static constexpr int rows(int np) { return fwd_rows(np); }
  static void run(unsigned P, cudaStream_t stream, const ForwardArgs& a) {
    mps_fwd_kernel<NP, T><<<P, T, 0, stream>>>(a);
  }
};

template <int NP, int T>
struct LaunchBwd {
  static constexpr int rows(int np) { return bwd_rows(np); }
  static void run(unsigned P, cudaStream_t stream, const BackwardArgs& a) {
    mps_bwd_kernel<NP, T><<<P, T, 0, stream>>>(a);
  }
};

}  // namespace

cudaError_t launch_mps_forward(const ForwardArgs& args, int64_t P, cudaStream_t stream) {
  return dispatch<LaunchFwd>(args.M, args.N, P, stream, args);
}

cudaError_t launch_mps_backward(const BackwardArgs& args, int64_t P, cudaStream_t stream) {
  return dispatch<LaunchBwd>(args.M, args.N, P, stream, args);
}

}  // namespace cuda
}  // namespace otseg
