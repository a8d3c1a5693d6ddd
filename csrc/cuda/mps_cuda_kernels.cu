// Fused Multi-Prompts Sinkhorn on CUDA: the kernels and their launches
// (launch_mps_forward / launch_mps_backward, mps_cuda.h). No ATen here: the
// host side (checks, outputs, streams, exceptions) is mps_cuda.cpp.
//
// One block per (b, k) problem. Each thread owns a few pixel rows (fwd_rows) and
// keeps their scores and kernel entries in registers for all iterations, so S
// is read from global memory once and every iteration, the per-problem
// stopping test included, runs on chip with no host synchronisation. The
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
// cheaper, and 128 threads for 1024 x 8 leave room for two problems an SM
// (the Triton forward ran 1.6-1.9x faster with 4 warps than with 8 on an
// H100: otseg/ops/mps/triton.py, _blocks). 16 prompts keep 4 rows (registers).
// The backward keeps 4 rows and 256 threads for 1024 pixels.
__host__ __device__ constexpr int fwd_rows(int NP) { return NP <= 8 ? 8 : 4; }
constexpr int kBwdRows = 4;

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

// Block-wide sum (or max) of V values per thread, result in every thread.
// smem holds (kThreads / 32) * V floats. Every thread combines the warp
// partials in the same order, so all threads get bitwise the same result and
// the decisions taken on it are uniform across the block.
template <int V, int kThreads, bool kMax>
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
  __syncthreads();
}

template <int NP, int kThreads>
__global__ void __launch_bounds__(kThreads) mps_fwd_kernel(ForwardArgs a) {
  constexpr int kRows = fwd_rows(NP);
  __shared__ float red[(kThreads / 32) * (NP + 1)];
  const int64_t p = blockIdx.x;
  const int M = a.M, N = a.N;
  const float ie = 1.0f / a.eps;
  const float mu = 1.0f / M, nu = 1.0f / N;
  const float log_mu = -logf(static_cast<float>(M)), log_nu = -logf(static_cast<float>(N));
  const float lo_ok = expf(-kAbsorb), hi_ok = expf(kAbsorb);

  // Registers: scores s, kernel k, absorbed potential alpha, scaling u and the
  // previous full potential prev (all in units of eps), for this thread's rows.
  float s[kRows][NP], k[kRows][NP], alpha[kRows], u[kRows], prev[kRows];
  // Per prompt, replicated in every thread.
  float beta[NP], v[NP];
  bool bad = false;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int m = threadIdx.x + r * kThreads;
#pragma unroll
    for (int n = 0; n < NP; ++n) {
      float x = 0.0f;
      if (m < M && n < N) {
        x = load_as_float(a.S, p * a.sP + m * a.sM + n * a.sN, a.dtype);
        bad |= !isfinite(x);
      }
      s[r][n] = x;
    }
    alpha[r] = 0.0f;
    u[r] = 1.0f;
    prev[r] = 0.0f;
  }
  if (a.nonfinite != nullptr && __syncthreads_or(bad)) {  // the pointer is the same in every thread
    if (threadIdx.x == 0) atomicExch(a.nonfinite, 1);
  }
#pragma unroll
  for (int n = 0; n < NP; ++n) {
    beta[n] = 0.0f;
    v[n] = 1.0f;
  }

  // Log-domain f half-step from beta (v = 1): alpha and K with rows summing to mu.
  auto rebuild_rows = [&]() {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const bool live = threadIdx.x + r * kThreads < M;
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < NP; ++n)
        if (n < N) mx = fmaxf(mx, s[r][n] * ie + beta[n] - ie);
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < NP; ++n) {
        k[r][n] = n < N ? __expf(s[r][n] * ie + beta[n] - ie - mx) : 0.0f;
        sum += k[r][n];
      }
      alpha[r] = log_mu - mx - __logf(sum);
      // Rows past M (s = 0 there) must stay out of every column sum:
      // K is 0 on them, as rebuild_cols and the sweep assume.
      const float scale = live ? mu / sum : 0.0f;
#pragma unroll
      for (int n = 0; n < NP; ++n) k[r][n] *= scale;
      u[r] = 1.0f;
    }
#pragma unroll
    for (int n = 0; n < NP; ++n) v[n] = 1.0f;
  };
  // Log-domain g half-step from alpha (u = 1): beta and K with columns summing to nu.
  auto rebuild_cols = [&]() {
    float mx[NP];
#pragma unroll
    for (int n = 0; n < NP; ++n) {
      mx[n] = -INFINITY;
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        if (threadIdx.x + r * kThreads < M) mx[n] = fmaxf(mx[n], s[r][n] * ie + alpha[r]);
    }
    block_reduce<NP, kThreads, true>(mx, red);
    float sum[NP];
#pragma unroll
    for (int n = 0; n < NP; ++n) {
      sum[n] = 0.0f;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const bool live = threadIdx.x + r * kThreads < M && n < N;
        k[r][n] = live ? __expf(s[r][n] * ie + alpha[r] - mx[n]) : 0.0f;
        sum[n] += k[r][n];
      }
    }
    block_reduce<NP, kThreads, false>(sum, red);
