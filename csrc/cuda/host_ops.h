// Host side of the CUDA ops: checks, layout, launch configuration and the kernel launches. Shared by
// the CUDA build (csrc/cuda/ops.cu, Context = the current CUDA stream of the input's device) and the
// SIMT emulator build (csrc/simt/ops.cpp, CPU tensors), so both run exactly the same launch logic.
//
// Context must provide: `stream` (passed to FUSEDBN_LAUNCH), `int sm_count`, `int max_threads` (threads
// per block the launches may use: kMaxBlockThreads on a GPU, fewer under the emulator, where each thread
// is an OS thread), `int blocks_per_sm(const void* kernel, int threads)` (how many blocks of `threads` of
// that kernel are resident on an SM at once: the grids are at most one wave, sm_count times that), and for
// the scratch (scratch.h) `scratch_key()`, `capturing()` and `on_scratch(scratch)` (called
// when an op takes its scratch: nothing on a GPU; the emulator poisons and checks it).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../backward_inputs.h"
#include "../checks.h"
#include "../dispatch.h"
#include "../layout.h"
#include "../schemas.h"
#include "kernels.cuh"
#include "launch.h"
#include "scratch.h"

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

// A kernel as the Context's blocks_per_sm takes it.
template <auto kKernel>
const void* kernel_id() {
  return reinterpret_cast<const void*>(kKernel);
}

// Blocks of `threads` threads of kKernel that run at once on the whole GPU.
template <auto kKernel, typename Context>
int64_t wave_of(const Context& ctx, int64_t threads) {
  return static_cast<int64_t>(ctx.sm_count) * std::max(1, ctx.blocks_per_sm(kernel_id<kKernel>(), static_cast<int>(threads)));
}

// A reduction's launch, at most one wave of blocks (a wave: what is resident at once): channels-first, one
// block row per channel, min(C, wave) of them (a block takes several channels when they are more), split
// (grid.y) into several blocks when the channels are fewer than half a wave and each split still has >= 4
// windows per thread: wave / C splits, rounded down; channels-last, blocks of channel vectors x rows
// (grid.x = channel groups), rows split the same way while each split keeps >= 8 rows per thread row.
struct ReduceGrid {
  dim3 grid, block;
  int64_t windows_per_run = 0;  // channels-first: W, see channels_first_reduce_kernel

  int64_t splits() const { return grid.y; }
  // One arrival counter per block row, C partials per split (none without a grid merge).
  int64_t counters() const { return splits() > 1 ? grid.x : 0; }
  int64_t partials(int64_t C) const { return splits() > 1 ? C * splits() : 0; }
};

// Channels-first: the kVec-aligned windows a run of S values can overlap (at least one, so an empty run
// still indexes safely); S / kVec when every window is full.
template <int kVec>
int64_t windows_per_run(int64_t S) {
  return std::max<int64_t>(1, S % kVec == 0 ? S / kVec : (S + kVec - 2) / kVec + 1);
}

// kChannelsLast: the layout's (each layout's kernel exists only at its own vector widths).
template <bool kChannelsLast, int kVec, typename Reducer, typename Finisher, typename Context>
ReduceGrid reduce_grid(const ChannelLayout& layout, const Context& ctx) {
  using R = std::remove_cv_t<Reducer>;  // the kernels launch_reduce instantiates
  using F = std::remove_cv_t<Finisher>;
  const int64_t C = layout.C;
  ReduceGrid g;
  if constexpr (!kChannelsLast) {
    g.windows_per_run = windows_per_run<kVec>(layout.S);
    const int64_t windows = layout.N * g.windows_per_run;
    const int64_t threads = std::min<int64_t>(ctx.max_threads, std::max<int64_t>(32, ceil_div(windows, 32) * 32));
    const int64_t wave = wave_of<&channels_first_reduce_kernel<R, F, kVec>>(ctx, threads);
    const int64_t max_splits = std::max<int64_t>(1, windows / (threads * 4));
    const int64_t splits = std::min<int64_t>({std::max<int64_t>(1, wave / C), max_splits, 65535});
    g.grid = dim3(static_cast<unsigned>(splits > 1 ? C : std::min(C, wave)), static_cast<unsigned>(splits));
    g.block = dim3(static_cast<unsigned>(threads));
  } else {
    g.block = channels_last_block(ceil_div(C, kVec), ctx.max_threads);
    const int64_t wave = wave_of<&channels_last_reduce_kernel<R, F, kVec>>(ctx, ctx.max_threads);
    const int64_t groups = ceil_div(C, static_cast<int64_t>(g.block.x) * kVec);
    const int64_t max_splits = std::max<int64_t>(1, layout.rows() / (static_cast<int64_t>(g.block.y) * 8));
    const int64_t splits = std::min<int64_t>({std::max<int64_t>(1, wave / groups), max_splits, 65535});
    g.grid = dim3(static_cast<unsigned>(groups), static_cast<unsigned>(splits));
  }
  return g;
}

