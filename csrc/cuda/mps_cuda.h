// The interface between the CUDA backend's host code (mps_cuda.cpp, compiled
// by the C++ compiler with ATen) and its kernels (mps_cuda_kernels.cu,
// compiled by nvcc without any ATen or c10 host code): plain structs of
// pointers, strides and scalars, and two launch functions that return a CUDA
// status instead of throwing.
//
// Why the split: on the first GPU runs, a failed argument check (a C++
// exception built from ATen types) raised in host code compiled by nvcc
// crashed the process (SIGSEGV in the message formatting, bench/README.md
// "GPU runs"); the same checks raise cleanly from the CPU backend's C++. All
// checks, allocations and exceptions now live in C++-compiled code, and
// nvcc compiles only the kernels and their launches (which also builds
// faster: no ATen headers in the .cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace otseg {
namespace cuda {

constexpr int kMaxPixels = 4096;     // M limit of the kernels
constexpr int kMaxPromptsCuda = 16;  // N limit of the kernels

// Inputs and outputs are float32, float16 or bfloat16; the kernels compute in
// float32 and branch on the dtype at run time (uniformly), which keeps the
// number of template instantiations, and so the build time, small.
enum class Dtype : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

struct ForwardArgs {
  const void* S;
  int64_t sP, sM, sN;
  int M, N;
  float eps;
  int max_iter;
  float tol;
  Dtype dtype;
  void* score;         // [P, M]
  void* plan;          // [P, M, N] or null
  float* f;            // [P, M]
  float* g;            // [P, N]
  int* n_iter;         // [P]
  int* nonfinite;      // [1], set when S holds NaN or inf; null: no check
};

struct BackwardArgs {
  const void* dscore;  // [P, M] contiguous, or null
  const void* dplan;   // [P, M, N] strided, or null
  int64_t dpP, dpM, dpN;
  const void* S;
  int64_t sP, sM, sN;
  const float* f;      // [P, M]
  const float* g;      // [P, N]
  int M, N;
  float eps;
  Dtype dtype;
  void* grad;          // [P, M, N] contiguous
};

// One block per problem, P problems, on `stream`. Return the launch's status
// (cudaGetLastError), or cudaErrorInvalidValue for a shape without a kernel
// (M outside [1, kMaxPixels], N outside [1, kMaxPromptsCuda]); the caller
// checks shapes first and turns a status into an exception.
cudaError_t launch_mps_forward(const ForwardArgs& args, int64_t P, cudaStream_t stream);
cudaError_t launch_mps_backward(const BackwardArgs& args, int64_t P, cudaStream_t stream);

}  // namespace cuda
}  // namespace otseg
