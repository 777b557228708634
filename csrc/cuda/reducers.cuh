// Reducers: how a thread folds values into its partials. Two views of the data:
//   at_channel(c)        channels-first: one channel's values, either whole vectors (load<kVec>(offset),
//                        then add_whole(state, loaded[]) for several of them at once) or the lanes
//                        [first, last) of the kVec values at `offset` (add<kVec>: a window at a run's ends);
//   at_channels<kVec>(c, C) channels-last: an accumulator for the kVec consecutive channels c, c+1, ...;
//                        load(offset) reads one value of each, stored contiguously at `offset`, add(loaded)
//                        folds them in, lane(k) is channel c + k's partial. Every thread of the block
//                        calls it (it may fill a table in shared memory behind a barrier); past C, empty.
// `result(c, total)` turns a channel's merged total into what the finisher needs; kVec <= kMaxLanes.
// kInFlight (the reducer's, per vector width: channels-first whole windows; its Lanes': channels-last
// rows): how many vectors a thread loads before it uses the first, so that several loads are in flight per
// thread (as many as fit in the 64 registers beside the accumulators, tests/test_kernel_resources.py).
#pragma once

#include <cstdint>
#include <type_traits>

#include "../epilogue.h"
#include "../welford.h"
#include "coefficients.cuh"
#include "kernel_basics.cuh"
#include "merges.cuh"

namespace fusedbn::cuda {

// Welford statistics of values shifted by the channel's first value K (channel_shift, welford.h; every
// thread and block of the channel uses the same K, so the partials merge exactly): means stay of the
// order of the spread, and a channel with mean 1e4 and std 1 keeps full precision. Each thread accumulates
// in acc_t; its partial and every merge above it (warps, block, grid: up to ~20 levels of Chan merges) are
// in double, so the merges' rounding does not add up to more than the final rounding to acc_t (the mean
// within half a unit in the last place of what the threads' partials give). x == nullptr marks an empty
// batch.
template <typename scalar_t, typename acc_t>
struct WelfordReducer {
  using State = WelfordPartial<double>;
  static constexpr int kMaxLanes = 8;  // the widest vector; channels-last: shift, mean and M2 a lane
  static constexpr int kMaxLanesLast = 8;
  template <int kVec>
  static constexpr int kInFlight = kVec >= 8 ? 2 : 4;  // 16 values (8 of double) folded at once
  Restrict<const scalar_t> x;
  int64_t channel_stride;  // channel c's first value is x[c * channel_stride]

  struct Local {
    Restrict<const scalar_t> x;
    acc_t shift;

    template <int kVec>
    using Loaded = Vec<scalar_t, kVec>;
    template <int kVec>
    __device__ __forceinline__ Loaded<kVec> load(int64_t offset) const {
      return load_vec<kVec>(x + offset);
    }
    // kCount whole vectors: their own mean (summed pairwise, so its rounding grows with log2 of the count
    // only; divided by a power of two, exactly) and M2, then one Chan merge into s.
    template <int kVec, int kCount>
    __device__ __forceinline__ void add_whole(State& s, const Loaded<kVec> (&loaded)[kCount]) const {
      constexpr int kValues = kVec * kCount;
      static_assert((kValues & (kValues - 1)) == 0, "pairwise sums over a power of two");
      auto value = [&](int i) { return static_cast<acc_t>(loaded[i / kVec].val[i % kVec]) - shift; };
      constexpr int kHalf = kValues > 1 ? kValues / 2 : 1;
      acc_t sums[kHalf];
#pragma unroll
      for (int i = 0; i < kHalf; ++i) {
        if constexpr (kValues > 1) {
          sums[i] = value(i) + value(i + kHalf);
        } else {
          sums[i] = value(i);
        }
      }
#pragma unroll
      for (int width = kValues / 4; width > 0; width /= 2) {
#pragma unroll
        for (int i = 0; i < width; ++i) sums[i] += sums[i + width];
      }
      const acc_t mean = sums[0] / static_cast<acc_t>(kValues);
      acc_t m2 = 0;
#pragma unroll
      for (int i = 0; i < kValues; ++i) m2 = mul_add(value(i) - mean, value(i) - mean, m2);  // fused: host_device.h
      s = welford_merge(s, State{mean, m2, kValues});
    }
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