// The vector width of a kernel over `layout`, as f(std::integral_constant<int, kVec>) for each layout
// (f_first channels-first, f_last channels-last): kVec = min(kVecWidth, the kernel's widest vector: K's
// kMaxLanes channels-first, kMaxLanesLast channels-last) where the tensors are aligned and, channels-last, C
// is a multiple of it or, channels-first where `runs_hold_a_vector`, S >= kVec; 1 otherwise. Each layout's
// kernel is instantiated only for its own widths.
template <int kVecWidth, typename K, typename First, typename Last>
void with_layout_width(const ChannelLayout& layout, bool aligned, bool runs_hold_a_vector, First&& f_first,
                       Last&& f_last) {
  constexpr int kFirst = std::min(kVecWidth, K::kMaxLanes), kLast = std::min(kVecWidth, K::kMaxLanesLast);
  if (!layout.channels_last) {
    with_vec_width<kFirst>(aligned && (!runs_hold_a_vector || layout.S >= kFirst), f_first);
  } else {
    with_vec_width<kLast>(aligned && layout.C % kLast == 0, f_last);
  }
}

// The scratch (scratch.h) a reduction by Reducer and Finisher over `layout` needs, its partials after
// `reserved_bytes` the caller uses for its own per-channel terms.
template <int kVecWidth, typename Reducer, typename Finisher, typename Context>
Scratch reduce_scratch(const ChannelLayout& layout, bool aligned, int64_t reserved_bytes, const Tensor& like,
                       const Context& ctx) {
  ReduceGrid g;
  with_layout_width<kVecWidth, Reducer>(
      layout, aligned, false,
      [&](auto vec) { g = reduce_grid<false, decltype(vec)::value, Reducer, Finisher>(layout, ctx); },
      [&](auto vec) { g = reduce_grid<true, decltype(vec)::value, Reducer, Finisher>(layout, ctx); });
  return scratch(ctx, like, g.counters(),
                 round_up16(reserved_bytes) +
                     g.partials(layout.C) * static_cast<int64_t>(sizeof(typename Reducer::State)));
}

// Per-channel reduction (reducer, finisher from kernels.cuh) over the layout, with the partials and
// counters of `scratch` (from reduce_scratch with the same arguments).
template <int kVecWidth, typename Reducer, typename Finisher, typename Context>
void launch_reduce(const ChannelLayout& layout, const Reducer& reducer, const Finisher& finisher, bool aligned,
                   const Scratch& scratch, int64_t reserved_bytes, const Context& ctx) {
  using State = typename Reducer::State;
  const BlockPartials<State> partials{scratch.at<State>(round_up16(reserved_bytes))};
  with_layout_width<kVecWidth, Reducer>(
      layout, aligned, false,
      [&](auto vec) {
        constexpr int kVec = decltype(vec)::value;
        const ReduceGrid g = reduce_grid<false, kVec, Reducer, Finisher>(layout, ctx);
        FUSEDBN_LAUNCH((&channels_first_reduce_kernel<Reducer, Finisher, kVec>), g.grid, g.block, 0, ctx.stream)(
            reducer, finisher, layout.N, layout.C, layout.S, g.windows_per_run, partials, scratch.counter_ptr());
      },
      [&](auto vec) {
        constexpr int kVec = decltype(vec)::value;
        const ReduceGrid g = reduce_grid<true, kVec, Reducer, Finisher>(layout, ctx);
        FUSEDBN_LAUNCH((&channels_last_reduce_kernel<Reducer, Finisher, kVec>), g.grid, g.block, 0, ctx.stream)(
            reducer, finisher, layout.rows(), layout.C, partials, scratch.counter_ptr());
      });
  FUSEDBN_LAUNCH_CHECK();
}

