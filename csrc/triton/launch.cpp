// The triton backend's launches from C++ (launch.h says why and how): the
// specialisation key and parameters of a launch, the registry of compiled
// kernels, the operators through which Python registers them and tests read
// the keys, and, in the CUDA build, the launches.
#include "launch.h"

#include "../common/checks.h"

#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <unordered_map>
#include <vector>

#ifdef OTSEG_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda.h>
#include <dlfcn.h>
#endif

namespace otseg {
namespace triton {

KernelArgs::KernelArgs(const char* kernel) : key_(kernel) { key_ += ':'; }

void KernelArgs::push(const void* value, int bytes) {
  OTSEG_CHECK(n_ < kMaxParams, "otseg: too many Triton kernel parameters");
  std::memcpy(&slots_[n_], value, bytes);
  ptrs_[n_] = &slots_[n_];
  sizes_ += static_cast<char>('0' + bytes);
  ++n_;
}

void KernelArgs::tensor(const at::Tensor& t) {
  // Triton's type of the pointer (its dtype) and "D" when 16-byte aligned.
  key_ += 'p';
  key_ += c10::toString(t.scalar_type());
  const uint64_t ptr = reinterpret_cast<uint64_t>(t.data_ptr());
  key_ += ptr % 16 == 0 ? 'D' : '_';
  push(&ptr, 8);
}

void KernelArgs::integer(int64_t v, bool specialize) {
  if (specialize && v == 1) {
    // A constant of the compiled kernel, not a parameter.
    key_ += '1';
    return;
  }
  const bool i32 = v >= std::numeric_limits<int32_t>::min() && v <= std::numeric_limits<int32_t>::max();
  key_ += i32 ? 'i' : 'l';
  key_ += !specialize ? 'u' : v % 16 == 0 ? 'D' : '_';
  if (i32) {
    const int32_t x = static_cast<int32_t>(v);
    push(&x, 4);
  } else {
    push(&v, 8);
  }
}

void KernelArgs::fp32(double v) {
  key_ += 'f';
  const float x = static_cast<float>(v);
  push(&x, 4);
}

void KernelArgs::tag(int64_t v) {
  key_ += 't';
  key_ += std::to_string(v);
  key_ += ',';
}

void KernelArgs::append_null_pointers(int n) {
  const uint64_t null = 0;
  for (int i = 0; i < n; ++i) push(&null, 8);
}

int64_t vector_width(const at::Tensor& x, int64_t N) {
  if (N < 2 || !x.is_contiguous()) return 1;
  const int64_t elem = x.element_size();
  for (const int64_t vec : {4, 2}) {
    const int64_t width = vec * elem;
    if (N % vec == 0 && width <= 16 && x.storage_offset() * elem % width == 0) return vec;
  }
  return 1;
}

namespace {

// A Python float as float32 hi + lo (_split in otseg/ops/mps/triton.py).
std::pair<double, double> split(double x) {
  const float hi = static_cast<float>(x);
  const float lo = std::isfinite(hi) ? static_cast<float>(x - static_cast<double>(hi)) : 0.0f;
  return {hi, lo};
}

// The launch configuration's inputs that are not arguments of their own: the
// device, the shape (block sizes, warps), the dtypes (through the pointers),
// which optional inputs are there, the vector width.
void common_tags(KernelArgs& args, const at::Tensor& flat, int64_t vec) {
  args.tag(flat.device().type() == at::kCUDA ? flat.device().index() : -1);
  args.tag(flat.size(1));
  args.tag(flat.size(2));
  args.tag(vec);
}

}  // namespace

int64_t forward_args(KernelArgs& args, const at::Tensor& flat, const at::Tensor& score,
                     const std::optional<at::Tensor>& plan, const at::Tensor& f, const at::Tensor& g,
                     const at::Tensor& n_iter, int64_t max_iter, double eps, double tol) {
  const int64_t M = flat.size(1), N = flat.size(2);
  const int64_t vec = vector_width(flat, N);
  common_tags(args, flat, vec);
  args.tag(plan.has_value());
  args.tensor(flat);
  args.tensor(score);
  // Without a plan the kernel never touches PLAN; the scores stand in.
  args.tensor(plan.has_value() ? *plan : flat);
  args.tensor(f);
  args.tensor(g);
  args.tensor(n_iter);
  // do_not_specialize=["stride_sm", "stride_sn"] (kernels/mps.py).
  args.integer(flat.stride(0));
  args.integer(flat.stride(1), false);
  args.integer(flat.stride(2), false);
  args.integer(M);
  args.integer(N);
  args.integer(std::min<int64_t>(max_iter, std::numeric_limits<int32_t>::max()));
  const auto [eps_hi, eps_lo] = split(eps);
  const auto [tol_hi, tol_lo] = split(tol);
  args.fp32(eps_hi);
  args.fp32(eps_lo);
  args.fp32(tol_hi);
  args.fp32(tol_lo);
  return vec;
}

int64_t backward_args(KernelArgs& args, const std::optional<at::Tensor>& ds, const std::optional<at::Tensor>& dp,
                      const at::Tensor& flat, const at::Tensor& f, const at::Tensor& g, const at::Tensor& grad,
                      double eps) {
  const int64_t M = flat.size(1), N = flat.size(2);
  const int64_t vec = vector_width(flat, N);
  common_tags(args, flat, vec);
  args.tag(ds.has_value());
  args.tag(dp.has_value());
  args.tensor(flat);
  args.tensor(f);
  args.tensor(g);
  // Absent upstream gradients are never read; the scores stand in.
  args.tensor(ds.has_value() ? *ds : flat);
  args.tensor(dp.has_value() ? *dp : flat);
  args.tensor(grad);
  // do_not_specialize=["stride_sm", "stride_sn", "stride_dpm", "stride_dpn"].
  args.integer(flat.stride(0));
  args.integer(flat.stride(1), false);
  args.integer(flat.stride(2), false);
  args.integer(ds.has_value() ? ds->stride(0) : 0);
  args.integer(ds.has_value() ? ds->stride(1) : 0);
  args.integer(dp.has_value() ? dp->stride(0) : 0);
  args.integer(dp.has_value() ? dp->stride(1) : 0, false);
  args.integer(dp.has_value() ? dp->stride(2) : 0, false);
  args.integer(M);
  args.integer(N);
  const auto [eps_hi, eps_lo] = split(eps);
  args.fp32(eps_hi);
  args.fp32(eps_lo);
  return vec;
}

namespace {

// A compiled kernel: its CUfunction and launch configuration, and the number
// of parameters Triton's launcher appends.
struct Kernel {
  uint64_t function;
  int64_t num_warps;
  int64_t shared;
  int extra_params;
};

class Registry {
 public:
  std::optional<Kernel> find(const std::string& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = kernels_.find(key);
    if (it == kernels_.end()) return std::nullopt;
    return it->second;
  }
  void add(const std::string& key, Kernel kernel) {
    std::lock_guard<std::mutex> lock(mutex_);
    kernels_[key] = kernel;
    size_.store(static_cast<int64_t>(kernels_.size()));
  }
  void remove(const std::string& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    kernels_.erase(key);
    size_.store(static_cast<int64_t>(kernels_.size()));
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    kernels_.clear();
    size_.store(0);
    forward_launches.store(0);
    backward_launches.store(0);
    failed_launches.store(0);
  }
  // Read without the lock: the common case of an empty registry costs nothing.
  int64_t size() const { return size_.load(std::memory_order_relaxed); }

