// Elementwise passes: one read and one write per value (the backward's: dy, x and a side value read, dx
// and dz written), vectors of up to 16 bytes where alignment allows. An op has per-channel
// `Coeffs coeffs(c)`, `load<kVec>(offset)` of the kVec contiguous values at `offset` (all it reads there)
// and `store<kVec>(offset, loaded, co)`, which computes lane k's results with the coefficients co(k) and
// writes them. Each thread loads Op::kInFlight<kVec> vectors before it uses the first. kMaxLanes,
// kMaxLanesLast: the widest vector an op takes channels-first and channels-last, so that its values and
// coefficients stay within 64 registers
// (tests/test_kernel_resources.py). Act: the activation policy (coefficients.cuh).
#pragma once

#include <cstdint>
#include <type_traits>

#include "../epilogue.h"
#include "coefficients.cuh"
#include "device_memory.h"
#include "kernel_basics.cuh"
#include "reducers.cuh"

namespace fusedbn::cuda {

// co(k) of a channels-first vector: it spans at most two channels' runs, lanes k < boundary in the first
// (two sets of coefficients in registers, not one per lane). By value: a reference chosen at run time
// would need the two sets in addressable (local) memory.
template <typename Coeffs>
struct TwoChannels {
  Coeffs first, second;
  int boundary;
  __device__ __forceinline__ Coeffs operator()(int k) const { return k < boundary ? first : second; }
};

// co(k) of a channels-last vector: lane k is channel c + k, its coefficients in the block's table in shared
// memory at k * columns + column (conflict-free across a warp's columns).
template <typename Coeffs, typename Table>
struct TableLanes {
  Table* table;
  unsigned column, columns;
  __device__ __forceinline__ Coeffs operator()(int k) const { return (*table)[k * columns + column]; }
};

// y = act((x - mean) * alpha + beta [+ residual]), the coefficients from `coefficients`.
template <typename scalar_t, typename acc_t, typename param_t, typename Act>
struct NormalizeOp {
  Restrict<const scalar_t> x;
  Restrict<scalar_t> y;
  Restrict<const scalar_t> residual;  // may be null
  ChannelCoefficients<acc_t, param_t, kSlopesOf<Act>> coefficients;
  Activation act;
  acc_t param;

  using Coeffs = Coefficients<acc_t, kSlopesOf<Act>>;
  __device__ __forceinline__ Coeffs coeffs(int64_t c) const { return coefficients(c); }

  static constexpr int kMaxLanes = 8;  // 16 bytes of 2-byte values
  static constexpr int kMaxLanesLast = 8;
  // Vectors of x and the residual each; one where any activation's code may run (its registers).
  template <int kVec>
  static constexpr int kInFlight = std::is_same_v<Act, AnyActivation> ? 1 : 2;

  template <int kVec>
  struct Loaded {
    Vec<scalar_t, kVec> x, residual;
  };
  template <int kVec>
  __device__ __forceinline__ Loaded<kVec> load(int64_t offset) const {
    return {load_vec<kVec>(x + offset), residual ? load_vec<kVec>(residual + offset) : Vec<scalar_t, kVec>{}};
  }
  template <int kVec, typename Lanes>
  __device__ __forceinline__ void store(int64_t offset, const Loaded<kVec>& in, const Lanes& co) const {
    store_vec<kVec>(y + offset, outputs<kVec>(in.x, in.residual, co));
  }

  // The outputs of the values xv (and their residual rv, zeros without one), lane k with co(k).
  template <int kVec, typename Lanes>
  __device__ __forceinline__ Vec<scalar_t, kVec> outputs(const Vec<scalar_t, kVec>& xv, const Vec<scalar_t, kVec>& rv,
                                                         const Lanes& co) const {
    acc_t z[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const Coeffs ck = co(k);
      z[k] = normalized(static_cast<acc_t>(xv.val[k]), ck.mean, ck.alpha, ck.beta);
      if (residual) z[k] += static_cast<acc_t>(rv.val[k]);
    }
    Vec<scalar_t, kVec> out;
    Act::apply(act, [&](auto kind) {  // one branch on the activation per vector
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const acc_t p = activation_param<Act>(co, k, param);
        out.val[k] = static_cast<scalar_t>(ActivationFn<decltype(kind)::value>::forward(z[k], p));
      }
    });
    return out;
  }
};

