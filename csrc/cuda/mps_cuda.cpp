// The CUDA backend's host code: argument checks, outputs, the device guard
// and the launch on the current stream, registered for the CUDA dispatch key.
// Compiled by the C++ compiler; the kernels are in mps_cuda_forward.cu and
// mps_cuda_backward.cu, behind the plain interface of mps_cuda.h (which says
// why the two are apart).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "../common/checks.h"
#include "mps_cuda.h"

namespace otseg {
namespace {

using cuda::BackwardArgs;
using cuda::Dtype;
using cuda::ForwardArgs;
using cuda::kMaxPixels;
using cuda::kMaxPromptsCuda;
using cuda::launch_mps_backward;
using cuda::launch_mps_forward;

Dtype to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return Dtype::kFloat;
    case at::kHalf:
      return Dtype::kHalf;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    default:
      OTSEG_CHECK_TYPE(false, "the cuda backend takes float32, float16 or bfloat16 scores (computing in float32), got ",
                       t, "; use backend=\"reference\" for float64");
  }
  return Dtype::kFloat;
}

// A launch's status as an exception (the shapes were checked before).
void launch_checked(cudaError_t status, const char* what, int64_t M, int64_t N) {
  OTSEG_CHECK(status == cudaSuccess, "the cuda backend's ", what, " launch for M = ", M, ", N = ", N,
              " failed: ", cudaGetErrorString(status));
}

Problems check_cuda_shape(const at::Tensor& scores) {
  Problems pr = problems_of(scores);
  OTSEG_CHECK(scores.is_cuda(), "scores must be a CUDA tensor");
  OTSEG_CHECK_VALUE(pr.N <= kMaxPromptsCuda, "the cuda backend supports N <= ", kMaxPromptsCuda,
                    " prompts, got N = ", pr.N, " (use backend=\"cpu\" on CPU tensors or \"reference\")");
  OTSEG_CHECK_VALUE(pr.M <= kMaxPixels, "the cuda backend supports M <= ", kMaxPixels,
                    " pixels per problem, got M = ", pr.M, " (use backend=\"reference\")");
  OTSEG_CHECK_VALUE(pr.P <= std::numeric_limits<int>::max(), "too many problems for one launch");
  return pr;
}

// Elements per vector access of the rows of a [P, M, N] tensor (element
// strides sP, sM, sN) of `element_size`-byte elements at `data`: the largest of
// 8, 4, 2 that divides N, keeps a vector within 16 bytes and that every row
// start and `data` are aligned to, when the prompts are contiguous (sN = 1);
// else 1. The strides of a dimension of size 1 are never used.
int vector_width(const void* data, int64_t P, int64_t M, int64_t N, int64_t sP, int64_t sM, int64_t sN,
                 int64_t element_size) {
  if (sN != 1) return 1;
  for (int v = 8; v > 1; v /= 2) {
    if (v * element_size > 16 || N % v != 0 || (P > 1 && sP % v != 0) || (M > 1 && sM % v != 0)) continue;
    if (reinterpret_cast<uintptr_t>(data) % (v * element_size) == 0) return v;
  }
  return 1;
}

