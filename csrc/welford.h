// The per-channel statistics math every backend shares (CPU, CUDA and the CUDA kernels under the SIMT
// emulator): Welford partials and their merge, invstd, the running-statistics update and normalize's
// coefficients, each written once here.
//
// A partial is (count n, mean, M2 = sum of squared deviations from mean). Two partials merge exactly
// (Chan, Golub & LeVeque 1979):
//   n = na + nb,  delta = mb - ma,  mean = ma + delta * nb / n,  M2 = M2a + M2b + delta^2 * na * nb / n
// Written so that it never makes a NaN or an overflow the true result does not have:
//  - an empty side (na or nb = 0) contributes exactly nothing: the cross term is
//    delta * (delta * (na * nb / n)), which is delta * 0 = 0 for any finite delta (an infinite mean makes
//    it NaN, where M2 is NaN anyway);
//  - delta * (delta * f) with f = na * nb / n >= 1/2 overflows only where delta^2 * f does;
//  - where delta itself is not finite (means of opposite sign near the range's end, or an infinite mean),
//    the mean is the weighted sum ma * na/n + mb * nb/n, which is finite where the true mean is and
//    inf (or NaN, for inf - inf) exactly where a plain sum of the values is.
//
// Rounding (host_device.h): a formula here either has no product feeding a sum (invstd, the variances,
// 1/m, centering_of, grad_weight_of, alpha_of: each step correctly rounded, so the same inputs give the
// same bits on every backend), or says where it is fused: fma_exact (the running-statistics update: the
// same bits on every backend) or mul_add (the merge, which also runs per vector in the CUDA reductions:
// the same bits on the GPU, the SIMT emulator and the CPU's FMA builds, but for its fallback where the
// means' difference is not finite; the x86-64 baseline CPU build rounds the products apart). The statistics
// themselves differ between the CPU and the GPU in the last bits anyway: they sum in different orders.
#pragma once

#include <cstdint>
#include <cmath>

#include "host_device.h"

namespace fusedbn {

// Trivial (no member initializers) so it can live in CUDA shared memory; value-initialise with {}.
template <typename acc_t>
struct WelfordPartial {
  acc_t mean;
  acc_t m2;
  int64_t count;
};

// The Chan merge of side b's (mean, M2) into side a's, given nb / n and na * nb / n (shared by every
// column of a block on the CPU, where the columns merge in vectorized loops). Fused as nvcc fuses it:
// mean + delta * nb/n and m2_b + delta * (delta * na nb/n) in one rounding each (mul_add).
template <typename acc_t>
FUSEDBN_HOST_DEVICE inline void chan_merge_into(acc_t& mean, acc_t& m2, acc_t mean_b, acc_t m2_b, acc_t nb_over_n,
                                                acc_t na_nb_over_n) {
  const acc_t delta = mean_b - mean;
  mean = mul_add(delta, nb_over_n, mean);
  m2 += mul_add(delta, delta * na_nb_over_n, m2_b);
}

template <typename acc_t>
FUSEDBN_HOST_DEVICE inline WelfordPartial<acc_t> welford_merge(
    const WelfordPartial<acc_t>& a, const WelfordPartial<acc_t>& b) {
  const int64_t n = a.count + b.count;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n > 0 ? n : 1);
  const acc_t nb_over_n = static_cast<acc_t>(b.count) * inv_n;
  WelfordPartial<acc_t> out{a.mean, a.m2, n};
  chan_merge_into(out.mean, out.m2, b.mean, b.m2, nb_over_n, static_cast<acc_t>(a.count) * nb_over_n);
  // Left to the compiler (nvcc fuses the first product, g++ on an FMA target may): an explicit fma here costs
  // the Welford reductions 2 registers, for a last bit of means near float's range or beyond it.
  if (!std::isfinite(b.mean - a.mean)) out.mean = a.mean * (static_cast<acc_t>(a.count) * inv_n) + b.mean * nb_over_n;
  return out;
}

// The value every partial of a channel is shifted by before summing (its first value): means stay of the
// order of the spread, so a channel with mean 1e4 and std 1 keeps full precision. A non-finite first value
// would make every shifted value inf - inf; 0 stays finite.
template <typename acc_t>
FUSEDBN_HOST_DEVICE inline acc_t channel_shift(acc_t first_value) {
  return std::isfinite(first_value) ? first_value : acc_t(0);
}