// One elementwise pass over the layout, with vectors of up to 16 bytes (at most Op::kMaxLanes values) when
// every tensor is aligned and a vector spans at most two channel runs (channels-first, S >= kVec) or whole
// channels (channels-last); at most one wave of blocks.
template <int kVecWidth, typename Op, typename Context>
void launch_elementwise(const ChannelLayout& layout, const Op& op, int64_t numel, bool aligned, const Context& ctx) {
  if (numel == 0) return;
  const int64_t C = layout.C;
  const int64_t threads = std::min<int64_t>(256, ctx.max_threads);
  with_layout_width<kVecWidth, Op>(
      layout, aligned, true,
      [&](auto vec) {
        constexpr int kVec = decltype(vec)::value;
        const int64_t wave = wave_of<&channels_first_elementwise_kernel<Op, kVec>>(ctx, threads);
        const int64_t blocks = std::min<int64_t>(ceil_div(numel / kVec, threads), wave);
        FUSEDBN_LAUNCH((&channels_first_elementwise_kernel<Op, kVec>), dim3(std::max<int64_t>(1, blocks)),
                       dim3(threads), 0, ctx.stream)(op, numel, layout.S, C);
      },
      [&](auto vec) {
        constexpr int kVec = decltype(vec)::value;
        const int64_t M = layout.rows();
        const dim3 block = channels_last_block(ceil_div(C, kVec), threads);
        const int64_t wave = wave_of<&channels_last_elementwise_kernel<Op, kVec>>(ctx, threads);
        const int64_t groups = ceil_div(C, static_cast<int64_t>(block.x) * kVec);
        const int64_t row_blocks =
            std::min<int64_t>({ceil_div(M, block.y), std::max<int64_t>(1, wave / groups), 65535});
        FUSEDBN_LAUNCH((&channels_last_elementwise_kernel<Op, kVec>),
                       dim3(static_cast<unsigned>(groups), static_cast<unsigned>(row_blocks)), block, 0, ctx.stream)(
            op, M, C);
      });
  FUSEDBN_LAUNCH_CHECK();
}

template <typename scalar_t>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

// The per-channel tensors a kernel computes its coefficients from (kernels.cuh's ChannelCoefficients):
// batch statistics (mean, invstd in acc_t) or the running ones (eval: `invstd` undefined), and the
// parameters, all read by channel index (contiguous ones: check_* and the callers make sure).
// kSlope: PReLU's kernels', with its slopes (activation_slopes: 1 or C values).
template <typename acc_t, typename param_t, bool kSlope>
ChannelCoefficients<acc_t, param_t, kSlope> channel_coefficients(const Tensor& mean, const Tensor& invstd,
                                                                 const OptTensor& running_mean,
                                                                 const OptTensor& running_var, const OptTensor& weight,
                                                                 const OptTensor& bias, double eps,
                                                                 const Tensor& slopes) {
  ChannelCoefficients<acc_t, param_t, kSlope> co{};
  co.mean = invstd.defined() ? mean.const_data_ptr<acc_t>() : nullptr;
  co.invstd = invstd.defined() ? invstd.const_data_ptr<acc_t>() : nullptr;
  co.running_mean = ptr_or_null<param_t>(running_mean);
  co.running_var = ptr_or_null<param_t>(running_var);
  co.weight = ptr_or_null<param_t>(weight);
  co.bias = ptr_or_null<param_t>(bias);
  co.eps = eps;
  if constexpr (kSlope) {
    co.slopes = slopes.const_data_ptr<acc_t>();
    co.slope_step = slope_step(slopes);
  }
  return co;
}

// The normalize pass, y = act((x - mean) * alpha + beta [+ residual]) per channel with the coefficients
// computed in the kernel from `coefficients`: its output (with x's strides), residual (in x's view) and op.
template <typename scalar_t, typename acc_t, typename param_t, typename Act>
struct NormalizePass {
  Tensor y, r;
  NormalizeOp<scalar_t, acc_t, param_t, Act> op;