#pragma unroll
    for (int n = 0; n < NP; ++n) {
      beta[n] = n < N ? log_nu + ie - mx[n] - __logf(sum[n]) : 0.0f;
      const float scale = n < N ? nu / sum[n] : 0.0f;
#pragma unroll
      for (int r = 0; r < kRows; ++r) k[r][n] *= scale;
      v[n] = 1.0f;
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) u[r] = 1.0f;
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
    block_reduce<NP, kThreads, false>(z, red);
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

  int it = 0;
  bool have_kernel = false;
  while (it < a.max_iter) {
    ++it;
    float change;
    bool sweep_ok = false;
    if (have_kernel) {
      // One pass over the registers: u = mu / (K v), the new full potential,
      // its change, and the partial column products K^T u.
      float acc[NP + 1];
      bool u_bad = false;
#pragma unroll
      for (int n = 0; n <= NP; ++n) acc[n] = 0.0f;
      float a_new[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const bool live = threadIdx.x + r * kThreads < M;
        float kv = 0.0f;
#pragma unroll
        for (int n = 0; n < NP; ++n) kv += k[r][n] * v[n];
        const float um = live ? mu / kv : 1.0f;
        u_bad |= !(um >= lo_ok && um <= hi_ok);
        a_new[r] = alpha[r] + __logf(um);
        acc[NP] += live ? fabsf(a_new[r] - prev[r]) : 0.0f;
        u[r] = um;
#pragma unroll
        for (int n = 0; n < NP; ++n) acc[n] += live ? k[r][n] * um : 0.0f;
      }
      if (!__syncthreads_or(u_bad)) {
        block_reduce<NP + 1, kThreads, false>(acc, red);
        sweep_ok = true;
        change = acc[NP];
#pragma unroll
        for (int r = 0; r < kRows; ++r) prev[r] = a_new[r];
        bool v_ok = true;
#pragma unroll
        for (int n = 0; n < NP; ++n) {
          if (n < N) {
            v[n] = nu / acc[n];
            v_ok = v_ok && v[n] >= lo_ok && v[n] <= hi_ok;
          }
        }
        if (!v_ok) {
          // Absorb u (alpha + log u is prev) and redo the g half-step in the log domain.
#pragma unroll
          for (int r = 0; r < kRows; ++r) alpha[r] = prev[r];
          rebuild_cols();
        }
      }
    }
    if (!sweep_ok) {
      // First iteration, or u left the safe range: absorb v, the f half-step
      // in the log domain, then the g half-step.
      if (have_kernel) {
#pragma unroll
        for (int n = 0; n < NP; ++n) beta[n] += n < N ? __logf(v[n]) : 0.0f;
      }
      rebuild_rows();
      have_kernel = true;
      if (!scale_cols()) rebuild_cols();
      float c[1] = {0.0f};
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (threadIdx.x + r * kThreads < M) c[0] += fabsf(alpha[r] - prev[r]);
        prev[r] = alpha[r];
      }
      block_reduce<1, kThreads, false>(c, red);
      change = c[0];
    }
    if (a.eps * change / M < a.tol) break;
  }

  // Outputs: f = eps * prev, g = eps * (beta + log v), the refined score and the plan.
  const float mn = static_cast<float>(M) * static_cast<float>(N);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int m = threadIdx.x + r * kThreads;
    if (m >= M) continue;
    a.f[p * M + m] = a.eps * prev[r];
    float acc = 0.0f;
#pragma unroll
    for (int n = 0; n < NP; ++n) acc += k[r][n] * v[n] * s[r][n];
    store_from_float(a.score, p * M + m, mn * u[r] * acc, a.dtype);
    if (a.plan != nullptr) {
#pragma unroll
      for (int n = 0; n < NP; ++n)
        if (n < N) store_from_float(a.plan, (p * M + m) * N + n, u[r] * k[r][n] * v[n], a.dtype);
    }
  }
  if (threadIdx.x == 0) {
    for (int n = 0; n < N; ++n) a.g[p * N + n] = a.eps * (beta[n] + logf(v[n]));
    a.n_iter[p] = it;
  }
}

template <int NP, int kThreads>
__global__ void __launch_bounds__(kThreads) mps_bwd_kernel(BackwardArgs a) {
  constexpr int kRows = kBwdRows;
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
    float row_a = 0.0f, row_r = 0.0f;
#pragma unroll
    for (int n = 0; n < NP; ++n) {
      float tv = 0.0f, hv = 0.0f;
      if (live && n < N) {
        const float s = load_as_float(a.S, p * a.sP + m * a.sM + n * a.sN, a.dtype);
        tv = __expf((fm + g[n] - 1.0f + s) * ie);
        float gmn = s * ds[r];
        if (a.dplan != nullptr) gmn += load_as_float(a.dplan, p * a.dpP + m * a.dpM + n * a.dpN, a.dtype);
        hv = -tv * gmn * ie;
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
#pragma unroll
    for (int n = 0; n < NP; ++n) {
      if (n >= N) break;
      const float dc = h[r][n] - t[r][n] * (x + static_cast<float>(y_s[n]));
      store_from_float(a.grad, (p * M + m) * N + n, t[r][n] * ds[r] - dc, a.dtype);
    }
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
  static constexpr int rows(int) { return kBwdRows; }
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