    static constexpr int kInFlight = 2;  // beside 3 accumulators a lane
    using Loaded = Vec<scalar_t, kVec>;
    __device__ __forceinline__ Loaded load(int64_t offset) const { return load_vec<kVec>(x + offset); }
    __device__ __forceinline__ void add(const Loaded& loaded) {
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
  __device__ __forceinline__ Lanes<kVec> at_channels(int64_t c, int64_t C) const {
    Lanes<kVec> lanes{x, {}, {}, {}, 0};
    if (c < C) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) lanes.shift[k] = shift_of(c + k);
    }
    return lanes;
  }
  // The channel's statistics in acc_t, each rounded once.
  __device__ __forceinline__ WelfordPartial<acc_t> result(int64_t c, State total) const {
    return {static_cast<acc_t>(total.mean + static_cast<double>(shift_of(c))), static_cast<acc_t>(total.m2), total.count};
  }
};

// dz, the gradient reaching BatchNorm's output: dy, or dy through the activation that followed it
// (grad_through_activation, epilogue.h): ReLU's mask read from the forward's output, or the derivative at
// z recomputed from x with the forward's coefficients (and the residual). Act: the activation policy
// (coefficients.cuh), fixed for identity and ReLU, else chosen per value. (The CPU's GradSource,
// elementwise.h, holds the same pointers with the rule as template arguments.)
template <typename scalar_t, typename acc_t, typename Act>
struct GradSource {
  Restrict<const scalar_t> dy;
  Restrict<const scalar_t> x;  // dy where nothing reads x (read and ignored: no branch before the loads)
  GradFrom from;
  Activation act;
  acc_t param;
  Restrict<const scalar_t> side;  // kOutput: the output; kRecompute: the residual (may be null)

  // A vector of dy, x and the side value (zeros where dz reads none), as both backward passes read them.
  template <int kVec>
  struct Loaded {
    Vec<scalar_t, kVec> g, x, side;
  };
  template <int kVec>
  __device__ __forceinline__ Loaded<kVec> load(int64_t offset) const {
    return {load_vec<kVec>(dy + offset), load_vec<kVec>(x + offset),
            side ? load_vec<kVec>(side + offset) : Vec<scalar_t, kVec>{}};
  }
  // dz[k] of a vector's values: g = dy, x the inputs, o the side values (Loaded::side), co(k) lane k's
  // channel's coefficients. One branch on the rule per vector for the fixed activations; per value for any
  // (the whole vector's values live across the branch to its code would not fit in the registers).
  template <int kVec, typename Lanes>
  __device__ __forceinline__ void operator()(acc_t (&dz)[kVec], const Vec<scalar_t, kVec>& g,
                                             const Vec<scalar_t, kVec>& x, const Vec<scalar_t, kVec>& o,
                                             const Lanes& co) const {
    using From = GradFrom;
    constexpr int kPerBranch = std::is_same_v<Act, AnyActivation> ? 1 : kVec;
#pragma unroll
    for (int k0 = 0; k0 < kVec; k0 += kPerBranch) {
      auto each = [&](auto kind, auto from_c) {
#pragma unroll
        for (int k = k0; k < k0 + kPerBranch; ++k) {
          dz[k] = grad_through_activation<decltype(kind)::value, decltype(from_c)::value, scalar_t>(
              static_cast<acc_t>(g.val[k]), static_cast<acc_t>(x.val[k]), o.val[k], static_cast<acc_t>(o.val[k]),
              co(k).mean, co(k).alpha, co(k).beta, activation_param<Act>(co, k, param));
        }
      };
      switch (from) {
        case From::kOutput:
          each(std::integral_constant<Activation, Activation::kRelu>{}, std::integral_constant<From, From::kOutput>{});
          break;
        case From::kRecompute:
          Act::apply(act, [&](auto kind) { each(kind, std::integral_constant<From, From::kRecompute>{}); });
          break;
        default:
#pragma unroll
          for (int k = k0; k < k0 + kPerBranch; ++k) dz[k] = static_cast<acc_t>(g.val[k]);
      }
    }
  }
};

template <typename scalar_t, typename acc_t, typename param_t, typename Act>
struct GradReducer {
  // PReLU's weight gradient, sum(dy * min(z, 0)), is summed beside the two sums.
  static constexpr bool kSlopes = kSlopesOf<Act>;
  using State = GradSums<acc_t, kSlopes>;
  using Coeffs = Coefficients<acc_t, kSlopes>;
  // The widest vector within 64 registers: 16 bytes of 2-byte values (dy, x and the side value a lane;
  // channels-last 2 sums and the mean a lane besides, the other coefficients in shared memory: Lanes), 4
  // where any activation's code may run, or PReLU's (its slope, and a third sum a lane).
  static constexpr int kMaxLanes = kHeavyActivation<Act> ? 4 : 8;
  static constexpr int kMaxLanesLast = kMaxLanes;
  // Vectors of dy, x (and the side value) each: two of up to 4 lanes; one of 8 (dy and x are two 16-byte
  // loads already), of double, or where any activation's code may run (their registers).
  template <int kVec>
  static constexpr int kInFlight = sizeof(acc_t) == 8 || kVec >= 8 || kHeavyActivation<Act> ? 1 : 2;
  ChannelCoefficients<acc_t, param_t, kSlopes> coefficients;  // the forward's
  GradSource<scalar_t, acc_t, Act> source;

