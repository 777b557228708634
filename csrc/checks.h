// Argument checks shared by every backend's ops. Messages follow torch's own batch_norm wording so a
// user sees the same error with fusedbn as with nn.BatchNorm. Every check runs before anything is
// written, so a rejected call leaves running statistics untouched.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>

namespace fusedbn {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_input(const at::Tensor& input) {
  TORCH_CHECK_NOT_IMPLEMENTED(is_supported_float(input.scalar_type()),
                              "\"batch_norm\" not implemented for '", input.scalar_type(), "'");
  TORCH_CHECK_INDEX(input.dim() >= 2, "Dimension out of range (expected input of at least 2 dims, got ",
                    input.dim(), ")");
}

// A per-channel tensor (weight, bias, running stats, saved statistics): C elements, on the input's
// device, of the input's dtype or float32 (the mixed-precision case nn.BatchNorm accepts).
inline void check_channel_param(const at::Tensor& param, const char* name, const at::Tensor& input) {
  const int64_t C = input.size(1);
  TORCH_CHECK(param.numel() == C, name, " should contain ", C, " elements not ", param.numel());
  TORCH_CHECK(param.device() == input.device(),
              "Expected all tensors to be on the same device, but found at least two devices, ",
              input.device(), " and ", param.device(), "! (", name, ")");
  const auto dtype = param.scalar_type();
  const bool reduced_input = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  TORCH_CHECK(dtype == input.scalar_type() || (reduced_input && dtype == at::kFloat),
              "mixed dtype: expect parameter to have scalar type of ", input.scalar_type(),
              (reduced_input ? " or Float" : ""), ", but ", name, " is ", dtype);
}

inline void check_optional_param(const std::optional<at::Tensor>& param, const char* name,
                                 const at::Tensor& input) {
  if (param.has_value() && param->defined()) check_channel_param(*param, name, input);
}

inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

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

// Values per channel, N * prod(spatial).
inline int64_t values_per_channel(const at::Tensor& input) {
  int64_t count = input.size(0);
  for (int64_t d = 2; d < input.dim(); ++d) count *= input.size(d);
  return count;
}

// A tensor of the input's shape (grad_output, the residual, the op's output): same shape, dtype and device.
inline void check_like_input(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.sizes() == input.sizes(), name, " should have the input's shape ", input.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), name, " should have dtype ", input.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == input.device(),
              "Expected all tensors to be on the same device, but found at least two devices, ", input.device(),
              " and ", t.device(), "! (", name, ")");
}

inline void check_optional_like_input(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& input) {
  if (has(t)) check_like_input(*t, name, input);
}

inline void check_forward_train_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& running_mean,
                                     const std::optional<at::Tensor>& running_var,
                                     const std::optional<at::Tensor>& residual) {
  check_input(input);
  check_optional_like_input(residual, "residual", input);
  check_optional_param(weight, "weight", input);
  check_optional_param(bias, "bias", input);
  check_optional_param(running_mean, "running_mean", input);
  check_optional_param(running_var, "running_var", input);
  check_params_share_dtype({&weight, &bias, &running_mean, &running_var});
  TORCH_CHECK(has(running_mean) == has(running_var),
              "running_mean and running_var must either both be None or neither be None");
  TORCH_CHECK_VALUE(values_per_channel(input) != 1,
                    "Expected more than 1 value per channel when training, got input size ", input.sizes());
}

// torch.nn.functional.batch_norm's rule: eps > 0 in training, eps >= 0 with running statistics.
inline void check_eps(double eps, bool training) {
  TORCH_CHECK_VALUE(!training || eps > 0.0, "batch_norm eps must be positive during training, but got ", eps);
  TORCH_CHECK_VALUE(eps >= 0.0, "batch_norm eps must be non-negative, but got ", eps);
}

inline void check_forward_eval_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                                    const at::Tensor& running_var, const std::optional<at::Tensor>& residual) {
  check_input(input);
  check_optional_like_input(residual, "residual", input);
  check_optional_param(weight, "weight", input);
  check_optional_param(bias, "bias", input);
  check_channel_param(running_mean, "running_mean", input);
  check_channel_param(running_var, "running_var", input);
  const std::optional<at::Tensor> rm = running_mean, rv = running_var;
  check_params_share_dtype({&weight, &bias, &rm, &rv});
}

inline void check_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                                const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                const at::Tensor& invstd, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& output) {
  check_input(input);
  check_like_input(grad_output, "grad_output", input);
  check_optional_like_input(output, "output", input);
  check_optional_param(weight, "weight", input);
  check_optional_param(bias, "bias", input);
  check_channel_param(mean, "mean", input);
  check_channel_param(invstd, "invstd", input);
}

}  // namespace fusedbn
