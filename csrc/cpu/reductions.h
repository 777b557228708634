// Per-tile reductions of the CPU kernels. Each tile writes its own slots of a [parts, C] partial buffer
// (PartMoments for the statistics, plain sums for the gradients); the caller merges the parts pairwise
// (merge_moment_blocks, sum_rows_pairwise).
//
// Accuracy: no float accumulator takes a long sequential stream. Values are summed in short blocks (at
// most kMaxBlockRows rows of a column, or kLanes-way lanes over a chunk of a channel's runs, at most
// kBlockValues / kLanes values a lane), and the blocks'
// results, the chunks' and the parts' are merged pairwise, so rounding error grows like
// kMaxBlockRows + log2(count), in both layouts alike. Welford partials are all about one shift per
// channel (channel_shifts, near the channel's mean) and stay about it until the channel's total, so a mean
// of 1e4 next to a spread of 1 loses nothing to the merges.
#pragma once

#include <algorithm>
#include <array>
#include <vector>

#include "../welford.h"
#include "elementwise.h"
#include "tiles.h"

namespace fusedbn::cpu {

// Values per block of rows of a tile (a block is read twice by block_moments_two_pass, so it must stay in
// L1/L2 between the reads), within [kMinBlockRows, kMaxBlockRows] rows: enough rows that the per-column merge
// after each block stays a small fraction of the work when C is large, few enough that each column's
// sequential sum stays short. The gradient sums take blocks of kMinBlockRows rows.
constexpr int64_t kBlockValues = 4096;
constexpr int64_t kMinBlockRows = 16;
constexpr int64_t kMaxBlockRows = 64;

inline int64_t block_rows_for(int64_t width) {
  return std::clamp<int64_t>(kBlockValues / std::max<int64_t>(1, width), kMinBlockRows, kMaxBlockRows);
}

// The calling thread's scratch memory for one tile's buffers, kept from tile to tile: allocating, zeroing and
// freeing a tile's few vectors costs more than the work of a small tile. take(n) hands out consecutive slices
// of one buffer, uninitialized. A tile function makes one per element type, and tiles do not nest, so no two
// are alive on one thread.
template <typename T>
class TileScratch {
 public:
  explicit TileScratch(int64_t total) : data_(storage(total)) {}
  T* take(int64_t n) {
    T* slice = data_ + used_;
    used_ += n;
    return slice;
  }

