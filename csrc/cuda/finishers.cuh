// Finishers: what the last block does with a channel's total.
#pragma once

#include <cstdint>

#include "../welford.h"
#include "device_memory.h"
#include "merges.cuh"

namespace fusedbn::cuda {

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
  Global<acc_t> sum_dslope;  // PReLU's; null for the other activations
  template <bool kSlopes>
  __device__ void operator()(int64_t c, const GradSums<acc_t, kSlopes>& total) const {
    sum_dz[c] = total.dz;
    sum_dz_xmu[c] = total.dz_xmu;
    if constexpr (kSlopes) sum_dslope[c] = total.dslope;
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
  Global<acc_t> sum_dslope;  // may be null: PReLU's weight gradient per channel

  template <bool kSlopes>
  __device__ void operator()(int64_t c, const GradSums<acc_t, kSlopes>& total) const {
    if constexpr (kSlopes) {
      if (sum_dslope) sum_dslope[c] = total.dslope;
    }
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

}  // namespace fusedbn::cuda
