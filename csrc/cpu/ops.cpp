// CPU implementations of the fusedbn ops: argument checks, layout resolution, then the tile kernels
// (tiles.h, reductions.h, elementwise.h) run with at::parallel_for.
#include "vec_math.h"  // first: it chooses the instruction set of ATen's vector headers

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "../backward_inputs.h"
#include "../checks.h"
#include "../dispatch.h"
#include "../layout.h"
#include "../schemas.h"
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

OptTensor as_acc(const OptTensor& t, at::ScalarType acc) {
  return has(t) ? OptTensor(as_acc(*t, acc)) : std::nullopt;
}

template <typename acc_t>
const acc_t* data_or_null(const OptTensor& t) {
  return has(t) ? t->const_data_ptr<acc_t>() : nullptr;
}

// Rows of one [rows, C] accumulation-dtype tensor filled by one loop over the channels, f(c, row) with
// row[r] the r-th row's data: at small shapes an aten op per per-channel vector costs more than the kernels.
template <typename acc_t, size_t kRows, typename F>
Tensor channel_rows(int64_t C, const at::TensorOptions& acc_options, F&& f) {
  Tensor rows = at::empty({static_cast<int64_t>(kRows), C}, acc_options);
  std::array<acc_t*, kRows> row;
  for (size_t r = 0; r < kRows; ++r) row[r] = rows.mutable_data_ptr<acc_t>() + static_cast<int64_t>(r) * C;
  for (int64_t c = 0; c < C; ++c) f(c, row);
  return rows;
}

// normalize's per-channel coefficients, [4, C]: mean (0 where null), alpha and beta (alpha_of, beta_of in
// welford.h), PReLU's slope (`slopes`: 1 or C values, activation_slopes; else 0), the rows of channel_rows.
template <typename acc_t>
Tensor normalize_coefficients(const acc_t* mean, const acc_t* invstd, const OptTensor& weight,
                              const OptTensor& bias, const Tensor& slopes, int64_t C,
                              const at::TensorOptions& acc_options) {
  const acc_t* w = data_or_null<acc_t>(weight);
  const acc_t* b = data_or_null<acc_t>(bias);
  const acc_t* s = slopes.defined() ? slopes.const_data_ptr<acc_t>() : nullptr;
  const int64_t step = s ? slope_step(slopes) : 0;
  return channel_rows<acc_t, 4>(C, acc_options, [&](int64_t c, const auto& row) {
    row[0][c] = mean ? mean[c] : acc_t(0);
    row[1][c] = alpha_of(w, c, invstd[c]);
    row[2][c] = beta_of<acc_t>(b, c);
    row[3][c] = s ? s[c * step] : acc_t(0);
  });
}

// y = act((x - mean) * alpha + beta [+ residual]) per channel, in `layout`, with the strides of `like`
// (x's when undefined; another tensor in the same view may differ on size-1 dims). `coefficients`: the
// [4, C] rows mean, alpha, beta, slope (normalize_coefficients).
Tensor normalize(const Tensor& x, const ChannelLayout& layout, const Tensor& coefficients,
                 const OptTensor& residual = std::nullopt, Epilogue epilogue = {}, const Tensor& like = Tensor()) {
  Tensor y = empty_like_dense(like.defined() ? like : x, x.scalar_type());
  const Tensor r = has(residual) ? to_layout(*residual, layout) : Tensor();
  FUSEDBN_DISPATCH_INPUT(x.scalar_type(), [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    const scalar_t* res = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    const acc_t* mean = coefficients.const_data_ptr<acc_t>();
    const acc_t* alpha = mean + layout.C;
    const acc_t* beta = alpha + layout.C;
    const acc_t* slope = beta + layout.C;
    const auto param = static_cast<acc_t>(epilogue.param);
    with_flag(r.defined(), [&](auto add) {
      with_activation(epilogue.act, [&](auto act) {
        parallel_for_elementwise_tiles(layout, [&](const Tile& tile, auto stride) {
          tile_normalize<scalar_t, acc_t, decltype(stride)::value, decltype(add)::value, decltype(act)::value>(
              in, res, out, mean, alpha, beta, slope, param, tile);
        });
      });
    });
  });
  return y;
}