 private:
  static T* storage(int64_t total) {
    thread_local std::vector<T> buffer;
    if (static_cast<int64_t>(buffer.size()) < total) buffer.resize(total);
    return buffer.data();
  }
  T* data_;
  int64_t used_ = 0;
};

template <typename acc_t>
acc_t plus(const acc_t& a, const acc_t& b) {
  return a + b;
}

// The pairwise (tree) order in which n rows merge into row 0, depth log2(n): merge_row(into, from) takes
// row `from` into row `into`, level by level.
template <typename MergeRow>
void merge_pairwise(int64_t n, MergeRow merge_row) {
  while (n > 1) {
    const int64_t half = n / 2, upper = n - half;
    for (int64_t i = 0; i < half; ++i) merge_row(i, upper + i);
    n = upper;
  }
}

// Sums rows[0..n) (row i is rows[i * ld .. i * ld + width), ld = width unless given) column by column,
// pairwise; the result lands in row 0. Overwrites rows. Each column's sum is the same whatever the width.
template <typename T>
void sum_rows_pairwise(T* rows, int64_t n, int64_t width, int64_t ld = 0) {
  ld = ld > 0 ? ld : width;
  merge_pairwise(n, [&](int64_t i, int64_t k) {
    T* __restrict__ into = rows + i * ld;
    const T* __restrict__ from = rows + k * ld;
    for (int64_t j = 0; j < width; ++j) into[j] += from[j];
  });
}

// pairwise_sum of a size known at compile time, its levels unrolled into straight-line vector code.
template <int64_t kN, typename acc_t>
acc_t pairwise_sum_of(acc_t* __restrict__ v) {
  int64_t n = kN;
#pragma GCC unroll 8
  for (int level = 0; level < 8 && n > 1; ++level) {
    const int64_t half = n / 2, upper = n - half;
    for (int64_t i = 0; i < half; ++i) v[i] += v[upper + i];
    n = upper;
  }
  return v[0];
}

// Sum of v[0..n) by pairwise summation, in sum_rows_pairwise's order (each level adds the upper half onto the
// lower in one vectorized loop). Overwrites v. The powers of two up to run_sum's lanes (a 4x4x4 run's columns,
// the lanes themselves) take the unrolled code: the loop's per-level overhead costs twice the additions there.
template <typename acc_t>
acc_t pairwise_sum(acc_t* v, int64_t n) {
  switch (n) {
    case 0: return acc_t(0);
    case 8: return pairwise_sum_of<8>(v);
    case 16: return pairwise_sum_of<16>(v);
    case 32: return pairwise_sum_of<32>(v);
    case 64: return pairwise_sum_of<64>(v);
  }
  while (n > 1) {
    const int64_t half = n / 2, upper = n - half;
#pragma GCC ivdep
    for (int64_t i = 0; i < half; ++i) v[i] += v[upper + i];  // i < half <= upper: the halves do not overlap
    n = upper;
  }
  return v[0];
}

// A stream of partials merged as the leaves of a balanced binary tree, left to right, in O(log n) space
// (a binary counter: the k-th push merges the subtrees its trailing one bits complete).
template <typename T, T (*kMerge)(const T&, const T&)>
class PairwiseStream {
 public:
  void push(T value) {
    for (int64_t pushed = count_++; pushed & 1; pushed >>= 1) value = kMerge(levels_[--depth_], value);
    levels_[depth_++] = value;
  }
  T total() const {  // T{} for an empty stream
    if (depth_ == 0) return T{};
    T value = levels_[depth_ - 1];
    for (int d = depth_ - 2; d >= 0; --d) value = kMerge(levels_[d], value);
    return value;
  }

 private:
  T levels_[64];
  int depth_ = 0;
  int64_t count_ = 0;
};

// Independent accumulators for a reduction over one contiguous run: the compiler vectorizes across them
// without being allowed to reassociate a single float sum.
constexpr int kLanes = 64;

// The kSums sums of f(r, j) (a std::array<acc_t, kSums>) over rows r < rows and columns j < n of a chunk, in one
// pass, each in kLanes accumulators (lane j mod kLanes of each row) combined pairwise. A chunk gives each lane
// at most kBlockValues / kLanes values (for_each_chunk).
template <int kSums, typename acc_t, typename F>
std::array<acc_t, kSums> run_sums(int64_t rows, int64_t n, F f) {
  acc_t lanes[kSums][kLanes] = {};
  const auto add = [&](int l, const std::array<acc_t, kSums>& v) {
    for (int s = 0; s < kSums; ++s) lanes[s][l] += v[s];
  };
  for (int64_t r = 0; r < rows; ++r) {
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) add(l, f(r, j + l));
    }
    for (int l = 0; j < n; ++j, ++l) add(l, f(r, j));
  }
  std::array<acc_t, kSums> sums;
  for (int s = 0; s < kSums; ++s) sums[s] = pairwise_sum_of<kLanes>(lanes[s]);
  return sums;
}

// run_sums of one sum, f(r, j) an acc_t.
template <typename acc_t, typename F>
acc_t run_sum(int64_t rows, int64_t n, F f) {
  return run_sums<1, acc_t>(rows, n, [&](int64_t r, int64_t j) { return std::array<acc_t, 1>{f(r, j)}; })[0];
}

// Channels-first runs of at least this many values are reduced run by run in run_sum's lanes; shorter runs
// fill too few lanes to beat the column sums of a tile's rows.
constexpr int64_t kMinLaneRun = kLanes / 2;

inline bool reduces_in_lanes(const Tile& tile) { return tile.columns_per_channel >= kMinLaneRun; }

