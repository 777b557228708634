// The checked, layout-resolved inputs of the backward ops and the backward's plan, shared by every
// backend's host code.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <array>
#include <optional>

#include "checks.h"
#include "epilogue.h"
#include "layout.h"

namespace fusedbn {

struct BackwardInputs {
  at::Tensor x;     // input, in one of the two layout views
  at::Tensor dy;    // grad_output, in the same view as x (whatever its own memory format)
  at::Tensor out;       // the forward's output in the same view, when ReLU's mask is read from it
  at::Tensor residual;  // the forward's residual in the same view, when z is recomputed with it
  at::Tensor mean;  // per-channel statistics in the accumulation dtype, contiguous
  at::Tensor invstd;
  std::optional<at::Tensor> weight, bias;  // as (C,) vectors (flat_channels)
  at::Tensor slopes;                       // PReLU's (activation_slopes), else undefined
  ChannelLayout layout;
  at::ScalarType acc;
  Epilogue epilogue;
  GradFrom from;
};

inline BackwardInputs prepare_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                       const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                       const at::Tensor& invstd, const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& output,
                                       const std::optional<at::Tensor>& residual, std::string_view activation,
                                       double activation_param,
                                       const std::optional<at::Tensor>& activation_weight) {
  check_backward_args(grad_output, input, weight, mean, invstd, bias, output, residual);
  BackwardInputs in;
  in.epilogue = parse_epilogue(activation, activation_param, activation_weight, input, output);
  in.x = dense_input(input);
  in.layout = channel_layout(in.x);
  in.dy = to_layout(grad_output, in.layout);
  const bool relu = in.epilogue.act == Activation::kRelu;
  in.from = in.epilogue.act == Activation::kIdentity ? GradFrom::kDy
            : relu && has(output)                     ? GradFrom::kOutput
                                                      : GradFrom::kRecompute;
  if (in.from == GradFrom::kOutput) in.out = to_layout(*output, in.layout);
  if (in.from == GradFrom::kRecompute && has(residual)) in.residual = to_layout(*residual, in.layout);
  in.acc = at::toOpMathType(input.scalar_type());
  in.mean = mean.to(in.acc).contiguous();
  in.invstd = invstd.to(in.acc).contiguous();
  in.weight = flat_channels(weight);
  in.bias = flat_channels(bias);
  in.slopes = activation_slopes(activation_weight, in.acc);
  return in;
}

// PReLU's weight gradient from its per-channel sums (C values, the accumulation dtype): summed over the
// channels for one weight, in the weight's shape and dtype.
inline at::Tensor grad_of_activation_weight(const at::Tensor& per_channel, const at::Tensor& weight) {
  const at::Tensor total = weight.numel() == 1 ? per_channel.sum() : per_channel;
  return total.to(weight.scalar_type()).reshape(weight.sizes()).contiguous();
}

// backward_elemt's inputs: the backward's, and the global centering terms in the statistics' dtype.
struct BackwardElemtInputs : BackwardInputs {
  at::Tensor mean_dz, proj;
};

inline BackwardElemtInputs prepare_backward_elemt(const at::Tensor& grad_output, const at::Tensor& input,
                                                  const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                                  const at::Tensor& invstd, const at::Tensor& mean_dz,
                                                  const at::Tensor& proj, const std::optional<at::Tensor>& bias,
                                                  const std::optional<at::Tensor>& output,
                                                  const std::optional<at::Tensor>& residual,
                                                  std::string_view activation, double activation_param,
                                                  const std::optional<at::Tensor>& activation_weight) {
  BackwardElemtInputs in{prepare_backward(grad_output, input, weight, mean, invstd, bias, output, residual, activation,
                                          activation_param, activation_weight)};
  check_centering_terms(mean_dz, proj, input);
  in.mean_dz = mean_dz.to(in.acc).contiguous();
  in.proj = proj.to(in.acc).contiguous();
  return in;
}

// Which passes the backward runs, decided here for every backend from what is asked (dz: the gradient
// reaching BatchNorm's output, alpha = w * invstd):
//   sums        the reduction sum(dz), sum(dz * (x - mean)) per channel (PReLU's: and sum(dy * min(z, 0))):
//               for grad_weight, grad_bias, PReLU's weight gradient or the training dx;
//   scaled_dy   eval statistics, dx wanted, nothing to gate or return for the residual: dx = alpha * dy,
//               the normalize pass run on dy;
//   elementwise otherwise, the dx pass where dx or grad_residual (= dz) is wanted;
//   centered    that pass subtracts the batch terms: training statistics and dx wanted.
struct BackwardPlan {
  bool sums, scaled_dy, elementwise, centered;
};

inline BackwardPlan plan_backward(const BackwardInputs& in, bool training, std::array<bool, 3> output_mask,
                                  bool want_grad_residual, bool want_grad_slopes) {
  BackwardPlan plan;
  plan.sums = (training && output_mask[0]) || output_mask[1] || output_mask[2] || want_grad_slopes;
  plan.scaled_dy = output_mask[0] && !training && in.from == GradFrom::kDy && !want_grad_residual;
  plan.elementwise = !plan.scaled_dy && (output_mask[0] || want_grad_residual);
  plan.centered = training && output_mask[0];
  return plan;
}

}  // namespace fusedbn
