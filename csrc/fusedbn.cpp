// The fusedbn op schemas, declared once; each backend registers its kernels with TORCH_LIBRARY_IMPL
// in its own file (csrc/cpu/ops.cpp, csrc/cuda/ops.cpp).
#include <Python.h>
#include <torch/library.h>

// `import fusedbn._C` loads this library, which registers the ops with the dispatcher.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(fusedbn, m) {
  // Training: Welford statistics, running-stat update (in place, unbiased variance), normalize.
  // Returns (output, mean, invstd), the statistics in float (double for float64 input).
  m.def(
      "forward_train(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum, float eps) -> (Tensor, Tensor, Tensor)");
  // Inference with running statistics: a per-channel affine map.
  m.def(
      "forward_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
      "Tensor running_var, float eps) -> Tensor");
  // Fused backward: (grad_input, grad_weight, grad_bias); an entry is computed only where
  // output_mask is true. `training` selects batch statistics (mean, invstd of forward_train) or
  // fixed ones (running_mean and 1/sqrt(running_var + eps)).
  m.def(
      "backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, "
      "bool training, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}