// Calls chunk(offset, rows, n) for the chunks of the k-th channel of a channels-first tile (the k-th run of
// each row), in memory order: blocks of rows, each row cut into pieces of at most kBlockValues values, with
// at most kBlockValues / kLanes values in a lane of run_sum. The chunks, and so every sum, depend on the run
// length and the tile's rows alone.
template <typename F>
void for_each_chunk(const Tile& tile, int64_t k, F chunk) {
  const int64_t span = tile.columns_per_channel, piece = std::min(span, kBlockValues);
  const int64_t rows_per_chunk = std::max<int64_t>(1, kBlockValues / (kLanes * ((piece + kLanes - 1) / kLanes)));
  for (int64_t r0 = 0; r0 < tile.rows; r0 += rows_per_chunk) {
    for (int64_t s0 = 0; s0 < span; s0 += piece) {
      chunk(tile.offset + k * span + r0 * tile.ld + s0, std::min(rows_per_chunk, tile.rows - r0),
            std::min(piece, span - s0));
    }
  }
}

// Merges n blocks of Welford moments of `width` columns (block i: means[i * width ...], m2s likewise, and
// counts[i] values in each of its columns) pairwise into block 0, in vectorized column loops: the merge
// weights are the blocks' counts, shared by their columns. A non-finite result is recomputed by the
// caller (for_each_channel_moments), so the plain Chan formula serves.
template <typename acc_t>
void merge_moment_blocks(int64_t* counts, acc_t* means, acc_t* m2s, int64_t n, int64_t width) {
  merge_pairwise(n, [&](int64_t i, int64_t k) {
    const int64_t total = counts[i] + counts[k];
    const acc_t nb_over_n = total > 0 ? static_cast<acc_t>(counts[k]) / static_cast<acc_t>(total) : 0;
    const acc_t na_nb_over_n = static_cast<acc_t>(counts[i]) * nb_over_n;
    acc_t* __restrict__ into_mean = means + i * width;
    acc_t* __restrict__ into_m2 = m2s + i * width;
    const acc_t* __restrict__ from_mean = means + k * width;
    const acc_t* __restrict__ from_m2 = m2s + k * width;
    for (int64_t j = 0; j < width; ++j) {
      chan_merge_into(into_mean[j], into_m2[j], from_mean[j], from_m2[j], nb_over_n, na_nb_over_n);
    }
    counts[i] = total;
  });
}

// The parts of a reduction: per part p, the (mean, M2) of each channel about its shift, [parts, C], and the
// count of values behind each (the same for every channel: all tiles of a part cover the same rows).
template <typename acc_t>
struct PartMoments {
  int64_t channels;
  std::vector<int64_t> counts;
  std::vector<acc_t> means, m2s;

  PartMoments(int64_t parts, int64_t channels)
      : channels(channels), counts(parts, 0), means(parts * channels, acc_t(0)), m2s(parts * channels, acc_t(0)) {}
  void merge_pairwise() {
    merge_moment_blocks(counts.data(), means.data(), m2s.data(), static_cast<int64_t>(counts.size()), channels);
  }
};

// Rows averaged for the channels-last shifts.
constexpr int64_t kShiftSamples = 16;

// The shift every partial of a channel is taken about (see the top of this file). Channels-last: the mean of
// the channel's values in the first kShiftSamples rows, near the channel's mean so that
// block_moments_one_pass rarely needs a second pass. Channels-first (two-pass blocks, where any shift of
// the order of the values serves), and where that mean is not finite: channel_shift of the channel's first
// value (welford.h).
template <typename scalar_t, typename acc_t>
std::vector<acc_t> channel_shifts(const scalar_t* x, const ChannelLayout& layout) {
  const int64_t C = layout.C;
  std::vector<acc_t> shifts(C, acc_t(0));
  if (layout.count_per_channel() == 0) return shifts;
  const auto first_value = [&](int64_t c) {
    return channel_shift(static_cast<acc_t>(x[layout.channels_last ? c : c * layout.S]));
  };
  if (!layout.channels_last) {
    for (int64_t c = 0; c < C; ++c) shifts[c] = first_value(c);
    return shifts;
  }
  const int64_t samples = std::min(kShiftSamples, layout.rows());
  for (int64_t k = 0; k < samples; ++k) {
    for (int64_t c = 0; c < C; ++c) shifts[c] += static_cast<acc_t>(x[k * C + c]);
  }
  for (int64_t c = 0; c < C; ++c) {
    shifts[c] /= static_cast<acc_t>(samples);
    if (!std::isfinite(shifts[c])) shifts[c] = first_value(c);
  }
  return shifts;
}

