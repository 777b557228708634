// Work decomposition shared by the CPU kernels.
//
// Both layouts are walked as 2-D tiles of `rows` x `width` entries with row stride `ld`:
//   channels-first: one tile per (row part, channel c); rows are samples n, columns the S positions of c,
//                   ld = C*S. Every column belongs to channel c (channel stride 0).
//   channels-last:  one tile per row part; rows are positions, columns the C channels, ld = C
//                   (channel stride 1).
//   channels-first runs of at most kShortRun values, in the reductions: one tile per (row part, group of
//                   channels); rows are samples n, columns the S positions of each channel of the group in
//                   turn, ld = C*S. A tile per channel would hold too few values to pay for itself.
// Rows are split into parts of a size fixed by the shape alone (never by the thread count), so the
// reduction order, and hence every result, is the same however many threads run it. Channels-first runs
// of at least kLongRun values get a part each: the tiles then follow memory order (n, c), which streams
// better than visiting a channel's rows C*S apart, for one partial per run.
#pragma once

#include <ATen/Parallel.h>

#include <type_traits>

#include "../layout.h"

namespace fusedbn::cpu {

struct Tile {
  int64_t offset;   // element offset of the tile's first value
  int64_t rows;     // rows in this tile
  int64_t width;    // values per row
  int64_t ld;       // elements between consecutive rows
  int64_t channel;  // channel of column 0 of row 0
  int64_t part;     // row part, the index into per-part partial buffers
  // Channels-first elementwise tiles hold consecutive (n, c) runs: row r's channel is
  // (channel + r * row_channel_step) % channels. Reduction tiles keep one channel (step 0).
  int64_t row_channel_step = 0;
  int64_t channels = 1;
  // Reduction tiles: consecutive columns of one channel, channel(j) = channel + j / columns_per_channel
  // (1 channels-last, S channels-first).
  int64_t columns_per_channel = 1;
};

// Enough values per task to amortise scheduling, small enough to keep both cores busy at C = 1.
constexpr int64_t kValuesPerPart = 1 << 16;

constexpr int64_t kLongRun = 512;
constexpr int64_t kShortRun = 64;
// Values per row of a tile of short channels-first runs: a block of its rows stays in cache between the
// two reads of block_moments_two_pass.
constexpr int64_t kGroupRowValues = 2048;

// Whether a reduction tile holds several channels: channels-last (all of them), short channels-first runs.
inline bool multi_channel_tiles(const ChannelLayout& layout) {
  return layout.channels_last || layout.S <= kShortRun;
}

// Channels per reduction tile.
inline int64_t channels_per_tile(const ChannelLayout& layout) {
  if (layout.channels_last) return layout.C;
  if (layout.S > kShortRun) return 1;
  return std::clamp<int64_t>(kGroupRowValues / std::max<int64_t>(1, layout.S), 1, std::max<int64_t>(1, layout.C));
}

inline int64_t columns_per_channel(const ChannelLayout& layout) { return layout.channels_last ? 1 : layout.S; }

inline int64_t rows_per_part(const ChannelLayout& layout) {
  if (!layout.channels_last && layout.S >= kLongRun) return 1;
  const int64_t row_values = channels_per_tile(layout) * columns_per_channel(layout);
  return std::max<int64_t>(1, kValuesPerPart / std::max<int64_t>(1, row_values));
}

inline int64_t num_parts(const ChannelLayout& layout) {
  const int64_t rows = layout.rows();
  const int64_t per_part = rows_per_part(layout);
  return std::max<int64_t>(1, (rows + per_part - 1) / per_part);
}

// Rows of the layout's view in part p (the last part may be short; an empty batch has one empty part).
inline int64_t rows_in_part(const ChannelLayout& layout, int64_t p) {
  const int64_t per_part = rows_per_part(layout);
  return std::max<int64_t>(0, std::min(layout.rows(), (p + 1) * per_part) - p * per_part);
}

// Calls body(tile, multi_channel) for every tile, in parallel. multi_channel is a compile-time
// std::integral_constant: 1 where the tile holds several channels (channel(j) = channel + j for
// channels-last, whose tiles the elementwise passes share), 0 where it holds one.
template <typename Body>
void parallel_for_tiles(const ChannelLayout& layout, Body&& body) {
  const int64_t parts = num_parts(layout);
  const int64_t per_part = rows_per_part(layout);
  const int64_t rows = layout.rows();
  const int64_t C = layout.C, span = columns_per_channel(layout), ld = C * span;
  const int64_t group = channels_per_tile(layout), groups = std::max<int64_t>(1, (C + group - 1) / group);
  const auto tile_of = [&](int64_t task) {
    const int64_t p = task / groups, c0 = (task % groups) * group;
    const int64_t r0 = p * per_part, r1 = std::min(rows, r0 + per_part);
    const int64_t channels = std::max<int64_t>(0, std::min(group, C - c0));
    return Tile{r0 * ld + c0 * span, r1 - r0, channels * span, ld, c0, p, 0, 1, span};
  };
  at::parallel_for(0, parts * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      if (multi_channel_tiles(layout)) {
        body(tile_of(task), std::integral_constant<int, 1>{});
      } else {
        body(tile_of(task), std::integral_constant<int, 0>{});
      }
    }
  });
}

// Tiles for the elementwise passes, which need no per-part partials: channels-last as above; channels-first
// as groups of consecutive (n, c) runs in memory order (about kValuesPerPart / 16 values a tile), so each
// thread streams through consecutive memory and short runs (7x7) do not pay a task each.
template <typename Body>
void parallel_for_elementwise_tiles(const ChannelLayout& layout, Body&& body) {
  if (layout.channels_last) {
    parallel_for_tiles(layout, body);
    return;
  }
  const int64_t C = layout.C, S = layout.S;
  const int64_t runs_per_tile = std::max<int64_t>(1, kValuesPerPart / 16 / std::max<int64_t>(1, S));
  const int64_t runs = layout.N * C;
  const int64_t tiles = (runs + runs_per_tile - 1) / runs_per_tile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t run = t * runs_per_tile;
      body(Tile{run * S, std::min(runs_per_tile, runs - run), S, S, run % C, 0, 1, C},
           std::integral_constant<int, 0>{});
    }
  });
}

}  // namespace fusedbn::cpu
