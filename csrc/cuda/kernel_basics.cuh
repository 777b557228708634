// What every kernel uses: the launch limits, vectors of up to 16 bytes and their loads and stores, and the
// channels-first windows (a run's values grouped into aligned vectors).
#pragma once

#include <cstdint>

#include "device_memory.h"

namespace fusedbn::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxWarps = 32;              // 1024 threads
constexpr int kMaxBlockThreads = 512;      // what the host side launches at most
constexpr int kMinResidentThreads = 1024;  // per SM, for every kernel: at most 64 registers a thread

// Every kernel: at most kMaxBlockThreads threads, registers capped so kMinResidentThreads fit on an SM.
// The grids are sized from the occupancy each instantiation really has (the Context's blocks_per_sm).
#define FUSEDBN_KERNEL __global__ __launch_bounds__(kMaxBlockThreads, kMinResidentThreads / kMaxBlockThreads)

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

// kVec values at p, a pointer to global memory (device_memory.h), as one vector access.
template <int kVec, typename P>
__device__ __forceinline__ Vec<pointee_t<P>, kVec> load_vec(P p) {
  return *reinterpret_cast<const Vec<pointee_t<P>, kVec>*>(reading(p, kVec));
}

template <int kVec, typename P>
__device__ __forceinline__ void store_vec(P p, const Vec<pointee_t<P>, kVec>& v) {
  *reinterpret_cast<Vec<pointee_t<P>, kVec>*>(writing(p, kVec)) = v;
}

// Window j of sample n of channel c (channels-first (N, C, S)): the kVec-aligned vector at `start` and its
// lanes [first, last) inside the channel's run [base, base + S), base = n * C*S + c * S (first == last where
// the window misses the run). `fits`: the whole vector lies inside the tensor; only a last window can
// reach past its end, and it is read value by value.
struct Window {
  int64_t start;
  int first, last;
  bool fits;
};

template <int kVec>
__device__ __forceinline__ Window window_of(int64_t n, int64_t j, int64_t channel_offset, int64_t sample_stride,
                                           int64_t S, int64_t numel) {
  const int64_t base = n * sample_stride + channel_offset;
  const int64_t start = base / kVec * kVec + j * kVec;
  const int64_t lo = start > base ? start : base;
  const int64_t hi = start + kVec < base + S ? start + kVec : base + S;
  return Window{start, static_cast<int>(lo - start), static_cast<int>(hi > lo ? hi - start : lo - start),
                start + kVec <= numel};
}

// The offsets of whole-vector windows when every run is whole vectors (S % kVec == 0): window w of a
// channel is vector w % W of sample w / W's run, at n * C*S + c * S + j * kVec. A thread walks its windows
// w, w + step, ... by adding, without dividing (n and j advanced as one mixed-radix number).
struct WholeWindows {
  int64_t offset;  // of the current window
  int64_t j;       // its vector within the run
  int64_t W, step_j, step_offset, wrap_offset;

  // The walk from window w of the channel whose run starts at channel_offset, by `step` windows.
  __device__ __forceinline__ static WholeWindows at(int64_t w, int64_t step, int64_t W, int64_t channel_offset,
                                                     int64_t sample_stride, int kVec) {
    const int64_t n = w / W, j = w - n * W, step_n = step / W, step_j = step - step_n * W;
    return WholeWindows{n * sample_stride + channel_offset + j * kVec, j, W, step_j,
                        step_n * sample_stride + step_j * kVec, sample_stride - W * kVec};
  }
  __device__ __forceinline__ void advance() {
    offset += step_offset;
    j += step_j;
    if (j >= W) {  // into the next sample's run
      j -= W;
      offset += wrap_offset;
    }
  }
};

}  // namespace fusedbn::cuda
