// Per-tile reductions of the CPU kernels. Each tile writes its own slot of a [parts, C] partial buffer;
// the caller merges the parts pairwise (merge_rows_pairwise).
//
// Accuracy: no float accumulator takes a long sequential stream. Values are summed in short blocks (at
// most kMaxBlockRows rows of a column, or kLanes-way lanes over a chunk of one run), and the blocks'
// results, the chunks' and the parts' are merged pairwise, so rounding error grows like
// kMaxBlockRows + log2(count), in both layouts alike. Welford partials are all about one shift per
// channel (channel_shift, welford.h) and stay about it until the channel's total, so a mean of 1e4 next
// to a spread of 1 loses nothing to the merges.
#pragma once

#include <algorithm>
#include <vector>

#include "../welford.h"
#include "elementwise.h"
#include "tiles.h"

namespace fusedbn::cpu {

// Values per block of a channels-last tile (a block is read twice by tile_welford, so it must stay in
// L1/L2 between the reads), within [kMinBlockRows, kMaxBlockRows] rows: at least a few rows so the
// per-column merge after each block stays a small fraction of the work when C is large, at most a
// short sequential sum per column.
constexpr int64_t kBlockValues = 4096;
constexpr int64_t kMinBlockRows = 8;
constexpr int64_t kMaxBlockRows = 64;

inline int64_t block_rows_for(int64_t width) {
  return std::clamp<int64_t>(kBlockValues / std::max<int64_t>(1, width), kMinBlockRows, kMaxBlockRows);
}

// Merges rows[0..n) (row i is rows[i * width .. i * width + width)) column by column, pairwise (a tree of
// depth log2(n)); the result lands in row 0. Overwrites rows.
template <typename T, typename Merge>
void merge_rows_pairwise(T* rows, int64_t n, int64_t width, Merge merge) {
  while (n > 1) {
    const int64_t half = n / 2, upper = n - half;
    for (int64_t i = 0; i < half; ++i) {
      T* __restrict__ into = rows + i * width;
      const T* __restrict__ from = rows + (upper + i) * width;
      for (int64_t j = 0; j < width; ++j) into[j] = merge(into[j], from[j]);
    }
    n = upper;
  }
}

template <typename acc_t>
acc_t plus(acc_t a, acc_t b) {
  return a + b;
}

// Sum of v[0..n) by pairwise summation. Overwrites v.
template <typename acc_t>
acc_t pairwise_sum(acc_t* v, int64_t n) {
  if (n == 0) return acc_t(0);
  merge_rows_pairwise(v, n, 1, plus<acc_t>);
  return v[0];
}

// Independent accumulators for a reduction over one contiguous run: the compiler vectorizes across them
// without being allowed to reassociate a single float sum.
constexpr int kLanes = 64;

// sum of f(j) over j in [0, n) (f gives acc_t), n <= kBlockValues, in kLanes accumulators combined pairwise.
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

// Calls chunk(row_offset, s0, n) for each chunk of at most kBlockValues values of each of the tile's
// rows (long channels-first runs), in memory order: chunks_in(tile) calls.
template <typename F>
void for_each_chunk(const Tile& tile, F chunk) {
  for (int64_t r = 0; r < tile.rows; ++r) {
    for (int64_t s0 = 0; s0 < tile.width; s0 += kBlockValues) {
      chunk(tile.offset + r * tile.ld + s0, std::min(kBlockValues, tile.width - s0));
    }
  }
}

inline int64_t chunks_in(const Tile& tile) { return tile.rows * ((tile.width + kBlockValues - 1) / kBlockValues); }

// Welford statistics of one tile about the per-channel shifts, without a division per value.
// Long channels-first runs: each chunk of a run gives (count, mean, M2) by two passes over the cached
// chunk, and the chunks merge pairwise. Channels-last, and channels-first runs shorter than kLongRun: for
// each block of rows, per-column block mean and M2 about it (two passes over the cached block), the
// blocks merged pairwise (all columns of a block have the same count). Short channels-first runs then
// fold their W columns into the one channel.
template <typename scalar_t, typename acc_t, int kChannelStride>
void tile_welford(const scalar_t* __restrict__ x, const acc_t* __restrict__ shifts, const Tile& tile, int64_t C,
                  WelfordPartial<acc_t>* partials) {
  using Partial = WelfordPartial<acc_t>;
  const int64_t W = tile.width;
  Partial* out = partials + tile.part * C + tile.channel;
  if (tile.rows == 0 || W == 0) {  // an empty batch: empty partials, harmless to merge
    std::fill(out, out + (kChannelStride == 1 ? W : 1), Partial{});
    return;
  }
  if (kChannelStride == 0 && W >= kLongRun) {
    const acc_t shift = shifts[tile.channel];
    std::vector<Partial> chunk_partials(chunks_in(tile));
    Partial* next = chunk_partials.data();
    for_each_chunk(tile, [&](int64_t offset, int64_t n) {
      const scalar_t* chunk = x + offset;
      const acc_t chunk_mean =
          run_sum<acc_t>(n, [&](int64_t j) { return static_cast<acc_t>(chunk[j]) - shift; }) / static_cast<acc_t>(n);
      const acc_t chunk_m2 = run_sum<acc_t>(n, [&](int64_t j) {
        const acc_t d = (static_cast<acc_t>(chunk[j]) - shift) - chunk_mean;
        return d * d;
      });
      *next++ = Partial{chunk_mean, chunk_m2, n};
    });
    merge_rows_pairwise(chunk_partials.data(), static_cast<int64_t>(chunk_partials.size()), 1,
                        welford_merge<acc_t>);
    *out = chunk_partials[0];
    return;
  }
  const int64_t block_rows = block_rows_for(W);
  const int64_t blocks = (tile.rows + block_rows - 1) / block_rows;
  std::vector<Partial> block_partials(blocks * W);
  std::vector<acc_t> shift_buf(W), block_mean_buf(W), block_m2_buf(W);
  // Restrict-qualified views so the compiler vectorizes the column loops.
  acc_t* __restrict__ shift = shift_buf.data();
  acc_t* __restrict__ block_mean = block_mean_buf.data();
  acc_t* __restrict__ block_m2 = block_m2_buf.data();
  for (int64_t j = 0; j < W; ++j) shift[j] = shifts[tile.channel + j * kChannelStride];
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t r0 = b * block_rows, nb = std::min(block_rows, tile.rows - r0);
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
    Partial* dst = block_partials.data() + b * W;
    for (int64_t j = 0; j < W; ++j) dst[j] = Partial{block_mean[j], block_m2[j], nb};
  }
  merge_rows_pairwise(block_partials.data(), blocks, W, welford_merge<acc_t>);
  const Partial* columns = block_partials.data();
  if constexpr (kChannelStride == 1) {
    std::copy(columns, columns + W, out);
  } else {
    // Short runs of one channel: its W columns have `seen` values each, so
    // M2 = sum_j M2_j + seen * sum_j (mean_j - mean)^2.
    const int64_t seen = columns[0].count;
    for (int64_t j = 0; j < W; ++j) block_mean[j] = columns[j].mean;
    const acc_t channel_mean = pairwise_sum(block_mean, W) / static_cast<acc_t>(W);
    for (int64_t j = 0; j < W; ++j) {
      block_mean[j] = columns[j].m2;
      block_m2[j] = (columns[j].mean - channel_mean) * (columns[j].mean - channel_mean);
    }
    const acc_t channel_m2 = pairwise_sum(block_mean, W) + static_cast<acc_t>(seen) * pairwise_sum(block_m2, W);
    *out = Partial{channel_mean, channel_m2, seen * W};
  }
}

