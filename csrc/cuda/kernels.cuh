// The CUDA kernels of fusedbn, written in the CUDA subset the SIMT emulator (csrc/simt/simt.h) also
// compiles: no <<<>>> (launches go through FUSEDBN_LAUNCH in launch.h), no CUDA runtime calls, static
// __shared__ arrays of trivial types, full-warp shuffles, block sizes that are multiples of 32.
//
// Two kernel families, each one template over the element type and a small functor:
//   reductions  - per-channel partials per thread, warp merge by shuffles, block merge through shared
//                 memory, grid merge across the blocks of a channel by the last block to finish (a
//                 per-channel semaphore), which then calls the finisher for the channel: Welford
//                 statistics (forward) or the gradient sums (backward).
//   elementwise - one read and one write per value, 16-byte vectors where alignment allows, grid-stride,
//                 the channel of each vector tracked incrementally (no division in the loop).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../welford.h"

namespace fusedbn::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxWarps = 32;  // 1024 threads

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

template <int kVec, typename T>
__device__ __forceinline__ Vec<T, kVec> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, kVec>*>(p);
}

template <int kVec, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, kVec>& v) {
  *reinterpret_cast<Vec<T, kVec>*>(p) = v;
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

// sum(dy) and sum(dy * (x - mean)) of one channel.
template <typename acc_t>
struct GradSums {
  acc_t dy;
  acc_t dy_xmu;
};

template <typename acc_t>
__device__ __forceinline__ GradSums<acc_t> shfl_down(const GradSums<acc_t>& s, int delta) {
  return GradSums<acc_t>{__shfl_down_sync(kFullMask, s.dy, delta), __shfl_down_sync(kFullMask, s.dy_xmu, delta)};
}

template <typename acc_t>
__device__ __forceinline__ GradSums<acc_t> merge(const GradSums<acc_t>& a, const GradSums<acc_t>& b) {
  return GradSums<acc_t>{a.dy + b.dy, a.dy_xmu + b.dy_xmu};
}

// ---------------------------------------------------------------------------------------------------
// Reducers: how a thread folds values into its partial. `at_channel(c)` gives the per-thread view of one
// channel, whose `add<kVec>(state, offset)` takes kVec contiguous values of that channel starting at
// element `offset`; `result(c, total)` turns the channel's merged total into what the finisher needs.

// Welford statistics of values shifted by the channel's first value K (every thread and block of the
// channel uses the same K, so the partials merge exactly): means stay of the order of the spread, and a
// channel with mean 1e4 and std 1 keeps full precision. x == nullptr marks an empty batch.
template <typename scalar_t, typename acc_t>
struct WelfordReducer {
  using State = WelfordPartial<acc_t>;
  const scalar_t* __restrict__ x;
  int64_t channel_stride;  // channel c's first value is x[c * channel_stride]

  struct Local {
    const scalar_t* __restrict__ x;
    acc_t shift;

    // kVec values: their own mean and M2 (no division per value), then one Chan merge.
    template <int kVec>
    __device__ __forceinline__ void add(State& s, int64_t offset) const {
      acc_t v[kVec];
      if constexpr (kVec == 1) {
        v[0] = static_cast<acc_t>(x[offset]) - shift;
      } else {
        const auto loaded = load_vec<kVec>(x + offset);
#pragma unroll
        for (int k = 0; k < kVec; ++k) v[k] = static_cast<acc_t>(loaded.val[k]) - shift;
      }
      acc_t sum = 0;
#pragma unroll
      for (int k = 0; k < kVec; ++k) sum += v[k];
      const acc_t mean = sum / acc_t(kVec);
      acc_t m2 = 0;
#pragma unroll
      for (int k = 0; k < kVec; ++k) m2 += (v[k] - mean) * (v[k] - mean);
      s = welford_merge(s, State{mean, m2, kVec});
    }
  };

  __device__ __forceinline__ acc_t shift_of(int64_t c) const {
    return x ? static_cast<acc_t>(x[c * channel_stride]) : acc_t(0);
  }
  __device__ __forceinline__ Local at_channel(int64_t c) const { return Local{x, shift_of(c)}; }
  __device__ __forceinline__ State result(int64_t c, State total) const {
    total.mean += shift_of(c);
    return total;
  }
};

template <typename scalar_t, typename acc_t>
struct GradReducer {
  using State = GradSums<acc_t>;
  const scalar_t* __restrict__ dy;
  const scalar_t* __restrict__ x;
  const acc_t* __restrict__ mean;

  struct Local {
    const scalar_t* __restrict__ dy;
    const scalar_t* __restrict__ x;
    acc_t mu;

    template <int kVec>
    __device__ __forceinline__ void add(State& s, int64_t offset) const {
      if constexpr (kVec == 1) {
        const acc_t g = static_cast<acc_t>(dy[offset]);
        s.dy += g;
        s.dy_xmu += g * (static_cast<acc_t>(x[offset]) - mu);
      } else {
        const auto g = load_vec<kVec>(dy + offset);
        const auto xv = load_vec<kVec>(x + offset);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const acc_t gk = static_cast<acc_t>(g.val[k]);
          s.dy += gk;
          s.dy_xmu += gk * (static_cast<acc_t>(xv.val[k]) - mu);
        }
      }
    }
  };

  __device__ __forceinline__ Local at_channel(int64_t c) const { return Local{dy, x, mean[c]}; }
  __device__ __forceinline__ State result(int64_t, State total) const { return total; }
};

