// Argument checks shared by every device's entry points.
#pragma once

#include <ATen/ATen.h>

#include <cstdio>
#include <initializer_list>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "gauge_solve.h"  // kMaxPrompts

// The checks of the extension. Their messages are built by otseg::text,
// which formats numbers with std::to_string and snprintf instead of
// streaming them into c10::str's std::ostream (TORCH_CHECK then streams one
// string). On the GPU machines, streaming an integer from this library's
// code ended the process with SIGSEGV: the H100 runs of 41c01fa and 8667a72
// and the H200 run of 0b64572 in a shape check, and the H200 run of 1ce472b
// in `max_iter must be >= 1, got 0`, where cuda-gdb showed
// std::ostream::_M_insert<long> calling a member of the wrong locale facet
// (std::codecvt<char16_t>::do_unshift) inside otseg/_C*.so, while messages of
// text alone raised cleanly. The cause (a second copy of libstdc++'s locale
// machinery bound inside the library by that machine's build) is not
// established; bench/gpu_errors.py probes it. The message is built only when
// the check fails.
#define OTSEG_CHECK(cond, ...) TORCH_CHECK(cond, ::otseg::text(__VA_ARGS__))
#define OTSEG_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::otseg::text(__VA_ARGS__))
#define OTSEG_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::otseg::text(__VA_ARGS__))

#define OTSEG_CHECK_PARAMS(eps, max_iter, tol)                                       \
  OTSEG_CHECK(std::isfinite(eps) && (eps) > 0, "eps must be finite and > 0, got ", eps); \
  OTSEG_CHECK((max_iter) >= 1, "max_iter must be >= 1, got ", max_iter);           \
  OTSEG_CHECK((tol) >= 0, "tol must be >= 0, got ", tol)

// `want` (a std::vector) is evaluated once, into a named local, so that the
// message never refers to a temporary.
#define OTSEG_CHECK_SIZES(x, want)                                                            \
  do {                                                                                        \
    const std::vector<int64_t> otseg_want_ = (want);                                          \
    OTSEG_CHECK((x).sizes() == at::IntArrayRef(otseg_want_), #x " must have shape ",          \
                at::IntArrayRef(otseg_want_), ", got ", (x).sizes());                         \
  } while (false)

namespace otseg {

// Pieces of a check's message as text, without iostreams (see OTSEG_CHECK).
inline std::string to_text(const char* s) { return s; }
inline std::string to_text(const std::string& s) { return s; }
inline std::string to_text(at::ScalarType t) { return c10::toString(t); }
inline std::string to_text(const c10::Device& d) { return d.str(); }  // formatted inside libc10
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
std::string to_text(T v) {
  return std::to_string(v);
}
template <typename T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
std::string to_text(T v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", static_cast<double>(v));
  return buf;
}
// "[2, 10]".
inline std::string to_text(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(sizes[i]);
  }
  return out + "]";
}

// A check's message: the text of each piece, concatenated.
template <typename... Pieces>
std::string text(const Pieces&... pieces) {
  std::string out;
  ((out += to_text(pieces)), ...);
  return out;
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
  OTSEG_CHECK(scores.dim() >= 2, "scores must be [..., M, N], got ", scores.sizes());
  const int64_t M = scores.size(-2), N = scores.size(-1);
  OTSEG_CHECK(M > 0 && N > 0, "scores must have M > 0 and N > 0, got ", scores.sizes());
  OTSEG_CHECK(N <= kMaxPrompts, "scores has N = ", N, " prompts; the fused kernels support N <= ", kMaxPrompts,
              " (use backend=\"reference\" beyond)");
  OTSEG_CHECK(at::isFloatingType(scores.scalar_type()), "scores must be floating point, got ", scores.scalar_type());
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