// Per channel: sum(dz) and sum(dz * (x - mean)), the two reductions of the batch-norm backward, with dz
// read through relu's mask (grad_through_relu, epilogue.h). Long channels-first runs: lane sums per chunk,
// chunks summed pairwise. Otherwise per block of kMinBlockRows rows into columns, blocks summed pairwise.
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
    // The second lane sum re-reads the chunk from cache.
    const int64_t c = tile.channel;
    const acc_t mu = mean[c];
    std::vector<acc_t> chunk_dz(chunks_in(tile)), chunk_dz_xmu(chunk_dz.size());
    int64_t k = 0;
    for_each_chunk(tile, [&](int64_t offset, int64_t n) {
      chunk_dz[k] = run_sum<acc_t>(n, [&](int64_t j) { return dz_at(offset + j, c); });
      chunk_dz_xmu[k++] = run_sum<acc_t>(
          n, [&](int64_t j) { return dz_at(offset + j, c) * (static_cast<acc_t>(x[offset + j]) - mu); });
    });
    sum_dz[slot] = pairwise_sum(chunk_dz.data(), k);
    sum_dz_xmu[slot] = pairwise_sum(chunk_dz_xmu.data(), k);
    return;
  }
  const int64_t blocks = std::max<int64_t>(1, (tile.rows + kMinBlockRows - 1) / kMinBlockRows);  // >= 1 zero row
  std::vector<acc_t> block_dz_buf(blocks * W, acc_t(0)), block_dz_xmu_buf(blocks * W, acc_t(0));
  for (int64_t b = 0; b < blocks; ++b) {
    acc_t* __restrict__ block_dz = block_dz_buf.data() + b * W;
    acc_t* __restrict__ block_dz_xmu = block_dz_xmu_buf.data() + b * W;
    for (int64_t r = b * kMinBlockRows; r < std::min(tile.rows, (b + 1) * kMinBlockRows); ++r) {
      const int64_t base = tile.offset + r * tile.ld;
      for (int64_t j = 0; j < W; ++j) {
        const int64_t c = tile.channel + j * kChannelStride;
        const acc_t g = dz_at(base + j, c);
        block_dz[j] += g;
        block_dz_xmu[j] += g * (static_cast<acc_t>(x[base + j]) - mean[c]);
      }
    }
  }
  merge_rows_pairwise(block_dz_buf.data(), blocks, W, plus<acc_t>);
  merge_rows_pairwise(block_dz_xmu_buf.data(), blocks, W, plus<acc_t>);
  acc_t* col_dz = block_dz_buf.data();
  acc_t* col_dz_xmu = block_dz_xmu_buf.data();
  if constexpr (kChannelStride == 1) {
    std::copy(col_dz, col_dz + W, sum_dz + slot);
    std::copy(col_dz_xmu, col_dz_xmu + W, sum_dz_xmu + slot);
  } else {  // short runs of one channel
    sum_dz[slot] = pairwise_sum(col_dz, W);
    sum_dz_xmu[slot] = pairwise_sum(col_dz_xmu, W);
  }
}

}  // namespace fusedbn::cpu