// ---------------------------------------------------------------------------------------------------
// Finishers: what the last block does with a channel's total.

// Batch statistics -> saved mean/invstd, the normalize coefficients (alpha = w*invstd, beta = b) and the
// running-stat update (unbiased variance m/(m-1)), all in one place so no extra launch is needed.
template <typename acc_t, typename param_t>
struct StatsFinisher {
  const param_t* weight;  // may be null
  const param_t* bias;    // may be null
  param_t* running_mean;  // may be null (then running_var is too)
  param_t* running_var;
  acc_t* mean;
  acc_t* invstd;
  acc_t* alpha;
  acc_t* beta;
  double momentum;
  double eps;

  __device__ void operator()(int64_t c, const WelfordPartial<acc_t>& total) const {
    const acc_t istd = welford_invstd(total, eps);
    mean[c] = total.mean;
    invstd[c] = istd;
    alpha[c] = (weight ? static_cast<acc_t>(weight[c]) : acc_t(1)) * istd;
    beta[c] = bias ? static_cast<acc_t>(bias[c]) : acc_t(0);
    if (running_mean && total.count > 0) {
      const acc_t m = static_cast<acc_t>(momentum);
      running_mean[c] = static_cast<param_t>((acc_t(1) - m) * static_cast<acc_t>(running_mean[c]) + m * total.mean);
      running_var[c] = static_cast<param_t>((acc_t(1) - m) * static_cast<acc_t>(running_var[c]) +
                                            m * welford_unbiased_var(total));
    }
  }
};

// Gradient sums -> grad_weight, grad_bias and the coefficients of the training dx:
//   dx = (dy - mean_dy - (x - mean) * proj) * a,  mean_dy = sum(dy)/m,
//   proj = invstd^2 * sum(dy*(x-mean))/m,  a = w * invstd.
template <typename acc_t, typename param_t>
struct GradFinisher {
  const param_t* weight;  // may be null
  const acc_t* invstd;
  param_t* grad_weight;   // may be null
  param_t* grad_bias;     // may be null
  acc_t* mean_dy;
  acc_t* proj;
  acc_t* a;
  int64_t count;

  __device__ void operator()(int64_t c, const GradSums<acc_t>& total) const {
    const acc_t istd = invstd[c];
    if (grad_weight) grad_weight[c] = static_cast<param_t>(total.dy_xmu * istd);
    if (grad_bias) grad_bias[c] = static_cast<param_t>(total.dy);
    const acc_t inv_m = acc_t(1) / static_cast<acc_t>(count > 0 ? count : 1);
    mean_dy[c] = total.dy * inv_m;
    proj[c] = istd * istd * total.dy_xmu * inv_m;
    a[c] = (weight ? static_cast<acc_t>(weight[c]) : acc_t(1)) * istd;
  }
};

// ---------------------------------------------------------------------------------------------------
// Block and grid merges.

// Merges the partials of all threads of the block (warp shuffles, then the warps' results through shared
// memory); the block's total is returned to thread 0. Every thread must call it.
template <typename State>
__device__ State block_merge(State s) {
  __shared__ State warp_totals[kMaxWarps];
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int warps = (blockDim.x * blockDim.y) / kWarpSize;
  for (int delta = kWarpSize / 2; delta > 0; delta /= 2) s = merge(s, shfl_down(s, delta));
  if (tid % kWarpSize == 0) warp_totals[tid / kWarpSize] = s;
  __syncthreads();
  if (tid == 0) {
    for (int w = 1; w < warps; ++w) s = merge(s, warp_totals[w]);
  }
  __syncthreads();  // warp_totals may be reused by the caller's next block_merge
  return s;
}

