// Argument checks shared by every device's entry points.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>

#define OTSEG_CHECK_SCORES(x)                                                             \
  TORCH_CHECK((x).dim() == 3, #x " must be [P, M, N], got ", (x).sizes());               \
  TORCH_CHECK((x).size(1) > 0 && (x).size(2) > 0, #x " must have M > 0 and N > 0, got ", \
              (x).sizes());                                                               \
  TORCH_CHECK((x).size(2) <= ::otseg::kMaxPrompts, #x " has N = ", (x).size(2),          \
              " prompts; the fused kernels support N <= ", ::otseg::kMaxPrompts,          \
              " (use backend=\"reference\" beyond)");                                    \
  TORCH_CHECK(at::isFloatingType((x).scalar_type()), #x " must be floating point, got ", \
              (x).scalar_type())

#define OTSEG_CHECK_PARAMS(eps, max_iter, tol)                                     \
  TORCH_CHECK(std::isfinite(eps) && (eps) > 0, "eps must be finite and > 0, got ", eps); \
  TORCH_CHECK((max_iter) >= 1, "max_iter must be >= 1, got ", max_iter);           \
  TORCH_CHECK((tol) >= 0, "tol must be >= 0, got ", tol)

#define OTSEG_CHECK_SHAPE(x, ...)                                                     \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (", \
              #__VA_ARGS__, "), got ", (x).sizes())

namespace otseg {

// The upstream gradients of a backward entry point, checked: of the refined
// score [P, M] (made contiguous) and of the plan [P, M, N] (any strides), in
// the dtype of scores [P, M, N]. Either may be absent (an undefined tensor).
inline std::pair<at::Tensor, at::Tensor> upstream_grads(const std::optional<at::Tensor>& grad_score,
                                                        const std::optional<at::Tensor>& grad_plan,
                                                        const at::Tensor& scores) {
  const int64_t P = scores.size(0), M = scores.size(1), N = scores.size(2);
  at::Tensor ds, dp;
  if (grad_score.has_value() && grad_score->defined()) {
    OTSEG_CHECK_SHAPE(*grad_score, P, M);
    ds = grad_score->to(scores.scalar_type()).contiguous();
  }
  if (grad_plan.has_value() && grad_plan->defined()) {
    OTSEG_CHECK_SHAPE(*grad_plan, P, M, N);
    dp = grad_plan->to(scores.scalar_type());
  }
  return {ds, dp};
}

}  // namespace otseg
