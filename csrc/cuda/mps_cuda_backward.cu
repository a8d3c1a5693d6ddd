// The CUDA backend's backward kernel and its launch (launch_mps_backward,
// mps_cuda.h); shared device code in mps_cuda_device.cuh.
//
// The implicit gradient of the converged problem (SPEC section 1), one block
// per problem: one pass over its rows builds the plan, the right-hand side
// and the prompt weights of the N x N Laplacian system; one warp solves it,
// lane i holding row i (the CPU kernel's elimination, csrc/common/
// gauge_solve.h); a second pass writes the gradient of the scores.
#include "../common/gauge_solve.h"
#include "mps_cuda_device.cuh"

namespace otseg {
namespace cuda {
namespace {

// The backward's rows are read and written through AnyRows, F32Vec4Rows,
// F32Vec2Rows or F32Vec2Rows6 (mps_cuda_device.cuh); the float32 kernels are
// launched only without a plan gradient (LaunchBwd), so they never read one.

// Floats of shared memory a warp of the backward writes: its partial sums of
// the prompt weights W[n][j] = sum_m T_mn T_mj / a_m (NP x NP, diagonal
// unwritten) and of the right-hand side (NP).
__host__ __device__ constexpr int bwd_part_floats(int NP) { return NP * NP + NP; }

// Whether the backward keeps H (kRows x NP a thread) in shared memory: up to
// 32 KB a block, as the forward's scores (fwd_scores_in_smem).
__host__ __device__ constexpr bool bwd_h_in_smem(int NP, int threads) {
  return bwd_rows(NP) * NP * threads * 4 <= 32 * 1024;
}

// The backward of one problem (the block's), its rows accessed through Rows.
// Shared memory: part [kWarps * bwd_part_floats(NP)], the warps' partial
// sums; y_s [NP], the solution; h_tile, H where bwd_h_in_smem.
template <int NP, int kThreads, class Rows>
__device__ __forceinline__ void mps_bwd_body(const BackwardArgs& a, float* part, double* y_s, float* h_tile) {
  constexpr int kRows = bwd_rows(NP);
  constexpr int kWarps = kThreads / 32;
  constexpr int kPart = bwd_part_floats(NP);
  const int64_t p = blockIdx.x;
  // N known at compile time in the float32 x2 kernel for N = 6 alone
  // (F32Vec2Rows6, VOC's prompts: every test n < N, the weights' pairs and
  // the solve's steps decided by the compiler). Not from the x4 rows' kN:
  // the backward runs them for any N of whole float4s (N = 12 of 16). A
  // float32 x2 row type with a kN must be launched for that N only, as
  // LaunchBwd launches F32Vec2Rows6.
  constexpr int kFixedN = Rows::kVec == 2 ? Rows::kN : 0;
  const int M = a.M, N = kFixedN > 0 ? kFixedN : a.N;
  const float ie = 1.0f / a.eps;
  // T = exp((f + g - C) / eps) as exp2f of the argument times log2(e)/eps
  // (kLog2e; sm_90, 8 prompts, float32 rows: 5480 -> 5168 instructions of
  // code). Not for 16 prompts, whose float32 kernel ptxas then gave 179
  // registers instead of 168, two blocks an SM instead of three
  // (bench/cuda_ptxas.py).
  constexpr bool kExp2 = NP <= 8;
  const float ie2 = ie * kLog2e;
  const float mn = static_cast<float>(M) * static_cast<float>(N);

  // H is needed again only in pass 2: kept in shared memory up to 32 KB a
  // block (h_tile, tile_at), which frees kRows x NP registers a thread
  // (sm_90, 8 x 8, 128 threads: from 195 registers, two blocks an SM, to
  // three); larger blocks hold it in registers.
  constexpr bool kHSmem = bwd_h_in_smem(NP, kThreads);
  float h_reg[kHSmem ? 1 : kRows][NP];
  auto h_at = [&](int r, int n) -> float& {
    if constexpr (kHSmem) return tile_at<NP, kThreads>(h_tile, r, n);
    else return h_reg[r][n];
  };
  float t[kRows][NP], inv_a[kRows], rr[kRows], ds[kRows];
  float g[NP];
#pragma unroll
  for (int n = 0; n < NP; ++n) g[n] = n < N ? a.g[p * N + n] : 0.0f;
  // f, dS* and the scores of each row (0 past M and N): where H goes to
  // shared memory, the float32 kernels request every row's loads at once, so
  // that they are in flight together (Nsight Compute on an H100, commit
  // ea3ceed: the warps waited 3.7 of 10.5 cycles an instruction on memory
  // with each row's loads issued after the previous row's arithmetic), and
  // the scores wait in h_tile until pass 1 writes H over them. The kernel
  // for any rows reads them row by row: requested at once, ptxas chose 128
  // registers and spilled (sm_90, 8 x 8, 128 threads).
  constexpr bool kPrefetch = kHSmem && Rows::kFloat32;
  float fm[kRows];
  auto load_f_ds = [&](int r) {
    const int m = threadIdx.x + r * kThreads;
    const bool live = m < M;
    fm[r] = live ? a.f[p * M + m] : 0.0f;
    ds[r] = live && a.dscore != nullptr ? Rows::load1(a.dscore, p * M + m, a.dtype) * mn : 0.0f;
  };
  if constexpr (kPrefetch) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) load_f_ds(r);
    stage_rows<NP, kRows, kThreads, false>(
        M, [&](int m, float(&x)[NP]) { Rows::load(a.S, p * a.sP + m * a.sM, a.sN, N, a.dtype, a.s_vec, x); },
        [&](int r, const float(&x)[NP]) {
#pragma unroll
          for (int n = 0; n < NP; ++n) tile_at<NP, kThreads>(h_tile, r, n) = x[n];
        });
  }
  // Pass 1: T, H = -(T * G) / eps; row sums a, r; the right-hand side
  // s - T^T (r / a) of the Laplacian system.
  float rhs[NP];
#pragma unroll
  for (int n = 0; n < NP; ++n) rhs[n] = 0.0f;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int m = threadIdx.x + r * kThreads;
    const bool live = m < M;
    if constexpr (!kPrefetch) load_f_ds(r);
    // Scores and the plan's upstream gradient of the row (0 past M and N).
    float s[NP], dp[NP];
#pragma unroll
    for (int n = 0; n < NP; ++n) s[n] = dp[n] = 0.0f;
    if constexpr (kPrefetch) {
#pragma unroll
      for (int n = 0; n < NP; ++n) s[n] = h_at(r, n);
    }
    if (live) {
      if constexpr (!kPrefetch) Rows::load(a.S, p * a.sP + m * a.sM, a.sN, N, a.dtype, a.s_vec, s);
      if constexpr (!Rows::kFloat32) {
        if (a.dplan != nullptr) Rows::load(a.dplan, p * a.dpP + m * a.dpM, a.dpN, N, a.dtype, a.dp_vec, dp);
      }
    }
    float row_a = 0.0f, row_r = 0.0f, h_row[NP];
#pragma unroll
    for (int n = 0; n < NP; ++n) {
      float tv = 0.0f, hv = 0.0f;
      if (live && n < N) {
        const float x = fm[r] + g[n] - 1.0f + s[n];  // (f + g - C), C = 1 - S
        tv = kExp2 ? exp2f(x * ie2) : __expf(x * ie);
        hv = -tv * (s[n] * ds[r] + dp[n]) * ie;
      }
      t[r][n] = tv;
      h_row[n] = hv;
      h_at(r, n) = hv;
      row_a += tv;
      row_r += hv;
    }
    inv_a[r] = row_a > 0.0f ? 1.0f / row_a : 0.0f;
    rr[r] = row_r;
#pragma unroll
    for (int n = 0; n < NP; ++n) rhs[n] += h_row[n] - t[r][n] * inv_a[r] * row_r;
  }
  // The weights, sums of positive terms: the Laplacian L = diag(W 1) - W
  // equals diag(b) - T^T diag(1/a) T without its cancellations
  // (csrc/common/gauge_solve.h). W is symmetric and its diagonal unused, so
  // each warp sums the pairs n < j only (28 of 64 for 8 prompts) and writes
  // both halves; its partial right-hand side goes beside them.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* my_part = part + warp * kPart;
#pragma unroll
  for (int n = 0; n < NP - 1; ++n) {
    if (n >= N - 1) break;  // uniform across the block
    float row[NP];
#pragma unroll
    for (int j = n + 1; j < NP; ++j) {
      row[j] = 0.0f;
      if (j >= N) continue;  // uniform
#pragma unroll
      for (int r = 0; r < kRows; ++r) row[j] += t[r][n] * t[r][j] * inv_a[r];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) row[j] += __shfl_xor_sync(0xffffffffu, row[j], off);
    }
    if (lane == 0) {
#pragma unroll
      for (int j = n + 1; j < NP; ++j) {
        if (j >= N) break;
        my_part[n * NP + j] = row[j];
        my_part[j * NP + n] = row[j];
      }
    }
  }