// Calls f(value) for every value of channel c, in memory order.
template <typename scalar_t, typename F>
void for_each_value_of_channel(const scalar_t* x, const ChannelLayout& layout, int64_t c, F&& f) {
  if (layout.channels_last) {
    for (int64_t r = 0; r < layout.rows(); ++r) f(x[r * layout.C + c]);
  } else {
    for (int64_t n = 0; n < layout.N; ++n) {
      const scalar_t* run = x + (n * layout.C + c) * layout.S;
      for (int64_t s = 0; s < layout.S; ++s) f(run[s]);
    }
  }
}

// Channel c's moments in float64 by two plain passes, for a channel whose merged moments came out
// non-finite: exactly what a plain sum gives where values are infinite or NaN (torch's CPU kernels sum),
// and finite where float32 moments overflowed (M2 of values near 1e30; torch's CPU kernels accumulate
// float32 in float64 too). The merges before it may then use the plain Chan formula (chan_merge_into).
template <typename scalar_t>
WelfordPartial<double> channel_moments_in_double(const scalar_t* x, const ChannelLayout& layout, int64_t c,
                                                 double shift) {
  const int64_t count = layout.count_per_channel();
  double sum = 0, m2 = 0;
  for_each_value_of_channel(x, layout, c, [&](scalar_t v) { sum += static_cast<double>(v) - shift; });
  const double mean = sum / static_cast<double>(count);
  for_each_value_of_channel(x, layout, c, [&](scalar_t v) {
    const double d = (static_cast<double>(v) - shift) - mean;
    m2 += d * d;
  });
  return {shift + mean, m2, count};
}

// Per-channel Welford moments of x in `layout`: f(c, total) for each c, total a WelfordPartial of the
// accumulation type, or of double where that came out non-finite (channel_moments_in_double). All
// partials of a channel are about one shift (channel_shifts) and the parts merge
// pairwise, in an order fixed by the shape.
template <typename scalar_t, typename F>
void for_each_channel_moments(const Tensor& x, const ChannelLayout& layout, F&& f) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = layout.C, parts = num_parts(layout);
  const scalar_t* data = x.const_data_ptr<scalar_t>();
  const std::vector<acc_t> shifts = channel_shifts<scalar_t, acc_t>(data, layout);
  // Every tile of part p covers the same rows, so the part's count is the same for all its channels.
  PartMoments<acc_t> partials(parts, C);
  for (int64_t p = 0; p < parts; ++p) {
    partials.counts[p] = rows_in_part(layout, p) * (layout.channels_last ? 1 : layout.S);
  }
  parallel_for_tiles(layout, [&](const Tile& tile, auto stride) {
    tile_welford<scalar_t, acc_t, decltype(stride)::value>(data, shifts.data(), tile, partials);
  });
  partials.merge_pairwise();
  std::vector<int64_t> non_finite;
  for (int64_t c = 0; c < C; ++c) {
    const WelfordPartial<acc_t> total{shifts[c] + partials.means[c], partials.m2s[c], partials.counts[0]};
    if (std::isfinite(total.mean) && std::isfinite(total.m2)) {
      f(c, total);
    } else {
      non_finite.push_back(c);
    }
  }
  at::parallel_for(0, static_cast<int64_t>(non_finite.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = non_finite[i];
      f(c, channel_moments_in_double(data, layout, c, static_cast<double>(shifts[c])));
    }
  });
}

