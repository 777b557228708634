// Per-tile reductions of the CPU kernels. Each tile writes its own slot of a [parts, C] partial buffer;
// the caller merges the parts in a fixed order.
#pragma once

#include <algorithm>
#include <vector>

#include "../welford.h"
#include "elementwise.h"
#include "tiles.h"

namespace fusedbn::cpu {

// Values per block in the reductions: a block is read twice (sum, then squared deviations), so it must
// stay in L1/L2 between the two reads; memory then sees one read per value. Channels-last blocks take at
// least kMinBlockRows rows, so the per-column merge after each block stays a small fraction of the work
// when C is large.
constexpr int64_t kBlockValues = 4096;
constexpr int64_t kMinBlockRows = 16;

inline int64_t block_rows_for(int64_t width) {
  return std::max<int64_t>(kMinBlockRows, kBlockValues / std::max<int64_t>(1, width));
}

// Sum of v[0..n) by pairwise (tree) summation, whose rounding error grows like log(n) rather than n.
// Overwrites v.
template <typename acc_t>
acc_t pairwise_sum(acc_t* v, int64_t n) {
  if (n == 0) return acc_t(0);
  while (n > 1) {
    const int64_t half = n / 2, upper = n - half;
    for (int64_t i = 0; i < half; ++i) v[i] += v[upper + i];
    n = upper;
  }
  return v[0];
}

// Independent accumulators for a reduction over one contiguous run: the compiler vectorizes across them
// without being allowed to reassociate a single float sum.
constexpr int kLanes = 64;

// sum of f(j) over j in [0, n) (f gives acc_t), in kLanes accumulators combined pairwise.
template <typename acc_t, typename F>
acc_t run_sum(int64_t n, F f) {
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += f(j + l);
  }
  for (int l = 0; j < n; ++j, ++l) lanes[l] += f(j);
  return pairwise_sum(lanes, kLanes);
}

