// Host side of the CUDA ops: checks, layout, launch configuration and the kernel launches. Shared by
// the CUDA build (csrc/cuda/ops.cu, Context = the current CUDA stream of the input's device) and the
// SIMT emulator build (csrc/simt/ops.cpp, CPU tensors), so both run exactly the same launch logic.
//
// Context must provide: `stream` (passed to FUSEDBN_LAUNCH), `int sm_count` and `int max_threads`
// (threads per block the launches may use: 512 on a GPU, fewer under the emulator, where each thread is
// an OS thread).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

#include "../backward_inputs.h"
#include "../checks.h"
#include "../dispatch.h"
#include "../layout.h"
#include "../schemas.h"
#include "kernels.cuh"
#include "launch.h"

namespace fusedbn::cuda {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

inline OptTensor contiguous(const OptTensor& t) {
  return has(t) ? OptTensor(t->contiguous()) : t;
}

template <typename T>
T* ptr_or_null(const OptTensor& t) {
  return has(t) ? t->mutable_data_ptr<T>() : nullptr;
}

inline std::optional<at::ScalarType> dtype_of_first(std::initializer_list<const OptTensor*> ts) {
  for (const auto* t : ts) {
    if (has(*t)) return (*t)->scalar_type();
  }
  return std::nullopt;
}

inline int64_t pow2_at_least(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

// Channels-last block: blockDim.x = channel vectors of a row (a power of two up to a warp),
// blockDim.y = rows, `threads` in all (a power of two), so a warp reads whole rows when C is small.
inline dim3 channels_last_block(int64_t vectors_per_row, int64_t threads) {
  const int64_t x = std::min<int64_t>(kWarpSize, pow2_at_least(vectors_per_row));
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(threads / x));
}

// Per-channel reduction (reducer, finisher from kernels.cuh) over the layout, with 16-byte vectors when
// the tensors are aligned (channels-last also needs C % kVec == 0).
// Channels-first: one block row per channel, split into several blocks when channels are too few to
// fill the GPU (about 4 blocks per SM) and each split still has >= 4 windows per thread.
// Channels-last: blocks of channel vectors x rows, rows split the same way while each split keeps >= 8
// rows per thread row.
template <int kVecWidth, typename Reducer, typename Finisher, typename Context>
void launch_reduce(const ChannelLayout& layout, const Reducer& reducer, const Finisher& finisher, bool aligned,
                   const Tensor& like, const Context& ctx) {
  using State = typename Reducer::State;
  const int64_t C = layout.C;
  const int64_t target_blocks = 4 * static_cast<int64_t>(ctx.sm_count);
  auto workspace_for = [&](int64_t states, int64_t semaphores) {
    return std::make_tuple(at::empty({states * static_cast<int64_t>(sizeof(State))}, like.options().dtype(at::kByte)),
                           at::zeros({semaphores}, like.options().dtype(at::kInt)));
  };
  if (!layout.channels_last) {
    with_vec_width<kVecWidth>(aligned, [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      const int64_t S = layout.S;
      // Windows a run can overlap (at least one, so an empty run (S = 0) still indexes safely).
      const int64_t W = std::max<int64_t>(1, S % kVec == 0 ? S / kVec : (S + kVec - 2) / kVec + 1);
      const int64_t windows = layout.N * W;
      const int64_t threads = std::min<int64_t>(ctx.max_threads, std::max<int64_t>(32, ceil_div(windows, 32) * 32));
      const int64_t max_splits = std::max<int64_t>(1, windows / (threads * 4));
      const int64_t splits = std::min<int64_t>({ceil_div(target_blocks, C), max_splits, 65535});
      auto [workspace, semaphores] = workspace_for(splits > 1 ? C * splits : 0, splits > 1 ? C : 0);
      FUSEDBN_LAUNCH((&channels_first_reduce_kernel<Reducer, Finisher, kVec>),
                     dim3(static_cast<unsigned>(C), static_cast<unsigned>(splits)), dim3(threads), 0, ctx.stream)(
          reducer, finisher, layout.N, C, S, W, reinterpret_cast<State*>(workspace.data_ptr()),
          reinterpret_cast<unsigned*>(semaphores.data_ptr()));
    });
  } else {
    with_vec_width<kVecWidth>(aligned && C % kVecWidth == 0, [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      const int64_t M = layout.rows();
      const dim3 block = channels_last_block(ceil_div(C, kVec), ctx.max_threads);
      const int64_t groups = ceil_div(C, static_cast<int64_t>(block.x) * kVec);
      const int64_t max_splits = std::max<int64_t>(1, M / (static_cast<int64_t>(block.y) * 8));
      const int64_t splits = std::min<int64_t>({ceil_div(target_blocks, groups), max_splits, 65535});
      auto [workspace, semaphores] = workspace_for(splits > 1 ? C * splits : 0, splits > 1 ? groups : 0);
      FUSEDBN_LAUNCH((&channels_last_reduce_kernel<Reducer, Finisher, kVec>),
                     dim3(static_cast<unsigned>(groups), static_cast<unsigned>(splits)), block, 0, ctx.stream)(
          reducer, finisher, M, C, reinterpret_cast<State*>(workspace.data_ptr()),
          reinterpret_cast<unsigned*>(semaphores.data_ptr()));
    });
  }
  FUSEDBN_LAUNCH_CHECK();
}

// One elementwise pass over the layout, with 16-byte vectors when every tensor is aligned and a vector
// spans at most two channel runs (channels-first, S >= kVec) or whole channels (channels-last).
template <int kVecWidth, typename Op, typename Context>
void launch_elementwise(const ChannelLayout& layout, const Op& op, int64_t numel, bool aligned, const Context& ctx) {
  if (numel == 0) return;
  const int64_t C = layout.C;
  const int64_t max_blocks = 8 * static_cast<int64_t>(ctx.sm_count);
  const int64_t threads = std::min<int64_t>(256, ctx.max_threads);
  if (!layout.channels_last) {
    with_vec_width<kVecWidth>(aligned && layout.S >= kVecWidth, [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      const int64_t blocks = std::min<int64_t>(ceil_div(numel / kVec, threads), max_blocks);
      FUSEDBN_LAUNCH((&channels_first_elementwise_kernel<Op, kVec>), dim3(std::max<int64_t>(1, blocks)),
                     dim3(threads), 0, ctx.stream)(op, numel, layout.S, C);
    });
  } else {
    with_vec_width<kVecWidth>(aligned && C % kVecWidth == 0, [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      const int64_t M = layout.rows();
      const dim3 block = channels_last_block(ceil_div(C, kVec), threads);
      const int64_t groups = ceil_div(C, static_cast<int64_t>(block.x) * kVec);
      const int64_t row_blocks = std::min<int64_t>({ceil_div(M, block.y), std::max<int64_t>(1, max_blocks / groups), 65535});
      FUSEDBN_LAUNCH((&channels_last_elementwise_kernel<Op, kVec>),
                     dim3(static_cast<unsigned>(groups), static_cast<unsigned>(row_blocks)), block, 0, ctx.stream)(
          op, M, C);
    });
  }
  FUSEDBN_LAUNCH_CHECK();
}

template <typename scalar_t>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

// y = act((x - mean) * alpha + beta [+ residual]) per channel, with the strides of `like` (x's when
// undefined; another tensor in the same view may differ on size-1 dims).
template <typename Context>
Tensor normalize(const Tensor& x, const ChannelLayout& layout, const Tensor& mean, const Tensor& alpha,
                 const Tensor& beta, const Context& ctx, const OptTensor& residual = std::nullopt,
                 Epilogue epilogue = {}, const Tensor& like = Tensor()) {
  Tensor y = empty_like_dense(like.defined() ? like : x, x.scalar_type());
  const Tensor r = has(residual) ? to_layout(*residual, layout) : Tensor();
  FUSEDBN_DISPATCH_INPUT(x.scalar_type(), [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const NormalizeOp<scalar_t, acc_t> op{x.const_data_ptr<scalar_t>(),      y.mutable_data_ptr<scalar_t>(),
                                          mean.const_data_ptr<acc_t>(),       alpha.const_data_ptr<acc_t>(),
                                          beta.const_data_ptr<acc_t>(),
                                          r.defined() ? r.const_data_ptr<scalar_t>() : nullptr,
                                          epilogue.act,                       static_cast<acc_t>(epilogue.param)};
    launch_elementwise<vec_width<scalar_t>()>(layout, op, x.numel(),
                                              aligned16(x) && aligned16(y) && (!r.defined() || aligned16(r)), ctx);
  });
  return y;
}

// channel_coefficients_kernel over C channels: alpha, beta (and mean, where defined) from the running
// statistics (eval) or a given invstd (defined: the backward). It reads the per-channel tensors by index:
// strided ones from contiguous copies.
template <typename Context>
void launch_channel_coefficients(at::ScalarType input_dtype, int64_t C, const OptTensor& running_mean,
                                 const OptTensor& running_var, const Tensor& invstd, const OptTensor& weight,
                                 const OptTensor& bias, double eps, const Tensor& mean, const Tensor& alpha,
                                 const Tensor& beta, const Context& ctx) {
  if (C == 0) return;
  const OptTensor w = contiguous(flat_channels(weight)), b = contiguous(flat_channels(bias));
  const OptTensor rm = contiguous(running_mean), rv = contiguous(running_var);
  FUSEDBN_DISPATCH_INPUT(input_dtype, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_param_type<scalar_t>(dtype_of_first({&weight, &bias, &running_mean, &running_var}), [&](auto param_tag) {
      using param_t = decltype(param_tag);
      const int64_t threads = std::min<int64_t>(256, ctx.max_threads);
      FUSEDBN_LAUNCH((&channel_coefficients_kernel<acc_t, param_t>), dim3(static_cast<unsigned>(ceil_div(C, threads))),
                     dim3(threads), 0, ctx.stream)(
          ptr_or_null<param_t>(rm), ptr_or_null<param_t>(rv), invstd.defined() ? invstd.const_data_ptr<acc_t>() : nullptr,
          ptr_or_null<param_t>(w), ptr_or_null<param_t>(b), eps, C,
          mean.defined() ? mean.mutable_data_ptr<acc_t>() : nullptr, alpha.mutable_data_ptr<acc_t>(),
          beta.mutable_data_ptr<acc_t>());
      FUSEDBN_LAUNCH_CHECK();
    });
  });
}

