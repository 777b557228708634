// CPU implementations of the fusedbn ops: argument checks, layout resolution, then the tile kernels
// (tiles.h, reductions.h, elementwise.h) run with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <array>
#include <type_traits>
#include <vector>

#include "../backward_inputs.h"
#include "../checks.h"
#include "../layout.h"
#include "../welford.h"
#include "elementwise.h"
#include "reductions.h"
#include "tiles.h"

namespace fusedbn::cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Per-channel tensors as contiguous accumulation-dtype vectors for the kernels.
Tensor as_acc(const Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

Tensor weight_or_ones(const OptTensor& weight, int64_t C, const at::TensorOptions& acc) {
  return has(weight) ? weight->to(acc.dtype().toScalarType()).contiguous() : at::ones({C}, acc);
}

// Calls f(std::bool_constant<b>{}): a run-time flag made a template argument of the tile kernels.
template <typename F>
void with_flag(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// y = relu?((x - mean) * alpha + beta [+ residual]) per channel, in `layout`.
Tensor normalize(const Tensor& x, const ChannelLayout& layout, const Tensor& mean, const Tensor& alpha,
                 const Tensor& beta, const OptTensor& residual = std::nullopt, bool relu = false) {
  Tensor y = empty_in_layout(x, layout, x.scalar_type());
  const Tensor r = has(residual) ? to_layout(*residual, layout) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    const scalar_t* res = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    with_flag(r.defined(), [&](auto add) {
      with_flag(relu, [&](auto apply_relu) {
        parallel_for_elementwise_tiles(layout, [&](const Tile& tile, auto stride) {
          tile_normalize<scalar_t, acc_t, decltype(stride)::value, decltype(add)::value, decltype(apply_relu)::value>(
              in, res, out, mean.const_data_ptr<acc_t>(), alpha.const_data_ptr<acc_t>(),
              beta.const_data_ptr<acc_t>(), tile);
        });
      });
    });
  });
  return y;
}

// Per-channel Welford moments of x in `layout`, the parts merged in a fixed order: f(c, total) for each c.
template <typename scalar_t, typename F>
void for_each_channel_moments(const Tensor& x, const ChannelLayout& layout, F&& f) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = layout.C, parts = num_parts(layout);
  std::vector<WelfordPartial<acc_t>> partials(parts * C);
  parallel_for_tiles(layout, [&](const Tile& tile, auto stride) {
    tile_welford<scalar_t, acc_t, decltype(stride)::value>(x.const_data_ptr<scalar_t>(), tile, C, partials.data());
  });
  for (int64_t c = 0; c < C; ++c) {
    WelfordPartial<acc_t> total{};
    for (int64_t p = 0; p < parts; ++p) total = welford_merge(total, partials[p * C + c]);
    f(c, total);
  }
}

std::tuple<Tensor, Tensor, Tensor> forward_train(const Tensor& input, const OptTensor& weight,
                                                 const OptTensor& bias, const OptTensor& running_mean,
                                                 const OptTensor& running_var, double momentum,
                                                 double eps, const OptTensor& residual, bool relu) {
  check_forward_train_args(input, weight, bias, running_mean, running_var, residual);
  check_eps(eps, true);
  const Tensor x = dense_input(input);
  const ChannelLayout layout = channel_layout(x);
  const int64_t C = layout.C, count = layout.count_per_channel();

  const auto acc = at::toOpMathType(input.scalar_type());
  const auto acc_options = input.options().dtype(acc);
  Tensor mean = at::empty({C}, acc_options), invstd = at::empty({C}, acc_options);
  Tensor unbiased_var = at::empty({C}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* mean_out = mean.mutable_data_ptr<acc_t>();
    acc_t* invstd_out = invstd.mutable_data_ptr<acc_t>();
    acc_t* var_out = unbiased_var.mutable_data_ptr<acc_t>();
    for_each_channel_moments<scalar_t>(x, layout, [&](int64_t c, const WelfordPartial<acc_t>& total) {
      mean_out[c] = total.mean;
      invstd_out[c] = welford_invstd(total, eps);
      var_out[c] = welford_unbiased_var(total);
    });
  });

  const Tensor alpha = weight_or_ones(weight, C, acc_options) * invstd;
  const Tensor beta = has(bias) ? as_acc(*bias, acc) : at::zeros({C}, acc_options);
  Tensor y = normalize(x, layout, mean, alpha, beta, residual, relu);

  // An empty batch leaves the running statistics as they were (as nn.BatchNorm does).
  if (has(running_mean) && count > 0) {
    running_mean->copy_(running_mean->to(acc).mul_(1 - momentum).add_(mean, momentum));
    running_var->copy_(running_var->to(acc).mul_(1 - momentum).add_(unbiased_var, momentum));
  }
  return {y, mean, invstd};
}