// Called by every thread after the block wrote its partial for a group of channels into `workspace`:
// returns true in all threads of the one block (per group) that finishes last. The semaphores start at
// zero (the front allocates them zeroed for each launch).
__device__ __forceinline__ bool last_block_of_group(unsigned* semaphore, unsigned blocks_in_group) {
  __shared__ bool is_last;
  __threadfence();  // this thread's partial writes are visible device-wide ...
  __syncthreads();  // ... for every writer of the block, before the block signals
  if (threadIdx.x == 0 && threadIdx.y == 0) is_last = atomicAdd(semaphore, 1u) == blocks_in_group - 1;
  __syncthreads();
  if (is_last) __threadfence();  // order the reads of the other blocks' partials after the signal
  return is_last;
}

// Channels-first (N, C, S): blockIdx.x = channel, blockIdx.y = split of the channel's N*S values.
// Each split covers a contiguous range of the channel's values (rounded to kVec; S % kVec == 0 when
// kVec > 1, so a vector never straddles two samples). Value e of channel c lives at (e/S)*C*S + c*S + e%S;
// the thread tracks (n, s) incrementally.
template <typename Reducer, typename Finisher, int kVec>
__global__ void channels_first_reduce_kernel(Reducer reducer, Finisher finisher, int64_t N, int64_t C,
                                             int64_t S, typename Reducer::State* workspace,
                                             unsigned* semaphores) {
  using State = typename Reducer::State;
  const int64_t c = blockIdx.x;
  const int64_t splits = gridDim.y;
  const int64_t count = N * S;
  const int64_t vectors = count / kVec;
  const int64_t per_split = (vectors + splits - 1) / splits;
  const int64_t v_begin = per_split * blockIdx.y;
  const int64_t v_end = v_begin + per_split < vectors ? v_begin + per_split : vectors;

  State s{};
  const auto channel = reducer.at_channel(c);
  const int64_t stride = static_cast<int64_t>(blockDim.x) * kVec;
  const int64_t first = (v_begin + threadIdx.x) * kVec;
  int64_t n = first / S, pos = first - n * S;
  const int64_t step_n = stride / S, step_s = stride - step_n * S;
  for (int64_t v = v_begin + threadIdx.x; v < v_end; v += blockDim.x) {
    channel.template add<kVec>(s, (n * C + c) * S + pos);
    n += step_n;
    pos += step_s;
    if (pos >= S) {
      pos -= S;
      ++n;
    }
  }
  s = block_merge(s);
  if (splits == 1) {
    if (threadIdx.x == 0) finisher(c, reducer.result(c, s));
    return;
  }
  if (threadIdx.x == 0) workspace[c * splits + blockIdx.y] = s;
  if (last_block_of_group(semaphores + c, static_cast<unsigned>(splits)) && threadIdx.x == 0) {
    State total{};
    for (int64_t i = 0; i < splits; ++i) total = merge(total, workspace[c * splits + i]);
    finisher(c, reducer.result(c, total));
  }
}

// Channels-last (M = N*S rows, C): threadIdx.x walks channels (coalesced), threadIdx.y rows;
// blockIdx.x = group of blockDim.x channels, blockIdx.y = split of the rows.
template <typename Reducer, typename Finisher>
__global__ void channels_last_reduce_kernel(Reducer reducer, Finisher finisher, int64_t M, int64_t C,
                                            typename Reducer::State* workspace, unsigned* semaphores) {
  using State = typename Reducer::State;
  __shared__ State column[kMaxWarps * kWarpSize];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t splits = gridDim.y;
  const int64_t per_split = (M + splits - 1) / splits;
  const int64_t r_begin = per_split * blockIdx.y;
  const int64_t r_end = r_begin + per_split < M ? r_begin + per_split : M;

  State s{};
  if (c < C) {
    const auto channel = reducer.at_channel(c);
    for (int64_t r = r_begin + threadIdx.y; r < r_end; r += blockDim.y) channel.template add<1>(s, r * C + c);
  }
  // Merge the blockDim.y partials of each channel through shared memory, in row order.
  column[threadIdx.y * blockDim.x + threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0) {
    for (unsigned y = 1; y < blockDim.y; ++y) s = merge(s, column[y * blockDim.x + threadIdx.x]);
  }
  if (splits == 1) {
    if (threadIdx.y == 0 && c < C) finisher(c, reducer.result(c, s));
    return;
  }
  if (threadIdx.y == 0 && c < C) workspace[blockIdx.y * C + c] = s;
  if (last_block_of_group(semaphores + blockIdx.x, static_cast<unsigned>(splits)) && threadIdx.y == 0 && c < C) {
    State total{};
    for (int64_t i = 0; i < splits; ++i) total = merge(total, workspace[i * C + c]);
    finisher(c, reducer.result(c, total));
  }
}

