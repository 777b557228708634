// Per-tile elementwise passes of the CPU kernels: one read and one write per value (plus the residual
// and relu epilogue, epilogue.h), per-channel coefficients indexed with a compile-time channel stride so
// the inner loop vectorizes in both layouts.
#pragma once

#include "../epilogue.h"
#include "tiles.h"

namespace fusedbn::cpu {

// Walks a tile's rows: body(row_base, channel) with the channel of the row's first value.
template <typename Body>
void for_each_row(const Tile& tile, Body&& body) {
  int64_t channel = tile.channel;
  for (int64_t r = 0; r < tile.rows; ++r) {
    body(tile.offset + r * tile.ld, channel);
    channel += tile.row_channel_step;
    if (channel >= tile.channels) channel -= tile.channels;
  }
}

// y = relu?(bn(x) [+ residual]) with bn(x) = (x - mean[c]) * alpha[c] + beta[c].
template <typename scalar_t, typename acc_t, int kChannelStride, bool kAdd, bool kRelu>
void tile_normalize(const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual, scalar_t* __restrict__ y,
                    const acc_t* __restrict__ mean, const acc_t* __restrict__ alpha, const acc_t* __restrict__ beta,
                    const Tile& tile) {
  for_each_row(tile, [&](int64_t base, int64_t channel) {
    const acc_t* __restrict__ mu = mean + channel;
    const acc_t* __restrict__ a = alpha + channel;
    const acc_t* __restrict__ b = beta + channel;
    for (int64_t j = 0; j < tile.width; ++j) {
      const int64_t c = j * kChannelStride;
      acc_t z = normalized(static_cast<acc_t>(x[base + j]), mu[c], a[c], b[c]);
      if constexpr (kAdd) z += static_cast<acc_t>(residual[base + j]);
      if constexpr (kRelu) z = relu(z);
      y[base + j] = static_cast<scalar_t>(z);
    }
  });
}

// dz, the gradient reaching BatchNorm's output: dy, or dy through the relu that followed it, its mask
// read from the op's output or recomputed from x with the forward's coefficients (alpha, beta).
template <typename scalar_t, typename acc_t, ReluMask kMask>
struct OutputGrad {
  const scalar_t* __restrict__ dy;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ out;  // kFromOutput
  const acc_t* __restrict__ mean;    // kFromInput: the forward's coefficients
  const acc_t* __restrict__ alpha;
  const acc_t* __restrict__ beta;

  acc_t operator()(int64_t i, int64_t c) const {
    const acc_t g = static_cast<acc_t>(dy[i]);
    if constexpr (kMask == ReluMask::kFromOutput) {
      return relu_grad(g, out[i]);
    } else if constexpr (kMask == ReluMask::kFromInput) {
      return relu_grad(g, static_cast<scalar_t>(normalized(static_cast<acc_t>(x[i]), mean[c], alpha[c], beta[c])));
    } else {
      return g;
    }
  }
};

// dx = (dz - mean_dz[c] - (x - mean[c]) * proj[c]) * a[c] (training; eval statistics pass mean_dz = proj
// = 0), and dz itself into grad_residual when asked. Subtracting before scaling by a = w * invstd avoids
// the cancellation between a*dz and a*mean_dz when invstd is large.
template <typename scalar_t, typename acc_t, int kChannelStride, bool kWriteDz, typename Grad>
void tile_backward_elemt(const Grad& grad, const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                         scalar_t* __restrict__ grad_residual, const acc_t* __restrict__ mean,
                         const acc_t* __restrict__ mean_dz, const acc_t* __restrict__ proj,
                         const acc_t* __restrict__ a, const Tile& tile) {
  for_each_row(tile, [&](int64_t base, int64_t channel) {
    const acc_t* __restrict__ mu = mean + channel;
    const acc_t* __restrict__ mdz = mean_dz + channel;
    const acc_t* __restrict__ pc = proj + channel;
    const acc_t* __restrict__ ac = a + channel;
    for (int64_t j = 0; j < tile.width; ++j) {
      const int64_t c = j * kChannelStride;
      const acc_t dz = grad(base + j, channel + c);
      const acc_t xmu = static_cast<acc_t>(x[base + j]) - mu[c];
      dx[base + j] = static_cast<scalar_t>((dz - mdz[c] - xmu * pc[c]) * ac[c]);
      if constexpr (kWriteDz) grad_residual[base + j] = static_cast<scalar_t>(dz);
    }
  });
}

}  // namespace fusedbn::cpu