  bool aligned(const Tensor& x) const { return aligned16(x) && aligned16(y) && (!r.defined() || aligned16(r)); }
};

template <typename scalar_t, typename Act, typename acc_t, typename param_t>
NormalizePass<scalar_t, acc_t, param_t, Act> normalize_pass(
    const Tensor& x, const ChannelLayout& layout, const ChannelCoefficients<acc_t, param_t, kSlopesOf<Act>>& coefficients,
    const OptTensor& residual, Epilogue epilogue) {
  Tensor y = empty_like_dense(x, x.scalar_type());
  Tensor r = has(residual) ? to_layout(*residual, layout) : Tensor();
  const NormalizeOp<scalar_t, acc_t, param_t, Act> op{x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                                 r.defined() ? r.const_data_ptr<scalar_t>() : nullptr, coefficients,
                                                 epilogue.act, static_cast<acc_t>(epilogue.param)};
  return {y, r, op};
}

// The training forward in one launch (kernels.cuh channels_first_forward_kernel) where it applies:
// channels-first, and each channel's windows within kOnePassRows a thread of one block. The reduction of
// the two-launch path would take one block per channel for such shapes too (it splits a channel only
// where each split gets at least 4 windows a thread), so this one loses no parallelism and reads x once.
// Returns whether it launched.
constexpr int kOnePassRows = 4;

template <int kVecWidth, typename scalar_t, typename acc_t, typename param_t, typename Act, typename Context>
bool launch_one_pass_forward(const ChannelLayout& layout, const WelfordReducer<scalar_t, acc_t>& reducer,
                             const StatsFinisher<acc_t, param_t>& finisher,
                             const NormalizeOp<scalar_t, acc_t, param_t, Act>& op, bool aligned, const Context& ctx) {
  if constexpr (sizeof(acc_t) == 8) {
    return false;  // not for double: its kRows vectors and statistics do not fit in the registers together
  } else {
    if (layout.channels_last || layout.count_per_channel() == 0) return false;
    bool launched = false;
    with_vec_width<kVecWidth>(aligned, [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      if (layout.N * layout.C * layout.S % kVec != 0) return;  // a window would reach past the tensor's end
      const int64_t W = windows_per_run<kVec>(layout.S);
      const int64_t threads =
          std::max<int64_t>(kWarpSize, ceil_div(ceil_div(layout.N * W, kOnePassRows), kWarpSize) * kWarpSize);
      if (threads > ctx.max_threads) return;
      constexpr auto kernel = &channels_first_forward_kernel<scalar_t, acc_t, param_t, Act, kVec, kOnePassRows>;
      const int64_t blocks = std::min(layout.C, wave_of<kernel>(ctx, threads));
      FUSEDBN_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(threads)), 0, ctx.stream)(
          reducer, finisher, op, layout.N, layout.C, layout.S, W);
      FUSEDBN_LAUNCH_CHECK();
      launched = true;
    });
    return launched;
  }
}