  std::atomic<int64_t> forward_launches{0};
  std::atomic<int64_t> backward_launches{0};
  std::atomic<int64_t> failed_launches{0};

 private:
  std::mutex mutex_;
  std::unordered_map<std::string, Kernel> kernels_;
  std::atomic<int64_t> size_{0};
};

Registry& registry() {
  static Registry r;
  return r;
}

using ArgsResult = std::tuple<std::string, std::string, int64_t>;

// (key, parameter sizes, vector width) of a forward launch: what Python
// registers its compiled kernel under, and what the tests compare with PTX.
ArgsResult forward_args_op(const at::Tensor& flat, const at::Tensor& score, const std::optional<at::Tensor>& plan,
                           const at::Tensor& f, const at::Tensor& g, const at::Tensor& n_iter, int64_t max_iter,
                           double eps, double tol) {
  OTSEG_CHECK(flat.dim() == 3, "triton_launch_args_forward takes flat scores [P, M, N], got ", flat.sizes());
  KernelArgs args("mps_fwd");
  const int64_t vec = forward_args(args, flat, score, plan, f, g, n_iter, max_iter, eps, tol);
  return {args.key(), args.sizes(), vec};
}

ArgsResult backward_args_op(const std::optional<at::Tensor>& ds, const std::optional<at::Tensor>& dp,
                            const at::Tensor& flat, const at::Tensor& f, const at::Tensor& g, const at::Tensor& grad,
                            double eps) {
  OTSEG_CHECK(flat.dim() == 3, "triton_launch_args_backward takes flat scores [P, M, N], got ", flat.sizes());
  KernelArgs args("mps_bwd");
  const int64_t vec = backward_args(args, ds, dp, flat, f, g, grad, eps);
  return {args.key(), args.sizes(), vec};
}

// Registers a compiled kernel under `key`; "" when registered, else why not.
// `ptx_sizes`: the byte sizes of the parameters of the kernel's PTX entry,
// which must be `sizes` followed by 8-byte pointers only (Triton's scratch).
std::string register_op(const std::string& key, const std::string& sizes, const std::string& ptx_sizes,
                        int64_t function, int64_t num_warps, int64_t shared) {
  if (ptx_sizes.size() < sizes.size() || ptx_sizes.compare(0, sizes.size(), sizes) != 0 ||
      ptx_sizes.find_first_not_of('8', sizes.size()) != std::string::npos) {
    return "the kernel's PTX parameters (sizes " + ptx_sizes + ") are not the launch's (" + sizes +
           ") followed by pointers";
  }
  if (function == 0 || num_warps < 1 || shared < 0) return "the compiled kernel has no function handle";
  registry().add(key, {static_cast<uint64_t>(function), num_warps, shared,
                       static_cast<int>(ptx_sizes.size() - sizes.size())});
  return "";
}

std::vector<int64_t> stats_op() {
  auto& r = registry();
  return {r.size(), r.forward_launches.load(), r.backward_launches.load(), r.failed_launches.load()};
}

void clear_op() { registry().clear(); }

#ifdef OTSEG_WITH_CUDA

// Tensors this path may read the data pointers of, on `device`: dense CUDA
// tensors whose memory holds their values, not fake, functional or functorch
// wrappers, nor lazily negated or zero tensors (which the dispatcher's
// fallbacks materialise before the Python operators see them). With a
// dispatch mode active (it would expect to see the Python operators) the
// caller skips this path altogether.
bool plain_cuda(const at::Tensor& t, const at::Device& device) {
  static const c10::DispatchKeySet kWrappers(
      {c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot, c10::DispatchKey::Functionalize,
       c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::FuncTorchGradWrapper,
       c10::DispatchKey::FuncTorchDynamicLayerFrontMode, c10::DispatchKey::Negative, c10::DispatchKey::Conjugate,
       c10::DispatchKey::ZeroTensor});
  return t.defined() && t.device() == device && t.layout() == at::kStrided && !t.key_set().has_any(kWrappers) &&
         t.has_storage() && (t.numel() == 0 || t.data_ptr() != nullptr);
}

using LaunchKernelFn = CUresult (*)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                                    CUstream, void**, void**);
using ErrorStringFn = CUresult (*)(CUresult, const char**);
using CtxGetCurrentFn = CUresult (*)(CUcontext*);

// cuLaunchKernel from the driver torch has loaded, found at the first launch
// (the extension does not link libcuda, which machines without a GPU lack).
struct Driver {
  LaunchKernelFn launch = nullptr;
  ErrorStringFn error_string = nullptr;
  CtxGetCurrentFn ctx_get_current = nullptr;
};

const Driver& driver() {
  static const Driver d = [] {
    Driver out;
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    OTSEG_CHECK(lib != nullptr, "otseg: cannot load the CUDA driver (libcuda.so.1) to launch Triton kernels: ",
                dlerror());
    out.launch = reinterpret_cast<LaunchKernelFn>(dlsym(lib, "cuLaunchKernel"));
    out.error_string = reinterpret_cast<ErrorStringFn>(dlsym(lib, "cuGetErrorString"));
    out.ctx_get_current = reinterpret_cast<CtxGetCurrentFn>(dlsym(lib, "cuCtxGetCurrent"));
    OTSEG_CHECK(out.launch != nullptr && out.ctx_get_current != nullptr,
                "otseg: the CUDA driver has no cuLaunchKernel or cuCtxGetCurrent");
    return out;
  }();
  return d;
}

// Launches a registered kernel. A failed launch unregisters it (later calls
// go through Triton's launcher) and raises.
void launch(const Kernel& kernel, KernelArgs& args, int64_t programs, const at::Tensor& like, const char* what) {
  args.append_null_pointers(kernel.extra_params);
  const Driver& d = driver();
  // The driver API launches into the thread's current context: the device's
  // primary context, which the runtime (torch's) makes current on
  // cudaSetDevice; a thread that has made no runtime call may have none.
  CUcontext ctx = nullptr;
  if (d.ctx_get_current(&ctx) != CUDA_SUCCESS || ctx == nullptr) {
    C10_CUDA_CHECK(cudaSetDevice(like.device().index()));
  }
  const auto stream = at::cuda::getCurrentCUDAStream(like.device().index());
  const CUresult status = d.launch(reinterpret_cast<CUfunction>(kernel.function), static_cast<unsigned>(programs),
                                   1, 1, static_cast<unsigned>(32 * kernel.num_warps), 1, 1,
                                   static_cast<unsigned>(kernel.shared), stream.stream(), args.params(), nullptr);
  if (status != CUDA_SUCCESS) {
    registry().remove(args.key());
    registry().failed_launches.fetch_add(1);
    const char* text = nullptr;
    if (d.error_string == nullptr || d.error_string(status, &text) != CUDA_SUCCESS) text = "unknown error";
    OTSEG_CHECK(false, "the triton backend's ", what, " launch from C++ failed: ", text, " (CUresult ",
                static_cast<int>(status), "; it may be an earlier kernel's error). The kernel is unregistered: "
                "later calls launch it through Triton's launcher");
  }
}

bool skip(const at::Tensor& scores) {
  return registry().size() == 0 || c10::impl::dispatch_mode_enabled() || !scores.is_cuda() ||
         !plain_cuda(scores, scores.device());
}

// The shapes the Python operators take without raising (their checks give
// the error messages): [..., M, N] floating point, 0 < M <= 4096, 0 < N <= 16.
bool supported(const at::Tensor& scores) {
  if (scores.dim() < 2 || !at::isFloatingType(scores.scalar_type())) return false;
  const int64_t M = scores.size(-2), N = scores.size(-1);
  return M > 0 && N > 0 && M <= 4096 && N <= 16;
}

#endif  // OTSEG_WITH_CUDA

}  // namespace

std::optional<ForwardOutputs> launch_forward(const at::Tensor& scores, double eps, int64_t max_iter, double tol,
                                             bool return_plan) {
#ifdef OTSEG_WITH_CUDA
  if (skip(scores) || !supported(scores) || max_iter < 0) return std::nullopt;
  c10::cuda::CUDAGuard guard(scores.device());
  const Problems pr = problems_of(scores);
  // The outputs of empty_outputs (otseg/ops/mps/fused.py).
  const auto acc = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = scores.options();
  at::Tensor score = at::empty(pr.sizes({pr.M}), opts);
  at::Tensor plan = return_plan ? at::empty(pr.sizes({pr.M, pr.N}), opts) : at::empty({0}, opts);
  at::Tensor f = at::empty(pr.sizes({pr.M}), opts.dtype(acc));
  at::Tensor g = at::empty(pr.sizes({pr.N}), opts.dtype(acc));
  at::Tensor n_iter = at::empty(pr.batch, opts.dtype(at::kInt));
  if (pr.P == 0) return ForwardOutputs{score, plan, f, g, n_iter};
  KernelArgs args("mps_fwd");
  forward_args(args, pr.flat, score, return_plan ? std::optional<at::Tensor>(plan) : std::nullopt, f, g, n_iter,
               max_iter, eps, tol);
  const auto kernel = registry().find(args.key());
  if (!kernel) return std::nullopt;
  launch(*kernel, args, pr.P, scores, "forward");
  registry().forward_launches.fetch_add(1, std::memory_order_relaxed);
  return ForwardOutputs{score, plan, f, g, n_iter};
#else
  (void)scores, (void)eps, (void)max_iter, (void)tol, (void)return_plan;
  return std::nullopt;
#endif
}

std::optional<at::Tensor> launch_backward(const std::optional<at::Tensor>& grad_score,
                                          const std::optional<at::Tensor>& grad_plan, const at::Tensor& scores,
                                          const at::Tensor& f, const at::Tensor& g, double eps) {
#ifdef OTSEG_WITH_CUDA
  const bool has_ds = grad_score.has_value() && grad_score->defined();
  const bool has_dp = grad_plan.has_value() && grad_plan->defined();
  const auto device = scores.device();
  if (skip(scores) || !supported(scores) || !(has_ds || has_dp) || !plain_cuda(f, device) ||
      !plain_cuda(g, device)) {
    return std::nullopt;
  }
  if ((has_ds && !plain_cuda(*grad_score, device)) || (has_dp && !plain_cuda(*grad_plan, device))) {
    return std::nullopt;
  }
  const Problems pr = problems_of(scores);
  // The shapes _check_backward_args (otseg/ops/mps/triton.py) accepts; it
  // raises for any other.
  const auto acc = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto bm = pr.sizes({pr.M});
  if (f.sizes() != at::IntArrayRef(bm) || g.sizes() != at::IntArrayRef(pr.sizes({pr.N})) ||
      f.scalar_type() != acc || g.scalar_type() != acc || (has_ds && grad_score->sizes() != at::IntArrayRef(bm)) ||
      (has_dp && grad_plan->sizes() != scores.sizes())) {
    return std::nullopt;
  }
  c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor grad = at::empty_like(scores, at::MemoryFormat::Contiguous);
  if (pr.P == 0) return grad;
  std::optional<at::Tensor> ds, dp;
  if (has_ds) ds = grad_score->reshape({pr.P, pr.M});
  if (has_dp) dp = grad_plan->reshape({pr.P, pr.M, pr.N});
  // Held until the launch: copies when f, g are not contiguous.
  const at::Tensor fc = f.contiguous(), gc = g.contiguous();
  KernelArgs args("mps_bwd");
  backward_args(args, ds, dp, pr.flat, fc, gc, grad, eps);
  const auto kernel = registry().find(args.key());
  if (!kernel) return std::nullopt;
  launch(*kernel, args, pr.P, scores, "backward");
  registry().backward_launches.fetch_add(1, std::memory_order_relaxed);
  return grad;
#else
  (void)grad_score, (void)grad_plan, (void)scores, (void)f, (void)g, (void)eps;
  return std::nullopt;
#endif
}

TORCH_LIBRARY_IMPL(otseg, CompositeImplicitAutograd, m) {
  m.impl("triton_launch_args_forward", &forward_args_op);
  m.impl("triton_launch_args_backward", &backward_args_op);
  m.impl("triton_launch_register", &register_op);
  m.impl("triton_launch_stats", &stats_op);
  m.impl("triton_launch_clear", &clear_op);
}

}  // namespace triton
}  // namespace otseg