  template <int kVec>
  using Loaded = typename GradSource<scalar_t, acc_t, Act>::template Loaded<kVec>;
  template <int kVec>
  __device__ __forceinline__ Loaded<kVec> load(int64_t offset) const {
    return source.template load<kVec>(offset);
  }

  // dz and dz * (x - mean) of the lanes [first, last) of loaded values, value k with coefficients co(k) into
  // sums[k] (kLanes = kVec: channels-last) or all into sums[0] (co(k) then the same for every k).
  template <int kVec, int kLanes, typename Co>
  __device__ __forceinline__ void add(State (&sums)[kLanes], const Co& co, const Loaded<kVec>& in, int first = 0,
                                      int last = kVec) const {
    acc_t dz[kVec];
    source(dz, in.g, in.x, in.side, co);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const int lane = kLanes == 1 ? 0 : k;
      if (k >= first && k < last) {
        const acc_t xk = static_cast<acc_t>(in.x.val[k]);
        sums[lane].dz += dz[k];
        sums[lane].dz_xmu = mul_add(dz[k], xk - co(k).mean, sums[lane].dz_xmu);
        if constexpr (kSlopes) {  // z as the source recomputed it (the side value is the residual, or 0)
          const acc_t z = normalized(xk, co(k).mean, co(k).alpha, co(k).beta) + static_cast<acc_t>(in.side.val[k]);
          sums[lane].dslope += ActivationFn<Activation::kPrelu>::grad_slope(static_cast<acc_t>(in.g.val[k]), z);
        }
      }
    }
  }

  struct Local {
    const GradReducer* r;
    Coeffs co;

    __device__ __forceinline__ Coeffs operator()(int) const { return co; }

    template <int kVec>
    using Loaded = GradReducer::Loaded<kVec>;
    template <int kVec>
    __device__ __forceinline__ Loaded<kVec> load(int64_t offset) const {
      return r->template load<kVec>(offset);
    }
    template <int kVec, int kCount>
    __device__ __forceinline__ void add_whole(State& s, const Loaded<kVec> (&loaded)[kCount]) const {
      State sums[1] = {s};
#pragma unroll
      for (int i = 0; i < kCount; ++i) r->template add<kVec>(sums, *this, loaded[i]);
      s = sums[0];
    }
    template <int kVec>
    __device__ __forceinline__ void add(State& s, int64_t offset, int first = 0, int last = kVec) const {
      State sums[1] = {s};
      r->template add<kVec>(sums, *this, r->template load<kVec>(offset), first, last);
      s = sums[0];
    }
  };

  // Channels-last: lane k is channel c + k. Its mean is in registers; its other coefficients, which only a
  // recomputed z reads, in the block's table in shared memory at k * blockDim.x + threadIdx.x (conflict-free
  // across a warp's columns), so 8 lanes' sums fit in the registers beside a 16-byte vector of each stream.
  template <int kVec>
  struct Lanes {
    using Table = SharedArray<Coeffs, kVec * kWarpSize>;
    const GradReducer* r;
    Table* table;
    acc_t mean[kVec];
    State sums[kVec];

    static constexpr int kInFlight = GradReducer::kInFlight<kVec>;
    using Loaded = GradReducer::Loaded<kVec>;
    __device__ __forceinline__ Coeffs operator()(int k) const {
      Coeffs t = (*table)[k * blockDim.x + threadIdx.x];
      t.mean = mean[k];
      return t;
    }
    __device__ __forceinline__ Loaded load(int64_t offset) const { return r->template load<kVec>(offset); }
    __device__ __forceinline__ void add(const Loaded& in) { r->template add<kVec>(sums, *this, in); }
    __device__ __forceinline__ State lane(int k) const { return sums[k]; }
  };

  __device__ __forceinline__ Local at_channel(int64_t c) const {
    return Local{this, coefficients(c)};
  }
  // Every thread of the block calls it (the table is filled behind a barrier); lanes past C stay empty.
  template <int kVec>
  __device__ __forceinline__ Lanes<kVec> at_channels(int64_t c, int64_t C) const {
    __shared__ SharedArray<Coeffs, kVec * kWarpSize> table;  // Lanes<kVec>::Table
    Lanes<kVec> lanes{this, &table, {}, {}};
    if (threadIdx.y == 0 && c < C) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) table[k * blockDim.x + threadIdx.x] = coefficients(c + k);
    }
    __syncthreads();
    if (c < C) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) lanes.mean[k] = static_cast<Coeffs>(table[k * blockDim.x + threadIdx.x]).mean;
    }
    return lanes;
  }
  __device__ __forceinline__ State result(int64_t, State total) const { return total; }
};

}  // namespace fusedbn::cuda
