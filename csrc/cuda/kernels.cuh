// The CUDA kernels of fusedbn, written in the CUDA subset the SIMT emulator (csrc/simt/simt.h) also
// compiles: no <<<>>> (launches go through FUSEDBN_LAUNCH in launch.h), no CUDA runtime calls, static
// shared memory as `__shared__ SharedArray<T, N>` of trivial types and the blocks' partials as
// BlockPartials (device_memory.h, so the emulator checks every access), full-warp shuffles, block sizes
// that are multiples of 32.
//
// Two kernel families, each one template over the element type and a small functor,
//   reductions  - per-channel partials per thread, warp merge by shuffles, block merge through shared
//                 memory, grid merge across the blocks of a channel by the last block to finish (an
//                 arrival counter that resets itself), whose threads all merge the blocks' partials and
//                 then call the finisher for the channel: Welford statistics (forward) or the gradient
//                 sums (backward).
//   elementwise - one read and one write per value, vectors of up to 16 bytes where alignment allows,
//                 grid-stride; channels-first tracks the channel of each vector incrementally (no division
//                 in the loop), channels-last keeps each thread on fixed channels with their coefficients
//                 in registers. The per-channel coefficients are computed in the kernel from the
//                 statistics and the parameters (ChannelCoefficients), so no other kernel runs before it.
// and the one-launch training forward (channels_first_forward_kernel), both in one block per channel.
// Every kernel is launched with at most kMaxBlockThreads threads per block and compiled for
// kMinResidentThreads resident threads per SM (at most 64 registers a thread), which
// tests/test_kernel_resources.py checks on the sm_90 build.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../epilogue.h"
#include "../welford.h"
#include "device_memory.h"

namespace fusedbn::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxWarps = 32;  // 1024 threads
constexpr int kMaxBlockThreads = 512;     // what the host side launches at most
constexpr int kMinResidentThreads = 1024;  // per SM, for every kernel: the grids are sized for it

// Every kernel: at most kMaxBlockThreads threads, registers capped so kMinResidentThreads fit on an SM.
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

// ---------------------------------------------------------------------------------------------------
// Partial states. Each has merge (associative; merged in a fixed order so results are reproducible)
// and a warp shuffle.

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

// sum(dz) and sum(dz * (x - mean)) of one channel, dz the gradient reaching BatchNorm's output.
template <typename acc_t>
struct GradSums {
  acc_t dz;
  acc_t dz_xmu;
};

template <typename acc_t>
__device__ __forceinline__ GradSums<acc_t> shfl_down(const GradSums<acc_t>& s, int delta) {
  return GradSums<acc_t>{__shfl_down_sync(kFullMask, s.dz, delta), __shfl_down_sync(kFullMask, s.dz_xmu, delta)};
}

template <typename acc_t>
__device__ __forceinline__ GradSums<acc_t> merge(const GradSums<acc_t>& a, const GradSums<acc_t>& b) {
  return GradSums<acc_t>{a.dz + b.dz, a.dz_xmu + b.dz_xmu};
}

// ---------------------------------------------------------------------------------------------------
// A channel's coefficients, bn(x) = (x - mean) * alpha + beta (epilogue.h's normalized), computed where
// they are used from the statistics and the parameters in their own dtypes with welford.h's formulas (the
// CPU ops' too, so every backend computes the same bits): from batch statistics (mean, invstd: training
// and the backward) or, where invstd is null, from the running ones (eval, invstd_of(running_var, eps)).
template <typename acc_t>
struct Coefficients {
  acc_t mean, alpha, beta;
};

template <typename acc_t, typename param_t>
struct ChannelCoefficients {
  Restrict<const acc_t> mean;  // batch statistics, or null with invstd (eval)
  Restrict<const acc_t> invstd;
  Restrict<const param_t> running_mean;  // eval
  Restrict<const param_t> running_var;
  Restrict<const param_t> weight;  // may be null
  Restrict<const param_t> bias;    // may be null
  double eps;