// The one place the CPU ops write state: both running statistics, from the batch's mean and unbiased
// variance, after every check. Under one lock, so calls from several threads on the same buffers leave
// what some serial order of them would; below autograd and ADInplaceOrView, so buffers made under
// torch.inference_mode() are updated as torch's BatchNorm updates them.
void update_running_stats(const Tensor& running_mean, const Tensor& running_var, const Tensor& mean,
                          const Tensor& unbiased_var, double momentum) {
  static std::mutex update_lock;
  const std::lock_guard<std::mutex> lock(update_lock);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  Tensor new_mean = running_mean.to(mean.scalar_type()).contiguous();
  Tensor new_var = running_var.to(mean.scalar_type()).contiguous();
  FUSEDBN_DISPATCH_STATISTICS(mean.scalar_type(), [&] {
    scalar_t* rm = new_mean.mutable_data_ptr<scalar_t>();
    scalar_t* rv = new_var.mutable_data_ptr<scalar_t>();
    const scalar_t* batch_mean = mean.const_data_ptr<scalar_t>();
    const scalar_t* batch_var = unbiased_var.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < mean.numel(); ++c) {
      rm[c] = running_update(rm[c], batch_mean[c], momentum);
      rv[c] = running_update(rv[c], batch_var[c], momentum);
    }
  });
  if (!new_mean.is_same(running_mean)) running_mean.copy_(new_mean);
  if (!new_var.is_same(running_var)) running_var.copy_(new_var);
}

std::tuple<Tensor, Tensor, Tensor> forward_train(const Tensor& input, const OptTensor& weight,
                                                 const OptTensor& bias, const OptTensor& running_mean,
                                                 const OptTensor& running_var, double momentum,
                                                 double eps, const OptTensor& residual,
                                                 c10::string_view activation, double activation_param,
                                                 const OptTensor& activation_weight) {
  check_forward_train_args(input, weight, bias, running_mean, running_var, residual, eps);
  const Epilogue epilogue = parse_epilogue(activation, activation_param, activation_weight, input);
  const OptTensor w = flat_channels(weight), b = flat_channels(bias);
  const Tensor x = dense_input(input);
  const ChannelLayout layout = channel_layout(x);
  const int64_t C = layout.C, count = layout.count_per_channel();

  const auto acc = at::toOpMathType(input.scalar_type());
  const auto acc_options = input.options().dtype(acc);
  Tensor mean = at::empty({C}, acc_options), invstd = at::empty({C}, acc_options);
  Tensor unbiased_var = at::empty({C}, acc_options);
  FUSEDBN_DISPATCH_INPUT(input.scalar_type(), [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* mean_out = mean.mutable_data_ptr<acc_t>();
    acc_t* invstd_out = invstd.mutable_data_ptr<acc_t>();
    acc_t* var_out = unbiased_var.mutable_data_ptr<acc_t>();
    for_each_channel_moments<scalar_t>(x, layout, [&](int64_t c, const auto& total) {
      mean_out[c] = static_cast<acc_t>(total.mean);
      invstd_out[c] = static_cast<acc_t>(welford_invstd(total, eps));
      var_out[c] = static_cast<acc_t>(welford_unbiased_var(total));
    });
  });

  const Tensor coefficients = FUSEDBN_DISPATCH_STATISTICS(acc, [&] {
    return normalize_coefficients<scalar_t>(mean.const_data_ptr<scalar_t>(), invstd.const_data_ptr<scalar_t>(),
                                            as_acc(w, acc), as_acc(b, acc), activation_slopes(activation_weight, acc),
                                            C, acc_options);
  });
  Tensor y = normalize(x, layout, coefficients, residual, epilogue);

  // An empty batch leaves the running statistics as they were (as nn.BatchNorm does).
  if (has(running_mean) && count > 0) update_running_stats(*running_mean, *running_var, mean, unbiased_var, momentum);
  return {y, mean, invstd};
}

std::tuple<Tensor, Tensor> batch_stats(const Tensor& input) {
  check_input(input);
  const Tensor x = dense_input(input);
  const ChannelLayout layout = channel_layout(x);
  const auto acc_options = input.options().dtype(at::toOpMathType(input.scalar_type()));
  Tensor mean = at::empty({layout.C}, acc_options), m2 = at::empty({layout.C}, acc_options);
  FUSEDBN_DISPATCH_INPUT(input.scalar_type(), [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* mean_out = mean.mutable_data_ptr<acc_t>();
    acc_t* m2_out = m2.mutable_data_ptr<acc_t>();
    for_each_channel_moments<scalar_t>(x, layout, [&](int64_t c, const auto& total) {
      mean_out[c] = static_cast<acc_t>(total.mean);
      m2_out[c] = static_cast<acc_t>(total.m2);
    });
  });
  return {mean, m2};
}