template <typename Context>
std::tuple<Tensor, Tensor, Tensor> forward_train(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                                 const OptTensor& running_mean, const OptTensor& running_var,
                                                 double momentum, double eps, const OptTensor& residual,
                                                 c10::string_view activation, double activation_param) {
  check_forward_train_args(input, weight, bias, running_mean, running_var, residual, eps);
  const Epilogue epilogue = parse_epilogue(activation, activation_param);
  const Context ctx(input);
  // The statistics kernel indexes per-channel tensors by channel and updates the running statistics in
  // place (the kernel is the one place they are written): strided ones are read from contiguous copies,
  // and the running statistics copied back.
  const OptTensor w = contiguous(flat_channels(weight)), b = contiguous(flat_channels(bias));
  const OptTensor rm = contiguous(running_mean), rv = contiguous(running_var);
  const Tensor x = dense_input(input);
  const ChannelLayout layout = channel_layout(x);
  const int64_t C = layout.C;
  const auto acc_options = input.options().dtype(at::toOpMathType(input.scalar_type()));
  Tensor mean = at::empty({C}, acc_options), invstd = at::empty({C}, acc_options);
  if (C == 0) return {empty_like_dense(x, x.scalar_type()), mean, invstd};
  Tensor alpha = at::empty({C}, acc_options), beta = at::empty({C}, acc_options);
  const auto param_dtype = dtype_of_first({&weight, &bias, &running_mean, &running_var});
  FUSEDBN_DISPATCH_INPUT(input.scalar_type(), [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_param_type<scalar_t>(param_dtype, [&](auto param_tag) {
      using param_t = decltype(param_tag);
      const WelfordReducer<scalar_t, acc_t> reducer{x.numel() > 0 ? x.const_data_ptr<scalar_t>() : nullptr,
                                                    layout.channels_last ? 1 : layout.S};
      const StatsFinisher<acc_t, param_t> finisher{
          ptr_or_null<param_t>(w),            ptr_or_null<param_t>(b),            ptr_or_null<param_t>(rm),
          ptr_or_null<param_t>(rv),           mean.mutable_data_ptr<acc_t>(),     invstd.mutable_data_ptr<acc_t>(),
          alpha.mutable_data_ptr<acc_t>(),    beta.mutable_data_ptr<acc_t>(),     momentum,
          eps};
      launch_reduce<vec_width<scalar_t>()>(layout, reducer, finisher, aligned16(x), x, ctx);
    });
  });
  {
    // Below autograd and ADInplaceOrView, so buffers made under torch.inference_mode() are updated too.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (const auto& [given, used] : {std::pair{&running_mean, &rm}, std::pair{&running_var, &rv}}) {
      if (has(*given) && !(*given)->is_same(**used)) (*given)->copy_(**used);
    }
  }
  return {normalize(x, layout, mean, alpha, beta, ctx, residual, epilogue), mean, invstd};
}