  __device__ __forceinline__ Coefficients<acc_t> operator()(int64_t c) const {
    const acc_t istd = invstd ? invstd[c] : invstd_of(static_cast<acc_t>(running_var[c]), eps);
    return of_statistics(c, invstd ? mean[c] : static_cast<acc_t>(running_mean[c]), istd);
  }
  // Channel c's coefficients from its mean and invstd as given.
  __device__ __forceinline__ Coefficients<acc_t> of_statistics(int64_t c, acc_t mean_c, acc_t invstd_c) const {
    return {mean_c, alpha_of(weight, c, invstd_c), beta_of<acc_t>(bias, c)};
  }
};

// ---------------------------------------------------------------------------------------------------
// Reducers: how a thread folds values into its partials. Two views of the data:
//   at_channel(c)        channels-first: add<kVec>(state, offset, first, last) takes the lanes [first, last)
//                        of the kVec contiguous values at `offset` (a full or, at a run's ends, partial window);
//   at_channels<kVec>(c) channels-last: an accumulator for the kVec consecutive channels c, c+1, ...;
//                        add(offset) takes one value of each, stored contiguously at `offset`, and
//                        lane(k) is channel c + k's partial; value-initialized, it is empty.
// `result(c, total)` turns a channel's merged total into what the finisher needs; kVec <= kMaxLanes.

// Welford statistics of values shifted by the channel's first value K (channel_shift, welford.h; every
// thread and block of the channel uses the same K, so the partials merge exactly): means stay of the
// order of the spread, and a channel with mean 1e4 and std 1 keeps full precision. x == nullptr marks an
// empty batch.
template <typename scalar_t, typename acc_t>
struct WelfordReducer {
  using State = WelfordPartial<acc_t>;
  static constexpr int kMaxLanes = 8;  // the widest vector; channels-last: shift, mean and M2 a lane
  Restrict<const scalar_t> x;
  int64_t channel_stride;  // channel c's first value is x[c * channel_stride]

  struct Local {
    Restrict<const scalar_t> x;
    acc_t shift;

    // The window's values: their own mean and M2 (no division per value), then one Chan merge. Lanes
    // outside [first, last) count as nothing (selected away, so a NaN there does not leak in).
    template <int kVec>
    __device__ __forceinline__ void add(State& s, int64_t offset, int first = 0, int last = kVec) const {
      add_loaded<kVec>(s, load_vec<kVec>(x + offset), first, last);
    }
    template <int kVec>
    __device__ __forceinline__ void add_loaded(State& s, const Vec<scalar_t, kVec>& loaded, int first, int last) const {
      acc_t v[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) v[k] = k >= first && k < last ? static_cast<acc_t>(loaded.val[k]) - shift : acc_t(0);
      acc_t sum = 0;
#pragma unroll
      for (int k = 0; k < kVec; ++k) sum += v[k];
      const acc_t mean = sum / static_cast<acc_t>(last - first);
      acc_t m2 = 0;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const acc_t d = k >= first && k < last ? v[k] - mean : acc_t(0);
        m2 = mul_add(d, d, m2);  // fused on every backend that runs this source (host_device.h)
      }
      s = welford_merge(s, State{mean, m2, last - first});
    }
  };

  // One Welford step per channel: mean += d / n, M2 += d * (v - new mean). The lanes see the same rows,
  // so they share one count and one reciprocal.
  template <int kVec>
  struct Lanes {
    Restrict<const scalar_t> x;
    acc_t shift[kVec];
    acc_t mean[kVec];
    acc_t m2[kVec];
    int64_t count;

    __device__ __forceinline__ void add(int64_t offset) {
      const auto loaded = load_vec<kVec>(x + offset);
      const acc_t inv_n = acc_t(1) / static_cast<acc_t>(++count);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const acc_t v = static_cast<acc_t>(loaded.val[k]) - shift[k];
        const acc_t d = v - mean[k];
        mean[k] = mul_add(d, inv_n, mean[k]);  // fused as nvcc fuses them, in the emulator too (host_device.h)
        m2[k] = mul_add(d, v - mean[k], m2[k]);
      }
    }
    __device__ __forceinline__ State lane(int k) const { return State{mean[k], m2[k], count}; }
  };

  __device__ __forceinline__ acc_t shift_of(int64_t c) const {
    return x ? channel_shift(static_cast<acc_t>(x[c * channel_stride])) : acc_t(0);
  }
  __device__ __forceinline__ Local at_channel(int64_t c) const { return Local{x, shift_of(c)}; }
  template <int kVec>
  __device__ __forceinline__ Lanes<kVec> at_channels(int64_t c) const {
    Lanes<kVec> lanes{x, {}, {}, {}, 0};
#pragma unroll
    for (int k = 0; k < kVec; ++k) lanes.shift[k] = shift_of(c + k);
    return lanes;
  }
  __device__ __forceinline__ State result(int64_t c, State total) const {
    total.mean += shift_of(c);
    return total;
  }
};