// vector_width of a [P, M, N] view.
int vector_width(const at::Tensor& x) {
  return vector_width(x.const_data_ptr(), x.size(0), x.size(1), x.size(2), x.stride(0), x.stride(1), x.stride(2),
                      x.element_size());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mps_forward_cuda(
    const at::Tensor& scores, double eps, int64_t max_iter, double tol, bool return_plan, bool check_finite) {
  const Problems pr = check_cuda_shape(scores);
  OTSEG_CHECK_PARAMS(eps, max_iter, tol);
  const at::cuda::OptionalCUDAGuard guard(scores.device());
  const int64_t P = pr.P, M = pr.M, N = pr.N;
  const at::Tensor& flat = pr.flat;
  auto score = at::empty(pr.sizes({M}), scores.options());
  auto plan = return_plan ? at::empty(pr.sizes({M, N}), scores.options()) : at::empty({0}, scores.options());
  auto f = at::empty(pr.sizes({M}), scores.options().dtype(at::kFloat));
  auto g = at::empty(pr.sizes({N}), scores.options().dtype(at::kFloat));
  auto n_iter = at::empty(pr.batch, scores.options().dtype(at::kInt));
  // The flag costs a fill kernel: only when the check is asked for.
  auto nonfinite = check_finite ? at::zeros({1}, scores.options().dtype(at::kInt)) : at::Tensor();
  if (P == 0) return {score, plan, f, g, n_iter};
  ForwardArgs a{flat.const_data_ptr(), flat.stride(0), flat.stride(1), flat.stride(2),
                static_cast<int>(M), static_cast<int>(N), static_cast<float>(eps),
                static_cast<int>(std::min<int64_t>(max_iter, std::numeric_limits<int>::max())),
                static_cast<float>(tol), to_dtype(scores.scalar_type()), score.mutable_data_ptr(),
                return_plan ? plan.mutable_data_ptr() : nullptr, f.mutable_data_ptr<float>(),
                g.mutable_data_ptr<float>(), n_iter.mutable_data_ptr<int>(),
                check_finite ? nonfinite.mutable_data_ptr<int>() : nullptr,
                vector_width(flat), return_plan ? vector_width(plan.view({P, M, N})) : 1};
  launch_checked(launch_mps_forward(a, P, at::cuda::getCurrentCUDAStream()), "forward", M, N);
  // The one host synchronisation, and only when asked for: reporting bad input.
  if (check_finite) {
    OTSEG_CHECK_VALUE(nonfinite.item<int>() == 0,
                      "the input contains NaN or inf; pass check_finite=False to skip this check");
  }
  return {score, plan, f, g, n_iter};
}

at::Tensor mps_backward_cuda(const std::optional<at::Tensor>& grad_score, const std::optional<at::Tensor>& grad_plan,
                             const at::Tensor& scores, const at::Tensor& f, const at::Tensor& g, double eps) {
  const Problems pr = check_cuda_shape(scores);
  OTSEG_CHECK(std::isfinite(eps) && eps > 0, "eps must be finite and > 0, got ", eps);
  const at::cuda::OptionalCUDAGuard guard(scores.device());
  const int64_t P = pr.P, M = pr.M, N = pr.N;
  OTSEG_CHECK_SIZES(f, pr.sizes({M}));
  OTSEG_CHECK_SIZES(g, pr.sizes({N}));
  OTSEG_CHECK(f.scalar_type() == at::kFloat && g.scalar_type() == at::kFloat, "f and g must be float32");
  auto fc = f.contiguous(), gc = g.contiguous();
  at::Tensor ds, dp;
  std::tie(ds, dp) = upstream_grads(grad_score, grad_plan, pr, scores.scalar_type());
  auto grad = at::empty(scores.sizes(), scores.options());
  if ((!ds.defined() && !dp.defined()) || P == 0) return grad.zero_();
  BackwardArgs a{ds.defined() ? ds.const_data_ptr() : nullptr,
                 dp.defined() ? dp.const_data_ptr() : nullptr,
                 dp.defined() ? dp.stride(0) : 0,
                 dp.defined() ? dp.stride(1) : 0,
                 dp.defined() ? dp.stride(2) : 0,
                 pr.flat.const_data_ptr(),
                 pr.flat.stride(0),
                 pr.flat.stride(1),
                 pr.flat.stride(2),
                 fc.const_data_ptr<float>(),
                 gc.const_data_ptr<float>(),
                 static_cast<int>(M),
                 static_cast<int>(N),
                 static_cast<float>(eps),
                 to_dtype(scores.scalar_type()),
                 grad.mutable_data_ptr(),
                 vector_width(pr.flat),
                 dp.defined() ? vector_width(dp) : 1,
                 vector_width(grad.view({P, M, N}))};
  launch_checked(launch_mps_backward(a, P, at::cuda::getCurrentCUDAStream()), "backward", M, N);
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(otseg, CUDA, m) {
  m.impl("mps_forward", &mps_forward_cuda);
  m.impl("mps_backward", &mps_backward_cuda);
}

}  // namespace otseg
