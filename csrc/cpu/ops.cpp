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

std::tuple<Tensor, Tensor, Tensor> forward_train(const Tensor& input, const OptTensor& weight,
                                                 const OptTensor& bias, const OptTensor& running_mean,
                                                 const OptTensor& running_var, double momentum,
                                                 double eps, const OptTensor& residual, bool relu) {
  check_forward_train_args(input, weight, bias, running_mean, running_var, residual);
  const Tensor x = dense_input(input);
  const ChannelLayout layout = channel_layout(x);
  const int64_t C = layout.C, count = layout.count_per_channel();

  const auto acc = at::toOpMathType(input.scalar_type());
  const auto acc_options = input.options().dtype(acc);
  Tensor mean = at::empty({C}, acc_options), invstd = at::empty({C}, acc_options);
  Tensor unbiased_var = at::empty({C}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t parts = num_parts(layout);
    std::vector<WelfordPartial<acc_t>> partials(parts * C);
    parallel_for_tiles(layout, [&](const Tile& tile, auto stride) {
      tile_welford<scalar_t, acc_t, decltype(stride)::value>(x.const_data_ptr<scalar_t>(), tile, C,
                                                             partials.data());
    });
    acc_t* mean_out = mean.mutable_data_ptr<acc_t>();
    acc_t* invstd_out = invstd.mutable_data_ptr<acc_t>();
    acc_t* var_out = unbiased_var.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      WelfordPartial<acc_t> total{};
      for (int64_t p = 0; p < parts; ++p) total = welford_merge(total, partials[p * C + c]);
      mean_out[c] = total.mean;
      invstd_out[c] = welford_invstd(total, eps);
      var_out[c] = welford_unbiased_var(total);
    }
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

Tensor forward_eval(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                    const Tensor& running_mean, const Tensor& running_var, double eps,
                    const OptTensor& residual, bool relu) {
  check_forward_eval_args(input, weight, bias, running_mean, running_var, residual);
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
  const Tensor &x = in.x, &mu = in.mean, &istd = in.invstd;
  const ChannelLayout& layout = in.layout;
  const int64_t C = layout.C;
  const auto acc = in.acc;
  const auto acc_options = input.options().dtype(acc);
  const Tensor a = weight_or_ones(weight, C, acc_options) * istd;  // also the forward's alpha
  const Tensor beta = has(bias) ? as_acc(*bias, acc) : at::zeros({C}, acc_options);
  const bool need_sums = (training && output_mask[0]) || output_mask[1] || output_mask[2];
  // Eval statistics without relu or residual: dx = a * dy is the normalize pass applied to dy.
  const bool dx_by_normalize = !training && in.mask == ReluMask::kNone && !want_grad_residual;
  const bool need_elementwise = (output_mask[0] || want_grad_residual) && !dx_by_normalize;

  Tensor sum_dz = at::zeros({C}, acc_options), sum_dz_xmu = at::zeros({C}, acc_options);
  Tensor grad_input, grad_residual;
  if (need_elementwise) grad_input = empty_in_layout(x, layout, input.scalar_type());
  if (want_grad_residual) grad_residual = empty_in_layout(x, layout, input.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_relu_mask(in.mask, [&](auto mask_tag) {
      constexpr ReluMask kMask = decltype(mask_tag)::value;
      const GradSource<scalar_t, acc_t> source{
          in.dy.const_data_ptr<scalar_t>(), in.out.defined() ? in.out.const_data_ptr<scalar_t>() : nullptr,
          a.const_data_ptr<acc_t>(), beta.const_data_ptr<acc_t>()};
      if (need_sums) {
        const int64_t parts = num_parts(layout);
        std::vector<acc_t> part_dz(parts * C), part_dz_xmu(parts * C);
        parallel_for_tiles(layout, [&](const Tile& tile, auto stride) {
          tile_grad_sums<scalar_t, acc_t, decltype(stride)::value, kMask>(source, x.const_data_ptr<scalar_t>(),
                                                                          mu.const_data_ptr<acc_t>(), tile, C,
                                                                          part_dz.data(), part_dz_xmu.data());
        });
        acc_t* out_dz = sum_dz.mutable_data_ptr<acc_t>();
        acc_t* out_dz_xmu = sum_dz_xmu.mutable_data_ptr<acc_t>();
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t p = 0; p < parts; ++p) {
            out_dz[c] += part_dz[p * C + c];
            out_dz_xmu[c] += part_dz_xmu[p * C + c];
          }
        }
      }
      if (need_elementwise) {
        // Training: mean_dz and the projection onto (x - mean); eval statistics: both zero.
        const double inv_m = 1.0 / static_cast<double>(std::max<int64_t>(1, layout.count_per_channel()));
        const Tensor mean_dz = training ? sum_dz * inv_m : at::zeros({C}, acc_options);
        const Tensor proj = training ? istd * istd * sum_dz_xmu * inv_m : at::zeros({C}, acc_options);
        with_flag(want_grad_residual, [&](auto write_dz) {
          parallel_for_elementwise_tiles(layout, [&](const Tile& tile, auto stride) {
            tile_backward_elemt<scalar_t, acc_t, decltype(stride)::value, kMask, decltype(write_dz)::value>(
                source, x.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(),
                grad_residual.defined() ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr,
                mu.const_data_ptr<acc_t>(), mean_dz.const_data_ptr<acc_t>(), proj.const_data_ptr<acc_t>(),
                a.const_data_ptr<acc_t>(), tile);
          });
        });
      }
    });
  });
  if (output_mask[0] && dx_by_normalize) {
    const Tensor zeros = at::zeros({C}, acc_options);
    grad_input = normalize(in.dy, layout, zeros, a, zeros);
  }
  const auto param_dtype = has(weight) ? weight->scalar_type() : input.scalar_type();
  return {output_mask[0] ? grad_input : Tensor(), output_mask[1] ? (sum_dz_xmu * istd).to(param_dtype) : Tensor(),
          output_mask[2] ? sum_dz.to(param_dtype) : Tensor(), grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedbn, CPU, m) {
  m.impl("forward_train", &forward_train);
  m.impl("forward_eval", &forward_eval);
  m.impl("backward", &backward);
}

}  // namespace fusedbn::cpu