// dz, the gradient reaching BatchNorm's output: dy, or dy through the activation that followed it
// (grad_through_activation, epilogue.h): ReLU's mask read from the forward's output, or the derivative at
// z recomputed from x with the forward's coefficients (and the residual). The activation is a run-time
// value: one uniform branch per value, where a template argument would multiply the kernels nine times.
// (The CPU's GradSource, elementwise.h, holds the same pointers with the rule as template arguments.)
template <typename scalar_t, typename acc_t>
struct GradSource {
  GradFrom from;
  Activation act;
  acc_t param;
  Restrict<const scalar_t> side;  // kOutput: the output; kRecompute: the residual (may be null)

  // The values dz is computed from besides dy and x (zeros where it reads none).
  template <int kVec>
  __device__ __forceinline__ Vec<scalar_t, kVec> load_side(int64_t offset) const {
    return side ? load_vec<kVec>(side + offset) : Vec<scalar_t, kVec>{};
  }
  // g = dy of one value, x its input, o its side value (from load_side), co its channel's coefficients.
  __device__ __forceinline__ acc_t operator()(acc_t g, acc_t x, scalar_t o, const Coefficients<acc_t>& co) const {
    switch (from) {
      case GradFrom::kOutput:
        return grad_through_activation<Activation::kRelu, GradFrom::kOutput>(g, x, o, acc_t(0), co.mean, co.alpha,
                                                                            co.beta, param);
      case GradFrom::kRecompute:
        return with_activation(act, [&](auto kind) {
          return grad_through_activation<decltype(kind)::value, GradFrom::kRecompute, scalar_t>(
              g, x, o, static_cast<acc_t>(o), co.mean, co.alpha, co.beta, param);
        });
      default:
        return g;
    }
  }
};

template <typename scalar_t, typename acc_t, typename param_t>
struct GradReducer {
  using State = GradSums<acc_t>;
  // The widest vector: dy, x and the side value a lane and, channels-last, 3 coefficients and 2 sums a lane,
  // within 64 registers.
  static constexpr int kMaxLanes = 4;
  Restrict<const scalar_t> dy;
  Restrict<const scalar_t> x;
  ChannelCoefficients<acc_t, param_t> coefficients;  // the forward's
  GradSource<scalar_t, acc_t> source;

  // dz and dz * (x - mean) of the lanes [first, last) of the kVec values at `offset`, lane k with
  // coefficients co[k] into sums[k] (kLanes = kVec: channels-last) or all with co[0] into sums[0].
  template <int kVec, int kLanes>
  __device__ __forceinline__ void add(State (&sums)[kLanes], const Coefficients<acc_t> (&co)[kLanes],
                                      int64_t offset, int first = 0, int last = kVec) const {
    const auto g = load_vec<kVec>(dy + offset);
    const auto xv = load_vec<kVec>(x + offset);
    const auto ov = source.template load_side<kVec>(offset);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const int lane = kLanes == 1 ? 0 : k;
      const acc_t xk = static_cast<acc_t>(xv.val[k]);
      const acc_t dz = source(static_cast<acc_t>(g.val[k]), xk, ov.val[k], co[lane]);
      if (k >= first && k < last) {
        sums[lane].dz += dz;
        sums[lane].dz_xmu = mul_add(dz, xk - co[lane].mean, sums[lane].dz_xmu);  // fused: host_device.h
      }
    }
  }

  struct Local {
    const GradReducer* r;
    Coefficients<acc_t> co[1];

    template <int kVec>
    __device__ __forceinline__ void add(State& s, int64_t offset, int first = 0, int last = kVec) const {
      State sums[1] = {s};
      r->template add<kVec>(sums, co, offset, first, last);
      s = sums[0];
    }
  };

  template <int kVec>
  struct Lanes {
    const GradReducer* r;
    Coefficients<acc_t> co[kVec];
    State sums[kVec];

    __device__ __forceinline__ void add(int64_t offset) { r->template add<kVec>(sums, co, offset); }
    __device__ __forceinline__ State lane(int k) const { return sums[k]; }
  };

  __device__ __forceinline__ Local at_channel(int64_t c) const { return Local{this, {coefficients(c)}}; }
  template <int kVec>
  __device__ __forceinline__ Lanes<kVec> at_channels(int64_t c) const {
    Lanes<kVec> lanes{this, {}, {}};
#pragma unroll
    for (int k = 0; k < kVec; ++k) lanes.co[k] = coefficients(c + k);
    return lanes;
  }
  __device__ __forceinline__ State result(int64_t, State total) const { return total; }
};

