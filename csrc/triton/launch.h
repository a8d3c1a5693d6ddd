// The triton backend's launches from C++: the Triton MPS kernels
// (kernels/mps.py), once Triton has compiled them, are launched here instead of
// through Python.
//
// Why: a call of the Triton operators from Python costs 70-91 us of host work
// on an H100 machine (torch's custom-op dispatch, our launcher, Triton's
// argument binding and launcher), several times the kernels' own time on
// problems that converge in a few iterations; the cuda backend's C++ host code
// costs 10-14 us.
//
// How: the first call of each kernel variant runs the Python operators as
// before (Triton compiles and launches). They then register the compiled
// kernel here (the operator otseg::triton_launch_register): its CUfunction, warps and shared memory,
// under the key of Triton's specialisation of that launch's arguments, which
// KernelArgs computes from the tensors exactly as Triton's JIT does
// (triton/runtime/jit.py, native_specialize_impl: pointer dtype and 16-byte
// alignment; integers equal to 1 made constants, others int32 or int64 and
// divisibility by 16; Python floats as float32). Later calls whose arguments
// give a registered key are launched here, on the current stream, with the
// same parameters in the same order as Triton's launcher passes them (the
// runtime arguments, then Triton's scratch pointers, null for these
// kernels). Registration compares that parameter list with the one in the
// kernel's PTX and refuses a kernel that does not match.
//
// The key and parameter functions are device-agnostic (tested on CPU tensors
// against kernels compiled for sm_90 without a GPU); the launch itself is in
// the CUDA build only.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace otseg {
namespace triton {

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The runtime parameters of one launch of a Triton kernel and the key of their
// specialisation. Arguments are added in the kernel's order.
class KernelArgs {
 public:
  static constexpr int kMaxParams = 32;

  explicit KernelArgs(const char* kernel);

  // A pointer: its dtype and whether it is 16-byte aligned.
  void tensor(const at::Tensor& t);
  // An integer: int32 (or int64 beyond). Specialised (the default): 1 becomes
  // a constant (no parameter), and whether it divides by 16 is in the key;
  // the kernel's do_not_specialize arguments are not.
  void integer(int64_t v, bool specialize = true);
  // A Python float, passed as float32.
  void fp32(double v);
  // A value that the launch configuration (the constexprs: block sizes, warps,
  // vector width) depends on; in the key only.
  void tag(int64_t v);
  // Parameters that Triton's launcher appends (its scratch pointers): null.
  void append_null_pointers(int n);

  const std::string& key() const { return key_; }
  // The byte size of each parameter, one character each ("8", "4").
  const std::string& sizes() const { return sizes_; }
  void** params() { return ptrs_.data(); }

 private:
  void push(const void* value, int bytes);

  std::string key_;
  std::string sizes_;
  std::array<uint64_t, kMaxParams> slots_{};
  std::array<void*, kMaxParams> ptrs_{};
  int n_ = 0;
};

// Prompts per vector read of [P, M, N] scores, as _vector_width of
// otseg/ops/mps/triton.py: 4 (or 2) when contiguous, N a multiple and the
// storage offset a multiple of the vector; else 1.
int64_t vector_width(const at::Tensor& x, int64_t N);

// The arguments of _mps_fwd_kernel for flat scores [P, M, N] and the outputs,
// as otseg/ops/mps/triton.py's launch_forward passes them; returns the
// vector width.
int64_t forward_args(KernelArgs& args, const at::Tensor& flat, const at::Tensor& score,
                     const std::optional<at::Tensor>& plan, const at::Tensor& f, const at::Tensor& g,
                     const at::Tensor& n_iter, int64_t max_iter, double eps, double tol);

// The arguments of _mps_bwd_kernel, as launch_backward passes them: ds [P, M]
// and dp [P, M, N] may be absent; f, g contiguous. Returns the vector width.
int64_t backward_args(KernelArgs& args, const std::optional<at::Tensor>& ds, const std::optional<at::Tensor>& dp,
                      const at::Tensor& flat, const at::Tensor& f, const at::Tensor& g, const at::Tensor& grad,
                      double eps);

// The C++ launches of the triton backend's operators: the outputs, or nullopt
// when this call must go through Python (no kernel registered for it yet,
// tensors that are not plain CUDA tensors, an active dispatch mode, an input
// the Python operator rejects with its error message). CUDA build only.
std::optional<ForwardOutputs> launch_forward(const at::Tensor& scores, double eps, int64_t max_iter, double tol,
                                             bool return_plan);
std::optional<at::Tensor> launch_backward(const std::optional<at::Tensor>& grad_score,
                                          const std::optional<at::Tensor>& grad_plan, const at::Tensor& scores,
                                          const at::Tensor& f, const at::Tensor& g, double eps);

}  // namespace triton
}  // namespace otseg
