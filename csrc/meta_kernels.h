// Meta kernels of the ops (the meta device, and FakeTensor tracing under torch.compile / torch.export,
// which runs them on fake tensors): the same argument checks as the real kernels (checks.h), then
// outputs of the shapes, dtypes and strides the real kernels produce (layout.h), without computing.
// Shared by the `fusedbn` library and the test-only `fusedbn_simt` one.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "checks.h"
#include "layout.h"
#include "schemas.h"

namespace fusedbn::meta {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

inline Tensor output_like(const Tensor& input) { return empty_like_dense(dense_input(input), input.scalar_type()); }

// A (C,) statistic in the accumulation dtype, or a parameter gradient in `dtype`.
inline Tensor per_channel(const Tensor& input, std::optional<at::ScalarType> dtype = std::nullopt) {
  return at::empty_symint({input.sym_size(1)},
                          input.options().dtype(dtype.value_or(at::toOpMathType(input.scalar_type()))));
}

inline std::tuple<Tensor, Tensor, Tensor> forward_train(const Tensor& input, const OptTensor& weight,
                                                        const OptTensor& bias, const OptTensor& running_mean,
                                                        const OptTensor& running_var, double, double eps,
                                                        const OptTensor& residual, c10::string_view activation,
                                                        double activation_param, const OptTensor& activation_weight) {
  check_forward_train_args(input, weight, bias, running_mean, running_var, residual, eps);
  parse_epilogue(activation, activation_param, activation_weight, input);
  return {output_like(input), per_channel(input), per_channel(input)};
}

inline Tensor forward_eval(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                           const Tensor& running_mean, const Tensor& running_var, double eps,
                           const OptTensor& residual, c10::string_view activation, double activation_param,
                           const OptTensor& activation_weight) {
  check_forward_eval_args(input, weight, bias, running_mean, running_var, residual, eps);
  parse_epilogue(activation, activation_param, activation_weight, input);
  return output_like(input);
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward(
    const Tensor& grad_output, const Tensor& input, const OptTensor& weight, const Tensor& mean, const Tensor& invstd,
    bool, std::array<bool, 3> output_mask, const OptTensor& bias, const OptTensor& output, const OptTensor& residual,
    c10::string_view activation, double activation_param, bool grad_residual, const OptTensor& activation_weight,
    bool grad_activation_weight) {
  check_backward_args(grad_output, input, weight, mean, invstd, bias, output, residual);
  parse_epilogue(activation, activation_param, activation_weight, input, output);
  const auto param_dtype = grad_param_dtype(weight, bias, input);
  const bool slopes = grad_activation_weight && has(activation_weight);
  return {output_mask[0] ? output_like(input) : Tensor(), output_mask[1] ? per_channel(input, param_dtype) : Tensor(),
          output_mask[2] ? per_channel(input, param_dtype) : Tensor(), grad_residual ? output_like(input) : Tensor(),
          slopes ? at::empty_like(*activation_weight, at::MemoryFormat::Contiguous) : Tensor()};
}

inline std::tuple<Tensor, Tensor> batch_stats(const Tensor& input) {
  check_input(input);
  return {per_channel(input), per_channel(input)};
}

inline std::tuple<Tensor, Tensor, Tensor> grad_sums(const Tensor& grad_output, const Tensor& input,
                                                    const OptTensor& weight, const Tensor& mean, const Tensor& invstd,
                                                    const OptTensor& bias, const OptTensor& output,
                                                    const OptTensor& residual, c10::string_view activation,
                                                    double activation_param, const OptTensor& activation_weight) {
  check_backward_args(grad_output, input, weight, mean, invstd, bias, output, residual);
  parse_epilogue(activation, activation_param, activation_weight, input, output);
  return {per_channel(input), per_channel(input), has(activation_weight) ? per_channel(input) : Tensor()};
}

inline std::tuple<Tensor, Tensor> backward_elemt(const Tensor& grad_output, const Tensor& input,
                                                 const OptTensor& weight, const Tensor& mean, const Tensor& invstd,
                                                 const Tensor& mean_dz, const Tensor& proj, const OptTensor& bias,
                                                 const OptTensor& output, const OptTensor& residual,
                                                 c10::string_view activation, double activation_param,
                                                 bool grad_residual, const OptTensor& activation_weight) {
  check_backward_args(grad_output, input, weight, mean, invstd, bias, output, residual);
  parse_epilogue(activation, activation_param, activation_weight, input, output);
  check_centering_terms(mean_dz, proj, input);  // in prepare_backward_elemt's order
  return {output_like(input), grad_residual ? output_like(input) : Tensor()};
}

inline void register_meta_kernels(torch::Library& m) {
  fusedbn::register_kernels(m, &forward_train, &forward_eval, &backward, &batch_stats, &grad_sums, &backward_elemt);
}

}  // namespace fusedbn::meta
