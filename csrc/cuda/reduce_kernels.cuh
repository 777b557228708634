// The reduction kernels: per-channel partials per thread (Reducer, reducers.cuh), merged in the block
// (merges.cuh) and, where a channel's values are split over several blocks, across them by the last block
// to finish, which hands the channel's total to the Finisher (finishers.cuh). Every grid is at most one
// wave of the GPU (host_ops.h reduce_grid): no block waits for a second wave.
#pragma once

#include <cstdint>

#include "device_memory.h"
#include "kernel_basics.cuh"
#include "merges.cuh"

namespace fusedbn::cuda {

// Channels-first (N, C, S): blockIdx.x walks the channels (c, c + gridDim.x, ...), blockIdx.y = split of a
// channel's N * W windows (several splits only where the channels are fewer than the blocks of a wave:
// then gridDim.x == C). Window j of sample n is the j-th kVec-aligned group of elements (aligned in memory
// too: the host side passes 16-byte aligned tensors) overlapping the run. The host side gives W = S / kVec
// when S % kVec == 0 (every window a whole vector of the run), else the most windows a run can overlap.
//   Whole windows: each thread loads Reducer::kInFlight<kVec> vectors (WholeWindows walks their offsets) before it
//   folds them into its partial at once.
//   Otherwise every window is one aligned vector load (window_of), the partial ones at a run's ends with
//   the lanes outside the run masked, except a last window reaching past the tensor's end, read value by
//   value.
// With several splits, the last block of a channel merges the splits' partials (partials[c * splits + i]):
// thread t takes partials t, t + blockDim.x, ... in order, then the block merge, so the order is fixed and
// the result bitwise repeatable.
template <typename Reducer, typename Finisher, int kVec>
FUSEDBN_KERNEL void channels_first_reduce_kernel(Reducer reducer, Finisher finisher, int64_t N, int64_t C, int64_t S,
                                                 int64_t W, BlockPartials<typename Reducer::State> partials,
                                                 unsigned* counters) {
  using State = typename Reducer::State;
  using Loaded = typename decltype(reducer.at_channel(0))::template Loaded<kVec>;
  constexpr int kInFlight = Reducer::template kInFlight<kVec>;
  const int64_t splits = gridDim.y;
  const int64_t windows = N * W;
  const int64_t numel = N * C * S;
  const int64_t per_split = (windows + splits - 1) / splits;
  const int64_t w_begin = per_split * blockIdx.y;
  const int64_t w_end = w_begin + per_split < windows ? w_begin + per_split : windows;
  const int64_t step = blockDim.x;
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    State s{};
    const auto channel = reducer.at_channel(c);
    int64_t w = w_begin + threadIdx.x;
    if (S >= kVec && S % kVec == 0) {
      WholeWindows walk = WholeWindows::at(w, step, W, c * S, C * S, kVec);
      for (; w + (kInFlight - 1) * step < w_end; w += kInFlight * step) {
        Loaded loaded[kInFlight];
#pragma unroll
        for (int i = 0; i < kInFlight; ++i) {
          loaded[i] = channel.template load<kVec>(walk.offset);
          walk.advance();
        }
        channel.template add_whole<kVec, kInFlight>(s, loaded);
      }
      for (; w < w_end; w += step) {
        const Loaded one[1] = {channel.template load<kVec>(walk.offset)};
        walk.advance();
        channel.template add_whole<kVec, 1>(s, one);
      }
    } else {
      int64_t n = w / W, j = w - n * W;  // (sample, window), advanced without division
      const int64_t step_n = step / W, step_j = step - step_n * W;
      for (; w < w_end; w += step) {
        const Window win = window_of<kVec>(n, j, c * S, C * S, S, numel);
        if (win.first < win.last && win.fits) {
          channel.template add<kVec>(s, win.start, win.first, win.last);
        } else {
          for (int k = win.first; k < win.last; ++k) channel.template add<1>(s, win.start + k);
        }
        n += step_n;
        j += step_j;
        if (j >= W) {
          j -= W;
          ++n;
        }
      }
    }
    s = block_merge(s);
    if (splits > 1) {
      if (threadIdx.x == 0) partials[c * splits + blockIdx.y] = s;
      if (!last_block_of_group(counters + c, static_cast<unsigned>(splits))) continue;
      s = State{};
      for (int64_t i = threadIdx.x; i < splits; i += blockDim.x) s = merge(s, static_cast<State>(partials[c * splits + i]));
      s = block_merge(s);
    }
    if (threadIdx.x == 0) finisher(c, reducer.result(c, s));
  }
}