Tensor forward_eval(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                    const Tensor& running_mean, const Tensor& running_var, double eps,
                    const OptTensor& residual, c10::string_view activation, double activation_param,
                    const OptTensor& activation_weight) {
  check_forward_eval_args(input, weight, bias, running_mean, running_var, residual, eps);
  const Epilogue epilogue = parse_epilogue(activation, activation_param, activation_weight, input);
  const OptTensor w = flat_channels(weight), b = flat_channels(bias);
  const Tensor x = dense_input(input);
  const ChannelLayout layout = channel_layout(x);
  const auto acc = at::toOpMathType(input.scalar_type());
  const auto acc_options = input.options().dtype(acc);
  const Tensor mean = as_acc(running_mean, acc), var = as_acc(running_var, acc);
  const Tensor coefficients = FUSEDBN_DISPATCH_STATISTICS(acc, [&] {
    std::vector<scalar_t> invstd(layout.C);
    const scalar_t* v = var.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < layout.C; ++c) invstd[c] = invstd_of(v[c], eps);
    return normalize_coefficients<scalar_t>(mean.const_data_ptr<scalar_t>(), invstd.data(), as_acc(w, acc),
                                            as_acc(b, acc), activation_slopes(activation_weight, acc), layout.C,
                                            acc_options);
  });
  return normalize(x, layout, coefficients, residual, epilogue);
}

// Calls f(GradRule<...>{}) with the rule of `in`: dy alone, ReLU's mask from the output, or the
// activation's derivative recomputed (with or without the residual).
template <typename F>
void with_grad_rule(const BackwardInputs& in, F&& f) {
  switch (in.from) {
    case GradFrom::kDy: return f(GradRule<Activation::kIdentity, GradFrom::kDy, false>{});
    case GradFrom::kOutput: return f(GradRule<Activation::kRelu, GradFrom::kOutput, false>{});
    case GradFrom::kRecompute:
      return with_activation(in.epilogue.act, [&](auto act) {
        with_flag(in.residual.defined(), [&](auto residual) {
          f(GradRule<decltype(act)::value, GradFrom::kRecompute, decltype(residual)::value>{});
        });
      });
  }
}

// The backward's coefficients, [4, C] as normalize_coefficients: 0, alpha = w * invstd (the forward's, which
// the recomputed activation needs too), beta = bias (without `with_bias`: 0), PReLU's slope.
Tensor backward_coefficients(const BackwardInputs& in, bool with_bias = true) {
  return FUSEDBN_DISPATCH_STATISTICS(in.acc, [&] {
    return normalize_coefficients<scalar_t>(nullptr, in.invstd.const_data_ptr<scalar_t>(), as_acc(in.weight, in.acc),
                                            with_bias ? as_acc(in.bias, in.acc) : std::nullopt, in.slopes, in.layout.C,
                                            in.x.options().dtype(in.acc));
  });
}

// Calls f(scalar_t{}, rule, source) with dz's rule (GradRule) and source (GradSource) for the backward
// tile kernels; `coefficients` from backward_coefficients; dz kept in `dz_out` when that is defined.
template <typename F>
void with_grad_source(const BackwardInputs& in, const Tensor& coefficients, F&& f, const Tensor& dz_out = Tensor()) {
  FUSEDBN_DISPATCH_INPUT(in.x.scalar_type(), [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* alpha = coefficients.const_data_ptr<acc_t>() + in.layout.C;
    const GradSource<scalar_t, acc_t> source{
        in.dy.const_data_ptr<scalar_t>(), in.out.defined() ? in.out.const_data_ptr<scalar_t>() : nullptr,
        in.residual.defined() ? in.residual.const_data_ptr<scalar_t>() : nullptr, alpha, alpha + in.layout.C,
        alpha + 2 * in.layout.C, static_cast<acc_t>(in.epilogue.param), dz_out.defined() ? dz_out.mutable_data_ptr<scalar_t>() : nullptr};
    with_grad_rule(in, [&](auto rule) { f(scalar_t{}, rule, source); });
  });
}