template <typename Context>
std::tuple<Tensor, Tensor, Tensor> forward_train(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                                 const OptTensor& running_mean, const OptTensor& running_var,
                                                 double momentum, double eps, const OptTensor& residual,
                                                 c10::string_view activation, double activation_param,
                                                 const OptTensor& activation_weight) {
  check_forward_train_args(input, weight, bias, running_mean, running_var, residual, eps);
  const Epilogue epilogue = parse_epilogue(activation, activation_param, activation_weight, input);
  const Context ctx(input);
  // The kernels index per-channel tensors by channel and the statistics kernel updates the running
  // statistics in place (the kernel is the one place they are written): strided ones are read from
  // contiguous copies, and the running statistics copied back.
  const OptTensor w = flat_channels(weight), b = flat_channels(bias);
  const OptTensor rm = contiguous(running_mean), rv = contiguous(running_var);
  const Tensor x = dense_input(input);
  const ChannelLayout layout = channel_layout(x);
  const int64_t C = layout.C;
  const auto acc_options = input.options().dtype(at::toOpMathType(input.scalar_type()));
  const Tensor slopes = activation_slopes(activation_weight, acc_options.dtype().toScalarType());
  Tensor mean = at::empty({C}, acc_options), invstd = at::empty({C}, acc_options);
  if (C == 0) return {empty_like_dense(x, x.scalar_type()), mean, invstd};
  Tensor y;
  FUSEDBN_DISPATCH_INPUT(input.scalar_type(), [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_param_type<scalar_t>(dtype_of_first({&weight, &bias, &running_mean, &running_var}), [&](auto param_tag) {
      using param_t = decltype(param_tag);
      const WelfordReducer<scalar_t, acc_t> reducer{x.numel() > 0 ? x.const_data_ptr<scalar_t>() : nullptr,
                                                    layout.channels_last ? 1 : layout.S};
      const StatsFinisher<acc_t, param_t> finisher{ptr_or_null<param_t>(rm),        ptr_or_null<param_t>(rv),
                                                   mean.mutable_data_ptr<acc_t>(),  invstd.mutable_data_ptr<acc_t>(),
                                                   momentum,                        eps};
      constexpr int kVecWidth = vec_width<scalar_t>();
      with_activation_policy(epilogue.act, [&](auto act) {
        const auto pass = normalize_pass<scalar_t, decltype(act)>(
            x, layout,
            channel_coefficients<acc_t, param_t, kSlopesOf<decltype(act)>>(mean, invstd, {}, {}, w, b, eps, slopes),
            residual, epilogue);
        y = pass.y;
        if (launch_one_pass_forward<kVecWidth>(layout, reducer, finisher, pass.op, pass.aligned(x), ctx)) return;
        const Scratch s =
            reduce_scratch<kVecWidth, decltype(reducer), decltype(finisher)>(layout, aligned16(x), 0, x, ctx);
        launch_reduce<kVecWidth>(layout, reducer, finisher, aligned16(x), s, 0, ctx);
        launch_elementwise<kVecWidth>(layout, pass.op, x.numel(), pass.aligned(x), ctx);
      });
    });
  });
  {
    // Below autograd and ADInplaceOrView, so buffers made under torch.inference_mode() are updated too.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (const auto& [given, used] : {std::pair{&running_mean, &rm}, std::pair{&running_var, &rv}}) {
      if (has(*given) && !(*given)->is_same(**used)) (*given)->copy_(**used);
    }
  }
  return {y, mean, invstd};
}

// One launch: the coefficients from the running statistics inside the normalize kernel.
template <typename Context>
Tensor forward_eval(const Tensor& input, const OptTensor& weight, const OptTensor& bias, const Tensor& running_mean,
                    const Tensor& running_var, double eps, const OptTensor& residual, c10::string_view activation,
                    double activation_param, const OptTensor& activation_weight) {
  check_forward_eval_args(input, weight, bias, running_mean, running_var, residual, eps);
  const Epilogue epilogue = parse_epilogue(activation, activation_param, activation_weight, input);
  const Tensor slopes = activation_slopes(activation_weight, at::toOpMathType(input.scalar_type()));
  const Context ctx(input);
  const OptTensor w = flat_channels(weight), b = flat_channels(bias);
  const OptTensor rm = contiguous(running_mean), rv = contiguous(running_var);
  const Tensor x = dense_input(input);
  const ChannelLayout layout = channel_layout(x);
  Tensor y;
  FUSEDBN_DISPATCH_INPUT(input.scalar_type(), [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_param_type<scalar_t>(dtype_of_first({&weight, &bias, &rm, &rv}), [&](auto param_tag) {
      using param_t = decltype(param_tag);
      with_activation_policy(epilogue.act, [&](auto act) {
        const auto pass = normalize_pass<scalar_t, decltype(act)>(
            x, layout,
            channel_coefficients<acc_t, param_t, kSlopesOf<decltype(act)>>(Tensor(), Tensor(), rm, rv, w, b, eps, slopes),
            residual, epilogue);
        launch_elementwise<vec_width<scalar_t>()>(layout, pass.op, x.numel(), pass.aligned(x), ctx);
        y = pass.y;
      });
    });
  });
  return y;
}