// Channels-last (M = N*S rows, C): threadIdx.x walks groups of kVec consecutive channels (one vector load
// per row, coalesced across the warp), threadIdx.y walks rows, Lanes::kInFlight rows loaded before the
// first is used; blockIdx.x = blockDim.x * kVec channels, blockIdx.y = split of the rows. C % kVec == 0.
// With several splits, the last block of a channel group merges the splits' partials (partials[i * C + c])
// as the rows were merged: thread row y takes splits y, y + blockDim.y, ... in order, its lanes' partials
// of a split loaded together and merged as independent chains, then the column merge (a fixed order:
// bitwise repeatable).
template <typename Reducer, typename Finisher, int kVec>
FUSEDBN_KERNEL void channels_last_reduce_kernel(Reducer reducer, Finisher finisher, int64_t M, int64_t C,
                                                BlockPartials<typename Reducer::State> partials, unsigned* counters) {
  using State = typename Reducer::State;
  using Lanes = decltype(reducer.template at_channels<kVec>(0, 0));
  constexpr int kInFlight = Lanes::kInFlight;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  const int64_t splits = gridDim.y;
  const int64_t per_split = (M + splits - 1) / splits;
  const int64_t r_begin = per_split * blockIdx.y;
  const int64_t r_end = r_begin + per_split < M ? r_begin + per_split : M;
  const int64_t step = blockDim.y;

  Lanes lanes = reducer.template at_channels<kVec>(c, C);  // every thread: a reducer may use a barrier
  if (c < C) {
    int64_t r = r_begin + threadIdx.y;
    for (; r + (kInFlight - 1) * step < r_end; r += kInFlight * step) {
      typename Lanes::Loaded loaded[kInFlight];
#pragma unroll
      for (int i = 0; i < kInFlight; ++i) loaded[i] = lanes.load((r + i * step) * C + c);
#pragma unroll
      for (int i = 0; i < kInFlight; ++i) lanes.add(loaded[i]);
    }
    for (; r < r_end; r += step) lanes.add(lanes.load(r * C + c));
  }
  // One lane at a time through the merges, so only its partial is live besides the accumulator.
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const State total = column_merge(lanes.lane(k));
    if (threadIdx.y == 0 && c < C) {
      if (splits == 1) {
        finisher(c + k, reducer.result(c + k, total));
      } else {
        partials[blockIdx.y * C + c + k] = total;
      }
    }
  }
  if (splits == 1 || !last_block_of_group(counters + blockIdx.x, static_cast<unsigned>(splits))) return;
  // Two lanes' chains at a time (their partials and totals within the registers).
  constexpr int kChains = kVec < 2 ? kVec : 2;
#pragma unroll 1
  for (int k0 = 0; k0 < kVec; k0 += kChains) {
    State s[kChains] = {};
    if (c < C) {
      for (int64_t i = threadIdx.y; i < splits; i += step) {
        State p[kChains];
#pragma unroll
        for (int k = 0; k < kChains; ++k) p[k] = partials[i * C + c + k0 + k];
#pragma unroll
        for (int k = 0; k < kChains; ++k) s[k] = merge(s[k], p[k]);
      }
    }
#pragma unroll
    for (int k = 0; k < kChains; ++k) {
      const State total = column_merge(s[k]);
      if (threadIdx.y == 0 && c < C) finisher(c + k0 + k, reducer.result(c + k0 + k, total));
    }
  }
}

}  // namespace fusedbn::cuda
