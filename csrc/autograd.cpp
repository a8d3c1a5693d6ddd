// Autograd of the fused MPS forwards, for every device that has a kernel:
// otseg::mps_forward (the cpu and cuda backends) and otseg::mps_triton, the
// differentiable entry of the triton backend, whose forward and backward are
// the Triton operators otseg::mps_forward_triton / mps_backward_triton
// (registered from Python, otseg/ops/mps/triton.py).
//
// Registered in C++ rather than with torch.library.register_autograd: the
// Python route costs about 90 us of interpreter work per forward + backward
// (measured on a 2-core CPU machine: 134 us against 48 us for a plain torch
// op), more than the whole backward kernel of a small batch. The backward is
// the implicit gradient op; the fake kernels stay in Python
// (otseg/ops/mps/fused.py, triton.py), and so does the autograd of
// mps_backward itself, which refuses double backward.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "triton/launch.h"

namespace otseg {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

using BackwardFn = at::Tensor(const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, double);

// The typed handle of an operator. Callers keep it in a function-local static,
// so it is looked up at the first call: the Triton operators are defined from
// Python (when otseg.ops.mps.triton is imported), after this library loads.
template <class Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// The forward and backward operators of the cpu and cuda backends.
struct FusedOps {
  static constexpr const char* kBackward = "otseg::mps_backward";
  static ForwardOutputs forward(const at::Tensor& scores, double eps, int64_t max_iter, double tol,
                                bool return_plan, bool check_finite) {
    static const auto op =
        find_op<ForwardOutputs(const at::Tensor&, double, int64_t, double, bool, bool)>("otseg::mps_forward");
    return op.call(scores, eps, max_iter, tol, return_plan, check_finite);
  }
  static at::Tensor backward(const std::optional<at::Tensor>& grad_score, const std::optional<at::Tensor>& grad_plan,
                             const at::Tensor& scores, const at::Tensor& f, const at::Tensor& g, double eps) {
    static const auto op = find_op<BackwardFn>(kBackward);
    return op.call(grad_score, grad_plan, scores, f, g, eps);
  }
};

// The Triton operators (no finiteness check: the triton backend checks in a
// separate pass). A kernel that Python has compiled and registered is launched
// from C++ (csrc/triton/launch.h); the first call of each kernel variant, and
// any call that path does not take, goes through the Python operators.
struct TritonOps {
  static constexpr const char* kBackward = "otseg::mps_backward_triton";
  static ForwardOutputs forward(const at::Tensor& scores, double eps, int64_t max_iter, double tol,
                                bool return_plan, bool /*check_finite*/) {
    if (auto out = triton::launch_forward(scores, eps, max_iter, tol, return_plan)) return *std::move(out);
    static const auto op =
        find_op<ForwardOutputs(const at::Tensor&, double, int64_t, double, bool)>("otseg::mps_forward_triton");
    return op.call(scores, eps, max_iter, tol, return_plan);
  }
  static at::Tensor backward(const std::optional<at::Tensor>& grad_score, const std::optional<at::Tensor>& grad_plan,
                             const at::Tensor& scores, const at::Tensor& f, const at::Tensor& g, double eps) {
    if (auto grad = triton::launch_backward(grad_score, grad_plan, scores, f, g, eps)) return *std::move(grad);
    static const auto op = find_op<BackwardFn>(kBackward);
    return op.call(grad_score, grad_plan, scores, f, g, eps);
  }
};

template <class Ops>
class MPSFunction : public torch::autograd::Function<MPSFunction<Ops>> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& scores, double eps, int64_t max_iter,
                               double tol, bool return_plan, bool check_finite) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [score, plan, f, g, n_iter] = Ops::forward(scores, eps, max_iter, tol, return_plan, check_finite);
    // The backward needs the scores and the final potentials, never the plan.
    ctx->save_for_backward({scores, f, g});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["return_plan"] = return_plan;
    ctx->mark_non_differentiable({f, g, n_iter});
    // Outputs without a gradient (the plan unless used, f, g, n_iter) reach
    // backward() undefined, not as zeros the size of f (a fill per call).
    ctx->set_materialize_grads(false);
    return {score, plan, f, g, n_iter};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool return_plan = ctx->saved_data["return_plan"].toBool();
    std::optional<at::Tensor> grad_score, grad_plan;
    if (grads[0].defined()) grad_score = grads[0];
    if (return_plan && grads[1].defined()) grad_plan = grads[1];
    at::Tensor grad;
    if (at::GradMode::is_enabled()) {
      // create_graph: through mps_backward's own autograd, so that
      // differentiating this gradient raises a clear error.
      static const auto backward_op = find_op<BackwardFn>(Ops::kBackward);
      grad = backward_op.call(grad_score, grad_plan, saved[0], saved[1], saved[2], eps);
    } else {
      at::AutoDispatchBelowADInplaceOrView guard;
      grad = Ops::backward(grad_score, grad_plan, saved[0], saved[1], saved[2], eps);
    }
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Whether a call has anything to differentiate: scores that require a
// gradient with grad mode on, or that carry a forward-mode tangent (which
// MPSFunction::apply refuses, as the C++ Function API has no jvp). Calls
// without go straight to the operator below autograd: no graph node, saved
// tensors or saved data, about 1.4 us of host time a call (a 2-core EPYC).
bool differentiable_call(const at::Tensor& scores) {
  return (at::GradMode::is_enabled() && scores.requires_grad()) || torch::autograd::isFwGradDefined(scores);
}