std::tuple<Tensor, Tensor> batch_stats(const Tensor& input) {
  check_input(input);
  const Tensor x = dense_input(input);
  const ChannelLayout layout = channel_layout(x);
  const auto acc_options = input.options().dtype(at::toOpMathType(input.scalar_type()));
  Tensor mean = at::empty({layout.C}, acc_options), m2 = at::empty({layout.C}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* mean_out = mean.mutable_data_ptr<acc_t>();
    acc_t* m2_out = m2.mutable_data_ptr<acc_t>();
    for_each_channel_moments<scalar_t>(x, layout, [&](int64_t c, const WelfordPartial<acc_t>& total) {
      mean_out[c] = total.mean;
      m2_out[c] = total.m2;
    });
  });
  return {mean, m2};
}

Tensor forward_eval(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                    const Tensor& running_mean, const Tensor& running_var, double eps,
                    const OptTensor& residual, bool relu) {
  check_forward_eval_args(input, weight, bias, running_mean, running_var, residual);
  check_eps(eps, false);
  const Tensor x = dense_input(input);
  const ChannelLayout layout = channel_layout(x);
  const auto acc = at::toOpMathType(input.scalar_type());
  const auto acc_options = input.options().dtype(acc);
  const Tensor invstd = (running_var.to(acc) + eps).rsqrt();
  const Tensor alpha = weight_or_ones(weight, layout.C, acc_options) * invstd;
  const Tensor beta = has(bias) ? as_acc(*bias, acc) : at::zeros({layout.C}, acc_options);
  return normalize(x, layout, as_acc(running_mean, acc), alpha, beta, residual, relu);
}

// Calls f(std::integral_constant<ReluMask, mask>{}).
template <typename F>
void with_relu_mask(ReluMask mask, F&& f) {
  switch (mask) {
    case ReluMask::kNone: return f(std::integral_constant<ReluMask, ReluMask::kNone>{});
    case ReluMask::kFromOutput: return f(std::integral_constant<ReluMask, ReluMask::kFromOutput>{});
    case ReluMask::kFromInput: return f(std::integral_constant<ReluMask, ReluMask::kFromInput>{});
  }
}

// Calls f(scalar_t{}, kMask tag, source) with dz's source (GradSource) for the backward tile kernels.
template <typename F>
void with_grad_source(const BackwardInputs& in, const Tensor& a, const Tensor& beta, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "batch_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_relu_mask(in.mask, [&](auto mask_tag) {
      const GradSource<scalar_t, acc_t> source{
          in.dy.const_data_ptr<scalar_t>(), in.out.defined() ? in.out.const_data_ptr<scalar_t>() : nullptr,
          a.const_data_ptr<acc_t>(), beta.const_data_ptr<acc_t>()};
      f(scalar_t{}, mask_tag, source);
    });
  });
}