// Per column j < W of rows[r * ld + j], r < n (n >= 1): the mean about shift[j] and M2, added into mean[j]
// and m2[j] (zeros), by two passes (the second re-reads the block from cache).
template <typename scalar_t, typename acc_t>
void block_moments_two_pass(const scalar_t* __restrict__ rows, int64_t ld, int64_t n, int64_t W,
                            const acc_t* __restrict__ shift, acc_t* __restrict__ mean, acc_t* __restrict__ m2) {
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t* __restrict__ row = rows + r * ld;
    for (int64_t j = 0; j < W; ++j) mean[j] += static_cast<acc_t>(row[j]) - shift[j];
  }
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  for (int64_t j = 0; j < W; ++j) mean[j] *= inv_n;
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t* __restrict__ row = rows + r * ld;
    for (int64_t j = 0; j < W; ++j) {
      const acc_t d = (static_cast<acc_t>(row[j]) - shift[j]) - mean[j];
      m2[j] += d * d;
    }
  }
}

// A column's one-pass M2 = s2 - s1^2/n (s1, s2 the sums of the shifted values and of their squares) is
// trusted while s2 <= kOnePassRatio * M2: its rounding error is then within kOnePassRatio of the two-pass
// sum's. With the shifts near the channels' means (channel_shifts) and at least kMinBlockRows values a
// column, about one column in a hundred fails; those are recomputed by two passes.
constexpr int kOnePassRatio = 2;

