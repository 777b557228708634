// Per-tile elementwise passes of the CPU kernels: one read and one write per value, per-channel
// coefficients indexed with a compile-time channel stride so the inner loop vectorizes in both layouts.
#pragma once

#include "tiles.h"

namespace fusedbn::cpu {

// y = (x - mean[c]) * alpha[c] + beta[c]. Centering before scaling keeps the output exact for inputs
// whose mean is large next to their spread (x * alpha + (beta - mean * alpha) would cancel).
template <typename scalar_t, typename acc_t, int kChannelStride>
void tile_normalize(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const acc_t* __restrict__ mean, const acc_t* __restrict__ alpha,
                    const acc_t* __restrict__ beta, const Tile& tile) {
  int64_t channel = tile.channel;
  for (int64_t r = 0; r < tile.rows; ++r) {
    const acc_t* __restrict__ mu = mean + channel;
    const acc_t* __restrict__ a = alpha + channel;
    const acc_t* __restrict__ b = beta + channel;
    const int64_t base = tile.offset + r * tile.ld;
    for (int64_t j = 0; j < tile.width; ++j) {
      const int64_t c = j * kChannelStride;
      y[base + j] = static_cast<scalar_t>((static_cast<acc_t>(x[base + j]) - mu[c]) * a[c] + b[c]);
    }
    channel += tile.row_channel_step;
    if (channel >= tile.channels) channel -= tile.channels;
  }
}

// dx = (dy - mean_dy[c] - (x - mean[c]) * proj[c]) * a[c], the training backward. Subtracting before
// scaling by a = w * invstd avoids the cancellation between a*dy and a*mean_dy when invstd is large.
template <typename scalar_t, typename acc_t, int kChannelStride>
void tile_backward_elemt(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, scalar_t* __restrict__ dx, const acc_t* __restrict__ mean,
                         const acc_t* __restrict__ mean_dy, const acc_t* __restrict__ proj, const acc_t* __restrict__ a, const Tile& tile) {
  int64_t channel = tile.channel;
  for (int64_t r = 0; r < tile.rows; ++r) {
    const acc_t* __restrict__ mu = mean + channel;
    const acc_t* __restrict__ mdy = mean_dy + channel;
    const acc_t* __restrict__ pc = proj + channel;
    const acc_t* __restrict__ ac = a + channel;
    const int64_t base = tile.offset + r * tile.ld;
    for (int64_t j = 0; j < tile.width; ++j) {
      const int64_t c = j * kChannelStride;
      const acc_t xmu = static_cast<acc_t>(x[base + j]) - mu[c];
      dx[base + j] = static_cast<scalar_t>((static_cast<acc_t>(dy[base + j]) - mdy[c] - xmu * pc[c]) * ac[c]);
    }
    channel += tile.row_channel_step;
    if (channel >= tile.channels) channel -= tile.channels;
  }
}

}  // namespace fusedbn::cpu
