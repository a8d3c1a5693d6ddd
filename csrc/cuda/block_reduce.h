// Block-wide sums and maxima of a few values a thread, for the CUDA forward
// (mps_cuda_device.cuh, BlockReducer), written once for the GPU and for a
// host emulation of a block (tests/cuda_block_reduce_host.cpp, run by
// tests/test_build.py): the warp's shuffles, its lane and the block barrier
// come from a `Block` policy, CudaBlock on the GPU.
//
// Each warp first reduce-scatters: at the butterfly distance 16 a lane keeps
// one half of its values and sends its partner the other, so that after
// log2(P) such steps lane l holds one value, l >> (5 - log2(P)), summed over
// the lanes that differ in the top bits, and the last steps are an ordinary
// butterfly on that one value. P is the largest power of two of the V values
// up to 32; the other V - P ("extra") values take the whole butterfly. For 9
// values (8 prompts and a change) that is 42 shuffles, selects and adds a
// thread instead of 90. The warps' sums then meet in shared memory: the lanes
// of value i sum its kWarps partials, in a fixed order, and every thread
// takes value i from lane i << (5 - log2(P)) by a shuffle; the extras are
// summed by every thread from shared memory, in the same fixed order. So
// every thread of the block gets bitwise the same results (an exchange's two
// lanes add the same two numbers, and floating-point addition commutes), and
// decisions taken on them are uniform across the block.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define OTSEG_BR_INLINE __device__ __forceinline__
#else
#define OTSEG_BR_INLINE inline
#endif

namespace otseg {
namespace cuda {

// The values reduce-scattered for V values a thread: the largest power of
// two <= V, at most 32 (a warp's lanes).
constexpr int scatter_count(int V) { return V >= 32 ? 32 : (V >= 16 ? 16 : (V >= 8 ? 8 : (V >= 4 ? 4 : (V >= 2 ? 2 : 1)))); }
constexpr int log2_exact(int P) { return P <= 1 ? 0 : 1 + log2_exact(P / 2); }

// Floats of shared memory one reduction of up to V values uses.
constexpr int block_reduce_floats(int V, int warps) { return V * warps; }

template <bool kMax>
OTSEG_BR_INLINE float reduce_op(float a, float b) {
  return kMax ? fmaxf(a, b) : a + b;
}

// The block-wide sum (or max) of x[0..V) of every thread of the block, in
// every thread. smem: block_reduce_floats(V, kWarps) floats, which no thread
// may still be reading from an earlier reduction (a barrier between, or
// alternate buffers: BlockReducer). Every thread of the block must call it
// (uniform control flow). One barrier.
template <int V, int kWarps, bool kMax, class Block>
OTSEG_BR_INLINE void block_reduce_scatter(float (&x)[V], float* smem, const Block& block) {
  constexpr int P = scatter_count(V);
  constexpr int kLevels = log2_exact(P);
  constexpr int kShift = 5 - kLevels;  // lane l holds value l >> kShift
  const int lane = block.lane(), warp = block.warp();
  // Reduce-scatter of x[0..P): at each level the count halves; lanes with
  // the level's bit set keep the upper half.
  float y[P];
#pragma unroll
  for (int i = 0; i < P; ++i) y[i] = x[i];
#pragma unroll
  for (int level = 0; level < kLevels; ++level) {
    const int off = 16 >> level;
    const int half = P >> (level + 1);
    const bool upper = (lane & off) != 0;
#pragma unroll
    for (int j = 0; j < half; ++j) {
      const float send = upper ? y[j] : y[j + half];
      const float keep = upper ? y[j + half] : y[j];
      y[j] = reduce_op<kMax>(keep, block.shfl_xor(send, off));
    }
  }
  // The remaining levels on the one value, and every level on the extras.
#pragma unroll
  for (int off = 16 >> kLevels; off > 0; off >>= 1) y[0] = reduce_op<kMax>(y[0], block.shfl_xor(y[0], off));
#pragma unroll
  for (int e = P; e < V; ++e) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x[e] = reduce_op<kMax>(x[e], block.shfl_xor(x[e], off));
  }
  // Warp partials: value i of warp w at smem[i * kWarps + w].
  const int idx = lane >> kShift;
  if ((lane & ((1 << kShift) - 1)) == 0) smem[idx * kWarps + warp] = y[0];
  if (lane == 0) {
#pragma unroll
    for (int e = P; e < V; ++e) smem[e * kWarps + warp] = x[e];
  }
  block.sync();
  float mine = smem[idx * kWarps];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) mine = reduce_op<kMax>(mine, smem[idx * kWarps + w]);
#pragma unroll
  for (int i = 0; i < P; ++i) x[i] = block.shfl(mine, i << kShift);
#pragma unroll
  for (int e = P; e < V; ++e) {
    float acc = smem[e * kWarps];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) acc = reduce_op<kMax>(acc, smem[e * kWarps + w]);
    x[e] = acc;
  }
}

#if defined(__CUDACC__)
// The policy of a CUDA block whose threads are all active (blockDim.x a
// multiple of 32).
struct CudaBlock {
  __device__ __forceinline__ int lane() const { return threadIdx.x % 32; }
  __device__ __forceinline__ int warp() const { return threadIdx.x / 32; }
  __device__ __forceinline__ float shfl_xor(float v, int off) const { return __shfl_xor_sync(0xffffffffu, v, off); }
  __device__ __forceinline__ float shfl(float v, int src) const { return __shfl_sync(0xffffffffu, v, src); }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
};
#endif

}  // namespace cuda
}  // namespace otseg