template <typename Context>
Tensor forward_eval(const Tensor& input, const OptTensor& weight, const OptTensor& bias, const Tensor& running_mean,
                    const Tensor& running_var, double eps, const OptTensor& residual, c10::string_view activation,
                    double activation_param) {
  check_forward_eval_args(input, weight, bias, running_mean, running_var, residual, eps);
  const Epilogue epilogue = parse_epilogue(activation, activation_param);
  const Context ctx(input);
  const Tensor x = dense_input(input);
  const ChannelLayout layout = channel_layout(x);
  const auto acc_options = input.options().dtype(at::toOpMathType(input.scalar_type()));
  Tensor mean = at::empty({layout.C}, acc_options), alpha = at::empty({layout.C}, acc_options);
  Tensor beta = at::empty({layout.C}, acc_options);
  launch_channel_coefficients(x.scalar_type(), layout.C, running_mean, running_var, Tensor(), weight, bias, eps, mean,
                              alpha, beta, ctx);
  return normalize(x, layout, mean, alpha, beta, ctx, residual, epilogue);
}

// What every backward op needs besides the checked inputs: alpha = w * invstd (the forward's, which the
// recomputed z needs too) and beta = bias (0 without).
struct BackwardCoefficients {
  Tensor alpha, beta;
};

template <typename Context>
BackwardCoefficients backward_coefficients(const BackwardInputs& in, const Context& ctx) {
  const auto acc_options = in.x.options().dtype(in.acc);
  BackwardCoefficients k{at::empty({in.layout.C}, acc_options), at::empty({in.layout.C}, acc_options)};
  launch_channel_coefficients(in.x.scalar_type(), in.layout.C, std::nullopt, std::nullopt, in.invstd, in.weight,
                              in.bias, 0.0, Tensor(), k.alpha, k.beta, ctx);
  return k;
}

