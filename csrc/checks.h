// Argument checks shared by every backend's ops. Messages follow torch's own batch_norm wording so a
// user sees the same error with fusedbn as with nn.BatchNorm. Every check runs before anything is
// written, so a rejected call leaves running statistics untouched.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

}  // namespace fusedbn