// The backward's per-part sums, [sums][parts][C]: sum(dz), sum(dz * (x - mean)) and, for PReLU, its weight's
// gradient sum(dy * min(z, 0)). Each reduction tile writes its own slots (tile_grad_sums); the parts then
// merge pairwise into part 0's row, channel by channel, so any split of the channels gives the same bits.
template <typename acc_t>
struct PartSums {
  int64_t parts, C, count;
  std::vector<acc_t> values;

  PartSums(const ChannelLayout& layout, int64_t count)
      : parts(num_parts(layout)), C(layout.C), count(count), values(count * parts * layout.C) {}
  acc_t* sum(int64_t k) { return k < count ? values.data() + k * parts * C : nullptr; }
  // Channels [c0, c0 + n) of every sum, into part 0's row.
  void merge(int64_t c0, int64_t n) {
    for (int64_t k = 0; k < count; ++k) sum_rows_pairwise(sum(k) + c0, parts, n, C);
  }
  // The merged sums as C-value tensors (each its own storage, as the schema's outputs are); the third undefined
  // without PReLU.
  std::array<Tensor, 3> totals(const at::TensorOptions& acc_options) {
    std::array<Tensor, 3> out;
    for (int64_t k = 0; k < count; ++k) {
      out[k] = at::empty({C}, acc_options);
      std::copy(sum(k), sum(k) + C, out[k].template mutable_data_ptr<acc_t>());
    }
    return out;
  }
};

// Sums of one reduction tile into its slots of `sums` (tile_grad_sums).
template <typename scalar_t, typename Rule, typename acc_t, int kMultiChannel>
void tile_sums(const BackwardInputs& in, const GradSource<scalar_t, acc_t>& source, PartSums<acc_t>& sums,
               const Tile& tile) {
  tile_grad_sums<scalar_t, acc_t, kMultiChannel, Rule>(source, in.x.const_data_ptr<scalar_t>(),
                                                        in.mean.const_data_ptr<acc_t>(), tile, in.layout.C,
                                                        sums.sum(0), sums.sum(1), sums.sum(2));
}

// sum(dz) and sum(dz * (x - mean)) per channel, dz the gradient reaching BatchNorm's output, and PReLU's
// weight gradient per channel sum(dy * min(z, 0)) (else undefined); dz itself written into `dz_out` when that
// is defined (only for the activations computed in spans, GradRule::kBuffered).
std::array<Tensor, 3> channel_grad_sums(const BackwardInputs& in, const Tensor& coefficients,
                                        const Tensor& dz_out = Tensor()) {
  std::array<Tensor, 3> totals;
  with_grad_source(in, coefficients, [&](auto scalar_tag, auto rule, const auto& source) {
    using scalar_t = decltype(scalar_tag);
    using acc_t = at::opmath_type<scalar_t>;
    PartSums<acc_t> sums(in.layout, in.slopes.defined() ? 3 : 2);
    parallel_for_tiles(in.layout, [&](const Tile& tile, auto stride) {
      tile_sums<scalar_t, decltype(rule), acc_t, decltype(stride)::value>(in, source, sums, tile);
    });
    sums.merge(0, in.layout.C);
    totals = sums.totals(in.x.options().dtype(in.acc));
  }, dz_out);
  return totals;
}

// dx = (dz - mean_dz - (x - mean) * proj) * alpha per value (dz * alpha under eval statistics: `centering`
// undefined; else its rows mean_dz, proj), and grad_residual = dz when it is defined.
Tensor dx_pass(const BackwardInputs& in, const Tensor& coefficients, const Tensor& centering,
               const Tensor& grad_residual) {
  Tensor grad_input = empty_like_dense(in.x, in.x.scalar_type());
  with_grad_source(in, coefficients, [&](auto scalar_tag, auto rule, const auto& source) {
    using scalar_t = decltype(scalar_tag);
    using acc_t = at::opmath_type<scalar_t>;
    with_flag(grad_residual.defined(), [&](auto write_dz) {
      with_flag(centering.defined(), [&](auto centered) {
        const acc_t* mean_dz = centered ? centering.const_data_ptr<acc_t>() : nullptr;
        parallel_for_elementwise_tiles(in.layout, [&](const Tile& tile, auto stride) {
          tile_backward_elemt<scalar_t, acc_t, decltype(stride)::value, decltype(rule),
                              decltype(write_dz)::value, decltype(centered)::value>(
              source, in.x.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(),
              grad_residual.defined() ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr,
              in.mean.const_data_ptr<acc_t>(), mean_dz, centered ? mean_dz + in.layout.C : nullptr, tile);
        });
      });
    });
  });
  return grad_input;
}