// ---------------------------------------------------------------------------------------------------
// Finishers: what the last block does with a channel's total.

// Batch statistics -> saved mean/invstd and the running-stat update (unbiased variance m/(m-1)), in one
// place so no extra launch is needed (the normalize pass computes its coefficients from mean and invstd).
template <typename acc_t, typename param_t>
struct StatsFinisher {
  Global<param_t> running_mean;  // may be null (then running_var is too)
  Global<param_t> running_var;
  Global<acc_t> mean;
  Global<acc_t> invstd;
  double momentum;
  double eps;

  __device__ void operator()(int64_t c, const WelfordPartial<acc_t>& total) const {
    mean[c] = total.mean;
    invstd[c] = welford_invstd(total, eps);
    if (running_mean && total.count > 0) {
      const param_t old_mean = running_mean[c], old_var = running_var[c];
      running_mean[c] = static_cast<param_t>(running_update(static_cast<acc_t>(old_mean), total.mean, momentum));
      running_var[c] =
          static_cast<param_t>(running_update(static_cast<acc_t>(old_var), welford_unbiased_var(total), momentum));
    }
  }
};

// A channel's total as it is: Welford moments (mean, M2) or gradient sums, for statistics that are merged
// across processes before use (SyncBatchNorm).
template <typename acc_t>
struct MomentsFinisher {
  Global<acc_t> mean;
  Global<acc_t> m2;
  __device__ void operator()(int64_t c, const WelfordPartial<acc_t>& total) const {
    mean[c] = total.mean;
    m2[c] = total.m2;
  }
};

template <typename acc_t>
struct SumsFinisher {
  Global<acc_t> sum_dz;
  Global<acc_t> sum_dz_xmu;
  __device__ void operator()(int64_t c, const GradSums<acc_t>& total) const {
    sum_dz[c] = total.dz;
    sum_dz_xmu[c] = total.dz_xmu;
  }
};

// Gradient sums -> grad_weight, grad_bias and, for the training dx, mean_dz and proj (welford.h's
// grad_weight_of and centering_of).
template <typename acc_t, typename param_t>
struct GradFinisher {
  Global<const acc_t> invstd;
  Global<param_t> grad_weight;  // may be null
  Global<param_t> grad_bias;    // may be null
  Global<acc_t> mean_dz;        // may be null (then proj is too)
  Global<acc_t> proj;
  int64_t count;

  __device__ void operator()(int64_t c, const GradSums<acc_t>& total) const {
    const acc_t istd = invstd[c];
    if (grad_weight) grad_weight[c] = static_cast<param_t>(grad_weight_of(total.dz_xmu, istd));
    if (grad_bias) grad_bias[c] = static_cast<param_t>(total.dz);
    if (mean_dz) {
      const CenteringTerms<acc_t> terms = centering_of(total.dz, total.dz_xmu, istd, inv_count_of<acc_t>(count));
      mean_dz[c] = terms.mean_dz;
      proj[c] = terms.proj;
    }
  }
};

// ---------------------------------------------------------------------------------------------------
// Block and grid merges.

// Merges the partials of all threads of the block (warp shuffles, then the warps' results through shared
// memory); the block's total is returned to thread 0. Every thread must call it.
template <typename State>
__device__ State block_merge(State s) {
  __shared__ SharedArray<State, kMaxWarps> warp_totals;
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int warps = (blockDim.x * blockDim.y) / kWarpSize;
  for (int delta = kWarpSize / 2; delta > 0; delta /= 2) s = merge(s, shfl_down(s, delta));
  if (tid % kWarpSize == 0) warp_totals[tid / kWarpSize] = s;
  __syncthreads();
  if (tid == 0) {
    for (int w = 1; w < warps; ++w) s = merge(s, static_cast<State>(warp_totals[w]));
  }
  __syncthreads();  // warp_totals may be reused by the caller's next block_merge
  return s;
}

