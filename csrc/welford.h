// Welford statistics shared by every backend (CPU, CUDA and the CUDA kernels under the SIMT emulator).
//
// A partial is (count n, mean, M2 = sum of squared deviations from mean). Two partials merge exactly
// (Chan, Golub & LeVeque 1979):
//   n = na + nb,  delta = mb - ma,  mean = ma + delta * nb / n,  M2 = M2a + M2b + delta^2 * na * nb / n
// The 1 / max(1, n) guard makes empty partials (an empty block, an empty rank) harmless.
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

template <typename acc_t>
FUSEDBN_HOST_DEVICE inline WelfordPartial<acc_t> welford_merge(
    const WelfordPartial<acc_t>& a, const WelfordPartial<acc_t>& b) {
  const int64_t n = a.count + b.count;
  const acc_t nb_over_n = static_cast<acc_t>(b.count) / static_cast<acc_t>(n > 0 ? n : 1);
  const acc_t delta = b.mean - a.mean;
  WelfordPartial<acc_t> out{};
  out.mean = a.mean + delta * nb_over_n;
  out.m2 = a.m2 + b.m2 + delta * delta * static_cast<acc_t>(a.count) * nb_over_n;
  out.count = n;
  return out;
}

// Biased variance (used to normalize) -> 1 / sqrt(var + eps).
template <typename acc_t>
FUSEDBN_HOST_DEVICE inline acc_t welford_invstd(const WelfordPartial<acc_t>& w, double eps) {
  const acc_t var = w.count > 0 ? w.m2 / static_cast<acc_t>(w.count) : acc_t(0);
  return acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
}

// Unbiased variance m/(m-1) * biased, the value nn.BatchNorm folds into running_var.
template <typename acc_t>
FUSEDBN_HOST_DEVICE inline acc_t welford_unbiased_var(const WelfordPartial<acc_t>& w) {
  return w.m2 / static_cast<acc_t>(w.count > 1 ? w.count - 1 : 1);
}

}  // namespace fusedbn
