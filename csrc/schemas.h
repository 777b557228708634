// The op schemas, shared by the `fusedbn` library and the test-only `fusedbn_simt` one (the CUDA kernels
// run under the SIMT emulator on CPU tensors), so both expose exactly the same ops.
#pragma once

#include <torch/library.h>

namespace fusedbn {

inline void define_schemas(torch::Library& m) {
  // Every forward computes out = act(bn(input) [+ residual]): the residual (input's shape) is added when
  // given, then the activation (epilogue.h): identity, relu, relu6, leaky_relu (activation_param: its
  // negative_slope), elu (activation_param: alpha), silu, hardswish, gelu, gelu_tanh, prelu (its slope is
  // activation_weight: 1 or C values, of the input's dtype or float32; required by prelu, refused otherwise).
  // Training: Welford statistics, running-stat update (in place, unbiased variance), normalize.
  // Returns (output, mean, invstd), the statistics in float (double for float64 input).
  m.def(
      "forward_train(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum, float eps, Tensor? residual=None, str activation='identity', "
      "float activation_param=0., Tensor? activation_weight=None) "
      "-> (Tensor, Tensor, Tensor)");
  // Inference with running statistics: a per-channel affine map.
  m.def(
      "forward_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
      "Tensor running_var, float eps, Tensor? residual=None, str activation='identity', float activation_param=0., "
      "Tensor? activation_weight=None) -> Tensor");
  // Fused backward: (grad_input, grad_weight, grad_bias, grad_residual, grad_activation_weight); an entry
  // is computed only where output_mask (the first three), grad_residual or grad_activation_weight asks for
  // it. PReLU's weight gradient is sum(dy * min(z, 0)) per channel (over all channels for one weight), in
  // the weight's shape and dtype, summed in the pass that sums the BatchNorm gradients. `training` selects batch statistics
  // (mean, invstd of forward_train) or fixed ones (running_mean and 1/sqrt(running_var + eps)).
  // With an activation, grad_output is the gradient of its output; its derivative is recomputed from input,
  // the statistics, weight, bias and the forward's residual, except that relu's mask comes from `output`
  // (the forward's) when that is given (relu only).
  m.def(
      "backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, "
      "bool training, bool[3] output_mask, Tensor? bias=None, Tensor? output=None, Tensor? residual=None, "
      "str activation='identity', float activation_param=0., bool grad_residual=False, "
      "Tensor? activation_weight=None, bool grad_activation_weight=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The pieces of a training step whose statistics span several processes (SyncBatchNorm), all in the
  // statistics' dtype. Per channel: the mean and M2 (sum of squared deviations) of the input's values;
  // sum(dz) and sum(dz * (x - mean)) of the gradient reaching BatchNorm's output (through the activation
  // as in backward), and for prelu sum(dy * min(z, 0)) (PReLU's weight gradient per channel; else undefined); and the elementwise half of the training backward given the global coefficients,
  // dx = (dz - mean_dz - (x - mean) * proj) * weight * invstd, returning (grad_input, grad_residual).
  m.def("batch_stats(Tensor input) -> (Tensor, Tensor)");
  m.def(
      "grad_sums(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, "
      "Tensor? bias=None, Tensor? output=None, Tensor? residual=None, str activation='identity', "
      "float activation_param=0., Tensor? activation_weight=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "backward_elemt(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, "
      "Tensor mean_dz, Tensor proj, Tensor? bias=None, Tensor? output=None, Tensor? residual=None, "
      "str activation='identity', float activation_param=0., bool grad_residual=False, "
      "Tensor? activation_weight=None) -> (Tensor, Tensor)");
}

// One backend's kernels for the six ops, by the names define_schemas gives them: every backend (CPU,
// CUDA, the emulator's, meta) registers through this one list.
inline void register_kernels(torch::Library& m, auto forward_train, auto forward_eval, auto backward, auto batch_stats,
                             auto grad_sums, auto backward_elemt) {
  m.impl("forward_train", forward_train);
  m.impl("forward_eval", forward_eval);
  m.impl("backward", backward);
  m.impl("batch_stats", batch_stats);
  m.impl("grad_sums", grad_sums);
  m.impl("backward_elemt", backward_elemt);
}

}  // namespace fusedbn