// Called by every thread after the block wrote its partials for a group of channels (BlockPartials):
// true in all threads of the one block (per group) that arrives last. The counter is zero before the
// launch (allocated zeroed, scratch.h) and that last block sets it back to zero, which is safe because
// every other block of the group has counted already: the next launch finds it zeroed, so no launch
// fills counters, and a CUDA graph's replays find them as its capture did.
__device__ __forceinline__ bool last_block_of_group(unsigned* counter, unsigned blocks_in_group) {
  __shared__ SharedArray<bool, 1> is_last;
  __threadfence();  // this thread's partial writes are visible device-wide ...
  __syncthreads();  // ... for every writer of the block, before the block signals
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    is_last[0] = atomicAdd(counter, 1u) == blocks_in_group - 1;
    if (is_last[0]) *counter = 0u;
  }
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

// The window's vector (zeros outside [first, last) where it does not fit: read value by value).
template <int kVec, typename P>
__device__ __forceinline__ Vec<pointee_t<P>, kVec> load_window(P p, const Window& w) {
  if (w.fits) return load_vec<kVec>(p + w.start);
  Vec<pointee_t<P>, kVec> v{};
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    if (k >= w.first && k < w.last) v.val[k] = p[w.start + k];
  }
  return v;
}

// Channels-first (N, C, S): blockIdx.x = channel, blockIdx.y = split of the channel's N * W windows.
// Window j of sample n is the j-th kVec-aligned group of elements (aligned in memory too: the host side
// passes 16-byte aligned tensors) overlapping the run (window_of). The host side gives W = S / kVec when
// S % kVec == 0 (every window full), else the most windows a run can overlap.
// Every window is one aligned vector load, the partial ones at a run's ends with the lanes outside the run
// masked, except a last window reaching past the tensor's end, read value by value.
// With several splits, the last block of a channel merges the splits' partials (partials[c * splits + i]):
// thread t takes partials t, t + blockDim.x, ... in order, then the block merge, so the order is fixed and
// the result bitwise repeatable.
template <typename Reducer, typename Finisher, int kVec>
FUSEDBN_KERNEL void channels_first_reduce_kernel(Reducer reducer, Finisher finisher, int64_t N, int64_t C, int64_t S,
                                                 int64_t W, BlockPartials<typename Reducer::State> partials,
                                                 unsigned* counters) {
  using State = typename Reducer::State;
  const int64_t c = blockIdx.x;
  const int64_t splits = gridDim.y;
  const int64_t windows = N * W;
  const int64_t numel = N * C * S;
  const int64_t per_split = (windows + splits - 1) / splits;
  const int64_t w_begin = per_split * blockIdx.y;
  const int64_t w_end = w_begin + per_split < windows ? w_begin + per_split : windows;

  State s{};
  const auto channel = reducer.at_channel(c);
  const int64_t first = w_begin + threadIdx.x;
  int64_t n = first / W, j = first - n * W;  // (sample, window), advanced without division
  const int64_t step_n = blockDim.x / W, step_j = blockDim.x - step_n * W;
  for (int64_t w = first; w < w_end; w += blockDim.x) {
    const Window win = window_of<kVec>(n, j, c * S, C * S, S, numel);
    if (win.first == 0 && win.last == kVec) {
      channel.template add<kVec>(s, win.start);
    } else if (win.first < win.last && win.fits) {
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
  s = block_merge(s);
  if (splits > 1) {
    if (threadIdx.x == 0) partials[c * splits + blockIdx.y] = s;
    if (!last_block_of_group(counters + c, static_cast<unsigned>(splits))) return;
    s = State{};
    for (int64_t i = threadIdx.x; i < splits; i += blockDim.x) s = merge(s, static_cast<State>(partials[c * splits + i]));
    s = block_merge(s);
  }
  if (threadIdx.x == 0) finisher(c, reducer.result(c, s));
}

// Channels-last (M = N*S rows, C): threadIdx.x walks groups of kVec consecutive channels (one vector load
// per row, coalesced across the warp), threadIdx.y walks rows; blockIdx.x = blockDim.x * kVec channels,
// blockIdx.y = split of the rows. C % kVec == 0.
// With several splits, the last block of a channel group merges the splits' partials (partials[i * C + c])
// as the rows were merged: thread row y takes splits y, y + blockDim.y, ... in order, then the column merge
// (a fixed order: bitwise repeatable).
template <typename Reducer, typename Finisher, int kVec>
FUSEDBN_KERNEL void channels_last_reduce_kernel(Reducer reducer, Finisher finisher, int64_t M, int64_t C,
                                                BlockPartials<typename Reducer::State> partials, unsigned* counters) {
  using State = typename Reducer::State;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  const int64_t splits = gridDim.y;
  const int64_t per_split = (M + splits - 1) / splits;
  const int64_t r_begin = per_split * blockIdx.y;
  const int64_t r_end = r_begin + per_split < M ? r_begin + per_split : M;

  using Lanes = decltype(reducer.template at_channels<kVec>(0));
  Lanes lanes{};
  if (c < C) {
    lanes = reducer.template at_channels<kVec>(c);
    // Unrolled so that two rows' loads are in flight before the first is used (the loop stores nothing).
#pragma unroll 2
    for (int64_t r = r_begin + threadIdx.y; r < r_end; r += blockDim.y) lanes.add(r * C + c);
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
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    State s{};
    if (c < C) {
      for (int64_t i = threadIdx.y; i < splits; i += blockDim.y) s = merge(s, static_cast<State>(partials[i * C + c + k]));
    }
    s = column_merge(s);
    if (threadIdx.y == 0 && c < C) finisher(c + k, reducer.result(c + k, s));
  }
}

// ---------------------------------------------------------------------------------------------------
// Elementwise passes. An op has per-channel `Coeffs coeffs(c)` and `apply<kVec>(offset, co)`, which
// reads kVec contiguous values at `offset`, lane k using the coefficients co(k), and writes kVec results.
// kMaxLanes: the widest vector an op takes (of either layout), so that its values and coefficients stay
// within 64 registers (tests/test_kernel_resources.py).

// co(k) of a channels-first vector: it spans at most two channels' runs, lanes k < boundary in the first
// (two sets of coefficients in registers, not one per lane). By value: a reference chosen at run time
// would need the two sets in addressable (local) memory.
template <typename Coeffs>
struct TwoChannels {
  Coeffs first, second;
  int boundary;
  __device__ __forceinline__ Coeffs operator()(int k) const { return k < boundary ? first : second; }
};

// co(k) of a channels-last vector: lane k is channel c + k.
template <typename Coeffs, int kLanes>
struct PerLane {
  Coeffs co[kLanes];
  __device__ __forceinline__ const Coeffs& operator()(int k) const { return co[k]; }
};

// y = act((x - mean) * alpha + beta [+ residual]), the coefficients from `coefficients`, the activation a
// run-time value as in GradSource.
template <typename scalar_t, typename acc_t, typename param_t>
struct NormalizeOp {
  Restrict<const scalar_t> x;
  Restrict<scalar_t> y;
  Restrict<const scalar_t> residual;  // may be null
  ChannelCoefficients<acc_t, param_t> coefficients;
  Activation act;
  acc_t param;

  using Coeffs = Coefficients<acc_t>;
  __device__ __forceinline__ Coeffs coeffs(int64_t c) const { return coefficients(c); }

  static constexpr int kMaxLanes = 8;  // 16 bytes of 2-byte values; channels-last: 3 coefficients a lane

  template <int kVec, typename Lanes>
  __device__ __forceinline__ void apply(int64_t offset, const Lanes& co) const {
    const auto rv = residual ? load_vec<kVec>(residual + offset) : Vec<scalar_t, kVec>{};
    store_vec<kVec>(y + offset, outputs<kVec>(load_vec<kVec>(x + offset), rv, co));
  }

  // The outputs of the values xv (and their residual rv, zeros without one), lane k with co(k).
  template <int kVec, typename Lanes>
  __device__ __forceinline__ Vec<scalar_t, kVec> outputs(const Vec<scalar_t, kVec>& xv, const Vec<scalar_t, kVec>& rv,
                                                         const Lanes& co) const {
    Vec<scalar_t, kVec> out;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const Coeffs ck = co(k);
      acc_t z = normalized(static_cast<acc_t>(xv.val[k]), ck.mean, ck.alpha, ck.beta);
      if (residual) z += static_cast<acc_t>(rv.val[k]);
      out.val[k] = static_cast<scalar_t>(
          with_activation(act, [&](auto kind) { return ActivationFn<decltype(kind)::value>::forward(z, param); }));
    }
    return out;
  }
};

// dx = (dz - mean_dz[c] - (x - mean[c]) * proj[c]) * alpha[c] with dz from `source`; under eval statistics
// (mean_dz and proj null) dx = dz * alpha[c], which x does not enter (a NaN input keeps a finite gradient,
// as in torch). dz itself goes into grad_residual when that is not null. The coefficients are the
// forward's, which the recomputed z needs too. x is null where nothing reads it (dz = dy under eval
// statistics: dx is dy scaled).
template <typename scalar_t, typename acc_t, typename param_t>
struct BackwardElemtOp {
  Restrict<const scalar_t> dy;
  Restrict<const scalar_t> x;
  Restrict<scalar_t> dx;             // may be null (only grad_residual wanted)
  Restrict<scalar_t> grad_residual;  // may be null
  Restrict<const acc_t> mean_dz;
  Restrict<const acc_t> proj;
  ChannelCoefficients<acc_t, param_t> coefficients;
  GradSource<scalar_t, acc_t> source;

  struct Coeffs {
    Coefficients<acc_t> bn;
    acc_t mean_dz, proj;
  };
  __device__ __forceinline__ Coeffs coeffs(int64_t c) const {
    return Coeffs{coefficients(c), mean_dz ? mean_dz[c] : acc_t(0), proj ? proj[c] : acc_t(0)};
  }

  // dy, x, the side value and two outputs per lane, and (channels-last) 5 coefficients a lane: 4 lanes keep
  // a thread within 64 registers (1 of double).
  static constexpr int kMaxLanes = sizeof(acc_t) == 8 ? 1 : 4;

  template <int kVec, typename Lanes>
  __device__ __forceinline__ void apply(int64_t offset, const Lanes& co) const {
    const auto gv = load_vec<kVec>(dy + offset);
    const auto xv = x ? load_vec<kVec>(x + offset) : Vec<scalar_t, kVec>{};
    const auto ov = source.template load_side<kVec>(offset);
    Vec<scalar_t, kVec> out, dz_out;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const acc_t xk = static_cast<acc_t>(xv.val[k]);
      const Coeffs ck = co(k);
      const acc_t dz = source(static_cast<acc_t>(gv.val[k]), xk, ov.val[k], ck.bn);
      out.val[k] = static_cast<scalar_t>(mean_dz ? dx_of<true>(dz, xk, ck.bn.mean, ck.mean_dz, ck.proj, ck.bn.alpha)
                                                 : dx_of<false>(dz, xk, ck.bn.mean, acc_t(0), acc_t(0), ck.bn.alpha));
      dz_out.val[k] = static_cast<scalar_t>(dz);
    }
    if (dx) store_vec<kVec>(dx + offset, out);
    if (grad_residual) store_vec<kVec>(grad_residual + offset, dz_out);
  }
};