// a = w * invstd (also the forward's alpha, which relu's recomputed mask needs) and beta = bias.
std::tuple<Tensor, Tensor> backward_coefficients(const BackwardInputs& in, const OptTensor& weight,
                                                 const OptTensor& bias) {
  const auto acc_options = in.x.options().dtype(in.acc);
  return {weight_or_ones(weight, in.layout.C, acc_options) * in.invstd,
          has(bias) ? as_acc(*bias, in.acc) : at::zeros({in.layout.C}, acc_options)};
}

// sum(dz) and sum(dz * (x - mean)) per channel, dz the gradient reaching BatchNorm's output.
std::tuple<Tensor, Tensor> channel_grad_sums(const BackwardInputs& in, const Tensor& a, const Tensor& beta) {
  const int64_t C = in.layout.C;
  const auto acc_options = in.x.options().dtype(in.acc);
  Tensor sum_dz = at::zeros({C}, acc_options), sum_dz_xmu = at::zeros({C}, acc_options);
  with_grad_source(in, a, beta, [&](auto scalar_tag, auto mask_tag, const auto& source) {
    using scalar_t = decltype(scalar_tag);
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t parts = num_parts(in.layout);
    std::vector<acc_t> part_dz(parts * C), part_dz_xmu(parts * C);
    parallel_for_tiles(in.layout, [&](const Tile& tile, auto stride) {
      tile_grad_sums<scalar_t, acc_t, decltype(stride)::value, decltype(mask_tag)::value>(
          source, in.x.const_data_ptr<scalar_t>(), in.mean.const_data_ptr<acc_t>(), tile, C, part_dz.data(),
          part_dz_xmu.data());
    });
    acc_t* out_dz = sum_dz.mutable_data_ptr<acc_t>();
    acc_t* out_dz_xmu = sum_dz_xmu.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t p = 0; p < parts; ++p) {
        out_dz[c] += part_dz[p * C + c];
        out_dz_xmu[c] += part_dz_xmu[p * C + c];
      }
    }
  });
  return {sum_dz, sum_dz_xmu};
}

// dx = (dz - mean_dz - (x - mean) * proj) * a per value, and grad_residual = dz when it is defined.
Tensor dx_pass(const BackwardInputs& in, const Tensor& a, const Tensor& beta, const Tensor& mean_dz,
               const Tensor& proj, const Tensor& grad_residual) {
  Tensor grad_input = empty_in_layout(in.x, in.layout, in.x.scalar_type());
  with_grad_source(in, a, beta, [&](auto scalar_tag, auto mask_tag, const auto& source) {
    using scalar_t = decltype(scalar_tag);
    using acc_t = at::opmath_type<scalar_t>;
    with_flag(grad_residual.defined(), [&](auto write_dz) {
      parallel_for_elementwise_tiles(in.layout, [&](const Tile& tile, auto stride) {
        tile_backward_elemt<scalar_t, acc_t, decltype(stride)::value, decltype(mask_tag)::value,
                            decltype(write_dz)::value>(
            source, in.x.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(),
            grad_residual.defined() ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr,
            in.mean.const_data_ptr<acc_t>(), mean_dz.const_data_ptr<acc_t>(), proj.const_data_ptr<acc_t>(),
            a.const_data_ptr<acc_t>(), tile);
      });
    });
  });
  return grad_input;
}

