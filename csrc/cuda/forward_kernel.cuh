// The training forward in one launch where a channel's N * W windows fit in one block, kRows a thread
// (channels-first; the host side checks N * W <= kRows * blockDim.x, and that numel % kVec == 0, so every
// window is a whole aligned vector inside the tensor): the block reads its channel once and keeps the values
// in registers, its kRows loads issued together (a row past the channel's windows reads the channel's first
// window, and is ignored), merges their statistics, finishes the
// channel (StatsFinisher: mean, invstd, the running statistics) and normalizes the kept values: two passes
// over memory instead of three. blockIdx.x walks the channels (c, c + gridDim.x, ...: at most one wave of
// blocks). A window's lanes outside the run are neither counted nor written: other blocks own them.
#pragma once

#include <cstdint>

#include "device_memory.h"
#include "elementwise_kernels.cuh"
#include "finishers.cuh"
#include "kernel_basics.cuh"
#include "merges.cuh"
#include "reducers.cuh"

namespace fusedbn::cuda {

template <typename scalar_t, typename acc_t, typename param_t, typename Act, int kVec, int kRows>
FUSEDBN_KERNEL void channels_first_forward_kernel(WelfordReducer<scalar_t, acc_t> reducer,
                                                  StatsFinisher<acc_t, param_t> finisher,
                                                  NormalizeOp<scalar_t, acc_t, param_t, Act> op, int64_t N, int64_t C,
                                                  int64_t S, int64_t W) {
  using Coeffs = typename NormalizeOp<scalar_t, acc_t, param_t, Act>::Coeffs;
  __shared__ SharedArray<Coeffs, 1> channel_coeffs;
  const int64_t numel = N * C * S, sample_stride = C * S;
  // A channel's windows fit in a block, so their indices divide in 32 bits.
  const int windows = static_cast<int>(N * W), per_run = static_cast<int>(W);
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    auto window = [&](int i) {
      const int w = static_cast<int>(threadIdx.x + i * blockDim.x);
      return w < windows ? window_of<kVec>(w / per_run, w % per_run, c * S, sample_stride, S, numel)
                         : Window{0, 0, 0, true};
    };
    Vec<scalar_t, kVec> kept[kRows];
    int64_t start[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const Window win = window(i);
      start[i] = win.first < win.last ? win.start : window_of<kVec>(0, 0, c * S, sample_stride, S, numel).start;
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i) kept[i] = load_vec<kVec>(reducer.x + start[i]);
    const auto channel = reducer.at_channel(c);
    typename WelfordReducer<scalar_t, acc_t>::State s{};
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const Window win = window(i);
      if (win.first < win.last) channel.template add_loaded<kVec>(s, kept[i], win.first, win.last);
    }
    s = block_merge(s);
    // Thread 0 finishes the channel and hands its coefficients to the block through shared memory. Not
    // through op.coeffs(c): its mean and invstd pointers are __restrict__, a promise that nothing writes
    // them during the launch, which the finisher just did. (The next channel's write of channel_coeffs
    // comes after the barriers of its block_merge: no thread still reads this one.)
    if (threadIdx.x == 0) {
      finisher(c, reducer.result(c, s));
      channel_coeffs[0] = op.coefficients.of_statistics(c, finisher.mean[c], finisher.invstd[c]);
    }
    __syncthreads();
    const Coeffs here = channel_coeffs[0];
    const TwoChannels<Coeffs> co{here, here, kVec};
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const Window win = window(i);
      if (win.first >= win.last) continue;
      const auto rv = op.residual ? load_vec<kVec>(op.residual + win.start) : Vec<scalar_t, kVec>{};
      const auto out = op.template outputs<kVec>(kept[i], rv, co);
      if (win.first == 0 && win.last == kVec) {
        store_vec<kVec>(op.y + win.start, out);
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          if (k >= win.first && k < win.last) op.y[win.start + k] = out.val[k];
        }
      }
    }
  }
}

}  // namespace fusedbn::cuda