// Where dz comes from (kernels.cuh's GradSource).
template <typename scalar_t, typename acc_t>
GradSource<scalar_t, acc_t> grad_source(const BackwardInputs& in, const BackwardCoefficients& k) {
  const Tensor& side = in.from == GradFrom::kOutput ? in.out : in.residual;
  return {in.from,
          in.epilogue.act,
          static_cast<acc_t>(in.epilogue.param),
          side.defined() ? side.const_data_ptr<scalar_t>() : nullptr,
          in.from == GradFrom::kRecompute ? k.alpha.const_data_ptr<acc_t>() : nullptr,
          k.beta.const_data_ptr<acc_t>()};
}

inline bool backward_aligned(const BackwardInputs& in) {
  return aligned16(in.x) && aligned16(in.dy) && (!in.out.defined() || aligned16(in.out)) &&
         (!in.residual.defined() || aligned16(in.residual));
}

// The per-channel gradient reduction, its total handed to `make_finisher(scalar_t{}, param_t{})`'s finisher.
template <typename Context, typename MakeFinisher>
void grad_reduction(const BackwardInputs& in, const BackwardCoefficients& k, std::optional<at::ScalarType> param_dtype,
                    const Context& ctx, MakeFinisher&& make_finisher) {
  FUSEDBN_DISPATCH_INPUT(in.x.scalar_type(), [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_param_type<scalar_t>(param_dtype, [&](auto param_tag) {
      const GradReducer<scalar_t, acc_t> reducer{in.dy.const_data_ptr<scalar_t>(), in.x.const_data_ptr<scalar_t>(),
                                                 in.mean.const_data_ptr<acc_t>(), grad_source<scalar_t, acc_t>(in, k)};
      launch_reduce<vec_width<scalar_t>()>(in.layout, reducer, make_finisher(scalar_t{}, param_tag),
                                           backward_aligned(in), in.x, ctx);
    });
  });
}