template <class Ops>
ForwardOutputs forward_autograd(const at::Tensor& scores, double eps, int64_t max_iter, double tol, bool return_plan,
                                bool check_finite) {
  if (!differentiable_call(scores)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return Ops::forward(scores, eps, max_iter, tol, return_plan, check_finite);
  }
  auto out = MPSFunction<Ops>::apply(scores, eps, max_iter, tol, return_plan, check_finite);
  return {out[0], out[1], out[2], out[3], out[4]};
}

ForwardOutputs mps_forward_autograd(const at::Tensor& scores, double eps, int64_t max_iter, double tol,
                                    bool return_plan, bool check_finite) {
  return forward_autograd<FusedOps>(scores, eps, max_iter, tol, return_plan, check_finite);
}

ForwardOutputs mps_triton_autograd(const at::Tensor& scores, double eps, int64_t max_iter, double tol,
                                   bool return_plan) {
  return forward_autograd<TritonOps>(scores, eps, max_iter, tol, return_plan, false);
}

// Below autograd (inference mode): the Triton forward itself. CPU tensors
// reach it only under Triton's interpreter; the fake kernel is registered from
// Python.
ForwardOutputs mps_triton_forward(const at::Tensor& scores, double eps, int64_t max_iter, double tol,
                                  bool return_plan) {
  return TritonOps::forward(scores, eps, max_iter, tol, return_plan, false);
}

}  // namespace

TORCH_LIBRARY_IMPL(otseg, Autograd, m) {
  m.impl("mps_forward", &mps_forward_autograd);
  m.impl("mps_triton", &mps_triton_autograd);
}

// The Triton backward alone (mps_triton_backward's schema in ops.cpp).
at::Tensor mps_triton_backward(const std::optional<at::Tensor>& grad_score, const std::optional<at::Tensor>& grad_plan,
                               const at::Tensor& scores, const at::Tensor& f, const at::Tensor& g, double eps) {
  return TritonOps::backward(grad_score, grad_plan, scores, f, g, eps);
}

TORCH_LIBRARY_IMPL(otseg, CUDA, m) {
  m.impl("mps_triton", &mps_triton_forward);
  m.impl("mps_triton_backward", &mps_triton_backward);
}
TORCH_LIBRARY_IMPL(otseg, CPU, m) {
  m.impl("mps_triton", &mps_triton_forward);
  m.impl("mps_triton_backward", &mps_triton_backward);
}

}  // namespace otseg