// Welford statistics of one tile, without a division per value. Channels-last, and channels-first runs
// shorter than kLongRun: for each block of rows, per-column block mean and M2 about it (two passes over the
// cached block), then a Chan merge into the running column state; all columns have the same count, so the
// merge weights are shared scalars. Long channels-first runs reduce run by run.
// Values are shifted by the tile's first row (one shift per channel) before summing, so a channel whose
// mean is large next to its spread (mean 1e4, std 1) loses no precision to the sums.
template <typename scalar_t, typename acc_t, int kChannelStride>
void tile_welford(const scalar_t* __restrict__ x, const Tile& tile, int64_t C, WelfordPartial<acc_t>* partials) {
  const int64_t W = tile.width;
  WelfordPartial<acc_t>* out = partials + tile.part * C + tile.channel;
  if (tile.rows == 0 || W == 0) {  // an empty batch: empty partials, harmless to merge
    std::fill(out, out + (kChannelStride == 1 ? W : 1), WelfordPartial<acc_t>{});
    return;
  }
  if (kChannelStride == 0 && W >= kLongRun) {
    // One channel, long runs: each run of S values, in cache-sized chunks, gives a (count, mean, M2) by
    // two passes over the chunk (shifted by the tile's first value), merged into the channel's partial.
    const acc_t shift = static_cast<acc_t>(x[tile.offset]);
    WelfordPartial<acc_t> total{};
    for (int64_t r = 0; r < tile.rows; ++r) {
      const scalar_t* row = x + tile.offset + r * tile.ld;
      for (int64_t s0 = 0; s0 < W; s0 += kBlockValues) {
        const int64_t n = std::min(kBlockValues, W - s0);
        const scalar_t* chunk = row + s0;
        const acc_t chunk_mean =
            run_sum<acc_t>(n, [&](int64_t j) { return static_cast<acc_t>(chunk[j]) - shift; }) / static_cast<acc_t>(n);
        const acc_t chunk_m2 = run_sum<acc_t>(n, [&](int64_t j) {
          const acc_t d = (static_cast<acc_t>(chunk[j]) - shift) - chunk_mean;
          return d * d;
        });
        total = welford_merge(total, WelfordPartial<acc_t>{chunk_mean, chunk_m2, n});
      }
    }
    *out = WelfordPartial<acc_t>{shift + total.mean, total.m2, total.count};
    return;
  }
  std::vector<acc_t> shift_buf(W), mean_buf(W, acc_t(0)), m2_buf(W, acc_t(0)), block_mean_buf(W), block_m2_buf(W);
  // Restrict-qualified views so the compiler vectorizes the column loops.
  acc_t* __restrict__ shift = shift_buf.data();
  acc_t* __restrict__ mean = mean_buf.data();
  acc_t* __restrict__ m2 = m2_buf.data();
  acc_t* __restrict__ block_mean = block_mean_buf.data();
  acc_t* __restrict__ block_m2 = block_m2_buf.data();
  for (int64_t j = 0; j < W; ++j) shift[j] = static_cast<acc_t>(x[tile.offset + j * kChannelStride]);
  const int64_t block_rows = block_rows_for(W);
  int64_t seen = 0;
  for (int64_t r0 = 0; r0 < tile.rows; r0 += block_rows) {
    const int64_t nb = std::min(block_rows, tile.rows - r0);
    std::fill(block_mean, block_mean + W, acc_t(0));
    std::fill(block_m2, block_m2 + W, acc_t(0));
    for (int64_t r = r0; r < r0 + nb; ++r) {
      const scalar_t* row = x + tile.offset + r * tile.ld;
      for (int64_t j = 0; j < W; ++j) block_mean[j] += static_cast<acc_t>(row[j]) - shift[j];
    }
    const acc_t inv_nb = acc_t(1) / static_cast<acc_t>(nb);
    for (int64_t j = 0; j < W; ++j) block_mean[j] *= inv_nb;
    for (int64_t r = r0; r < r0 + nb; ++r) {
      const scalar_t* row = x + tile.offset + r * tile.ld;
      for (int64_t j = 0; j < W; ++j) {
        const acc_t d = (static_cast<acc_t>(row[j]) - shift[j]) - block_mean[j];
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
  if constexpr (kChannelStride == 1) {
    for (int64_t j = 0; j < W; ++j) out[j] = WelfordPartial<acc_t>{shift[j] + mean[j], m2[j], seen};
  } else {
    // Short runs of one channel (one shift): its W columns have `seen` values each, so
    // M2 = sum_j M2_j + seen * sum_j (mean_j - mean)^2.
    std::copy(mean, mean + W, block_mean);
    const acc_t channel_mean = pairwise_sum(block_mean, W) / static_cast<acc_t>(W);
    for (int64_t j = 0; j < W; ++j) block_m2[j] = (mean[j] - channel_mean) * (mean[j] - channel_mean);
    const acc_t channel_m2 = pairwise_sum(m2, W) + static_cast<acc_t>(seen) * pairwise_sum(block_m2, W);
    *out = WelfordPartial<acc_t>{shift[0] + channel_mean, channel_m2, seen * W};
  }
}

// Per channel: sum(dz) and sum(dz * (x - mean)), the two reductions of the batch-norm backward, with dz
// read through relu's mask (grad_through_relu, epilogue.h). Channels-first: lane sums per run.
// Channels-last: per block of rows into columns, then blocks into the tile's columns, so no single float
// accumulator takes more than a few thousand terms.
template <typename scalar_t, typename acc_t, int kChannelStride, ReluMask kMask>
void tile_grad_sums(const GradSource<scalar_t, acc_t>& source, const scalar_t* __restrict__ x,
                    const acc_t* __restrict__ mean, const Tile& tile, int64_t C, acc_t* __restrict__ sum_dz,
                    acc_t* __restrict__ sum_dz_xmu) {
  const scalar_t* __restrict__ dy = source.dy;
  const scalar_t* __restrict__ out = source.out;
  const acc_t* __restrict__ alpha = source.alpha;
  const acc_t* __restrict__ beta = source.beta;
  auto dz_at = [&](int64_t i, int64_t c) {
    return grad_through_relu<kMask>(static_cast<acc_t>(dy[i]), static_cast<acc_t>(x[i]), output_at<kMask>(out, i),
                                    mean[c], kMask == ReluMask::kFromInput ? alpha[c] : acc_t(0),
                                    kMask == ReluMask::kFromInput ? beta[c] : acc_t(0));
  };
  const int64_t W = tile.width;
  const int64_t slot = tile.part * C + tile.channel;
  if (kChannelStride == 0 && W >= kLongRun) {
    // One channel, long runs: lane sums over each run (the second pass re-reads the run from cache).
    const int64_t c = tile.channel;
    const acc_t mu = mean[c];
    acc_t total_dz = 0, total_dz_xmu = 0;
    for (int64_t r = 0; r < tile.rows; ++r) {
      const int64_t base = tile.offset + r * tile.ld;
      total_dz += run_sum<acc_t>(W, [&](int64_t j) { return dz_at(base + j, c); });
      total_dz_xmu += run_sum<acc_t>(
          W, [&](int64_t j) { return dz_at(base + j, c) * (static_cast<acc_t>(x[base + j]) - mu); });
    }
    sum_dz[slot] = total_dz;
    sum_dz_xmu[slot] = total_dz_xmu;
    return;
  }
  std::vector<acc_t> col_dz_buf(W, acc_t(0)), col_dz_xmu_buf(W, acc_t(0)), block_dz_buf(W), block_dz_xmu_buf(W);
  acc_t* __restrict__ col_dz = col_dz_buf.data();
  acc_t* __restrict__ col_dz_xmu = col_dz_xmu_buf.data();
  acc_t* __restrict__ block_dz = block_dz_buf.data();
  acc_t* __restrict__ block_dz_xmu = block_dz_xmu_buf.data();
  const int64_t block_rows = block_rows_for(W);
  for (int64_t r0 = 0; r0 < tile.rows; r0 += block_rows) {
    std::fill(block_dz, block_dz + W, acc_t(0));
    std::fill(block_dz_xmu, block_dz_xmu + W, acc_t(0));
    for (int64_t r = r0; r < std::min(tile.rows, r0 + block_rows); ++r) {
      const int64_t base = tile.offset + r * tile.ld;
      for (int64_t j = 0; j < W; ++j) {
        const int64_t c = tile.channel + j * kChannelStride;
        const acc_t g = dz_at(base + j, c);
        block_dz[j] += g;
        block_dz_xmu[j] += g * (static_cast<acc_t>(x[base + j]) - mean[c]);
      }
    }
    for (int64_t j = 0; j < W; ++j) {
      col_dz[j] += block_dz[j];
      col_dz_xmu[j] += block_dz_xmu[j];
    }
  }
  if constexpr (kChannelStride == 1) {
    std::copy(col_dz, col_dz + W, sum_dz + slot);
    std::copy(col_dz_xmu, col_dz_xmu + W, sum_dz_xmu + slot);
  } else {  // short runs of one channel
    sum_dz[slot] = pairwise_sum(col_dz, W);
    sum_dz_xmu[slot] = pairwise_sum(col_dz_xmu, W);
  }
}

}  // namespace fusedbn::cpu