// dx = (dz - mean_dz - (x - mean) * proj) * alpha per value (dz * alpha under eval statistics: mean_dz and proj
// undefined), and grad_residual = dz when it is defined.
template <typename Context>
Tensor dx_pass(const BackwardInputs& in, const BackwardCoefficients& k, const Tensor& mean_dz, const Tensor& proj,
               const Tensor& grad_residual, const Context& ctx) {
  Tensor grad_input = empty_like_dense(in.x, in.x.scalar_type());
  FUSEDBN_DISPATCH_INPUT(in.x.scalar_type(), [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardElemtOp<scalar_t, acc_t> op{
        in.dy.const_data_ptr<scalar_t>(),  in.x.const_data_ptr<scalar_t>(),  grad_input.mutable_data_ptr<scalar_t>(),
        grad_residual.defined() ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr,
        in.mean.const_data_ptr<acc_t>(),
        mean_dz.defined() ? mean_dz.const_data_ptr<acc_t>() : nullptr,
        proj.defined() ? proj.const_data_ptr<acc_t>() : nullptr,
        k.alpha.const_data_ptr<acc_t>(),   grad_source<scalar_t, acc_t>(in, k)};
    launch_elementwise<vec_width<scalar_t>()>(
        in.layout, op, in.x.numel(),
        backward_aligned(in) && aligned16(grad_input) && (!grad_residual.defined() || aligned16(grad_residual)), ctx);
  });
  return grad_input;
}

// Gradients of y = (x - mean) * invstd * w + b, with dz the gradient reaching y (dy, or dy through the
// activation): one reduction (sum(dz), sum(dz*(x-mean)) and the per-channel finish), then one elementwise
// pass for dx (and grad_residual = dz). See GradFinisher and BackwardElemtOp for the formulas, plan_backward
// (backward_inputs.h) for which passes run.
template <typename Context>
std::tuple<Tensor, Tensor, Tensor, Tensor> backward(const Tensor& grad_output, const Tensor& input,
                                                    const OptTensor& weight, const Tensor& mean, const Tensor& invstd,
                                                    bool training, std::array<bool, 3> output_mask,
                                                    const OptTensor& bias, const OptTensor& output,
                                                    const OptTensor& residual, c10::string_view activation,
                                                    double activation_param, bool want_grad_residual) {
  const BackwardInputs in = prepare_backward(grad_output, input, weight, mean, invstd, bias, output, residual,
                                             activation, activation_param);
  const Context ctx(input);
  const int64_t C = in.layout.C;
  const auto acc_options = input.options().dtype(in.acc);
  const auto param_dtype = grad_param_dtype(weight, input);
  Tensor grad_weight = output_mask[1] ? at::empty({C}, input.options().dtype(param_dtype)) : Tensor();
  Tensor grad_bias = output_mask[2] ? at::empty({C}, input.options().dtype(param_dtype)) : Tensor();
  Tensor grad_residual = want_grad_residual ? empty_like_dense(in.x, input.scalar_type()) : Tensor();
  if (C == 0) {
    return {output_mask[0] ? empty_like_dense(in.x, input.scalar_type()) : Tensor(), grad_weight, grad_bias,
            grad_residual};
  }
  const BackwardCoefficients k = backward_coefficients(in, ctx);
  const BackwardPlan plan = plan_backward(in, training, output_mask, want_grad_residual);
  // The centered dx pass's terms, which the reduction's finisher writes.
  const Tensor mean_dz = plan.centered ? at::empty({C}, acc_options) : Tensor();
  const Tensor proj = plan.centered ? at::empty({C}, acc_options) : Tensor();
  if (plan.sums) {
    grad_reduction(in, k, param_dtype, ctx, [&](auto scalar_tag, auto param_tag) {
      using acc_t = at::opmath_type<decltype(scalar_tag)>;
      using param_t = decltype(param_tag);
      return GradFinisher<acc_t, param_t>{in.invstd.const_data_ptr<acc_t>(),
                                          ptr_or_null<param_t>(grad_weight),
                                          ptr_or_null<param_t>(grad_bias),
                                          plan.centered ? mean_dz.mutable_data_ptr<acc_t>() : nullptr,
                                          plan.centered ? proj.mutable_data_ptr<acc_t>() : nullptr,
                                          in.layout.count_per_channel()};
    });
  }
  Tensor grad_input;
  if (plan.scaled_dy) {
    const Tensor zeros = at::zeros({C}, acc_options);
    grad_input = normalize(in.dy, in.layout, zeros, k.alpha, zeros, ctx, std::nullopt, {}, in.x);
  } else if (plan.elementwise) {
    grad_input = dx_pass(in, k, mean_dz, proj, grad_residual, ctx);
  }
  return {output_mask[0] ? grad_input : Tensor(), grad_weight, grad_bias, grad_residual};
}

