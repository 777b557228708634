// Per-tile reductions of the CPU kernels. Each tile writes its own slot of a [parts, C] partial buffer;
// the caller merges the parts in a fixed order.
#pragma once

#include <algorithm>
#include <vector>

#include "../welford.h"
#include "tiles.h"

namespace fusedbn::cpu {

// Rows per block in tile_welford: a block is read twice (sum, then squared deviations), so it must stay
// in L1/L2 between the two reads; memory then sees one read per value.
constexpr int64_t kBlockValues = 4096;

// Welford statistics of one tile, without a division per value: for each block of rows, per-column
// block mean and M2 about it (two passes over the cached block), then a Chan merge into the running
// column state. All columns of a tile have the same count, so the merge weights are shared scalars.
template <typename scalar_t, typename acc_t, int kChannelStride>
void tile_welford(const scalar_t* x, const Tile& tile, int64_t C, WelfordPartial<acc_t>* partials) {
  const int64_t W = tile.width;
  std::vector<acc_t> mean(W, acc_t(0)), m2(W, acc_t(0)), block_mean(W), block_m2(W);
  const int64_t block_rows = std::max<int64_t>(1, kBlockValues / std::max<int64_t>(1, W));
  int64_t seen = 0;
  for (int64_t r0 = 0; r0 < tile.rows; r0 += block_rows) {
    const int64_t nb = std::min(block_rows, tile.rows - r0);
    std::fill(block_mean.begin(), block_mean.end(), acc_t(0));
    std::fill(block_m2.begin(), block_m2.end(), acc_t(0));
    for (int64_t r = r0; r < r0 + nb; ++r) {
      const scalar_t* row = x + tile.offset + r * tile.ld;
      for (int64_t j = 0; j < W; ++j) block_mean[j] += static_cast<acc_t>(row[j]);
    }
    const acc_t inv_nb = acc_t(1) / static_cast<acc_t>(nb);
    for (int64_t j = 0; j < W; ++j) block_mean[j] *= inv_nb;
    for (int64_t r = r0; r < r0 + nb; ++r) {
      const scalar_t* row = x + tile.offset + r * tile.ld;
      for (int64_t j = 0; j < W; ++j) {
        const acc_t d = static_cast<acc_t>(row[j]) - block_mean[j];
        block_m2[j] += d * d;
      }
    }
    const acc_t nb_over_n = static_cast<acc_t>(nb) / static_cast<acc_t>(seen + nb);
    const acc_t cross = static_cast<acc_t>(seen) * nb_over_n;
    for (int64_t j = 0; j < W; ++j) {
      const acc_t delta = block_mean[j] - mean[j];
      mean[j] += delta * nb_over_n;
      m2[j] += block_m2[j] + delta * delta * cross;
    }
    seen += nb;
  }
  WelfordPartial<acc_t>* out = partials + tile.part * C + tile.channel;
  if constexpr (kChannelStride == 1) {
    for (int64_t j = 0; j < W; ++j) out[j] = WelfordPartial<acc_t>{mean[j], m2[j], seen};
  } else {
    // All W columns belong to one channel and have `seen` values each:
    // M2 = sum_j M2_j + seen * sum_j (mean_j - mean)^2.
    acc_t channel_mean = 0;
    for (int64_t j = 0; j < W; ++j) channel_mean += mean[j];
    channel_mean /= static_cast<acc_t>(std::max<int64_t>(1, W));
    acc_t channel_m2 = 0, spread = 0;
    for (int64_t j = 0; j < W; ++j) {
      const acc_t d = mean[j] - channel_mean;
      channel_m2 += m2[j];
      spread += d * d;
    }
    *out = WelfordPartial<acc_t>{channel_mean, channel_m2 + static_cast<acc_t>(seen) * spread, seen * W};
  }
}

// Per channel: sum(dy) and sum(dy * (x - mean)), the two reductions of the batch-norm backward.
template <typename scalar_t, typename acc_t, int kChannelStride>
void tile_grad_sums(const scalar_t* dy, const scalar_t* x, const acc_t* mean, const Tile& tile,
                    int64_t C, acc_t* sum_dy, acc_t* sum_dy_xmu) {
  const int64_t W = tile.width;
  std::vector<acc_t> col_dy(W, acc_t(0)), col_dy_xmu(W, acc_t(0));
  const acc_t* mu = mean + tile.channel;
  for (int64_t r = 0; r < tile.rows; ++r) {
    const int64_t base = tile.offset + r * tile.ld;
    for (int64_t j = 0; j < W; ++j) {
      const acc_t g = static_cast<acc_t>(dy[base + j]);
      col_dy[j] += g;
      col_dy_xmu[j] += g * (static_cast<acc_t>(x[base + j]) - mu[j * kChannelStride]);
    }
  }
  const int64_t slot = tile.part * C + tile.channel;
  if constexpr (kChannelStride == 1) {
    std::copy(col_dy.begin(), col_dy.end(), sum_dy + slot);
    std::copy(col_dy_xmu.begin(), col_dy_xmu.end(), sum_dy_xmu + slot);
  } else {
    acc_t total_dy = 0, total_dy_xmu = 0;
    for (int64_t j = 0; j < W; ++j) {
      total_dy += col_dy[j];
      total_dy_xmu += col_dy_xmu[j];
    }
    sum_dy[slot] = total_dy;
    sum_dy_xmu[slot] = total_dy_xmu;
  }
}

}  // namespace fusedbn::cpu
