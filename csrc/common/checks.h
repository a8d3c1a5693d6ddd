// Argument checks shared by every device's entry points.
#pragma once

#include <ATen/ATen.h>

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