template <typename Context>
std::tuple<Tensor, Tensor> batch_stats(const Tensor& input) {
  check_input(input);
  const Context ctx(input);
  const Tensor x = dense_input(input);
  const ChannelLayout layout = channel_layout(x);
  const auto acc_options = input.options().dtype(at::toOpMathType(input.scalar_type()));
  Tensor mean = at::empty({layout.C}, acc_options), m2 = at::empty({layout.C}, acc_options);
  if (layout.C == 0) return {mean, m2};
  FUSEDBN_DISPATCH_INPUT(input.scalar_type(), [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const WelfordReducer<scalar_t, acc_t> reducer{x.numel() > 0 ? x.const_data_ptr<scalar_t>() : nullptr,
                                                  layout.channels_last ? 1 : layout.S};
    const MomentsFinisher<acc_t> finisher{mean.mutable_data_ptr<acc_t>(), m2.mutable_data_ptr<acc_t>()};
    launch_reduce<vec_width<scalar_t>()>(layout, reducer, finisher, aligned16(x), x, ctx);
  });
  return {mean, m2};
}

template <typename Context>
std::tuple<Tensor, Tensor> grad_sums(const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                                     const Tensor& mean, const Tensor& invstd, const OptTensor& bias,
                                     const OptTensor& output, const OptTensor& residual, c10::string_view activation,
                                     double activation_param) {
  const BackwardInputs in = prepare_backward(grad_output, input, weight, mean, invstd, bias, output, residual,
                                             activation, activation_param);
  const Context ctx(input);
  const auto acc_options = input.options().dtype(in.acc);
  Tensor sum_dz = at::empty({in.layout.C}, acc_options), sum_dz_xmu = at::empty({in.layout.C}, acc_options);
  if (in.layout.C == 0) return {sum_dz, sum_dz_xmu};
  grad_reduction(in, backward_coefficients(in, ctx), std::nullopt, ctx, [&](auto scalar_tag, auto) {
    using acc_t = at::opmath_type<decltype(scalar_tag)>;
    return SumsFinisher<acc_t>{sum_dz.mutable_data_ptr<acc_t>(), sum_dz_xmu.mutable_data_ptr<acc_t>()};
  });
  return {sum_dz, sum_dz_xmu};
}

template <typename Context>
std::tuple<Tensor, Tensor> backward_elemt(const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                                          const Tensor& mean, const Tensor& invstd, const Tensor& mean_dz,
                                          const Tensor& proj, const OptTensor& bias, const OptTensor& output,
                                          const OptTensor& residual, c10::string_view activation,
                                          double activation_param, bool want_grad_residual) {
  const BackwardElemtInputs in = prepare_backward_elemt(grad_output, input, weight, mean, invstd, mean_dz, proj, bias,
                                                        output, residual, activation, activation_param);
  const Context ctx(input);
  Tensor grad_residual = want_grad_residual ? empty_like_dense(in.x, input.scalar_type()) : Tensor();
  if (in.layout.C == 0) return {empty_like_dense(in.x, input.scalar_type()), grad_residual};
  const Tensor grad_input = dx_pass(in, backward_coefficients(in, ctx), in.mean_dz, in.proj, grad_residual, ctx);
  return {grad_input, grad_residual};
}

// The six ops' kernels for one Context (the CUDA build and the emulator's register the same set).
template <typename Context>
void register_cuda_kernels(torch::Library& m) {
  fusedbn::register_kernels(m, &forward_train<Context>, &forward_eval<Context>, &backward<Context>,
                            &batch_stats<Context>, &grad_sums<Context>, &backward_elemt<Context>);
}

}  // namespace fusedbn::cuda