// Where dz comes from (kernels.cuh's GradSource).
template <typename scalar_t, typename acc_t, typename Act>
GradSource<scalar_t, acc_t, Act> grad_source(const BackwardInputs& in, bool read_x = true) {
  const Tensor& side = in.from == GradFrom::kOutput ? in.out : in.residual;
  return {in.dy.const_data_ptr<scalar_t>(),
          (read_x ? in.x : in.dy).const_data_ptr<scalar_t>(),
          in.from,
          in.epilogue.act,
          static_cast<acc_t>(in.epilogue.param),
          side.defined() ? side.const_data_ptr<scalar_t>() : nullptr};
}

// The forward's coefficients, alpha = w * invstd and beta = b (and the activation's parameter), for the
// backward's kernels.
template <typename acc_t, typename param_t, typename Act>
ChannelCoefficients<acc_t, param_t, kSlopesOf<Act>> forward_coefficients(const BackwardInputs& in) {
  return channel_coefficients<acc_t, param_t, kSlopesOf<Act>>(in.mean, in.invstd, {}, {}, in.weight, in.bias, 0.0,
                                                              in.slopes);
}

inline bool backward_aligned(const BackwardInputs& in) {
  return aligned16(in.x) && aligned16(in.dy) && (!in.out.defined() || aligned16(in.out)) &&
         (!in.residual.defined() || aligned16(in.residual));
}

// Calls f(scalar_t{}, param_t{}, Act{}) for the backward's input and parameter dtypes and its activation's
// policy (coefficients.cuh).
template <typename F>
void dispatch_backward(const BackwardInputs& in, F&& f) {
  FUSEDBN_DISPATCH_INPUT(in.x.scalar_type(), [&] {
    with_param_type<scalar_t>(dtype_of_first({&in.weight, &in.bias}), [&](auto param_tag) {
      with_activation_policy(in.epilogue.act, [&](auto act) { f(scalar_t{}, param_tag, act); });
    });
  });
}

// The per-channel gradient reduction with `finisher`, in `scratch` (reduce_scratch for its GradReducer).
template <typename scalar_t, typename param_t, typename Act, typename Finisher, typename Context>
void grad_reduction(const BackwardInputs& in, const Finisher& finisher, const Scratch& scratch, int64_t reserved_bytes,
                    const Context& ctx) {
  using acc_t = at::opmath_type<scalar_t>;
  const GradReducer<scalar_t, acc_t, param_t, Act> reducer{forward_coefficients<acc_t, param_t, Act>(in),
                                                           grad_source<scalar_t, acc_t, Act>(in)};
  launch_reduce<vec_width<scalar_t>()>(in.layout, reducer, finisher, backward_aligned(in), scratch, reserved_bytes, ctx);
}

// dx = (dz - mean_dz - (x - mean) * proj) * alpha per value (dz * alpha under eval statistics: mean_dz and
// proj null) where `want_dx`, and grad_residual = dz when it is defined. `read_x`: whether dz or dx needs x
// (not for dx = dy * alpha).
template <typename scalar_t, typename param_t, typename Act, typename Context>
Tensor dx_pass(const BackwardInputs& in, const at::opmath_type<scalar_t>* mean_dz,
               const at::opmath_type<scalar_t>* proj, const Tensor& grad_residual, bool want_dx, bool read_x,
               const Context& ctx) {
  using acc_t = at::opmath_type<scalar_t>;
  Tensor grad_input = want_dx ? empty_like_dense(in.x, in.x.scalar_type()) : Tensor();
  const BackwardElemtOp<scalar_t, acc_t, param_t, Act> op{
      want_dx ? grad_input.mutable_data_ptr<scalar_t>() : nullptr,
      grad_residual.defined() ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr,
      mean_dz,
      proj,
      forward_coefficients<acc_t, param_t, Act>(in),
      grad_source<scalar_t, acc_t, Act>(in, read_x)};
  launch_elementwise<vec_width<scalar_t>()>(
      in.layout, op, in.x.numel(),
      backward_aligned(in) && (!want_dx || aligned16(grad_input)) &&
          (!grad_residual.defined() || aligned16(grad_residual)),
      ctx);
  return grad_input;
}

