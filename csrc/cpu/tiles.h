// Work decomposition shared by the CPU kernels.
//
// Both layouts are walked as 2-D tiles of `rows` x `width` entries with row stride `ld`:
//   channels-first: one tile per (row part, channel c); rows are samples n, columns the S positions of c,
//                   ld = C*S. Every column belongs to channel c (channel stride 0).
//   channels-last:  one tile per (row part, group of channels); rows are positions, columns the group's
//                   channels, ld = C (channel stride 1).
//   channels-first runs of at most kShortRun values, in the reductions: one tile per (row part, group of
//                   channels); rows are samples n, columns the S positions of each channel of the group in
//                   turn, ld = C*S. A tile per channel would hold too few values to pay for itself.
// Rows are split into parts of a size fixed by the shape alone (never by the thread count), so the
// reduction order, and hence every result, is the same however many threads run it. Channels-first runs
// of at least kLongRun values get a part each: the tiles then follow memory order (n, c), which streams
// better than visiting a channel's rows C*S apart, for one partial per run. Channels-last groups only
// balance the threads: each column is its own channel, whose result does not depend on which other
// columns share its tile.
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
  // Values per row of the whole view (C channels-last; the group's values for short channels-first runs):
  // what the reductions size their blocks of rows by, so that splitting the channels into tiles leaves
  // every result as it was.
  int64_t view_width;
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

inline int64_t columns_per_channel(const ChannelLayout& layout) { return layout.channels_last ? 1 : layout.S; }

// Values per row of the view the row parts are sized by (Tile::view_width): every channel channels-last, a
// group of short runs, one run.
inline int64_t view_width(const ChannelLayout& layout) {
  if (layout.channels_last) return layout.C;
  if (layout.S > kShortRun) return layout.S;
  const int64_t group = std::clamp<int64_t>(kGroupRowValues / std::max<int64_t>(1, layout.S), 1,
                                            std::max<int64_t>(1, layout.C));
  return group * layout.S;
}

inline int64_t num_parts(const ChannelLayout& layout) {
  if (!layout.channels_last && layout.S >= kLongRun) return std::max<int64_t>(1, layout.rows());
  const int64_t most_rows = std::max<int64_t>(1, kValuesPerPart / std::max<int64_t>(1, view_width(layout)));
  return std::max<int64_t>(1, (layout.rows() + most_rows - 1) / most_rows);
}

// Rows per part: the rows shared out evenly over num_parts (the last part may hold fewer).
inline int64_t rows_per_part(const ChannelLayout& layout) {
  const int64_t parts = num_parts(layout);
  return std::max<int64_t>(1, (layout.rows() + parts - 1) / parts);
}

// Rows of the layout's view in part p (an empty batch has one empty part).
inline int64_t rows_in_part(const ChannelLayout& layout, int64_t p) {
  const int64_t per_part = rows_per_part(layout);
  return std::max<int64_t>(0, std::min(layout.rows(), (p + 1) * per_part) - p * per_part);
}

// Channels-last reduction tiles hold whole rows, split into groups of at least kMinGroupChannels channels (4 KB
// of float: narrower rows starve the hardware prefetchers) only where the row parts alone would give a thread
// fewer than kTasksPerThread tasks (7x7 positions under 2048 channels make few parts). A channel's result
// does not depend on the other channels of its tile, so the thread count may choose the split.
constexpr int64_t kMinGroupChannels = 1024;
constexpr int64_t kTasksPerThread = 8;
constexpr int64_t kGroupAlign = 16;  // channels: whole cache lines of float

// How the reduction tiles cover the view: row parts times channel groups. Made once per pass, outside its
// parallel region.
struct TileGrid {
  int64_t parts, rows_per_part, group, groups;

  explicit TileGrid(const ChannelLayout& layout)
      : parts(num_parts(layout)), rows_per_part(fusedbn::cpu::rows_per_part(layout)) {
    const int64_t C = std::max<int64_t>(1, layout.C);
    if (!layout.channels_last) {
      group = std::max<int64_t>(1, view_width(layout) / std::max<int64_t>(1, layout.S));  // S = 0: a view of no values
    } else {
      const int64_t wanted = (kTasksPerThread * at::get_num_threads() + parts - 1) / parts;
      const int64_t split = std::clamp<int64_t>(wanted, 1, std::max<int64_t>(1, C / kMinGroupChannels));
      group = ((C + split - 1) / split + kGroupAlign - 1) / kGroupAlign * kGroupAlign;
    }
    groups = (C + group - 1) / group;
  }
};