// Channels-first (N, C, S), flat over numel: vector v covers elements [v*kVec, v*kVec + kVec). With
// S >= kVec a vector spans at most two channel runs, so lane k belongs to channel c or the next one.
// The last numel % kVec values are done one per thread.
template <typename Op, int kVec>
FUSEDBN_KERNEL void channels_first_elementwise_kernel(Op op, int64_t numel, int64_t S, int64_t C) {
  using Coeffs = typename Op::Coeffs;
  const int64_t vectors = numel / kVec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (first < vectors) {
    // (position within the run, channel) of the vector's first element, advanced by the grid stride.
    int64_t pos = first * kVec % S, c = first * kVec / S % C;
    const int64_t step_pos = stride * kVec % S, step_c = stride * kVec / S % C;
    for (int64_t v = first; v < vectors; v += stride) {
      const Coeffs here = op.coeffs(c);
      const bool spans_two = pos + kVec > S;
      const TwoChannels<Coeffs> co{here, spans_two ? op.coeffs(c + 1 < C ? c + 1 : 0) : here,
                                   spans_two ? static_cast<int>(S - pos) : kVec};
      op.template apply<kVec>(v * kVec, co);
      pos += step_pos;
      c += step_c;
      if (pos >= S) {
        pos -= S;
        ++c;
      }
      if (c >= C) c -= C;
    }
  }
  const int64_t e = vectors * kVec + first;
  if (e < numel) {
    const Coeffs here = op.coeffs(e / S % C);
    op.template apply<1>(e, TwoChannels<Coeffs>{here, here, 1});
  }
}

