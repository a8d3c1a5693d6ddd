// Fused Multi-Prompts Sinkhorn on the CPU: the operators (argument checks,
// outputs, one parallel region per call) and the choice of the instruction
// set whose kernels run. The kernels are in mps_cpu_kernels.h; the scheme and
// the backward derivation in otseg/ops/mps/README.md.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>

#include "../common/checks.h"
#include "mps_cpu.h"

namespace otseg {
namespace cpu {
// The widest instruction set this CPU supports, or a narrower one named by the
// environment variable OTSEG_CPU_ISA ("avx2" or "baseline"; read once), so
// that every entry point can be tested on one machine.
Isa cpu_isa() {
#ifdef OTSEG_X86_DISPATCH
  static const Isa isa = [] {
    __builtin_cpu_init();
    Isa best = Isa::baseline;
    if (__builtin_cpu_supports("x86-64-v4"))
      best = Isa::avx512;
    else if (__builtin_cpu_supports("x86-64-v3"))
      best = Isa::avx2;
    const char* want = std::getenv("OTSEG_CPU_ISA");
    if (want == nullptr || *want == '\0') return best;
    const std::string name(want);
    if (name == "baseline") return Isa::baseline;
    if (name == "avx2" && best != Isa::baseline) return Isa::avx2;
    if (name == "avx512" && best == Isa::avx512) return Isa::avx512;
    TORCH_WARN("otseg: OTSEG_CPU_ISA=", name, " is unknown or not supported by this CPU; using the widest supported");
    return best;
  }();
  return isa;
#else
  return Isa::baseline;
#endif
}
}  // namespace cpu

namespace {

using cpu::acc_type_t;
using cpu::BackwardArgs;
using cpu::cpu_isa;
using cpu::ForwardArgs;
using cpu::Isa;

template <typename scalar_t, typename acc_t>
bool run_forward(const ForwardArgs<scalar_t, acc_t>& a) {
  switch (cpu_isa()) {
#ifdef OTSEG_X86_DISPATCH
    case Isa::avx512:
      return cpu::forward_avx512(a);
    case Isa::avx2:
      return cpu::forward_avx2(a);
#endif
    default:
      return cpu::forward_baseline(a);
  }
}

template <typename scalar_t, typename acc_t>
void run_backward(const BackwardArgs<scalar_t, acc_t>& a) {
  switch (cpu_isa()) {
#ifdef OTSEG_X86_DISPATCH
    case Isa::avx512:
      return cpu::backward_avx512(a);
    case Isa::avx2:
      return cpu::backward_avx2(a);
#endif
    default:
      return cpu::backward_baseline(a);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mps_forward_cpu(
    const at::Tensor& scores, double eps, int64_t max_iter, double tol, bool return_plan, bool check_finite) {
  const Problems pr = problems_of(scores);
  OTSEG_CHECK_PARAMS(eps, max_iter, tol);
  OTSEG_CHECK(scores.device().is_cpu(), "scores must be a CPU tensor");
  const int64_t P = pr.P, M = pr.M, N = pr.N;
  const int64_t threads = std::min<int64_t>(P, at::get_num_threads());
  const auto acc_dtype = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto score = at::empty(pr.sizes({M}), scores.options());
  auto plan = return_plan ? at::empty(pr.sizes({M, N}), scores.options()) : at::empty({0}, scores.options());
  auto f = at::empty(pr.sizes({M}), scores.options().dtype(acc_dtype));
  auto g = at::empty(pr.sizes({N}), scores.options().dtype(acc_dtype));
  auto n_iter = at::empty(pr.batch, scores.options().dtype(at::kInt));
  const at::Tensor& flat = pr.flat;
  const int64_t sP = flat.stride(0), sM = flat.stride(1), sN = flat.stride(2);
  std::atomic<bool> nonfinite{false};
  std::atomic<int64_t> next{0};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "mps_forward_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* S = flat.const_data_ptr<scalar_t>();
    scalar_t* score_p = score.mutable_data_ptr<scalar_t>();
    scalar_t* plan_p = return_plan ? plan.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t* f_p = f.mutable_data_ptr<acc_t>();
    acc_t* g_p = g.mutable_data_ptr<acc_t>();
    int32_t* it_p = n_iter.mutable_data_ptr<int32_t>();
    const ForwardArgs<scalar_t, acc_t> args{S, sP, sM, sN, M, N, static_cast<acc_t>(eps), max_iter,
                                             static_cast<acc_t>(tol), check_finite, score_p, plan_p, f_p, g_p, it_p,
                                             P, threads, &next};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      if (!run_forward(args)) nonfinite = true;
    });
  });
  OTSEG_CHECK_VALUE(!nonfinite, "the input contains NaN or inf; pass check_finite=False to skip this check");
  return {score, plan, f, g, n_iter};
}