// Gradients of y = (x - mean) * invstd * w + b, with dz the gradient reaching y (dy, or dy through the
// activation): one reduction (sum(dz), sum(dz*(x-mean)) and the per-channel finish), then one elementwise
// pass for dx (and grad_residual = dz). See GradFinisher and BackwardElemtOp for the formulas, plan_backward
// (backward_inputs.h) for which passes run. The centered dx pass's per-channel terms live in the scratch's
// reserved bytes, written by the reduction's finisher.
template <typename Context>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward(
    const Tensor& grad_output, const Tensor& input, const OptTensor& weight, const Tensor& mean, const Tensor& invstd,
    bool training, std::array<bool, 3> output_mask, const OptTensor& bias, const OptTensor& output,
    const OptTensor& residual, c10::string_view activation, double activation_param, bool want_grad_residual,
    const OptTensor& activation_weight, bool want_grad_slopes) {
  const BackwardInputs in = prepare_backward(grad_output, input, weight, mean, invstd, bias, output, residual,
                                             activation, activation_param, activation_weight);
  const Context ctx(input);
  const int64_t C = in.layout.C;
  const auto param_dtype = grad_param_dtype(weight, bias, input);
  want_grad_slopes = want_grad_slopes && in.slopes.defined();
  Tensor grad_weight = output_mask[1] ? at::empty({C}, input.options().dtype(param_dtype)) : Tensor();
  Tensor grad_bias = output_mask[2] ? at::empty({C}, input.options().dtype(param_dtype)) : Tensor();
  Tensor grad_residual = want_grad_residual ? empty_like_dense(in.x, input.scalar_type()) : Tensor();
  Tensor sum_dslope = want_grad_slopes ? at::empty({C}, input.options().dtype(in.acc)) : Tensor();
  const auto grad_slopes = [&] {
    return want_grad_slopes ? grad_of_activation_weight(sum_dslope, *activation_weight) : Tensor();
  };
  if (C == 0) {
    return {output_mask[0] ? empty_like_dense(in.x, input.scalar_type()) : Tensor(), grad_weight, grad_bias,
            grad_residual, grad_slopes()};
  }
  const BackwardPlan plan = plan_backward(in, training, output_mask, want_grad_residual, want_grad_slopes);
  Tensor grad_input;
  dispatch_backward(in, [&](auto scalar_tag, auto param_tag, auto act) {
    using scalar_t = decltype(scalar_tag);
    using param_t = decltype(param_tag);
    using Act = decltype(act);
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVecWidth = vec_width<scalar_t>();
    const int64_t reserved = plan.centered ? 2 * C * static_cast<int64_t>(sizeof(acc_t)) : 0;
    const Scratch s = plan.sums ? reduce_scratch<kVecWidth, GradReducer<scalar_t, acc_t, param_t, Act>,
                                                 GradFinisher<acc_t, param_t>>(in.layout, backward_aligned(in),
                                                                               reserved, in.x, ctx)
                                : Scratch{};
    acc_t* mean_dz = plan.centered ? s.at<acc_t>(0) : nullptr;
    acc_t* proj = plan.centered ? mean_dz + C : nullptr;
    if (plan.sums) {
      // grad_weight and grad_bias in the parameters' dtype (grad_param_dtype).
      const GradFinisher<acc_t, param_t> finisher{in.invstd.const_data_ptr<acc_t>(), ptr_or_null<param_t>(grad_weight),
                                                  ptr_or_null<param_t>(grad_bias),   mean_dz,
                                                  proj,                              in.layout.count_per_channel(),
                                                  ptr_or_null<acc_t>(sum_dslope)};
      grad_reduction<scalar_t, param_t, Act>(in, finisher, s, reserved, ctx);
    }
    if (plan.scaled_dy || plan.elementwise) {
      grad_input = dx_pass<scalar_t, param_t, Act>(in, mean_dz, proj, grad_residual, output_mask[0], !plan.scaled_dy, ctx);
    }
  });
  return {grad_input, grad_weight, grad_bias, grad_residual, grad_slopes()};
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
    constexpr int kVecWidth = vec_width<scalar_t>();
    const Scratch s = reduce_scratch<kVecWidth, decltype(reducer), decltype(finisher)>(layout, aligned16(x), 0, x, ctx);
    launch_reduce<kVecWidth>(layout, reducer, finisher, aligned16(x), s, 0, ctx);
  });
  return {mean, m2};
}