// dx = (dz - mean_dz[c] - (x - mean[c]) * proj[c]) * alpha[c] with dz from `source`; under eval statistics
// (mean_dz and proj null) dx = dz * alpha[c], which x does not enter (a NaN input keeps a finite gradient,
// as in torch). dz itself goes into grad_residual when that is not null. The coefficients are the
// forward's, which the recomputed z needs too. Where nothing needs x (dz = dy under eval statistics: dx is
// dy scaled), x is dy, read and ignored: a load behind no branch, so the loads of a trip issue together.
template <typename scalar_t, typename acc_t, typename param_t, typename Act>
struct BackwardElemtOp {
  Restrict<scalar_t> dx;             // may be null (only grad_residual wanted)
  Restrict<scalar_t> grad_residual;  // may be null
  Restrict<const acc_t> mean_dz;
  Restrict<const acc_t> proj;
  ChannelCoefficients<acc_t, param_t, kSlopesOf<Act>> coefficients;
  GradSource<scalar_t, acc_t, Act> source;

  struct Coeffs {
    Coefficients<acc_t, kSlopesOf<Act>> bn;
    acc_t mean_dz, proj;
  };
  __device__ __forceinline__ Coeffs coeffs(int64_t c) const {
    return Coeffs{coefficients(c), mean_dz ? mean_dz[c] : acc_t(0), proj ? proj[c] : acc_t(0)};
  }

  // 16 bytes of 2-byte values (1 of double): dy, x, the side value and two outputs a lane.
  static constexpr int kMaxLanes = sizeof(acc_t) == 8 ? 1 : 8;
  static constexpr int kMaxLanesLast = kMaxLanes;
  // Vectors of dy, x and the side value each: two of 4-lane vectors, one of 8 lanes, of double, or where
  // any activation's code may run (their registers).
  template <int kVec>
  static constexpr int kInFlight = sizeof(acc_t) == 8 || kVec >= 8 || kHeavyActivation<Act> ? 1 : 2;

  template <int kVec>
  using Loaded = typename GradSource<scalar_t, acc_t, Act>::template Loaded<kVec>;
  template <int kVec>
  __device__ __forceinline__ Loaded<kVec> load(int64_t offset) const {
    return source.template load<kVec>(offset);
  }
  template <int kVec, typename Lanes>
  __device__ __forceinline__ void store(int64_t offset, const Loaded<kVec>& in, const Lanes& co) const {
    acc_t dz[kVec];
    source(dz, in.g, in.x, in.side, [&](int k) { return co(k).bn; });
    Vec<scalar_t, kVec> out, dz_out;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const acc_t xk = static_cast<acc_t>(in.x.val[k]);
      const Coeffs ck = co(k);
      out.val[k] = static_cast<scalar_t>(mean_dz ? dx_of<true>(dz[k], xk, ck.bn.mean, ck.mean_dz, ck.proj, ck.bn.alpha)
                                                 : dx_of<false>(dz[k], xk, ck.bn.mean, acc_t(0), acc_t(0), ck.bn.alpha));
      dz_out.val[k] = static_cast<scalar_t>(dz[k]);
    }
    if (dx) store_vec<kVec>(dx + offset, out);
    if (grad_residual) store_vec<kVec>(grad_residual + offset, dz_out);
  }
};