// The training dx's per-channel terms, [2, C]: mean_dz and proj (centering_of, welford.h).
Tensor centering_terms(const BackwardInputs& in, const Tensor& sum_dz, const Tensor& sum_dz_xmu) {
  return FUSEDBN_DISPATCH_STATISTICS(in.acc, [&] {
    const scalar_t inv_m = inv_count_of<scalar_t>(in.layout.count_per_channel());
    const scalar_t* dz = sum_dz.const_data_ptr<scalar_t>();
    const scalar_t* dz_xmu = sum_dz_xmu.const_data_ptr<scalar_t>();
    const scalar_t* istd = in.invstd.const_data_ptr<scalar_t>();
    return channel_rows<scalar_t, 2>(in.layout.C, in.x.options().dtype(in.acc), [&](int64_t c, const auto& row) {
      const auto terms = centering_of(dz[c], dz_xmu[c], istd[c], inv_m);
      row[0][c] = terms.mean_dz;
      row[1][c] = terms.proj;
    });
  });
}

// Channels-first training backward whose sums and dx can share one sweep per channel group: the group's
// values (every row) fit in kFusedGroupBytes, and there are enough groups to keep kFusedGroupsPerThread
// per thread busy (or the tensor is small enough for one thread). Then the dx pass reads dy and x from
// cache, where the two passes apart read them from memory twice (torch's channels-first backward is per
// channel for that reason). The thread count only picks the path: both give the same bits.
constexpr int64_t kFusedGroupBytes = 1 << 20;
constexpr int64_t kFusedGroupsPerThread = 4;

bool fuses_sums_and_dx(const BackwardInputs& in, const BackwardPlan& plan, bool keep_dz) {
  const ChannelLayout& layout = in.layout;
  if (layout.channels_last || !plan.centered || !plan.elementwise || keep_dz) return false;
  const int64_t tensors_read = 2 + (in.out.defined() || in.residual.defined() ? 1 : 0);
  const int64_t group_bytes = layout.N * view_width(layout) * tensors_read * in.x.element_size();
  return group_bytes <= kFusedGroupBytes &&
         (runs_on_one_thread(layout) || TileGrid(layout).groups >= kFusedGroupsPerThread * at::get_num_threads());
}

