// CPU implementations of the fusedbn ops: argument checks, layout resolution, then the tile kernels
// (tiles.h, reductions.h, elementwise.h) run with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <array>
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

// y = (x - mean) * alpha + beta per channel, in `layout`.
Tensor normalize(const Tensor& x, const ChannelLayout& layout, const Tensor& mean, const Tensor& alpha,
                 const Tensor& beta) {
  Tensor y = empty_in_layout(x, layout, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    parallel_for_elementwise_tiles(layout, [&](const Tile& tile, auto stride) {
      tile_normalize<scalar_t, acc_t, decltype(stride)::value>(
          in, out, mean.const_data_ptr<acc_t>(), alpha.const_data_ptr<acc_t>(),
          beta.const_data_ptr<acc_t>(), tile);
    });
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor> forward_train(const Tensor& input, const OptTensor& weight,
                                                 const OptTensor& bias, const OptTensor& running_mean,
                                                 const OptTensor& running_var, double momentum,
                                                 double eps) {
  check_forward_train_args(input, weight, bias, running_mean, running_var);
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
  Tensor y = normalize(x, layout, mean, alpha, beta);

  // An empty batch leaves the running statistics as they were (as nn.BatchNorm does).
  if (has(running_mean) && count > 0) {
    running_mean->copy_(running_mean->to(acc).mul_(1 - momentum).add_(mean, momentum));
    running_var->copy_(running_var->to(acc).mul_(1 - momentum).add_(unbiased_var, momentum));
  }
  return {y, mean, invstd};
}

Tensor forward_eval(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                    const Tensor& running_mean, const Tensor& running_var, double eps) {
  check_forward_eval_args(input, weight, bias, running_mean, running_var);
  const Tensor x = dense_input(input);
  const ChannelLayout layout = channel_layout(x);
  const auto acc = at::toOpMathType(input.scalar_type());
  const auto acc_options = input.options().dtype(acc);
  const Tensor invstd = (running_var.to(acc) + eps).rsqrt();
  const Tensor alpha = weight_or_ones(weight, layout.C, acc_options) * invstd;
  const Tensor beta = has(bias) ? as_acc(*bias, acc) : at::zeros({layout.C}, acc_options);
  return normalize(x, layout, as_acc(running_mean, acc), alpha, beta);
}

// Gradients of y = (x - mean) * invstd * w + b, with a = w * invstd. Training (mean, invstd are the
// batch's, m values per channel):
//   dx = (dy - sum(dy)/m - (x - mean) * invstd^2 * sum(dy*(x-mean))/m) * a
// Eval statistics: dx = a*dy. Both: dw = sum(dy*(x-mean))*invstd, db = sum(dy).
std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& grad_output, const Tensor& input,
                                            const OptTensor& weight, const Tensor& mean,
                                            const Tensor& invstd, bool training,
                                            std::array<bool, 3> output_mask) {
  const BackwardInputs in = prepare_backward(grad_output, input, weight, mean, invstd);
  const Tensor &x = in.x, &dy = in.dy, &mu = in.mean, &istd = in.invstd;
  const ChannelLayout& layout = in.layout;
  const int64_t C = layout.C;
  const auto acc = in.acc;
  const auto acc_options = input.options().dtype(acc);

  Tensor sum_dy, sum_dy_xmu;
  if ((training && output_mask[0]) || output_mask[1] || output_mask[2]) {
    sum_dy = at::empty({C}, acc_options);
    sum_dy_xmu = at::empty({C}, acc_options);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t parts = num_parts(layout);
      std::vector<acc_t> part_dy(parts * C), part_dy_xmu(parts * C);
      parallel_for_tiles(layout, [&](const Tile& tile, auto stride) {
        tile_grad_sums<scalar_t, acc_t, decltype(stride)::value>(
            dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mu.const_data_ptr<acc_t>(),
            tile, C, part_dy.data(), part_dy_xmu.data());
      });
      acc_t* out_dy = sum_dy.mutable_data_ptr<acc_t>();
      acc_t* out_dy_xmu = sum_dy_xmu.mutable_data_ptr<acc_t>();
      for (int64_t c = 0; c < C; ++c) {
        acc_t total_dy = 0, total_dy_xmu = 0;
        for (int64_t p = 0; p < parts; ++p) {
          total_dy += part_dy[p * C + c];
          total_dy_xmu += part_dy_xmu[p * C + c];
        }
        out_dy[c] = total_dy;
        out_dy_xmu[c] = total_dy_xmu;
      }
    });
  }

  const auto param_dtype = has(weight) ? weight->scalar_type() : input.scalar_type();
  Tensor grad_weight = output_mask[1] ? (sum_dy_xmu * istd).to(param_dtype) : Tensor();
  Tensor grad_bias = output_mask[2] ? sum_dy.to(param_dtype) : Tensor();
  Tensor grad_input;
  if (output_mask[0]) {
    const Tensor a = weight_or_ones(weight, C, acc_options) * istd;
    if (training) {
      const double inv_m = 1.0 / static_cast<double>(std::max<int64_t>(1, layout.count_per_channel()));
      const Tensor mean_dy = sum_dy * inv_m;
      const Tensor proj = istd * istd * sum_dy_xmu * inv_m;
      grad_input = empty_in_layout(x, layout, input.scalar_type());
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        parallel_for_elementwise_tiles(layout, [&](const Tile& tile, auto stride) {
          tile_backward_elemt<scalar_t, acc_t, decltype(stride)::value>(
              dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
              grad_input.mutable_data_ptr<scalar_t>(), mu.const_data_ptr<acc_t>(),
              mean_dy.const_data_ptr<acc_t>(), proj.const_data_ptr<acc_t>(), a.const_data_ptr<acc_t>(), tile);
        });
      });
    } else {
      const Tensor zeros = at::zeros({C}, acc_options);
      grad_input = normalize(dy, layout, zeros, a, zeros);
    }
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedbn, CPU, m) {
  m.impl("forward_train", &forward_train);
  m.impl("forward_eval", &forward_eval);
  m.impl("backward", &backward);
}

}  // namespace fusedbn::cpu
