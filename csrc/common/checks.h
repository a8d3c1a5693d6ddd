// Argument checks shared by every device's entry points.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "gauge_solve.h"  // kMaxPrompts

#define OTSEG_CHECK_PARAMS(eps, max_iter, tol)                                     \
  TORCH_CHECK(std::isfinite(eps) && (eps) > 0, "eps must be finite and > 0, got ", eps); \
  TORCH_CHECK((max_iter) >= 1, "max_iter must be >= 1, got ", max_iter);           \
  TORCH_CHECK((tol) >= 0, "tol must be >= 0, got ", tol)

// `want` (a std::vector) is evaluated once, into a named local, so that the
// message never refers to a temporary. The shapes go into the message as
// strings (format_sizes): see there.
#define OTSEG_CHECK_SIZES(x, want)                                                        \
  do {                                                                                    \
    const std::vector<int64_t> otseg_want_ = (want);                                      \
    TORCH_CHECK((x).sizes() == at::IntArrayRef(otseg_want_), #x " must have shape ",      \
                ::otseg::format_sizes(otseg_want_), ", got ", ::otseg::format_sizes((x).sizes())); \
  } while (false)

namespace otseg {

// "[2, 10]", built with std::to_string rather than by streaming the sizes
// into c10::str's std::ostream. On the GPU machines (H100 runs of 41c01fa and
// 8667a72, H200 run of 0b64572) exactly this check's message, a c10::str of
// two IntArrayRefs, ended the process with SIGSEGV inside the formatting
// (cuda-gdb backtrace in bench/results/gpu/h100-summary.md), while messages
// without integers streamed raised cleanly in the same process; the cause is
// not established (bench/gpu_errors.py probes it).
inline std::string format_sizes(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(sizes[i]);
  }
  return out + "]";
}

// Scores [..., M, N] seen as P independent problems [P, M, N]: the kernels
// work on `flat` (a view where the batch dims merge, else a copy), and the
// outputs take the batch dims directly, so that the caller needs no reshape
// (each one is a dispatch and, under autograd, a node of the graph).
struct Problems {
  at::Tensor flat;             // [P, M, N], any strides
  int64_t P, M, N;
  std::vector<int64_t> batch;  // the dims before M, N

  // batch + tail, e.g. sizes({M}) for the refined score.
  std::vector<int64_t> sizes(std::initializer_list<int64_t> tail) const {
    std::vector<int64_t> out(batch);
    out.insert(out.end(), tail);
    return out;
  }
};

inline Problems problems_of(const at::Tensor& scores) {
  TORCH_CHECK(scores.dim() >= 2, "scores must be [..., M, N], got ", scores.sizes());
  const int64_t M = scores.size(-2), N = scores.size(-1);
  TORCH_CHECK(M > 0 && N > 0, "scores must have M > 0 and N > 0, got ", scores.sizes());
  TORCH_CHECK(N <= kMaxPrompts, "scores has N = ", N, " prompts; the fused kernels support N <= ", kMaxPrompts,
              " (use backend=\"reference\" beyond)");
  TORCH_CHECK(at::isFloatingType(scores.scalar_type()), "scores must be floating point, got ", scores.scalar_type());
  std::vector<int64_t> batch(scores.sizes().begin(), scores.sizes().end() - 2);
  int64_t P = 1;
  for (const int64_t b : batch) P *= b;
  at::Tensor flat = scores.dim() == 3 ? scores : scores.reshape({P, M, N});
  return {std::move(flat), P, M, N, std::move(batch)};
}

// The upstream gradients of a backward entry point, checked against the
// problems' shapes and flattened: of the refined score [..., M] (as [P, M],
// contiguous) and of the plan [..., M, N] (as [P, M, N], any strides), in the
// dtype of the scores. Either may be absent (an undefined tensor).
inline std::pair<at::Tensor, at::Tensor> upstream_grads(const std::optional<at::Tensor>& grad_score,
                                                        const std::optional<at::Tensor>& grad_plan,
                                                        const Problems& pr, at::ScalarType dtype) {
  at::Tensor ds, dp;
  if (grad_score.has_value() && grad_score->defined()) {
    OTSEG_CHECK_SIZES(*grad_score, pr.sizes({pr.M}));
    ds = grad_score->reshape({pr.P, pr.M}).to(dtype).contiguous();
  }
  if (grad_plan.has_value() && grad_plan->defined()) {
    OTSEG_CHECK_SIZES(*grad_plan, pr.sizes({pr.M, pr.N}));
    dp = grad_plan->reshape({pr.P, pr.M, pr.N}).to(dtype);
  }
  return {ds, dp};
}

}  // namespace otseg
