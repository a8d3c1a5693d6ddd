// The interface between the CUDA backend's host code (mps_cuda.cpp, compiled
// by the C++ compiler with ATen) and its kernels (mps_cuda_forward.cu and
// mps_cuda_backward.cu, compiled by nvcc without any ATen or c10 host code):
// plain structs of pointers, strides and scalars, and two launch functions
// that return a CUDA status instead of throwing.
//
// Why the split: every check, allocation and exception of the backend is
// compiled by the C++ compiler only, as in the CPU backend, and nvcc compiles
// only the kernels and their launches (which also builds faster: no ATen
// headers in the .cu files). It was made after a failed shape check of the
// cuda backward crashed the process on an H100 (SIGSEGV while formatting the
// check's message, whose shared inline code nvcc had compiled too;
// bench/GPU_RUNS.md); it did not end that crash (H200 run of 0b64572): see
// OTSEG_CHECK in csrc/common/checks.h.
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
  // Elements per vector access of the rows of S and of the plan (1: one at
  // a time, any strides); set by the host (vector_width, mps_cuda.cpp).
  int s_vec, plan_vec;
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
  // Elements per vector access of the rows of S, dplan and grad (1: one at
  // a time, any strides); set by the host (vector_width, mps_cuda.cpp).
  int s_vec, dp_vec, grad_vec;
};

// One block per problem, 1 <= P <= INT_MAX problems of 1 <= M <= kMaxPixels
// pixels and 1 <= N <= kMaxPromptsCuda prompts (the caller checks), on
// `stream`. Return the launch's status (cudaGetLastError), or
// cudaErrorNotSupported if no kernel takes the shape; the caller turns a
// status into an exception.
cudaError_t launch_mps_forward(const ForwardArgs& args, int64_t P, cudaStream_t stream);
cudaError_t launch_mps_backward(const BackwardArgs& args, int64_t P, cudaStream_t stream);

}  // namespace cuda
}  // namespace otseg
