// The checked, layout-resolved inputs of the backward op, shared by every backend's front.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <optional>

#include "checks.h"
#include "epilogue.h"
#include "layout.h"

namespace fusedbn {

struct BackwardInputs {
  at::Tensor x;     // input, in one of the two layout views
  at::Tensor dy;    // grad_output, in the same view as x (whatever its own memory format)
  at::Tensor out;   // the forward's output in the same view, when relu's mask is read from it
  at::Tensor mean;  // per-channel statistics in the accumulation dtype, contiguous
  at::Tensor invstd;
  std::optional<at::Tensor> weight, bias;  // as (C,) vectors (flat_channels)
  ChannelLayout layout;
  at::ScalarType acc;
  ReluMask mask;
};

inline BackwardInputs prepare_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                       const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                       const at::Tensor& invstd, const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& output, bool relu) {
  check_backward_args(grad_output, input, weight, mean, invstd, bias, output);
  BackwardInputs in;
  in.x = dense_input(input);
  in.layout = channel_layout(in.x);
  in.dy = to_layout(grad_output, in.layout);
  in.mask = !relu ? ReluMask::kNone : has(output) ? ReluMask::kFromOutput : ReluMask::kFromInput;
  if (in.mask == ReluMask::kFromOutput) in.out = to_layout(*output, in.layout);
  in.acc = at::toOpMathType(input.scalar_type());
  in.mean = mean.to(in.acc).contiguous();
  in.invstd = invstd.to(in.acc).contiguous();
  in.weight = flat_channels(weight);
  in.bias = flat_channels(bias);
  return in;
}

}  // namespace fusedbn
