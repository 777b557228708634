// Run-time values made compile-time ones, one place for every backend: the input's dtype (float, double,
// half, bfloat16) and the statistics' (float, double), a flag, the parameters' element type, a vector
// width. Each kernel template is instantiated for every combination; the call picks one at run time.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/core/ScalarType.h>

#include <optional>
#include <type_traits>

// FUSEDBN_DISPATCH_INPUT(type, [&] { ... scalar_t ... }) over the four input dtypes;
// FUSEDBN_DISPATCH_STATISTICS(type, [&] { ... scalar_t ... }) over the statistics' two.
#define FUSEDBN_DISPATCH_INPUT(type, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "batch_norm", __VA_ARGS__)
#define FUSEDBN_DISPATCH_STATISTICS(type, ...) AT_DISPATCH_FLOATING_TYPES(type, "batch_norm", __VA_ARGS__)

namespace fusedbn {

// Calls f(std::bool_constant<b>{}).
template <typename F>
void with_flag(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Calls f(param_t{}) with the parameters' element type: float for half/bfloat16 input with float32
// parameters (mixed precision), else the input's type.
template <typename scalar_t, typename F>
void with_param_type(std::optional<at::ScalarType> param_dtype, F&& f) {
  if (param_dtype && *param_dtype == at::kFloat && !std::is_same_v<scalar_t, float>) {
    f(float{});
  } else {
    f(scalar_t{});
  }
}

// Calls f(std::integral_constant<int, kVec>{}) with kVec = kVecWidth when `vectorize`, else 1 (the shape
// and alignment decide).
template <int kVecWidth, typename F>
void with_vec_width(bool vectorize, F&& f) {
  if (vectorize) {
    f(std::integral_constant<int, kVecWidth>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

}  // namespace fusedbn