// What block_moments_two_pass computes (mean and m2 zeros on entry), in one pass over the block but for the
// columns whose M2 is not trusted; sum_sq is scratch for W values.
template <typename scalar_t, typename acc_t>
void block_moments_one_pass(const scalar_t* __restrict__ rows, int64_t ld, int64_t n, int64_t W,
                            const acc_t* __restrict__ shift, acc_t* __restrict__ mean, acc_t* __restrict__ m2,
                            acc_t* __restrict__ sum_sq) {
  // mean holds the sum s1 until the division.
  std::fill(sum_sq, sum_sq + W, acc_t(0));
  // Four rows per sweep, so each column's two sums are loaded and stored once per four values.
  int64_t r = 0;
  for (; r + 4 <= n; r += 4) {
    const scalar_t* __restrict__ row = rows + r * ld;
    for (int64_t j = 0; j < W; ++j) {
      const acc_t d0 = static_cast<acc_t>(row[j]) - shift[j], d1 = static_cast<acc_t>(row[ld + j]) - shift[j];
      const acc_t d2 = static_cast<acc_t>(row[2 * ld + j]) - shift[j];
      const acc_t d3 = static_cast<acc_t>(row[3 * ld + j]) - shift[j];
      mean[j] += (d0 + d1) + (d2 + d3);
      sum_sq[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
    }
  }
  for (; r < n; ++r) {
    const scalar_t* __restrict__ row = rows + r * ld;
    for (int64_t j = 0; j < W; ++j) {
      const acc_t d = static_cast<acc_t>(row[j]) - shift[j];
      mean[j] += d;
      sum_sq[j] += d * d;
    }
  }
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  const auto trusted = [&](int64_t j) { return sum_sq[j] <= acc_t(kOnePassRatio) * m2[j]; };  // false for NaN
  int failed = 0;
  for (int64_t j = 0; j < W; ++j) {
    const acc_t s1 = mean[j];
    mean[j] = s1 * inv_n;
    m2[j] = sum_sq[j] - s1 * mean[j];
    failed |= !trusted(j);
  }
  for (int64_t j = 0; failed && j < W; ++j) {
    if (trusted(j)) continue;
    mean[j] = m2[j] = 0;
    block_moments_two_pass(rows + j, ld, n, 1, shift + j, mean + j, m2 + j);
  }
}

// Welford statistics of one tile about the per-channel shifts, into its part's slots of `parts` (the caller
// sets the parts' counts), without a division per value.
// Channels-first runs of at least kMinLaneRun values: per channel, each chunk (for_each_chunk) gives
// (count, mean, M2) by two passes of lane sums over the cached chunk, and the chunks merge pairwise.
// Otherwise: for each block of rows, per-column block mean and M2, in one pass where each column is a
// channel (channels-last, blocks of at least kMinBlockRows rows), else in two; the blocks merged pairwise;
// channels-first tiles then fold each channel's S columns into the channel (their columns hold only N values
// each, too few for the one-pass test to pass often).
template <typename scalar_t, typename acc_t, int kMultiChannel>
void tile_welford(const scalar_t* __restrict__ x, const acc_t* __restrict__ shifts, const Tile& tile,
                  PartMoments<acc_t>& parts) {
  const int64_t W = tile.width;
  if (tile.rows == 0 || W == 0) return;  // an empty batch: the parts stay empty (zeros)
  const acc_t* __restrict__ shift = shifts + tile.channel;
  if (reduces_in_lanes(tile)) {
    // Each chunk of a run gives (count, mean, M2) by two passes over the cached chunk; a channel's chunks
    // merge pairwise.
    for (int64_t k = 0; k < W / tile.columns_per_channel; ++k) {
      const acc_t channel_shift = shift[k];
      PairwiseStream<WelfordPartial<acc_t>, welford_merge<acc_t>> chunks;
      for_each_chunk(tile, k, [&](int64_t offset, int64_t rows, int64_t n) {
        const scalar_t* chunk = x + offset;
        const auto value = [&](int64_t r, int64_t j) { return static_cast<acc_t>(chunk[r * tile.ld + j]) - channel_shift; };
        const acc_t chunk_mean = run_sum<acc_t>(rows, n, value) / static_cast<acc_t>(rows * n);
        const acc_t chunk_m2 = run_sum<acc_t>(rows, n, [&](int64_t r, int64_t j) {
          const acc_t d = value(r, j) - chunk_mean;
          return d * d;
        });
        chunks.push(WelfordPartial<acc_t>{chunk_mean, chunk_m2, rows * n});
      });
      const WelfordPartial<acc_t> total = chunks.total();
      parts.means[tile.part * parts.channels + tile.channel + k] = total.mean;
      parts.m2s[tile.part * parts.channels + tile.channel + k] = total.m2;
    }
    return;
  }
  const int64_t block_rows = block_rows_for(tile.view_width);
  const int64_t blocks = (tile.rows + block_rows - 1) / block_rows;
  // Per block: its row count, and per column its mean and M2 (row b of the two [blocks, W] buffers).
  const int64_t span = tile.columns_per_channel;
  TileScratch<int64_t> count_scratch(blocks);
  int64_t* counts = count_scratch.take(blocks);
  // Column j's shift: the channel's own where each column is a channel, else copies over its columns; sum_sq
  // (one-pass blocks' scratch) or the channels' column spreads; per block, each column's mean and M2 (zeros).
  TileScratch<acc_t> scratch(W + 2 * blocks * W);
  acc_t* shift_buf = scratch.take(W);
  acc_t* means_buf = scratch.take(blocks * W);
  acc_t* m2s_buf = scratch.take(blocks * W);
  std::fill_n(means_buf, 2 * blocks * W, acc_t(0));
  for (int64_t k = 0; span > 1 && k < W / span; ++k) std::fill_n(shift_buf + k * span, span, shift[k]);
  const acc_t* __restrict__ column_shift = span == 1 ? shift : shift_buf;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t r0 = b * block_rows, nb = std::min(block_rows, tile.rows - r0);
    counts[b] = nb;
    const scalar_t* rows = x + tile.offset + r0 * tile.ld;
    if (span == 1 && nb >= kMinBlockRows) {
      block_moments_one_pass(rows, tile.ld, nb, W, column_shift, means_buf + b * W, m2s_buf + b * W, shift_buf);
    } else {
      block_moments_two_pass(rows, tile.ld, nb, W, column_shift, means_buf + b * W, m2s_buf + b * W);
    }
  }
  merge_moment_blocks(counts, means_buf, m2s_buf, blocks, W);
  acc_t* mean = means_buf;
  acc_t* m2 = m2s_buf;
  acc_t* out_mean = parts.means.data() + tile.part * parts.channels + tile.channel;
  acc_t* out_m2 = parts.m2s.data() + tile.part * parts.channels + tile.channel;
  if (span == 1) {
    std::copy(mean, mean + W, out_mean);
    std::copy(m2, m2 + W, out_m2);
    return;
  }
  // A channel's `span` columns have `seen` values each, so M2 = sum_j M2_j + seen * sum_j (mean_j - mean)^2,
  // each sum pairwise over the channel's columns.
  const acc_t seen = static_cast<acc_t>(counts[0]);
  acc_t* spread = shift_buf;  // the shifts' copies are read no more
  for (int64_t k = 0; k < W / span; ++k) {
    const acc_t* channel_means = mean + k * span;
    std::copy(channel_means, channel_means + span, spread);
    const acc_t channel_mean = pairwise_sum(spread, span) / static_cast<acc_t>(span);
    for (int64_t j = 0; j < span; ++j) {
      const acc_t d = channel_means[j] - channel_mean;
      spread[j] = d * d;
    }
    out_mean[k] = channel_mean;
    out_m2[k] = pairwise_sum(m2 + k * span, span) + seen * pairwise_sum(spread, span);
  }
}