// Channels-last (M rows, C): each thread keeps kVec consecutive channels (C % kVec == 0) and their
// coefficients in registers and walks rows; threadIdx.x/blockIdx.x = channel vectors, threadIdx.y/
// blockIdx.y = rows (grid-stride).
template <typename Op, int kVec>
FUSEDBN_KERNEL void channels_last_elementwise_kernel(Op op, int64_t M, int64_t C) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (c >= C) return;
  PerLane<typename Op::Coeffs, kVec> co;
#pragma unroll
  for (int k = 0; k < kVec; ++k) co.co[k] = op.coeffs(c + k);
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < M; r += stride) {
    op.template apply<kVec>(r * C + c, co);
  }
}

// The training forward in one launch where a channel's N * W windows fit in one block, kRows a thread
// (channels-first; the host side checks N * W <= kRows * blockDim.x): the block reads its channel once and
// keeps the values on chip, merges their statistics, finishes the channel (StatsFinisher: mean, invstd,
// the running statistics) and normalizes the kept values, two passes over memory instead of three. They
// are kept in shared memory, each thread's own (read back without a barrier): in registers they would not
// fit beside the merge within 64 (32 KB a 512-thread block, so 6 blocks still fit an SM). A window's lanes
// outside the run are neither counted nor written: other blocks own them.
template <typename scalar_t, typename acc_t, typename param_t, int kVec, int kRows>
FUSEDBN_KERNEL void channels_first_forward_kernel(WelfordReducer<scalar_t, acc_t> reducer,
                                                  StatsFinisher<acc_t, param_t> finisher,
                                                  NormalizeOp<scalar_t, acc_t, param_t> op, int64_t N, int64_t C,
                                                  int64_t S, int64_t W) {
  const int64_t c = blockIdx.x;
  const int64_t numel = N * C * S, channel_offset = c * S, sample_stride = C * S;
  // A channel's windows fit in a block, so their indices divide in 32 bits.
  const int windows = static_cast<int>(N * W), per_run = static_cast<int>(W);
  auto window = [&](int i) {
    const int w = static_cast<int>(threadIdx.x + i * blockDim.x);
    return w < windows ? window_of<kVec>(w / per_run, w % per_run, channel_offset, sample_stride, S, numel)
                       : Window{0, 0, 0, true};
  };
  const auto channel = reducer.at_channel(c);
  WelfordPartial<acc_t> s{};
  __shared__ SharedArray<Vec<scalar_t, kVec>, kRows * kMaxBlockThreads> kept;
  auto kept_at = [&](int i) -> decltype(auto) { return kept[i * blockDim.x + threadIdx.x]; };
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const Window win = window(i);
    if (win.first >= win.last) continue;
    const auto values = load_window<kVec>(reducer.x, win);
    kept_at(i) = values;
    channel.template add_loaded<kVec>(s, values, win.first, win.last);
  }
  s = block_merge(s);
  // Thread 0 finishes the channel and hands its coefficients to the block through shared memory. Not
  // through op.coeffs(c): its mean and invstd pointers are __restrict__, a promise that nothing writes
  // them during the launch, which the finisher just did.
  using Coeffs = typename NormalizeOp<scalar_t, acc_t, param_t>::Coeffs;
  __shared__ SharedArray<Coeffs, 1> channel_coeffs;
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
    const auto rv = op.residual ? load_window<kVec>(op.residual, win) : Vec<scalar_t, kVec>{};
    const auto out = op.template outputs<kVec>(kept_at(i), rv, co);
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

}  // namespace fusedbn::cuda