template <typename Context>
std::tuple<Tensor, Tensor, Tensor> grad_sums(const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                                             const Tensor& mean, const Tensor& invstd, const OptTensor& bias,
                                             const OptTensor& output, const OptTensor& residual,
                                             c10::string_view activation, double activation_param,
                                             const OptTensor& activation_weight) {
  const BackwardInputs in = prepare_backward(grad_output, input, weight, mean, invstd, bias, output, residual,
                                             activation, activation_param, activation_weight);
  const Context ctx(input);
  const auto acc_options = input.options().dtype(in.acc);
  Tensor sum_dz = at::empty({in.layout.C}, acc_options), sum_dz_xmu = at::empty({in.layout.C}, acc_options);
  Tensor sum_dslope = in.slopes.defined() ? at::empty({in.layout.C}, acc_options) : Tensor();
  if (in.layout.C == 0) return {sum_dz, sum_dz_xmu, sum_dslope};
  dispatch_backward(in, [&](auto scalar_tag, auto param_tag, auto act) {
    using scalar_t = decltype(scalar_tag);
    using acc_t = at::opmath_type<scalar_t>;
    const SumsFinisher<acc_t> finisher{sum_dz.mutable_data_ptr<acc_t>(), sum_dz_xmu.mutable_data_ptr<acc_t>(),
                                       ptr_or_null<acc_t>(sum_dslope)};
    const Scratch s = reduce_scratch<vec_width<scalar_t>(), GradReducer<scalar_t, acc_t, decltype(param_tag), decltype(act)>,
                                     decltype(finisher)>(in.layout, backward_aligned(in), 0, in.x, ctx);
    grad_reduction<scalar_t, decltype(param_tag), decltype(act)>(in, finisher, s, 0, ctx);
  });
  return {sum_dz, sum_dz_xmu, sum_dslope};
}

template <typename Context>
std::tuple<Tensor, Tensor> backward_elemt(const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                                          const Tensor& mean, const Tensor& invstd, const Tensor& mean_dz,
                                          const Tensor& proj, const OptTensor& bias, const OptTensor& output,
                                          const OptTensor& residual, c10::string_view activation,
                                          double activation_param, bool want_grad_residual,
                                          const OptTensor& activation_weight) {
  const BackwardElemtInputs in = prepare_backward_elemt(grad_output, input, weight, mean, invstd, mean_dz, proj, bias,
                                                        output, residual, activation, activation_param,
                                                        activation_weight);
  const Context ctx(input);
  Tensor grad_residual = want_grad_residual ? empty_like_dense(in.x, input.scalar_type()) : Tensor();
  if (in.layout.C == 0) return {empty_like_dense(in.x, input.scalar_type()), grad_residual};
  Tensor grad_input;
  dispatch_backward(in, [&](auto scalar_tag, auto param_tag, auto act) {
    using scalar_t = decltype(scalar_tag);
    using acc_t = at::opmath_type<scalar_t>;
    grad_input = dx_pass<scalar_t, decltype(param_tag), decltype(act)>(in, in.mean_dz.const_data_ptr<acc_t>(),
                                                                        in.proj.const_data_ptr<acc_t>(), grad_residual,
                                                                        true, true, ctx);
  });
  return {grad_input, grad_residual};
}

// Registers an op as it is.
template <auto Op>
struct AsIs {
  static constexpr auto call = Op;
};

// The six ops' kernels for one Context (the CUDA build and the emulator's register the same set), each
// as Wrap<op>::call (the emulator's wraps them in its host-side checks).
template <typename Context, template <auto> class Wrap = AsIs>
void register_cuda_kernels(torch::Library& m) {
  fusedbn::register_kernels(m, Wrap<&forward_train<Context>>::call, Wrap<&forward_eval<Context>>::call,
                            Wrap<&backward<Context>>::call, Wrap<&batch_stats<Context>>::call,
                            Wrap<&grad_sums<Context>>::call, Wrap<&backward_elemt<Context>>::call);
}

}  // namespace fusedbn::cuda
