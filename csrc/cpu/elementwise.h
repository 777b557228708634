// Per-tile elementwise passes of the CPU kernels: one read and one write per value (plus the residual
// and the activation, epilogue.h), per-channel coefficients indexed with a compile-time channel stride so
// the inner loop vectorizes in both layouts. Activations with an exp, erf or tanh run over spans of kSpan
// values in torch's vectors (vec_math.h); the others inline.
#pragma once

#include "vec_math.h"
#include "tiles.h"

namespace fusedbn::cpu {

// Values per span of the vectorized activations: a stack buffer of them stays in L1.
constexpr int64_t kSpan = 256;

// The channel of the first value of the tile's next row.
inline int64_t next_row_channel(const Tile& tile, int64_t channel) {
  channel += tile.row_channel_step;
  return channel >= tile.channels ? channel - tile.channels : channel;
}

// Calls body(j0, n) for the spans [j0, j0 + n) of [0, width), kSpan values at most.
template <typename F>
inline void for_each_span(int64_t width, F&& body) {
  for (int64_t j0 = 0; j0 < width; j0 += kSpan) body(j0, std::min(kSpan, width - j0));
}

// Calls f(i, n, z) for kSpan-value spans of an elementwise tile's values (its rows back to back: they are
// contiguous, ld == width), z[0..n) the values of elements i.. as fill(row, channel, j0, m, z) computes
// columns [j0, j0 + m) of a row of that (first) channel: the spans run across rows, so short rows (7x7)
// still fill the vectors of the activation.
template <typename acc_t, typename Fill, typename F>
inline void for_each_tile_span(const Tile& tile, Fill&& fill, F&& f) {
  acc_t z[kSpan];
  int64_t filled = 0, start = tile.offset;
  int64_t channel = tile.channel;
  for (int64_t r = 0; r < tile.rows; ++r, channel = next_row_channel(tile, channel)) {
    for (int64_t j0 = 0; j0 < tile.width;) {
      const int64_t m = std::min(tile.width - j0, kSpan - filled);
      fill(r, channel, j0, m, z + filled);
      filled += m;
      j0 += m;
      if (filled == kSpan) {
        f(start, filled, z);
        start += filled;
        filled = 0;
      }
    }
  }
  if (filled > 0) f(start, filled, z);
}

// y = act(bn(x) [+ residual]) with bn(x) = (x - mean[c]) * alpha[c] + beta[c], the activation's parameter
// param_for(param, slope, c) (epilogue.h).
template <typename scalar_t, typename acc_t, int kChannelStride, bool kAdd, Activation kAct>
void tile_normalize(const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual, scalar_t* __restrict__ y,
                    const acc_t* __restrict__ mean, const acc_t* __restrict__ alpha, const acc_t* __restrict__ beta,
                    const acc_t* __restrict__ slope, acc_t param, const Tile& tile) {
  using Act = ActivationFn<kAct>;
  if constexpr (Act::kTranscendental) {
    auto fill = [&](int64_t r, int64_t channel, int64_t j0, int64_t m, acc_t* __restrict__ z) {
      const int64_t i = tile.offset + r * tile.ld + j0;
      const scalar_t* __restrict__ xr = x + i;
      const scalar_t* __restrict__ rr = kAdd ? residual + i : nullptr;
      const int64_t c0 = channel + j0 * kChannelStride;
      const acc_t* __restrict__ mu = mean + c0;
      const acc_t* __restrict__ a = alpha + c0;
      const acc_t* __restrict__ b = beta + c0;
      for (int64_t j = 0; j < m; ++j) {
        const int64_t c = j * kChannelStride;
        acc_t zj = normalized(static_cast<acc_t>(xr[j]), mu[c], a[c], b[c]);
        if constexpr (kAdd) zj += static_cast<acc_t>(rr[j]);
        z[j] = zj;
      }
    };
    for_each_tile_span<acc_t>(tile, fill, [&](int64_t i, int64_t n, acc_t* __restrict__ z) {
      activation_span<kAct>(z, n, param);
      scalar_t* __restrict__ out = y + i;
      for (int64_t j = 0; j < n; ++j) out[j] = static_cast<scalar_t>(z[j]);
    });
    return;
  }
  int64_t channel = tile.channel;
  for (int64_t r = 0; r < tile.rows; ++r, channel = next_row_channel(tile, channel)) {
    const acc_t* __restrict__ mu = mean + channel;
    const acc_t* __restrict__ a = alpha + channel;
    const acc_t* __restrict__ b = beta + channel;
    const acc_t* __restrict__ s = slope + channel;
    const int64_t base = tile.offset + r * tile.ld;
    for (int64_t j = 0; j < tile.width; ++j) {
      const int64_t c = j * kChannelStride;
      acc_t z = normalized(static_cast<acc_t>(x[base + j]), mu[c], a[c], b[c]);
      if constexpr (kAdd) z += static_cast<acc_t>(residual[base + j]);
      y[base + j] = static_cast<scalar_t>(Act::forward(z, param_for<kAct>(param, s, c)));
    }
  }
}

// How a backward pass gets dz from dy (grad_through_activation, epilogue.h), as template arguments.
template <Activation kAct_, GradFrom kFrom_, bool kResidual_>
struct GradRule {
  static constexpr Activation kAct = kAct_;
  static constexpr GradFrom kFrom = kFrom_;
  static constexpr bool kResidual = kResidual_;
  // dz computed a span at a time in torch's vectors (dz_span) rather than value by value (dz_at).
  static constexpr bool kBuffered = kFrom_ == GradFrom::kRecompute && ActivationFn<kAct_>::kTranscendental;
  // The gradient sums also sum PReLU's weight gradient (dslope_at).
  static constexpr bool kSlopes = kAct_ == Activation::kPrelu;
};

// What the backward passes read dz from: dy, the op's output (kOutput), the residual (kRecompute with
// one), and the forward's alpha, beta and PReLU's slope (kRecompute, with the statistics' mean; alpha is
// also the dx pass's scale). Plain pointers the tile kernels copy into __restrict__ locals, so their loops vectorize.
template <typename scalar_t, typename acc_t>
struct GradSource {
  const scalar_t* dy;
  const scalar_t* out;       // kOutput, else null
  const scalar_t* residual;  // kRecompute with a residual, else null
  const acc_t* alpha;
  const acc_t* beta;
  const acc_t* slope;
  acc_t param;
  scalar_t* dz_out = nullptr;  // kBuffered rules in the gradient sums: where to keep dz for the dx pass
};

// dz of value i (input xv) with its channel's coefficients.
template <typename Rule, typename scalar_t, typename acc_t>
inline acc_t dz_at(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ out,
                   const scalar_t* __restrict__ residual, int64_t i, acc_t xv, acc_t mean, acc_t alpha, acc_t beta,
                   acc_t param) {
  const scalar_t o = Rule::kFrom == GradFrom::kOutput ? out[i] : scalar_t(0);
  const acc_t r = Rule::kResidual ? static_cast<acc_t>(residual[i]) : acc_t(0);
  return grad_through_activation<Rule::kAct, Rule::kFrom>(static_cast<acc_t>(dy[i]), xv, o, r, mean, alpha, beta,
                                                           param);
}

// PReLU's weight gradient of value i, dy * min(z, 0) (grad_slope), z recomputed as dz_at recomputes it.
template <typename Rule, typename scalar_t, typename acc_t>
inline acc_t dslope_at(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ residual, int64_t i, acc_t xv,
                       acc_t mean, acc_t alpha, acc_t beta) {
  const acc_t r = Rule::kResidual ? static_cast<acc_t>(residual[i]) : acc_t(0);
  return ActivationFn<Activation::kPrelu>::grad_slope(static_cast<acc_t>(dy[i]), normalized(xv, mean, alpha, beta) + r);
}

// dz[j] of the n values from element i on (kBuffered rules), column j's coefficients at j * kStride.
template <typename Rule, int kStride, typename scalar_t, typename acc_t>
inline void dz_span(const GradSource<scalar_t, acc_t>& source, const scalar_t* __restrict__ x, int64_t i, int64_t n,
                    const acc_t* __restrict__ mean, const acc_t* __restrict__ alpha, const acc_t* __restrict__ beta,
                    acc_t* __restrict__ dz) {
  const scalar_t* __restrict__ dy = source.dy;
  const scalar_t* __restrict__ residual = source.residual;
  acc_t z[kSpan];
  for (int64_t j = 0; j < n; ++j) {
    const int64_t c = j * kStride;
    acc_t zj = normalized(static_cast<acc_t>(x[i + j]), mean[c], alpha[c], beta[c]);
    if constexpr (Rule::kResidual) zj += static_cast<acc_t>(residual[i + j]);
    z[j] = zj;  // buffered rules are smooth activations: no ReLU rounding (grad_through_activation)
    dz[j] = static_cast<acc_t>(dy[i + j]);
  }
  activation_grad_span<Rule::kAct>(dz, z, n, source.param);
}

// dx per value (dx_of; mean_dz and proj per channel, read only when kCentered), and dz itself into
// grad_residual when asked.
template <typename scalar_t, typename acc_t, int kChannelStride, typename Rule, bool kWriteDz, bool kCentered>
void tile_backward_elemt(const GradSource<scalar_t, acc_t>& source, const scalar_t* __restrict__ x,
                         scalar_t* __restrict__ dx, scalar_t* __restrict__ grad_residual,
                         const acc_t* __restrict__ mean, const acc_t* __restrict__ mean_dz,
                         const acc_t* __restrict__ proj, const Tile& tile) {
  const scalar_t* __restrict__ dy = source.dy;
  const scalar_t* __restrict__ out = source.out;
  const scalar_t* __restrict__ residual = source.residual;
  const acc_t* __restrict__ alpha = source.alpha;
  const acc_t* __restrict__ beta = source.beta;
  const acc_t* __restrict__ slope = source.slope;
  const acc_t param = source.param;
  constexpr bool kRecompute = Rule::kFrom == GradFrom::kRecompute;
  int64_t channel = tile.channel;
  for (int64_t r = 0; r < tile.rows; ++r, channel = next_row_channel(tile, channel)) {
    const int64_t base = tile.offset + r * tile.ld;
    if constexpr (Rule::kBuffered) {
      for_each_span(tile.width, [&](int64_t j0, int64_t n) {
        acc_t dz[kSpan];
        const int64_t c0 = channel + j0 * kChannelStride;
        dz_span<Rule, kChannelStride>(source, x, base + j0, n, mean + c0, alpha + c0, beta + c0, dz);
        const scalar_t* __restrict__ xs = x + base + j0;
        scalar_t* __restrict__ dxs = dx + base + j0;
        for (int64_t j = 0; j < n; ++j) {
          const int64_t c = c0 + j * kChannelStride;
          dxs[j] = static_cast<scalar_t>(dx_of<kCentered>(dz[j], static_cast<acc_t>(xs[j]), mean[c],
                                                          kCentered ? mean_dz[c] : acc_t(0),
                                                          kCentered ? proj[c] : acc_t(0), alpha[c]));
        }
        if constexpr (kWriteDz) {
          for (int64_t j = 0; j < n; ++j) grad_residual[base + j0 + j] = static_cast<scalar_t>(dz[j]);
        }
      });
    } else {
      for (int64_t j = 0; j < tile.width; ++j) {
        const int64_t c = channel + j * kChannelStride;
        const int64_t i = base + j;
        const acc_t xv = static_cast<acc_t>(x[i]);
        const acc_t dz = dz_at<Rule>(dy, out, residual, i, xv, mean[c], kRecompute ? alpha[c] : acc_t(0),
                                     kRecompute ? beta[c] : acc_t(0), param_for<Rule::kAct>(param, slope, c));
        dx[i] = static_cast<scalar_t>(dx_of<kCentered>(dz, xv, mean[c], kCentered ? mean_dz[c] : acc_t(0),
                                                       kCentered ? proj[c] : acc_t(0), alpha[c]));
        if constexpr (kWriteDz) grad_residual[i] = static_cast<scalar_t>(dz);
      }
    }
  }
}

}  // namespace fusedbn::cpu