#pragma unroll
  for (int n = 0; n < NP; ++n) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) rhs[n] += __shfl_xor_sync(0xffffffffu, rhs[n], off);
  }
  if (lane == 0) {
#pragma unroll
    for (int n = 0; n < NP; ++n) my_part[NP * NP + n] = rhs[n];
  }
  __syncthreads();
  if (warp == 0) {
    // The Laplacian solve by the first warp, lane i holding row i in
    // registers (csrc/common/gauge_solve.h), summing the warps' parts in a
    // fixed order (no atomics: the same gradient on every launch); the
    // other warps wait.
    double w_row[NP];
    double b = 0.0;
#pragma unroll
    for (int j = 0; j < NP; ++j) {
      float acc = 0.0f;
      if (lane < N && j < N && j != lane) {
#pragma unroll
        for (int w = 0; w < kWarps; ++w) acc += part[w * kPart + lane * NP + j];
      }
      w_row[j] = acc;
    }
    if (lane < N) {
      float acc = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) acc += part[w * kPart + NP * NP + lane];
      b = acc;
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
      const float dc = h_at(r, n) - t[r][n] * (x + static_cast<float>(y_s[n]));
      out[n] = t[r][n] * ds[r] - dc;
    }
    Rows::store(a.grad, (p * M + m) * N, N, a.dtype, a.grad_vec, out);
  }
}