// Gradients of y = (x - mean) * invstd * w + b, with a = w * invstd and dz the gradient reaching y
// (dy, or dy through the relu). Training (mean, invstd are the batch's, m values per channel):
//   dx = (dz - sum(dz)/m - (x - mean) * invstd^2 * sum(dz*(x-mean))/m) * a
// Eval statistics: dx = a*dz. Both: dw = sum(dz*(x-mean))*invstd, db = sum(dz), grad_residual = dz.
std::tuple<Tensor, Tensor, Tensor, Tensor> backward(const Tensor& grad_output, const Tensor& input,
                                                    const OptTensor& weight, const Tensor& mean,
                                                    const Tensor& invstd, bool training,
                                                    std::array<bool, 3> output_mask, const OptTensor& bias,
                                                    const OptTensor& output, bool relu, bool want_grad_residual) {
  const BackwardInputs in = prepare_backward(grad_output, input, weight, mean, invstd, bias, output, relu);
  const int64_t C = in.layout.C;
  const auto acc_options = input.options().dtype(in.acc);
  const auto [a, beta] = backward_coefficients(in, weight, bias);
  const bool need_sums = (training && output_mask[0]) || output_mask[1] || output_mask[2];
  const auto [sum_dz, sum_dz_xmu] =
      need_sums ? channel_grad_sums(in, a, beta) : std::make_tuple(Tensor(), Tensor());
  Tensor grad_input;
  Tensor grad_residual = want_grad_residual ? empty_in_layout(in.x, in.layout, input.scalar_type()) : Tensor();
  if (!training && in.mask == ReluMask::kNone && !want_grad_residual) {
    // Eval statistics, nothing to gate or return for the residual: dx = a * dy, the normalize pass on dy.
    if (output_mask[0]) {
      const Tensor zeros = at::zeros({C}, acc_options);
      grad_input = normalize(in.dy, in.layout, zeros, a, zeros);
    }
  } else if (output_mask[0] || want_grad_residual) {
    const double inv_m = 1.0 / static_cast<double>(std::max<int64_t>(1, in.layout.count_per_channel()));
    const Tensor zeros = at::zeros({C}, acc_options);
    grad_input = training ? dx_pass(in, a, beta, sum_dz * inv_m, in.invstd * in.invstd * sum_dz_xmu * inv_m,
                                    grad_residual)
                          : dx_pass(in, a, beta, zeros, zeros, grad_residual);
  }
  const auto param_dtype = has(weight) ? weight->scalar_type() : input.scalar_type();
  return {output_mask[0] ? grad_input : Tensor(),
          output_mask[1] ? (sum_dz_xmu * in.invstd).to(param_dtype) : Tensor(),
          output_mask[2] ? sum_dz.to(param_dtype) : Tensor(), grad_residual};
}

// The two halves of the backward apart, for statistics computed over several processes (SyncBatchNorm).
std::tuple<Tensor, Tensor> grad_sums(const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                                     const Tensor& mean, const Tensor& invstd, const OptTensor& bias,
                                     const OptTensor& output, bool relu) {
  const BackwardInputs in = prepare_backward(grad_output, input, weight, mean, invstd, bias, output, relu);
  const auto [a, beta] = backward_coefficients(in, weight, bias);
  return channel_grad_sums(in, a, beta);
}

std::tuple<Tensor, Tensor> backward_elemt(const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                                          const Tensor& mean, const Tensor& invstd, const Tensor& mean_dz,
                                          const Tensor& proj, const OptTensor& bias, const OptTensor& output,
                                          bool relu, bool want_grad_residual) {
  const BackwardInputs in = prepare_backward(grad_output, input, weight, mean, invstd, bias, output, relu);
  check_channel_param(mean_dz, "mean_dz", input);
  check_channel_param(proj, "proj", input);
  const auto [a, beta] = backward_coefficients(in, weight, bias);
  Tensor grad_residual = want_grad_residual ? empty_in_layout(in.x, in.layout, input.scalar_type()) : Tensor();
  Tensor grad_input = dx_pass(in, a, beta, as_acc(mean_dz, in.acc), as_acc(proj, in.acc), grad_residual);
  return {grad_input, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedbn, CPU, m) {
  m.impl("forward_train", &forward_train);
  m.impl("forward_eval", &forward_eval);
  m.impl("backward", &backward);
  m.impl("batch_stats", &batch_stats);
  m.impl("grad_sums", &grad_sums);
  m.impl("backward_elemt", &backward_elemt);
}

}  // namespace fusedbn::cpu