// 1 / sqrt(var + eps) in acc_t, the batch's biased variance in training and running_var in eval: the same
// bits on every backend for the same var, three correctly rounded steps and no product to contract (nvcc's
// default -prec-div=true -prec-sqrt=true: no fast-math build, which would make them approximate).
template <typename acc_t>
FUSEDBN_HOST_DEVICE inline acc_t invstd_of(acc_t var, double eps) {
  return acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
}

// Biased variance (used to normalize) -> invstd.
template <typename acc_t>
FUSEDBN_HOST_DEVICE inline acc_t welford_invstd(const WelfordPartial<acc_t>& w, double eps) {
  return invstd_of(w.count > 0 ? w.m2 / static_cast<acc_t>(w.count) : acc_t(0), eps);
}

// Unbiased variance m/(m-1) * biased, the value nn.BatchNorm folds into running_var.
template <typename acc_t>
FUSEDBN_HOST_DEVICE inline acc_t welford_unbiased_var(const WelfordPartial<acc_t>& w) {
  return w.m2 / static_cast<acc_t>(w.count > 1 ? w.count - 1 : 1);
}

// nn.BatchNorm's running-statistic update, (1 - momentum) * old + momentum * batch, in acc_t (torch's CPU
// kernel computes it in float64: the two may differ in the last bit; a momentum beyond float32's range
// makes the update NaN in both). One fma, (1 - m) * old + round(m * batch), as nvcc contracts it: the same
// bits on every backend for the same batch statistic (per channel: libm's fma costs the x86-64 baseline
// CPU build nothing worth counting).
template <typename acc_t>
FUSEDBN_HOST_DEVICE inline acc_t running_update(acc_t old, acc_t batch, double momentum) {
  const acc_t m = static_cast<acc_t>(momentum);
  return fma_exact(acc_t(1) - m, old, m * batch);
}

// The backward's per-channel terms from the gradient sums over a channel's m values, sum(dz) and
// sum(dz * (x - mean)) (dz: the gradient reaching BatchNorm's output):
//   grad_weight = sum(dz * (x - mean)) * invstd,  grad_bias = sum(dz),
//   training dx = (dz - mean_dz - (x - mean) * proj) * alpha (dx_of, epilogue.h) with
//   mean_dz = sum(dz) / m and proj = invstd^2 * sum(dz * (x - mean)) / m.
// 1/m is rounded once from double, so a count beyond float's 2^24 still divides exactly as far as it can.
// Products only (invstd * invstd * sum * 1/m from the left, no sum to contract): the same bits on every
// backend for the same sums; the sums themselves are reduced in each backend's own order.
template <typename acc_t>
FUSEDBN_HOST_DEVICE inline acc_t inv_count_of(int64_t count) {
  return static_cast<acc_t>(1.0 / static_cast<double>(count > 0 ? count : 1));
}

template <typename acc_t>
struct CenteringTerms {
  acc_t mean_dz, proj;
};

template <typename acc_t>
FUSEDBN_HOST_DEVICE inline CenteringTerms<acc_t> centering_of(acc_t sum_dz, acc_t sum_dz_xmu, acc_t invstd,
                                                              acc_t inv_m) {
  return {sum_dz * inv_m, invstd * invstd * sum_dz_xmu * inv_m};
}

template <typename acc_t>
FUSEDBN_HOST_DEVICE inline acc_t grad_weight_of(acc_t sum_dz_xmu, acc_t invstd) {
  return sum_dz_xmu * invstd;
}

// normalize's per-channel coefficients, y = (x - mean) * alpha + beta: alpha = weight * invstd (invstd
// without a weight), beta = bias (0 without), from parameters of any dtype (null where absent) through a
// pointer (or the CUDA kernels' pointer type, csrc/cuda/device_memory.h). One product: the same bits on
// every backend for the same invstd (in eval, from running_var: the same everywhere).
template <typename acc_t, typename ParamPointer>
FUSEDBN_HOST_DEVICE inline acc_t alpha_of(ParamPointer weight, int64_t c, acc_t invstd) {
  return weight ? static_cast<acc_t>(weight[c]) * invstd : invstd;
}

template <typename acc_t, typename ParamPointer>
FUSEDBN_HOST_DEVICE inline acc_t beta_of(ParamPointer bias, int64_t c) {
  return bias ? static_cast<acc_t>(bias[c]) : acc_t(0);
}

}  // namespace fusedbn