template <int NP, int kThreads, class Rows>
__global__ void __launch_bounds__(kThreads) mps_bwd_kernel(BackwardArgs a) {
  __shared__ float part[kThreads / 32 * bwd_part_floats(NP)];
  __shared__ double y_s[NP];
  __shared__ float h_tile[bwd_h_in_smem(NP, kThreads) ? bwd_rows(NP) * NP * kThreads : 1];
  mps_bwd_body<NP, kThreads, Rows>(a, part, y_s, h_tile);
}

template <int NP, int T>
struct LaunchBwd {
  static constexpr int rows(int np) { return bwd_rows(np); }
  static void run(unsigned P, cudaStream_t stream, const BackwardArgs& a) {
    // The kernel for the rows' layout (AnyRows, F32Vec4Rows, F32Vec2Rows:
    // mps_cuda_device.cuh); float2 rows for 8 prompts only, where the rows
    // are whole float2s but not whole float4s (N = 6; N = 8 only 8-byte
    // aligned), with a twin for N = 6 (F32Vec2Rows6) in the blocks of 128
    // threads (M <= 1024), as the forward's. Width 4 implies width 2.
    const bool f32 = a.dtype == Dtype::kFloat && a.dplan == nullptr;
    if (f32 && a.s_vec == 4 && a.grad_vec == 4) {
      mps_bwd_kernel<NP, T, F32Vec4Rows<NP>><<<P, T, 0, stream>>>(a);
      return;
    }
    if constexpr (NP == 8) {
      if (f32 && a.s_vec % 2 == 0 && a.grad_vec % 2 == 0) {
        if constexpr (T == 128) {
          if (a.N == 6) {
            mps_bwd_kernel<NP, T, F32Vec2Rows6><<<P, T, 0, stream>>>(a);
            return;
          }
        }
        mps_bwd_kernel<NP, T, F32Vec2Rows<NP>><<<P, T, 0, stream>>>(a);
        return;
      }
    }
    mps_bwd_kernel<NP, T, AnyRows<NP>><<<P, T, 0, stream>>>(a);
  }
};

}  // namespace

cudaError_t launch_mps_backward(const BackwardArgs& args, int64_t P, cudaStream_t stream) {
  return dispatch<LaunchBwd>(args.M, args.N, P, stream, args);
}

}  // namespace cuda
}  // namespace otseg