// ---------------------------------------------------------------------------------------------------
// Elementwise passes. Element i belongs to channel (i / inner) % C, with inner = S (channels-first) or
// 1 (channels-last). A vector of kVec values has one channel (channels-first, S % kVec == 0) or kVec
// consecutive channels (channels-last, C % kVec == 0).

struct ChannelTracker {
  int64_t pos, c;              // position within the run, channel
  int64_t step_pos, step_c;    // per grid-stride step
  int64_t inner, C;

  __device__ ChannelTracker(int64_t first, int64_t stride, int64_t inner_, int64_t C_)
      : pos(first % inner_), c((first / inner_) % C_), step_pos(stride % inner_),
        step_c((stride / inner_) % C_), inner(inner_), C(C_) {}

  __device__ __forceinline__ void advance() {
    pos += step_pos;
    c += step_c;
    if (pos >= inner) {
      pos -= inner;
      ++c;
    }
    if (c >= C) c -= C;
  }
};

// y = (x - mean[c]) * alpha[c] + beta[c]
template <typename scalar_t, typename acc_t>
struct NormalizeOp {
  const scalar_t* __restrict__ x;
  scalar_t* __restrict__ y;
  const acc_t* __restrict__ mean;
  const acc_t* __restrict__ alpha;
  const acc_t* __restrict__ beta;

  template <int kVec>
  __device__ __forceinline__ void apply(int64_t offset, int64_t c, bool per_lane_channel) const {
    const auto xv = load_vec<kVec>(x + offset);
    Vec<scalar_t, kVec> out;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const int64_t ck = per_lane_channel ? c + k : c;
      out.val[k] = static_cast<scalar_t>((static_cast<acc_t>(xv.val[k]) - mean[ck]) * alpha[ck] + beta[ck]);
    }
    store_vec<kVec>(y + offset, out);
  }
};

// dx = (dy - mean_dy[c] - (x - mean[c]) * proj[c]) * a[c]
template <typename scalar_t, typename acc_t>
struct BackwardElemtOp {
  const scalar_t* __restrict__ dy;
  const scalar_t* __restrict__ x;
  scalar_t* __restrict__ dx;
  const acc_t* __restrict__ mean;
  const acc_t* __restrict__ mean_dy;
  const acc_t* __restrict__ proj;
  const acc_t* __restrict__ a;

  template <int kVec>
  __device__ __forceinline__ void apply(int64_t offset, int64_t c, bool per_lane_channel) const {
    const auto gv = load_vec<kVec>(dy + offset);
    const auto xv = load_vec<kVec>(x + offset);
    Vec<scalar_t, kVec> out;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const int64_t ck = per_lane_channel ? c + k : c;
      const acc_t xmu = static_cast<acc_t>(xv.val[k]) - mean[ck];
      out.val[k] = static_cast<scalar_t>((static_cast<acc_t>(gv.val[k]) - mean_dy[ck] - xmu * proj[ck]) * a[ck]);
    }
    store_vec<kVec>(dx + offset, out);
  }
};

template <typename Op, int kVec>
__global__ void elementwise_kernel(Op op, int64_t numel, int64_t inner, int64_t C) {
  const int64_t vectors = numel / kVec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (first >= vectors) return;
  ChannelTracker channel(first * kVec, stride * kVec, inner, C);
  const bool per_lane_channel = inner == 1;
  for (int64_t v = first; v < vectors; v += stride) {
    op.template apply<kVec>(v * kVec, channel.c, per_lane_channel);
    channel.advance();
  }
}

}  // namespace fusedbn::cuda
