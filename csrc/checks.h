// Argument checks shared by every backend's ops and their meta kernels (csrc/meta_kernels.h), so a dry
// run on the meta device or under FakeTensor tracing raises exactly what a real run raises. Messages
// follow torch's batch_norm wording where it has one, exception types are torch's. Every check runs
// before anything is written, so a rejected call leaves running statistics untouched.
//
// Sizes are read as SymInts (sym_size, sym_numel): under torch.compile with dynamic shapes the meta
// kernels see symbolic sizes, and comparing them records a guard, as torch's own meta functions do.
//
// Per-channel tensors, as torch treats them:
//  - weight and bias: any shape with C elements (torch reads them flattened); the ops flatten them
//    (flat_channels) and return their gradients in their own shape;
//  - running_mean, running_var and every statistic (mean, invstd, mean_dz, proj): 1-D of C elements
//    (torch rejects any other shape in training and eval alike).
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <string_view>

#include "epilogue.h"

namespace fusedbn {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline void check_input(const at::Tensor& input) {
  TORCH_CHECK_NOT_IMPLEMENTED(is_supported_float(input.scalar_type()),
                              "\"batch_norm\" not implemented for '", input.scalar_type(), "'");
  TORCH_CHECK(input.dim() >= 2, "batch_norm: expected an input of at least 2 dims (N, C, *), got ", input.dim(),
              " dims");
}

enum class ChannelTensor { kAffine, kStatistic };

// A per-channel tensor: C elements (and 1-D for a statistic), on the input's device, of the input's dtype
// or float32 (the mixed-precision case nn.BatchNorm accepts).
inline void check_channel_param(const at::Tensor& param, const char* name, const at::Tensor& input,
                                ChannelTensor kind = ChannelTensor::kStatistic) {
  const c10::SymInt C = input.sym_size(1);
  TORCH_CHECK(param.sym_numel() == C, name, " should contain ", C, " elements not ", param.sym_numel());
  TORCH_CHECK(kind == ChannelTensor::kAffine || param.dim() == 1, name, " should be a 1-D tensor of ", C,
              " elements, got shape ", param.sym_sizes());
  TORCH_CHECK(param.device() == input.device(),
              "Expected all tensors to be on the same device, but found at least two devices, ",
              input.device(), " and ", param.device(), "! (", name, ")");
  const auto dtype = param.scalar_type();
  const bool reduced_input = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  TORCH_CHECK(dtype == input.scalar_type() || (reduced_input && dtype == at::kFloat),
              "mixed dtype: expect parameter to have scalar type of ", input.scalar_type(),
              (reduced_input ? " or Float" : ""), ", but ", name, " is ", dtype);
}

inline void check_optional_param(const std::optional<at::Tensor>& param, const char* name, const at::Tensor& input,
                                 ChannelTensor kind = ChannelTensor::kStatistic) {
  if (has(param)) check_channel_param(*param, name, input, kind);
}

// weight or bias as the contiguous (C,) vector the kernels index (a copy only of a strided one).
inline std::optional<at::Tensor> flat_channels(const std::optional<at::Tensor>& param) {
  return has(param) ? std::optional<at::Tensor>(param->reshape({-1}).contiguous()) : param;
}

// Parameters given together must agree on dtype, as nn.BatchNorm requires in mixed precision.
inline void check_params_share_dtype(std::initializer_list<const std::optional<at::Tensor>*> params) {
  std::optional<at::ScalarType> dtype;
  for (const auto* p : params) {
    if (!has(*p)) continue;
    TORCH_CHECK(!dtype || *dtype == (*p)->scalar_type(),
                "mixed dtype: expect weight, bias, running_mean and running_var to share one dtype, got ",
                *dtype, " and ", (*p)->scalar_type());
    dtype = (*p)->scalar_type();
  }
}

// A running statistic must not require grad (torch's rule, in training and eval alike).
inline void check_running_stat_constant(const at::Tensor& stat, const char* name) {
  TORCH_CHECK(!(c10::GradMode::is_enabled() && stat.requires_grad()),
              "batch_norm is not differentiable with respect to argument '", name,
              "'. This input cannot have requires_grad True.");
}

// A running statistic the op updates in place: also, it must own each of its elements' memory (an
// expanded tensor would have every channel's update land on one location).
inline void check_running_stat_writable(const at::Tensor& stat, const char* name) {
  check_running_stat_constant(stat, name);
  if (stat.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return;  // parameters and buffers are static
  TORCH_CHECK(at::has_internal_overlap(stat) != at::MemOverlap::Yes, name,
              " has elements that share one memory location (an expanded tensor?), so the batch statistics "
              "cannot be written into it; pass a tensor with memory of its own, e.g. ", name, ".clone()");
}

// Values per channel, N * prod(spatial).
inline c10::SymInt count_per_channel(const at::Tensor& input) {
  c10::SymInt count = input.sym_size(0);
  for (int64_t d = 2; d < input.dim(); ++d) count *= input.sym_size(d);
  return count;
}

// A tensor of the input's shape (grad_output, the residual, the op's output): same shape, dtype and device.
inline void check_like_input(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.sym_sizes() == input.sym_sizes(), name, " should have the input's shape ", input.sym_sizes(),
              ", got ", t.sym_sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), name, " should have dtype ", input.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == input.device(),
              "Expected all tensors to be on the same device, but found at least two devices, ", input.device(),
              " and ", t.device(), "! (", name, ")");
}

