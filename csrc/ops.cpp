// Operator schemas of the otseg namespace. Each device registers its kernels in
// csrc/<device>/, the autograd of mps_forward is in csrc/autograd.cpp, and the
// fake (meta) kernels are registered from Python (otseg/ops/mps/fused.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(otseg, m) {
  // Multi-Prompts Sinkhorn on scores [..., M, N] (cost 1 - S, uniform
  // marginals), one problem per leading index. Returns the refined score
  // M*N*sum_n T*S [..., M] in the input dtype, the plan [..., M, N] when
  // return_plan (else an empty tensor), the final potentials f [..., M] and
  // g [..., N] in the compute dtype, and the iterations run [...] (int32).
  // With check_finite, NaN or inf in the scores raise a ValueError (found while
  // the kernel reads them, so the check costs no extra pass).
  m.def(
      "mps_forward(Tensor scores, float eps, int max_iter, float tol, bool return_plan, bool check_finite) -> "
      "(Tensor score, Tensor plan, Tensor f, Tensor g, Tensor n_iter)");
  // Implicit gradient at the fixed point (SPEC section 1) with respect to the
  // scores [..., M, N], for upstream gradients of the refined score [..., M]
  // and of the plan [..., M, N], either of which may be absent.
  m.def(
      "mps_backward(Tensor? grad_score, Tensor? grad_plan, Tensor scores, Tensor f, Tensor g, "
      "float eps) -> Tensor");
  // The triton backend's differentiable forward: mps_forward_triton (a Triton
  // operator registered from Python, otseg/ops/mps/triton.py) with its
  // implicit backward mps_backward_triton, glued in C++ (csrc/autograd.cpp).
  m.def(
      "mps_triton(Tensor scores, float eps, int max_iter, float tol, bool return_plan) -> "
      "(Tensor score, Tensor plan, Tensor f, Tensor g, Tensor n_iter)");
  // Its backward as an operator of its own, with the same route as inside
  // mps_triton's autograd (C++ launches of registered kernels, else
  // mps_backward_triton), for callers that time or test it alone.
  m.def(
      "mps_triton_backward(Tensor? grad_score, Tensor? grad_plan, Tensor scores, Tensor f, Tensor g, "
      "float eps) -> Tensor");
  // The per-mask sums behind the segmentation losses (SPEC section 3) of
  // logits [B, K, h, w] upsampled bilinearly (align_corners=False) to the
  // labels' [B, H, W], without forming the upsampled logits: [4, B, K] =
  // focal sum, sum p y, sum p, sum y over the labelled pixels of each mask,
  // p = sigmoid(logit), y = (label == k); labels equal to ignore_index count
  // for no class; alpha < 0 means no focal weighting.
  m.def("mask_stats(Tensor logits, Tensor labels, float alpha, float gamma, int ignore_index) -> Tensor");
  // Its gradient with respect to the logits [B, K, h, w], for the upstream
  // gradient [4, B, K] of the sums (that of sum y is ignored).
  m.def(
      "mask_stats_backward(Tensor grad_stats, Tensor logits, Tensor labels, float alpha, float gamma, "
      "int ignore_index) -> Tensor");
  // The triton backend's launches from C++ (csrc/triton/launch.h), for
  // otseg/ops/mps/triton.py and the tests: the specialisation key, parameter
  // sizes and vector width of a launch of _mps_fwd_kernel / _mps_bwd_kernel
  // with these arguments (flat [P, M, N] scores, the outputs as launch_forward
  // and launch_backward pass them); the registration of a compiled kernel
  // under a key ("" when registered, else why not); the number of kernels
  // registered, of forward and backward launches from C++ and of failed
  // launches; and the registry's reset (for otseg.ops.mps.triton's
  // set_cpp_launch, which also resets the Python side's record).
  m.def(
      "triton_launch_args_forward(Tensor scores, Tensor score, Tensor? plan, Tensor f, Tensor g, Tensor n_iter, "
      "int max_iter, float eps, float tol) -> (str, str, int)");
  m.def(
      "triton_launch_args_backward(Tensor? grad_score, Tensor? grad_plan, Tensor scores, Tensor f, Tensor g, "
      "Tensor grad, float eps) -> (str, str, int)");
  m.def(
      "triton_launch_register(str key, str sizes, str ptx_sizes, int function, int num_warps, int shared) -> str");
  m.def("triton_launch_stats() -> int[]");
  m.def("triton_launch_clear() -> ()");
}

namespace otseg {
// The instruction set the CPU kernels use on this machine (csrc/cpu/).
const char* cpu_isa_name();
}  // namespace otseg

// A Python module so that `import otseg._C` loads the library and runs the
// registrations above; everything else is reached through torch.ops.otseg.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* mod = PyModule_Create(&module);
  if (mod == nullptr) return nullptr;
#ifdef OTSEG_WITH_CUDA
  PyModule_AddIntConstant(mod, "with_cuda", 1);
#else
  PyModule_AddIntConstant(mod, "with_cuda", 0);
#endif
  PyModule_AddStringConstant(mod, "cpu_isa", otseg::cpu_isa_name());
#ifdef OTSEG_TORCH_VERSION
  PyModule_AddStringConstant(mod, "torch_version", OTSEG_TORCH_VERSION);
#endif
  return mod;
}