// The sums (PartSums::totals) and dx (and dz into grad_residual when defined) of fuses_sums_and_dx's case: per
// channel group, its reduction tiles, the merge of its channels' parts, their centering terms, then its dx.
// The same tiles, merge order and formulas as channel_grad_sums, centering_terms and dx_pass.
std::pair<std::array<Tensor, 3>, Tensor> fused_sums_and_dx(const BackwardInputs& in, const Tensor& coefficients,
                                                           const Tensor& grad_residual) {
  const ChannelLayout& layout = in.layout;
  const int64_t C = layout.C;
  Tensor grad_input = empty_like_dense(in.x, in.x.scalar_type());
  std::array<Tensor, 3> totals;
  with_grad_source(in, coefficients, [&](auto scalar_tag, auto rule, const auto& source) {
    using scalar_t = decltype(scalar_tag);
    using acc_t = at::opmath_type<scalar_t>;
    PartSums<acc_t> sums(layout, in.slopes.defined() ? 3 : 2);
    const TileGrid grid(layout);
    std::vector<acc_t> centering(2 * C);  // rows mean_dz, proj
    const acc_t inv_m = inv_count_of<acc_t>(layout.count_per_channel());
    const acc_t* invstd = in.invstd.const_data_ptr<acc_t>();
    with_flag(grad_residual.defined(), [&](auto write_dz) {
      parallel_for_tasks(layout, grid.groups, [&](int64_t begin, int64_t end) {
        for (int64_t g = begin; g < end; ++g) {
          for (int64_t p = 0; p < sums.parts; ++p) {
            with_tile_kind(layout, reduction_tile(layout, grid, p, g), [&](const Tile& tile, auto stride) {
              tile_sums<scalar_t, decltype(rule), acc_t, decltype(stride)::value>(in, source, sums, tile);
            });
          }
          const Tile group = group_runs_tile(layout, grid, 0, g);
          sums.merge(group.channel, group.rows);
          for (int64_t c = group.channel; c < group.channel + group.rows; ++c) {
            const auto terms = centering_of(sums.sum(0)[c], sums.sum(1)[c], invstd[c], inv_m);
            centering[c] = terms.mean_dz;
            centering[C + c] = terms.proj;
          }
          for (int64_t n = 0; n < layout.N; ++n) {
            tile_backward_elemt<scalar_t, acc_t, 0, decltype(rule), decltype(write_dz)::value, true>(
                source, in.x.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(),
                grad_residual.defined() ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr,
                in.mean.const_data_ptr<acc_t>(), centering.data(), centering.data() + C,
                group_runs_tile(layout, grid, n, g));
          }
        }
      });
    });
    totals = sums.totals(in.x.options().dtype(in.acc));
  });
  return {totals, grad_input};
}

// Gradients of y = (x - mean) * invstd * w + b, with alpha = w * invstd and dz the gradient reaching y
// (dy, or dy through the activation). Training (mean, invstd are the batch's, m values per channel):
//   dx = (dz - sum(dz)/m - (x - mean) * invstd^2 * sum(dz*(x-mean))/m) * alpha
// Eval statistics: dx = alpha * dz. Both: dw = sum(dz*(x-mean))*invstd, db = sum(dz), grad_residual = dz.
// Which passes run: plan_backward (backward_inputs.h).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward(
    const Tensor& grad_output, const Tensor& input, const OptTensor& weight, const Tensor& mean, const Tensor& invstd,
    bool training, std::array<bool, 3> output_mask, const OptTensor& bias, const OptTensor& output,
    const OptTensor& residual, c10::string_view activation, double activation_param, bool want_grad_residual,
    const OptTensor& activation_weight, bool want_grad_slopes) {
  const BackwardInputs in = prepare_backward(grad_output, input, weight, mean, invstd, bias, output, residual,
                                             activation, activation_param, activation_weight);
  const int64_t C = in.layout.C;
  const auto acc_options = input.options().dtype(in.acc);
  want_grad_slopes = want_grad_slopes && in.slopes.defined();
  const BackwardPlan plan = plan_backward(in, training, output_mask, want_grad_residual, want_grad_slopes);
  const Tensor coefficients = backward_coefficients(in, !plan.scaled_dy);
  // An activation computed in spans (SiLU, GELU, ELU: exp, erf, tanh) keeps dz from the sums' pass for the
  // dx pass instead of computing its derivative twice: one more tensor written and read, where the CPU is
  // compute-bound on the derivative.
  const bool keep_dz = plan.sums && plan.elementwise && in.from == GradFrom::kRecompute &&
                       is_transcendental(in.epilogue.act);
  const Tensor dz = keep_dz ? empty_like_dense(in.x, input.scalar_type()) : Tensor();
  Tensor grad_input, grad_weight;
  Tensor grad_residual = want_grad_residual && !keep_dz ? empty_like_dense(in.x, input.scalar_type()) : Tensor();
  std::array<Tensor, 3> sums;
  if (fuses_sums_and_dx(in, plan, keep_dz)) {
    std::tie(sums, grad_input) = fused_sums_and_dx(in, coefficients, grad_residual);
  } else {
    if (plan.sums) sums = channel_grad_sums(in, coefficients, dz);
    const Tensor centering = plan.centered ? centering_terms(in, sums[0], sums[1]) : Tensor();
    if (keep_dz) {
      BackwardInputs from_dz = in;  // dz as the gradient of an op without activation
      from_dz.dy = dz;
      from_dz.from = GradFrom::kDy;
      from_dz.residual = Tensor();
      if (output_mask[0]) grad_input = dx_pass(from_dz, coefficients, centering, Tensor());
      if (want_grad_residual) grad_residual = dz;
    } else if (plan.scaled_dy) {
      grad_input = normalize(in.dy, in.layout, coefficients, std::nullopt, {}, in.x);
    } else if (plan.elementwise) {
      grad_input = dx_pass(in, coefficients, centering, grad_residual);
    }
  }
  const auto& [sum_dz, sum_dz_xmu, sum_dslope] = sums;
  if (output_mask[1]) {  // sum(dz * (x - mean)) * invstd
    grad_weight = at::empty({C}, acc_options);
    FUSEDBN_DISPATCH_STATISTICS(in.acc, [&] {
      const scalar_t* sum = sum_dz_xmu.const_data_ptr<scalar_t>();
      const scalar_t* istd = in.invstd.const_data_ptr<scalar_t>();
      scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) gw[c] = grad_weight_of(sum[c], istd[c]);
    });
  }
  const auto param_dtype = grad_param_dtype(weight, bias, input);
  return {output_mask[0] ? grad_input : Tensor(), output_mask[1] ? grad_weight.to(param_dtype) : Tensor(),
          output_mask[2] ? sum_dz.to(param_dtype) : Tensor(), grad_residual,
          want_grad_slopes ? grad_of_activation_weight(sum_dslope, *activation_weight) : Tensor()};
}