// The reduction tile of row part p and channel group g.
inline Tile reduction_tile(const ChannelLayout& layout, const TileGrid& grid, int64_t p, int64_t g) {
  const int64_t span = columns_per_channel(layout), ld = layout.C * span;
  const int64_t r0 = p * grid.rows_per_part, c0 = g * grid.group;
  const int64_t channels = std::max<int64_t>(0, std::min(grid.group, layout.C - c0));
  return Tile{r0 * ld + c0 * span, rows_in_part(layout, p), channels * span, ld, c0, p, view_width(layout), 0, 1,
              span};
}

// Channels-first: the runs of channel group g (reduction_tile's channels) in sample n, consecutive in memory,
// as an elementwise tile (one run a row).
inline Tile group_runs_tile(const ChannelLayout& layout, const TileGrid& grid, int64_t n, int64_t g) {
  const int64_t c0 = g * grid.group, S = layout.S;
  const int64_t channels = std::max<int64_t>(0, std::min(grid.group, layout.C - c0));
  return Tile{(n * layout.C + c0) * S, channels, S, S, c0, 0, S, 1, layout.C};
}

// Below this many values a pass runs its tasks on one thread: waking the others costs more than they save
// (torch's at::internal::GRAIN_SIZE, the same bound for its elementwise kernels).
constexpr int64_t kMinParallelValues = 1 << 15;

inline bool runs_on_one_thread(const ChannelLayout& layout) {
  return layout.N * layout.C * layout.S < kMinParallelValues;
}

// at::parallel_for over `tasks` tasks of the layout's values: a grain of one task, or all of them where the
// tensor is small. Which thread runs a task never changes its result.
template <typename F>
void parallel_for_tasks(const ChannelLayout& layout, int64_t tasks, const F& f) {
  at::parallel_for(0, tasks, runs_on_one_thread(layout) ? std::max<int64_t>(1, tasks) : 1, f);
}

// Calls body(tile, multi_channel) with multi_channel a compile-time std::integral_constant: 1 where the
// layout's reduction tiles hold several channels (channel(j) = channel + j channels-last), 0 where they hold
// one.
template <typename Body>
void with_tile_kind(const ChannelLayout& layout, const Tile& tile, Body&& body) {
  if (multi_channel_tiles(layout)) {
    body(tile, std::integral_constant<int, 1>{});
  } else {
    body(tile, std::integral_constant<int, 0>{});
  }
}

// Calls body(tile, multi_channel) (with_tile_kind) for every reduction tile, in parallel. Tasks run group by
// group (all parts of a group of channels, then the next), so each thread's share holds as many short last
// parts as another's.
template <typename Body>
void parallel_for_tiles(const ChannelLayout& layout, Body&& body) {
  const TileGrid grid(layout);
  parallel_for_tasks(layout, grid.parts * grid.groups, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      with_tile_kind(layout, reduction_tile(layout, grid, task % grid.parts, task / grid.parts), body);
    }
  });
}

// Values per tile of the elementwise passes, which need no per-part partials: enough to amortise a task,
// few enough for several tasks per thread at ResNet's smallest layers.
constexpr int64_t kElementwiseTileValues = 1 << 12;

// Calls body(tile, multi_channel) for the tiles of the elementwise passes, in parallel, in memory order:
// channels-last, whole rows (multi_channel 1); channels-first, consecutive (n, c) runs (multi_channel 0), so
// short runs (7x7) do not pay a task each.
template <typename Body>
void parallel_for_elementwise_tiles(const ChannelLayout& layout, Body&& body) {
  const int64_t C = layout.C, S = layout.S;
  const int64_t row_values = std::max<int64_t>(1, layout.channels_last ? C : S);
  const int64_t rows = layout.channels_last ? layout.rows() : layout.N * C;
  const int64_t rows_per_tile = std::max<int64_t>(1, kElementwiseTileValues / row_values);
  const int64_t tiles = (rows + rows_per_tile - 1) / rows_per_tile;
  parallel_for_tasks(layout, tiles, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = t * rows_per_tile, n = std::min(rows_per_tile, rows - r0);
      if (layout.channels_last) {
        body(Tile{r0 * C, n, C, C, 0, 0, C, 0, 1, 1}, std::integral_constant<int, 1>{});
      } else {
        body(Tile{r0 * S, n, S, S, r0 % C, 0, S, 1, C}, std::integral_constant<int, 0>{});
      }
    }
  });
}

}  // namespace fusedbn::cpu