// dz_out[i + j] = dz[j] for j < n, when dz_out is given.
template <typename scalar_t, typename acc_t>
inline void keep_dz(scalar_t* __restrict__ dz_out, int64_t i, int64_t n, const acc_t* __restrict__ dz) {
  if (dz_out == nullptr) return;
  for (int64_t j = 0; j < n; ++j) dz_out[i + j] = static_cast<scalar_t>(dz[j]);
}

// Per channel: sum(dz) and sum(dz * (x - mean)), the two reductions of the batch-norm backward, with dz
// read through the activation (GradRule, elementwise.h), and for PReLU (GradRule::kSlopes) its weight's
// gradient sum(dy * min(z, 0)) into sum_dslope; for the kBuffered rules (SiLU, GELU, ELU) dz is also kept in
// source.dz_out when given, so the dx pass need not compute the activation's derivative again. Tiles of one
// channel (channels-first runs of more than kShortRun values): lane sums per chunk, chunks summed pairwise.
// Otherwise per block of kMinBlockRows rows into columns, blocks summed pairwise.
template <typename scalar_t, typename acc_t, int kMultiChannel, typename Rule>
void tile_grad_sums(const GradSource<scalar_t, acc_t>& source, const scalar_t* __restrict__ x,
                    const acc_t* __restrict__ mean, const Tile& tile, int64_t C, acc_t* __restrict__ sum_dz,
                    acc_t* __restrict__ sum_dz_xmu, acc_t* __restrict__ sum_dslope) {
  const scalar_t* __restrict__ dy = source.dy;
  const scalar_t* __restrict__ out = source.out;
  const scalar_t* __restrict__ residual = source.residual;
  const acc_t* __restrict__ alpha = source.alpha;
  const acc_t* __restrict__ beta = source.beta;
  const acc_t param = source.param;
  constexpr bool kRecompute = Rule::kFrom == GradFrom::kRecompute;
  const int64_t W = tile.width;
  const int64_t slot = tile.part * C + tile.channel;
  if (kMultiChannel == 0) {
    // The sums of each chunk in one pass of lane sums. (Shorter runs keep the column sums below, measured
    // faster there: lanes that a run fills only in part cost more than the columns' folds.)
    constexpr int kNumSums = Rule::kSlopes ? 3 : 2;
    const int64_t c = tile.channel;
    const acc_t mu = mean[c];
    const acc_t a = kRecompute ? alpha[c] : acc_t(0), b = kRecompute ? beta[c] : acc_t(0);
    const acc_t p = param_for<Rule::kAct>(param, source.slope, c);
    PairwiseStream<acc_t, plus<acc_t>> total_dz, total_dz_xmu, total_dslope;
    for_each_chunk(tile, 0, [&](int64_t offset, int64_t rows, int64_t n) {
      const auto x_at = [&](int64_t r, int64_t j) { return static_cast<acc_t>(x[offset + r * tile.ld + j]); };
      std::array<acc_t, kNumSums> sums;
      if constexpr (Rule::kBuffered) {
        acc_t buf[kBlockValues];  // the chunk's dz, its rows back to back
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = offset + r * tile.ld;
          for_each_span(n, [&](int64_t j0, int64_t m) {
            dz_span<Rule, 0>(source, x, row + j0, m, &mean[c], &alpha[c], &beta[c], buf + r * n + j0);
          });
          keep_dz(source.dz_out, row, n, buf + r * n);
        }
        sums = run_sums<2, acc_t>(rows, n, [&](int64_t r, int64_t j) {
          const acc_t g = buf[r * n + j];
          return std::array<acc_t, 2>{g, g * (x_at(r, j) - mu)};
        });
      } else {
        sums = run_sums<kNumSums, acc_t>(rows, n, [&](int64_t r, int64_t j) {
          const int64_t i = offset + r * tile.ld + j;
          const acc_t xv = x_at(r, j);
          const acc_t g = dz_at<Rule>(dy, out, residual, i, xv, mu, a, b, p);
          if constexpr (Rule::kSlopes) {
            return std::array<acc_t, 3>{g, g * (xv - mu), dslope_at<Rule>(dy, residual, i, xv, mu, a, b)};
          } else {
            return std::array<acc_t, 2>{g, g * (xv - mu)};
          }
        });
      }
      total_dz.push(sums[0]);
      total_dz_xmu.push(sums[1]);
      if constexpr (Rule::kSlopes) total_dslope.push(sums[2]);
    });
    sum_dz[slot] = total_dz.total();
    sum_dz_xmu[slot] = total_dz_xmu.total();
    if constexpr (Rule::kSlopes) sum_dslope[slot] = total_dslope.total();
    return;
  }
  // Column j's channel coefficients: the channels' own arrays where each column is a channel, else copies
  // spread over the channels' columns (alpha and beta only where dz recomputes the activation, the slope only
  // for PReLU).
  const int64_t span = tile.columns_per_channel;
  const int64_t blocks = std::max<int64_t>(1, (tile.rows + kMinBlockRows - 1) / kMinBlockRows);  // >= 1 zero row
  const int64_t num_sums = Rule::kSlopes ? 3 : 2;
  TileScratch<acc_t> scratch((span == 1 ? 0 : 4 * W) + num_sums * blocks * W);
  acc_t* spread_buf = scratch.take(span == 1 ? 0 : 4 * W);
  for (int64_t k = 0; span > 1 && k < W / span; ++k) {
    const int64_t c = tile.channel + k, j = k * span;
    std::fill_n(spread_buf + j, span, mean[c]);
    if (kRecompute) {
      std::fill_n(spread_buf + W + j, span, alpha[c]);
      std::fill_n(spread_buf + 2 * W + j, span, beta[c]);
    }
    if (Rule::kSlopes) std::fill_n(spread_buf + 3 * W + j, span, param_for<Rule::kAct>(param, source.slope, c));
  }
  const acc_t* __restrict__ col_mean = span == 1 ? mean + tile.channel : spread_buf;
  const acc_t* __restrict__ col_alpha = span == 1 ? alpha + tile.channel : spread_buf + W;
  const acc_t* __restrict__ col_beta = span == 1 ? beta + tile.channel : spread_buf + 2 * W;
  const acc_t* __restrict__ col_slope =
      !Rule::kSlopes ? nullptr : span == 1 ? source.slope + tile.channel : spread_buf + 3 * W;
  acc_t* block_dz_buf = scratch.take(blocks * W);
  acc_t* block_dz_xmu_buf = scratch.take(blocks * W);
  acc_t* block_dslope_buf = scratch.take(Rule::kSlopes ? blocks * W : 0);
  std::fill_n(block_dz_buf, num_sums * blocks * W, acc_t(0));
  for (int64_t b = 0; b < blocks; ++b) {
    acc_t* __restrict__ block_dz = block_dz_buf + b * W;
    acc_t* __restrict__ block_dz_xmu = block_dz_xmu_buf + b * W;
    acc_t* __restrict__ block_dslope = Rule::kSlopes ? block_dslope_buf + b * W : nullptr;
    for (int64_t r = b * kMinBlockRows; r < std::min(tile.rows, (b + 1) * kMinBlockRows); ++r) {
      const int64_t base = tile.offset + r * tile.ld;
      if constexpr (Rule::kBuffered) {
        for_each_span(W, [&](int64_t j0, int64_t n) {
          acc_t dz[kSpan];
          dz_span<Rule, 1>(source, x, base + j0, n, col_mean + j0, col_alpha + j0, col_beta + j0, dz);
          keep_dz(source.dz_out, base + j0, n, dz);
          acc_t* __restrict__ sums = block_dz + j0;
          acc_t* __restrict__ sums_xmu = block_dz_xmu + j0;
          const scalar_t* __restrict__ xs = x + base + j0;
          const acc_t* __restrict__ mu = col_mean + j0;
          for (int64_t j = 0; j < n; ++j) {
            sums[j] += dz[j];
            sums_xmu[j] += dz[j] * (static_cast<acc_t>(xs[j]) - mu[j]);
          }
        });
      } else {
        // No iteration touches another's column: without the promise, GCC versions the loop for aliasing
        // and, past its limit of run-time alias checks (PReLU's third sum), leaves it scalar (16x slower).
#pragma GCC ivdep
        for (int64_t j = 0; j < W; ++j) {
          const int64_t i = base + j;
          const acc_t xv = static_cast<acc_t>(x[i]);
          const acc_t a = kRecompute ? col_alpha[j] : acc_t(0), bb = kRecompute ? col_beta[j] : acc_t(0);
          const acc_t g = dz_at<Rule>(dy, out, residual, i, xv, col_mean[j], a, bb,
                                      param_for<Rule::kAct>(param, col_slope, j));
          block_dz[j] += g;
          block_dz_xmu[j] += g * (xv - col_mean[j]);
          if constexpr (Rule::kSlopes) block_dslope[j] += dslope_at<Rule>(dy, residual, i, xv, col_mean[j], a, bb);
        }
      }
    }
  }
  // Each sum's columns: blocks pairwise, then a channel's columns into its slot.
  const auto finish = [&](acc_t* block_sums, acc_t* __restrict__ sums) {
    sum_rows_pairwise(block_sums, blocks, W);
    acc_t* col = block_sums;
    if (span == 1) {
      std::copy(col, col + W, sums + slot);
    } else {  // each channel (one, or several of at most kShortRun columns) pairwise over its columns
      for (int64_t k = 0; k * span < W; ++k) sums[slot + k] = pairwise_sum(col + k * span, span);
    }
  };
  finish(block_dz_buf, sum_dz);
  finish(block_dz_xmu_buf, sum_dz_xmu);
  if constexpr (Rule::kSlopes) finish(block_dslope_buf, sum_dslope);
}

}  // namespace fusedbn::cpu