inline void check_optional_like_input(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& input) {
  if (has(t)) check_like_input(*t, name, input);
}

inline void check_affine(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& input) {
  check_optional_param(weight, "weight", input, ChannelTensor::kAffine);
  check_optional_param(bias, "bias", input, ChannelTensor::kAffine);
}

// torch.nn.functional.batch_norm's rule: eps > 0 in training, eps >= 0 with running statistics.
inline void check_eps(double eps, bool training) {
  TORCH_CHECK_VALUE(!training || eps > 0.0, "batch_norm eps must be positive during training, but got ", eps);
  TORCH_CHECK_VALUE(eps >= 0.0, "batch_norm eps must be non-negative, but got ", eps);
}

inline void check_forward_train_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& running_mean,
                                     const std::optional<at::Tensor>& running_var,
                                     const std::optional<at::Tensor>& residual, double eps) {
  check_input(input);
  check_optional_like_input(residual, "residual", input);
  check_affine(weight, bias, input);
  TORCH_CHECK_VALUE(has(running_mean) == has(running_var),
                    "running_mean and running_var must either both be None or neither be None");
  check_optional_param(running_mean, "running_mean", input);
  check_optional_param(running_var, "running_var", input);
  check_params_share_dtype({&weight, &bias, &running_mean, &running_var});
  if (has(running_mean)) {
    check_running_stat_writable(*running_mean, "running_mean");
    check_running_stat_writable(*running_var, "running_var");
  }
  TORCH_CHECK_VALUE(count_per_channel(input) != 1,
                    "Expected more than 1 value per channel when training, got input size ", input.sym_sizes());
  check_eps(eps, true);
}

inline void check_forward_eval_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                                    const at::Tensor& running_var, const std::optional<at::Tensor>& residual,
                                    double eps) {
  check_input(input);
  check_optional_like_input(residual, "residual", input);
  check_affine(weight, bias, input);
  check_channel_param(running_mean, "running_mean", input);
  check_channel_param(running_var, "running_var", input);
  check_running_stat_constant(running_mean, "running_mean");
  check_running_stat_constant(running_var, "running_var");
  const std::optional<at::Tensor> rm = running_mean, rv = running_var;
  check_params_share_dtype({&weight, &bias, &rm, &rv});
  check_eps(eps, false);
}