// The two halves of the backward apart, for statistics computed over several processes (SyncBatchNorm).
std::tuple<Tensor, Tensor, Tensor> grad_sums(const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                                             const Tensor& mean, const Tensor& invstd, const OptTensor& bias,
                                             const OptTensor& output, const OptTensor& residual,
                                             c10::string_view activation, double activation_param,
                                             const OptTensor& activation_weight) {
  const BackwardInputs in = prepare_backward(grad_output, input, weight, mean, invstd, bias, output, residual,
                                             activation, activation_param, activation_weight);
  const auto [sum_dz, sum_dz_xmu, sum_dslope] = channel_grad_sums(in, backward_coefficients(in));
  return {sum_dz, sum_dz_xmu, sum_dslope};
}

std::tuple<Tensor, Tensor> backward_elemt(const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                                          const Tensor& mean, const Tensor& invstd, const Tensor& mean_dz,
                                          const Tensor& proj, const OptTensor& bias, const OptTensor& output,
                                          const OptTensor& residual, c10::string_view activation,
                                          double activation_param, bool want_grad_residual,
                                          const OptTensor& activation_weight) {
  const BackwardElemtInputs in = prepare_backward_elemt(grad_output, input, weight, mean, invstd, mean_dz, proj, bias,
                                                        output, residual, activation, activation_param,
                                                        activation_weight);
  Tensor grad_residual = want_grad_residual ? empty_like_dense(in.x, input.scalar_type()) : Tensor();
  const Tensor centering = at::stack({in.mean_dz, in.proj});
  Tensor grad_input = dx_pass(in, backward_coefficients(in), centering, grad_residual);
  return {grad_input, grad_residual};
}

// Diagnostic (tests only): how many distinct threads ran the tiles of the reduction over `input`, through
// the same parallel_for_tiles the ops use; more than one wherever the build is parallel and torch has
// several threads.
int64_t reduction_threads(const Tensor& input) {
  std::mutex lock;
  std::set<std::thread::id> threads;
  parallel_for_tiles(channel_layout(dense_input(input)), [&](const Tile&, auto) {
    const std::lock_guard<std::mutex> guard(lock);
    threads.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(threads.size());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedbn, m) { m.def("_reduction_threads(Tensor input) -> int"); }

TORCH_LIBRARY_IMPL(fusedbn, CPU, m) {
  m.impl("_reduction_threads", &reduction_threads);
  register_kernels(m, &forward_train, &forward_eval, &backward, &batch_stats, &grad_sums, &backward_elemt);
}

}  // namespace fusedbn::cpu