at::Tensor mps_backward_cpu(const std::optional<at::Tensor>& grad_score,
                            const std::optional<at::Tensor>& grad_plan, const at::Tensor& scores,
                            const at::Tensor& f, const at::Tensor& g, double eps) {
  const Problems pr = problems_of(scores);
  OTSEG_CHECK(std::isfinite(eps) && eps > 0, "eps must be finite and > 0, got ", eps);
  const int64_t P = pr.P, M = pr.M, N = pr.N;
  const int64_t threads = std::min<int64_t>(P, at::get_num_threads());
  const auto acc_dtype = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  OTSEG_CHECK_SIZES(f, pr.sizes({M}));
  OTSEG_CHECK_SIZES(g, pr.sizes({N}));
  OTSEG_CHECK(f.scalar_type() == acc_dtype && g.scalar_type() == acc_dtype,
              "f and g must be ", acc_dtype, " for ", scores.scalar_type(), " scores");
  auto fc = f.contiguous(), gc = g.contiguous();
  at::Tensor ds, dp;
  std::tie(ds, dp) = upstream_grads(grad_score, grad_plan, pr, scores.scalar_type());
  auto grad = at::empty(scores.sizes(), scores.options());
  if (!ds.defined() && !dp.defined()) return grad.zero_();

  std::atomic<int64_t> next{0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "mps_backward_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* S = pr.flat.const_data_ptr<scalar_t>();
    const scalar_t* ds_p = ds.defined() ? ds.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* dp_p = dp.defined() ? dp.const_data_ptr<scalar_t>() : nullptr;
    const int64_t dpP = dp.defined() ? dp.stride(0) : 0, dpM = dp.defined() ? dp.stride(1) : 0,
                  dpN = dp.defined() ? dp.stride(2) : 0;
    const acc_t* f_p = fc.const_data_ptr<acc_t>();
    const acc_t* g_p = gc.const_data_ptr<acc_t>();
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    const int64_t sP = pr.flat.stride(0), sM = pr.flat.stride(1), sN = pr.flat.stride(2);
    const BackwardArgs<scalar_t, acc_t> args{ds_p, dp_p, dpP, dpM, dpN, S, sP, sM, sN, M, N, f_p, g_p,
                                              static_cast<acc_t>(eps), out, P, threads, &next};
    at::parallel_for(0, threads, 1,
                     [&](int64_t, int64_t) { run_backward(args); });
  });
  return grad;
}

}  // namespace

const char* cpu_isa_name() {
  switch (cpu_isa()) {
    case Isa::avx512:
      return "AVX-512";
    case Isa::avx2:
      return "AVX2";
    default:
#if defined(__x86_64__) && defined(OTSEG_X86_DISPATCH)
      return "SSE2";
#else
      return "baseline";
#endif
  }
}

TORCH_LIBRARY_IMPL(otseg, CPU, m) {
  m.impl("mps_forward", &mps_forward_cpu);
  m.impl("mps_backward", &mps_backward_cpu);
}

}  // namespace otseg