// The ops' (activation, activation_param, activation_weight) arguments; `output`, the backward's, is read
// only for ReLU. PReLU's weight is given exactly for prelu: 1 or C values (read flattened, as nn.PReLU's),
// on the input's device, of the input's dtype or float32 (nn.BatchNorm's mixed precision).
inline Epilogue parse_epilogue(std::string_view activation, double param,
                               const std::optional<at::Tensor>& activation_weight, const at::Tensor& input,
                               const std::optional<at::Tensor>& output = std::nullopt) {
  Epilogue epilogue{Activation::kIdentity, param};
  TORCH_CHECK_VALUE(parse_activation(activation, epilogue.act), "fusedbn: unknown activation '", activation,
                    "'; expected one of identity, relu, relu6, leaky_relu, elu, silu, hardswish, gelu, gelu_tanh, "
                    "prelu");
  TORCH_CHECK_VALUE(!has(output) || epilogue.act == Activation::kRelu,
                    "fusedbn: the backward reads the forward's output only for relu, got activation '", activation,
                    "' (pass the residual instead)");
  const bool prelu = epilogue.act == Activation::kPrelu;
  TORCH_CHECK_VALUE(!prelu || has(activation_weight),
                    "fusedbn: activation 'prelu' needs its weight (activation_weight), got None");
  TORCH_CHECK_VALUE(prelu || !has(activation_weight), "fusedbn: activation_weight is PReLU's weight, but the "
                    "activation is '", activation, "'");
  if (prelu) {
    TORCH_CHECK_VALUE(param == 0.0, "fusedbn: activation 'prelu' takes no activation_param (its slopes are "
                      "activation_weight), got ", param);
    const at::Tensor& w = *activation_weight;
    const c10::SymInt C = input.sym_size(1);
    TORCH_CHECK(w.sym_numel() == 1 || w.sym_numel() == C, "fusedbn: PReLU's weight (activation_weight) should "
                "have 1 or ", C, " elements (the input's channels), got ", w.sym_numel());
    TORCH_CHECK(w.device() == input.device(), "Expected all tensors to be on the same device, but found at least "
                "two devices, ", input.device(), " and ", w.device(), "! (activation_weight)");
    const bool reduced_input = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
    TORCH_CHECK(w.scalar_type() == input.scalar_type() || (reduced_input && w.scalar_type() == at::kFloat),
                "mixed dtype: expect PReLU's weight (activation_weight) to have scalar type of ", input.scalar_type(),
                (reduced_input ? " or Float" : ""), ", but it is ", w.scalar_type());
  }
  return epilogue;
}

// PReLU's slopes as the kernels read them: 1 or C values, contiguous, in the accumulation dtype `acc`;
// undefined without a weight.
inline at::Tensor activation_slopes(const std::optional<at::Tensor>& activation_weight, at::ScalarType acc) {
  return has(activation_weight) ? activation_weight->reshape({-1}).to(acc).contiguous() : at::Tensor();
}

// Channel c's slope is slopes[c * slope_step(slopes)]: one for every channel, or each its own.
inline int64_t slope_step(const at::Tensor& slopes) { return slopes.numel() > 1 ? 1 : 0; }

inline void check_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                                const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                const at::Tensor& invstd, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& output, const std::optional<at::Tensor>& residual) {
  check_input(input);
  check_like_input(grad_output, "grad_output", input);
  check_optional_like_input(output, "output", input);
  check_optional_like_input(residual, "residual", input);
  check_affine(weight, bias, input);
  check_params_share_dtype({&weight, &bias});
  check_channel_param(mean, "mean", input);
  check_channel_param(invstd, "invstd", input);
}

// backward_elemt's global centering terms, checked after the backward's own arguments.
inline void check_centering_terms(const at::Tensor& mean_dz, const at::Tensor& proj, const at::Tensor& input) {
  check_channel_param(mean_dz, "mean_dz", input);
  check_channel_param(proj, "proj", input);
}

// The dtype of grad_weight and grad_bias: the parameters' (the input's without any).
inline at::ScalarType grad_param_dtype(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                       const at::Tensor& input) {
  return has(weight) ? weight->scalar_type() : has(bias) ? bias->scalar_type() : input.scalar_type();
}

}  // namespace fusedbn