// Channels-first (N, C, S), flat over numel: vector v covers elements [v*kVec, v*kVec + kVec). Each block
// takes a contiguous range of vectors, thread t of it vectors t, t + blockDim.x, ... (so a thread's
// consecutive vectors mostly share a channel, whose coefficients it keeps until the channel changes), the
// (position within the run, channel) of each advanced without division. With S >= kVec a vector spans at
// most two channel runs, so lane k belongs to channel c or the next one. The last numel % kVec values are
// done one per thread of block 0.
template <typename Op, int kVec>
FUSEDBN_KERNEL void channels_first_elementwise_kernel(Op op, int64_t numel, int64_t S, int64_t C) {
  using Coeffs = typename Op::Coeffs;
  using Loaded = typename Op::template Loaded<kVec>;
  constexpr int kInFlight = Op::template kInFlight<kVec>;
  const int64_t vectors = numel / kVec;
  const int64_t per_block = (vectors + gridDim.x - 1) / gridDim.x;
  const int64_t v_begin = per_block * blockIdx.x;
  const int64_t v_end = v_begin + per_block < vectors ? v_begin + per_block : vectors;
  const int64_t step = blockDim.x;
  int64_t v = v_begin + threadIdx.x;
  if (v < v_end) {
    int64_t pos = v * kVec % S, c = v * kVec / S % C;
    const int64_t step_pos = step * kVec % S, step_c = step * kVec / S % C;
    int64_t here_c = c;
    Coeffs here = op.coeffs(c);
    // Stores vector v's results (the vector at (pos, c)), then moves (pos, c) on to vector v + step.
    auto store_and_advance = [&](int64_t v, const Loaded& in) {
      if (c != here_c) {
        here_c = c;
        here = op.coeffs(c);
      }
      const bool spans_two = pos + kVec > S;
      op.template store<kVec>(v * kVec, in,
                              TwoChannels<Coeffs>{here, spans_two ? op.coeffs(c + 1 < C ? c + 1 : 0) : here,
                                                  spans_two ? static_cast<int>(S - pos) : kVec});
      pos += step_pos;
      c += step_c;
      if (pos >= S) {
        pos -= S;
        ++c;
      }
      if (c >= C) c -= C;
    };
    for (; v + (kInFlight - 1) * step < v_end; v += kInFlight * step) {
      Loaded in[kInFlight];
#pragma unroll
      for (int i = 0; i < kInFlight; ++i) in[i] = op.template load<kVec>((v + i * step) * kVec);
#pragma unroll
      for (int i = 0; i < kInFlight; ++i) store_and_advance(v + i * step, in[i]);
    }
    for (; v < v_end; v += step) store_and_advance(v, op.template load<kVec>(v * kVec));
  }
  const int64_t e = vectors * kVec + threadIdx.x;
  if (blockIdx.x == 0 && e < numel) {
    const Coeffs here = op.coeffs(e / S % C);
    op.template store<1>(e, op.template load<1>(e), TwoChannels<Coeffs>{here, here, 1});
  }
}

// Channels-last (M rows, C): each thread keeps kVec consecutive channels (C % kVec == 0) and walks rows,
// Op::kInFlight<kVec> rows loaded before the first is used; threadIdx.x/blockIdx.x = channel vectors (at most a
// warp's), threadIdx.y/blockIdx.y = rows (grid-stride). The block's channels' coefficients are computed once,
// by its first row of threads, into shared memory (in registers, kVec lanes' would crowd out the loads).
template <typename Op, int kVec>
FUSEDBN_KERNEL void channels_last_elementwise_kernel(Op op, int64_t M, int64_t C) {
  using Coeffs = typename Op::Coeffs;
  using Loaded = typename Op::template Loaded<kVec>;
  constexpr int kInFlight = Op::template kInFlight<kVec>;
  __shared__ SharedArray<Coeffs, kVec * kWarpSize> table;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (threadIdx.y == 0 && c < C) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) table[k * blockDim.x + threadIdx.x] = op.coeffs(c + k);
  }
  __syncthreads();
  if (c >= C) return;
  const TableLanes<Coeffs, decltype(table)> co{&table, threadIdx.x, blockDim.x};
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  for (; r + (kInFlight - 1) * stride < M; r += kInFlight * stride) {
    Loaded in[kInFlight];
#pragma unroll
    for (int i = 0; i < kInFlight; ++i) in[i] = op.template load<kVec>((r + i * stride) * C + c);
#pragma unroll
    for (int i = 0; i < kInFlight; ++i) op.template store<kVec>((r + i * stride) * C + c, in[i], co);
  }
  for (; r < M; r += stride) op.template store<kVec>(r * C + c, op.template load<kVec>(r * C + c), co);
}

}  // namespace fusedbn::cuda
