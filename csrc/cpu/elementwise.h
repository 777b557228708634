// Per-tile elementwise passes of the CPU kernels: one read and one write per value (plus the residual
// and relu epilogue, epilogue.h), per-channel coefficients indexed with a compile-time channel stride so
// the inner loop vectorizes in both layouts.
#pragma once

#include "../epilogue.h"
#include "tiles.h"

namespace fusedbn::cpu {

// The channel of the first value of the tile's next row.
inline int64_t next_row_channel(const Tile& tile, int64_t channel) {
  channel += tile.row_channel_step;
  return channel >= tile.channels ? channel - tile.channels : channel;
}

// y = relu?(bn(x) [+ residual]) with bn(x) = (x - mean[c]) * alpha[c] + beta[c].
template <typename scalar_t, typename acc_t, int kChannelStride, bool kAdd, bool kRelu>
void tile_normalize(const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual, scalar_t* __restrict__ y,
                    const acc_t* __restrict__ mean, const acc_t* __restrict__ alpha, const acc_t* __restrict__ beta,
                    const Tile& tile) {
  int64_t channel = tile.channel;
  for (int64_t r = 0; r < tile.rows; ++r, channel = next_row_channel(tile, channel)) {
    const acc_t* __restrict__ mu = mean + channel;
    const acc_t* __restrict__ a = alpha + channel;
    const acc_t* __restrict__ b = beta + channel;
    const int64_t base = tile.offset + r * tile.ld;
    for (int64_t j = 0; j < tile.width; ++j) {
      const int64_t c = j * kChannelStride;
      acc_t z = normalized(static_cast<acc_t>(x[base + j]), mu[c], a[c], b[c]);
      if constexpr (kAdd) z += static_cast<acc_t>(residual[base + j]);
      if constexpr (kRelu) z = relu(z);
      y[base + j] = static_cast<scalar_t>(z);
    }
  }
}

// Where the backward passes read dz (grad_through_relu, epilogue.h): dy, and for relu's mask the op's
// output (kFromOutput) or the forward's alpha and beta (kFromInput, with the statistics' mean). Plain
// pointers the tile kernels copy into __restrict__ locals, so their loops vectorize.
template <typename scalar_t, typename acc_t>
struct GradSource {
  const scalar_t* dy;
  const scalar_t* out;   // kFromOutput, else null
  const acc_t* alpha;    // kFromInput, else null
  const acc_t* beta;
};

// The output value at i for relu's mask; 0 when the mask is not read from the output.
template <ReluMask kMask, typename scalar_t>
inline scalar_t output_at(const scalar_t* __restrict__ out, int64_t i) {
  if constexpr (kMask == ReluMask::kFromOutput) {
    return out[i];
  } else {
    return scalar_t(0);
  }
}

// dx = (dz - mean_dz[c] - (x - mean[c]) * proj[c]) * a[c] (kCentered: training), dz * a[c] under eval
// statistics (x does not enter: a NaN input keeps a finite gradient, as in torch), and dz itself into
// grad_residual when asked. Subtracting before scaling by a = w * invstd avoids the cancellation between
// a*dz and a*mean_dz when invstd is large.
template <typename scalar_t, typename acc_t, int kChannelStride, ReluMask kMask, bool kWriteDz, bool kCentered>
void tile_backward_elemt(const GradSource<scalar_t, acc_t>& source, const scalar_t* __restrict__ x,
                         scalar_t* __restrict__ dx, scalar_t* __restrict__ grad_residual,
                         const acc_t* __restrict__ mean, const acc_t* __restrict__ mean_dz,
                         const acc_t* __restrict__ proj, const acc_t* __restrict__ a, const Tile& tile) {
  const scalar_t* __restrict__ dy = source.dy;
  const scalar_t* __restrict__ out = source.out;
  const acc_t* __restrict__ alpha = source.alpha;
  const acc_t* __restrict__ beta = source.beta;
  int64_t channel = tile.channel;
  for (int64_t r = 0; r < tile.rows; ++r, channel = next_row_channel(tile, channel)) {
    const int64_t base = tile.offset + r * tile.ld;
    for (int64_t j = 0; j < tile.width; ++j) {
      const int64_t c = channel + j * kChannelStride;
      const int64_t i = base + j;
      const acc_t xv = static_cast<acc_t>(x[i]);
      const acc_t dz = grad_through_relu<kMask>(static_cast<acc_t>(dy[i]), xv, output_at<kMask>(out, i), mean[c],
                                                kMask == ReluMask::kFromInput ? alpha[c] : acc_t(0),
                                                kMask == ReluMask::kFromInput ? beta[c] : acc_t(0));
      if constexpr (kCentered) {
        dx[i] = static_cast<scalar_t>((dz - mean_dz[c] - (xv - mean[c]) * proj[c]) * a[c]);
      } else {
        dx[i] = static_cast<scalar_t>(dz * a[c]);
      }
      if constexpr (kWriteDz) grad_residual[i] = static_cast<scalar_t>(dz);
    }
  }
}

}  // namespace fusedbn::cpu
