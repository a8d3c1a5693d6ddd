// Device code shared by the CUDA backend's two kernels (mps_cuda_forward.cu,
// mps_cuda_backward.cu): rows per thread, loads and stores in the input's
// dtype, block reductions, and the launch dispatch over prompt buckets and
// block sizes. No ATen here: the host side (checks, outputs, streams,
// exceptions) is mps_cuda.cpp, behind the plain interface of mps_cuda.h.
// The kernels are in two files so that nvcc compiles them in parallel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "block_reduce.h"
#include "mps_cuda.h"

namespace otseg {
namespace cuda {

// log2(e) and ln 2: both kernels take exponentials as exp2f of arguments
// scaled by log2(e), one MUFU.EX2 under --use_fast_math where __expf
// multiplies by log2(e) first.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Pixel rows per thread. The forward gives each thread 8 rows up to 8
// prompts: fewer threads a problem make its two block sums an iteration
// cheaper, and 128 threads for 1024 x 8 leave room for three problems an SM
// (four with float32 x4 rows: fwd_min_blocks; the Triton forward ran
// 1.6-1.9x faster with 4 warps than with 8 on an H100: otseg/ops/mps/triton.py,
// _blocks). 16 prompts keep 4 rows (registers).
// The backward likewise (the Triton backward ran 1.4x faster with 4 warps than
// with 8 on an H100, while this kernel, at 4 rows and 256 threads for
// 1024 x 8, took twice the Triton backward's time): with H in shared memory
// (bwd_h_in_smem), 134-140 registers, no spills, three blocks of 128
// threads an SM for sm_90 (bench/cuda_ptxas.py).
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

// How a kernel reads and writes its rows; each kernel is compiled for each
// and the launch picks one (LaunchFwd, LaunchBwd). AnyRows takes every
// dtype, stride and vector width, choosing at run time for each row;
// F32Vec4Rows and F32Vec2Rows are the common cases alone: float32 rows of
// whole float4 (float2) vectors, contiguous and aligned (vector_width 4 or
// 2, mps_cuda.cpp), float2 for 8 prompts only (N = 6, the prompt templates
// of VOC, or N = 8 rows only 8-byte aligned). Nsight Compute on an H200
// (commit 0b64572) found both kernels' warps waiting for instructions (the
// forward 2.3 of 7.6 cycles an issued instruction, the backward 5.4 of about
// 13) with every row's accesses compiled for every dtype and width inline;
// on an H100 since (ea3ceed, e18088e), 0.14 with float4 rows. In one kernel
// with a branch, the two paths' joint register allocation spilled. With
// N = 6 (voc) the kernel for any rows still waited 9.7 of 17.8 cycles an
// instruction in the backward (H200, commit 4b7bf91), whence the float2
// kernels.
//   kFloat32: float32 rows read with no branch on the dtype or width;
//   kVec: their vector width (0: any);
//   kN: the prompts N, where the forward is launched for that N only
//   (every test n < N decided at compile time), else 0. The backward runs
//   the x4 rows for any N of whole float4s (N = 12 of 16), so it takes N
//   from kN for F32Vec2Rows6 alone (mps_cuda_backward.cu).
template <int NP>
struct AnyRows {
  static constexpr bool kFloat32 = false;
  static constexpr int kVec = 0;
  static constexpr int kN = 0;
  __device__ __forceinline__ static void load(const void* base, int64_t i0, int64_t stride, int N, Dtype dt,
                                              int vec, float (&x)[NP]) {
    load_row<NP>(base, i0, stride, N, dt, vec, x, 0.0f);
  }
  __device__ __forceinline__ static void store(void* base, int64_t i0, int N, Dtype dt, int vec,
                                               const float (&x)[NP]) {
    store_row<NP>(base, i0, N, dt, vec, x);
  }
  __device__ __forceinline__ static float load1(const void* base, int64_t i, Dtype dt) {
    return load_as_float(base, i, dt);
  }
  __device__ __forceinline__ static void store1(void* base, int64_t i, float v, Dtype dt) {
    store_from_float(base, i, v, dt);
  }
};

template <int NP, int V, int N_ = 0>
struct F32VecRows {
  static_assert(NP % V == 0 && N_ % V == 0 && N_ <= NP, "F32VecRows: rows of whole vectors");
  static constexpr bool kFloat32 = true;
  static constexpr int kVec = V;
  static constexpr int kN = N_;
  __device__ __forceinline__ static void load(const void* base, int64_t i0, int64_t, int N, Dtype, int,
                                              float (&x)[NP]) {
    load_chunks<NP, V>(base, i0, N, Dtype::kFloat, x, 0.0f);
  }
  __device__ __forceinline__ static void store(void* base, int64_t i0, int N, Dtype, int, const float (&x)[NP]) {
    store_chunks<NP, V>(base, i0, N, Dtype::kFloat, x);
  }
  __device__ __forceinline__ static float load1(const void* base, int64_t i, Dtype) {
    return static_cast<const float*>(base)[i];
  }
  __device__ __forceinline__ static void store1(void* base, int64_t i, float v, Dtype) {
    static_cast<float*>(base)[i] = v;
  }
};
// Named types, so that profilers and bench/cuda_ptxas.py tell the kernels
// apart. The float32 x4 forwards are launched for N = NP only; F32Vec2Rows6
// is the float32 x2 rows of N = 6 (VOC's prompts), for the forward's
// full-tile twin (mps_cuda_forward.cu) and the backward's twin of blocks of
// 128 threads (mps_cuda_backward.cu), both launched for N = 6 only.
template <int NP>
struct F32Vec4Rows : F32VecRows<NP, 4, NP> {};
template <int NP>
struct F32Vec2Rows : F32VecRows<NP, 2> {};
struct F32Vec2Rows6 : F32VecRows<8, 2, 6> {};

// A block's tile of kRows x NP values a thread in shared memory: entry (row
// r, prompt n) of thread t at [(r * NP + n) * kThreads + t], consecutive
// threads on consecutive words. Each thread touches its own entries only.
// The backward's layout (H, written entry by entry over the scores).
template <int NP, int kThreads>
__device__ __forceinline__ float& tile_at(float* tile, int r, int n) {
  return tile[(r * NP + n) * kThreads + threadIdx.x];
}

// The forward's layout of the same tile, in float4s (NP is 4, 8 or 16):
// prompts 4c .. 4c + 3 of row r of thread t at float4 [(r * NP / 4 + c) *
// kThreads + t], so that a warp's 16-byte accesses cover 512 consecutive
// bytes (four wavefronts, no bank conflicts) and a row of 8 prompts is two
// LDS.128 where tile_at's layout takes eight LDS (sm_90, 8 prompts, float32
// x4 rows: 48 fewer shared-memory instructions a thread in each of the
// staging, the first rebuild and the refined score; 104 shared loads and 24
// stores in the kernel's code instead of 328 and 72).
template <int NP, int kThreads>
__device__ __forceinline__ float4& tile4_at(float4* tile, int r, int c) {
  static_assert(NP % 4 == 0, "tile4_at: rows of whole float4s");
  return tile[(r * (NP / 4) + c) * kThreads + threadIdx.x];
}

// Row r of this thread from a float4 tile (tile4_at), and into it.
template <int NP, int kThreads>
__device__ __forceinline__ void tile4_load(float4* tile, int r, float (&x)[NP]) {
#pragma unroll
  for (int c = 0; c < NP / 4; ++c) {
    const float4 q = tile4_at<NP, kThreads>(tile, r, c);
    x[4 * c] = q.x, x[4 * c + 1] = q.y, x[4 * c + 2] = q.z, x[4 * c + 3] = q.w;
  }
}
template <int NP, int kThreads>
__device__ __forceinline__ void tile4_store(float4* tile, int r, const float (&x)[NP]) {
#pragma unroll
  for (int c = 0; c < NP / 4; ++c)
    tile4_at<NP, kThreads>(tile, r, c) = make_float4(x[4 * c], x[4 * c + 1], x[4 * c + 2], x[4 * c + 3]);
}

// This thread's rows m = threadIdx.x + r * kThreads (r < kRows), read by
// load(m, row), every row requested before any is stored, so that all their
// loads are in flight together; rows past M are 0. Then store(r, row) for
// each (into the thread's own entries of a tile: no barrier is needed, as
// each thread reads back only what it wrote). kFull: M = kRows kThreads,
// every row a pixel.
template <int NP, int kRows, int kThreads, bool kFull, class Load, class Store>
__device__ __forceinline__ void stage_rows(int M, Load load, Store store) {
  float x[kRows][NP];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int m = threadIdx.x + r * kThreads;
    if (kFull || m < M) {
      load(m, x[r]);
    } else {
#pragma unroll
      for (int n = 0; n < NP; ++n) x[r][n] = 0.0f;
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) store(r, x[r]);
}

// Block reductions of up to kMaxV values (block_reduce_scatter,
// block_reduce.h). With kHalves = 2, one barrier each: consecutive reductions
// write alternate halves of smem, so a thread writing one half has passed
// the barrier of the reduction in between, which every thread reaches only
// after reading that half. With kHalves = 1, one buffer and two barriers
// each. Every thread must make the same sequence of calls (uniform control
// flow), as with any block reduction.
template <int kThreads, int kMaxV, int kHalves>
struct BlockReducer {
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kHalfFloats = block_reduce_floats(kMaxV, kWarps);
  static constexpr int kFloats = kHalves * kHalfFloats;  // of smem
  float* smem;
  int half = 0;
  template <bool kMax, int V>
  __device__ __forceinline__ void operator()(float (&x)[V]) {
    static_assert(V <= kMaxV, "BlockReducer: too many values");
    if constexpr (kHalves == 2) {
      block_reduce_scatter<V, kWarps, kMax>(x, smem + half * kHalfFloats, CudaBlock{});
      half ^= 1;
    } else {
      block_reduce_scatter<V, kWarps, kMax>(x, smem, CudaBlock{});
      __syncthreads();
    }
  }
};

// The block shape for M pixels: rows per thread, at least 128 threads.
inline int threads_for(int M, int rows) {
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

}  // namespace cuda
}  // namespace otseg
