// Partial states and how they merge: within a warp (shuffles), a block (shared memory) and the grid (the
// last block of a group of blocks merges their partials). Each state has merge, associative, applied in a
// fixed order everywhere, so results are bitwise repeatable on a device.
#pragma once

#include <cstdint>

#include "../welford.h"
#include "device_memory.h"
#include "kernel_basics.cuh"

namespace fusedbn::cuda {

template <typename acc_t>
__device__ __forceinline__ WelfordPartial<acc_t> shfl_down(const WelfordPartial<acc_t>& s, int delta) {
  WelfordPartial<acc_t> o;
  o.mean = __shfl_down_sync(kFullMask, s.mean, delta);
  o.m2 = __shfl_down_sync(kFullMask, s.m2, delta);
  o.count = static_cast<int64_t>(__shfl_down_sync(kFullMask, static_cast<long long>(s.count), delta));
  return o;
}

template <typename acc_t>
__device__ __forceinline__ WelfordPartial<acc_t> merge(const WelfordPartial<acc_t>& a,
                                                       const WelfordPartial<acc_t>& b) {
  return welford_merge(a, b);
}

// sum(dz) and sum(dz * (x - mean)) of one channel, dz the gradient reaching BatchNorm's output; kSlopes:
// also PReLU's weight gradient, sum(dy * min(z, 0)).
template <typename acc_t, bool kSlopes = false>
struct GradSums {
  acc_t dz;
  acc_t dz_xmu;
};

template <typename acc_t>
struct GradSums<acc_t, true> {
  acc_t dz;
  acc_t dz_xmu;
  acc_t dslope;
};

template <typename acc_t, bool kSlopes>
__device__ __forceinline__ GradSums<acc_t, kSlopes> shfl_down(const GradSums<acc_t, kSlopes>& s, int delta) {
  GradSums<acc_t, kSlopes> o;
  o.dz = __shfl_down_sync(kFullMask, s.dz, delta);
  o.dz_xmu = __shfl_down_sync(kFullMask, s.dz_xmu, delta);
  if constexpr (kSlopes) o.dslope = __shfl_down_sync(kFullMask, s.dslope, delta);
  return o;
}

template <typename acc_t, bool kSlopes>
__device__ __forceinline__ GradSums<acc_t, kSlopes> merge(const GradSums<acc_t, kSlopes>& a,
                                                          const GradSums<acc_t, kSlopes>& b) {
  GradSums<acc_t, kSlopes> o;
  o.dz = a.dz + b.dz;
  o.dz_xmu = a.dz_xmu + b.dz_xmu;
  if constexpr (kSlopes) o.dslope = a.dslope + b.dslope;
  return o;
}

// The warp's partials merged by a shuffle tree; the total in lane 0.
template <typename State>
__device__ __forceinline__ State warp_merge(State s) {
  for (int delta = kWarpSize / 2; delta > 0; delta /= 2) s = merge(s, shfl_down(s, delta));
  return s;
}

// Merges the partials of all threads of the block: a shuffle tree in each warp, then the warps' totals by a
// second one in warp 0 (no serial chain); the block's total is returned to thread 0. Every thread must call
// it.
template <typename State>
__device__ State block_merge(State s) {
  __shared__ SharedArray<State, kMaxWarps> warp_totals;
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int warps = (blockDim.x * blockDim.y) / kWarpSize;
  s = warp_merge(s);
  if (tid % kWarpSize == 0) warp_totals[tid / kWarpSize] = s;
  __syncthreads();
  if (tid < kWarpSize) s = warp_merge(tid < warps ? static_cast<State>(warp_totals[tid]) : State{});
  __syncthreads();  // warp_totals may be reused by the caller's next block_merge
  return s;
}

// Called by every thread after the block wrote its partials for a group of channels (BlockPartials):
// true in all threads of the one block (per group) that arrives last. The counter is zero before the
// launch (allocated zeroed, scratch.h) and the last arrival wraps it back to zero in the same atomic
// (atomicInc), so the next launch finds it zeroed: no launch fills counters, and a CUDA graph's replays
// find them as its capture did. The fences around the arrival (release before it, acquire after it: the
// PTX memory model's fence-atomic-atomic-fence synchronization) order the partials.
__device__ __forceinline__ bool last_block_of_group(unsigned* counter, unsigned blocks_in_group) {
  __shared__ SharedArray<bool, 1> is_last;
  __threadfence();  // this thread's partial writes are visible device-wide ...
  __syncthreads();  // ... for every writer of the block, before the block signals
  if (threadIdx.x == 0 && threadIdx.y == 0) is_last[0] = atomicInc(counter, blocks_in_group - 1) == blocks_in_group - 1;
  __syncthreads();
  const bool last = is_last[0];
  if (last) __threadfence();  // order the reads of the other blocks' partials after the signal
  return last;
}

// Merges the partials of the threads that share threadIdx.x (blockDim.y of them, a power of two) by a
// tree in shared memory; the total lands in threadIdx.y == 0. Every thread must call it.
template <typename State>
__device__ State column_merge(State s) {
  __shared__ SharedArray<State, kMaxBlockThreads> column;
  const unsigned i = threadIdx.y * blockDim.x + threadIdx.x;
  for (unsigned half = blockDim.y / 2; half > 0; half /= 2) {
    column[i] = s;
    __syncthreads();
    if (threadIdx.y < half) s = merge(s, static_cast<State>(column[i + half * blockDim.x]));
    __syncthreads();
  }
  return s;
}

}  // namespace fusedbn::cuda
