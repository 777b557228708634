// Per-channel coefficients and the activation, as the kernels see them.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../epilogue.h"
#include "../welford.h"
#include "device_memory.h"

namespace fusedbn::cuda {

// A channel's coefficients, bn(x) = (x - mean) * alpha + beta (epilogue.h's normalized), computed where
// they are used from the statistics and the parameters in their own dtypes with welford.h's formulas (the
// CPU ops' too, so every backend computes the same bits): from batch statistics (mean, invstd: training
// and the backward) or, where invstd is null, from the running ones (eval, invstd_of(running_var, eps)).
// kSlope: with PReLU's slope of the channel (only PReLU's kernels carry it: registers, shared memory).
template <typename acc_t, bool kSlope = false>
struct Coefficients {
  acc_t mean, alpha, beta;
};

template <typename acc_t>
struct Coefficients<acc_t, true> {
  acc_t mean, alpha, beta, slope;
};

// PReLU's slopes, 1 or C values (slope_step 0 or 1): only its kernels' ChannelCoefficients carry them (an
// empty base otherwise, so the other kernels' arguments and code are as without PReLU).
template <typename acc_t, bool kSlope>
struct SlopesOf {};

template <typename acc_t>
struct SlopesOf<acc_t, true> {
  Restrict<const acc_t> slopes;
  int64_t slope_step;
};

template <typename acc_t, typename param_t, bool kSlope = false>
struct ChannelCoefficients : SlopesOf<acc_t, kSlope> {
  Restrict<const acc_t> mean;  // batch statistics, or null with invstd (eval)
  Restrict<const acc_t> invstd;
  Restrict<const param_t> running_mean;  // eval
  Restrict<const param_t> running_var;
  Restrict<const param_t> weight;  // may be null
  Restrict<const param_t> bias;    // may be null
  double eps;

  __device__ __forceinline__ Coefficients<acc_t, kSlope> operator()(int64_t c) const {
    const acc_t istd = invstd ? invstd[c] : invstd_of(static_cast<acc_t>(running_var[c]), eps);
    return of_statistics(c, invstd ? mean[c] : static_cast<acc_t>(running_mean[c]), istd);
  }
  // Channel c's coefficients from its mean and invstd as given.
  __device__ __forceinline__ Coefficients<acc_t, kSlope> of_statistics(int64_t c, acc_t mean_c, acc_t invstd_c) const {
    if constexpr (kSlope) {
      return {mean_c, alpha_of(weight, c, invstd_c), beta_of<acc_t>(bias, c), this->slopes[c * this->slope_step]};
    } else {
      return {mean_c, alpha_of(weight, c, invstd_c), beta_of<acc_t>(bias, c)};
    }
  }
};

// The activation after BatchNorm, as a kernel's template argument: fixed at compile time for the common
// ones (FixedActivation<kIdentity>, <kRelu>: no switch in the loops), or any, chosen per value from the
// run-time value (AnyActivation). apply(act, f) calls f(std::integral_constant<Activation, A>{}).
template <Activation kAct>
struct FixedActivation {
  template <typename F>
  __device__ __forceinline__ static auto apply(Activation, F&& f) {
    return f(std::integral_constant<Activation, kAct>{});
  }
};

struct AnyActivation {  // never PReLU (FixedActivation<kPrelu>: its slopes and third sum)
  template <typename F>
  __device__ __forceinline__ static auto apply(Activation act, F&& f) {
    return with_activation<false>(act, f);
  }
};

// Whether the policy's kernels read PReLU's slopes (and sum its weight's gradient).
template <typename Act>
inline constexpr bool kSlopesOf = std::is_same_v<Act, FixedActivation<Activation::kPrelu>>;
// Whether the policy's code needs registers beyond identity's and ReLU's: any activation's, or PReLU's
// slopes (and its third gradient sum); such kernels load fewer vectors at once.
template <typename Act>
inline constexpr bool kHeavyActivation = std::is_same_v<Act, AnyActivation> || kSlopesOf<Act>;

// The activation's parameter for lane k of a vector whose lanes' coefficients are co(k): PReLU's slope of
// the lane's channel (co(k) read only then), else the op's one parameter.
template <typename Act, typename Lanes, typename acc_t>
__device__ __forceinline__ acc_t activation_param(const Lanes& co, int k, acc_t param) {
  if constexpr (kSlopesOf<Act>) {
    return co(k).slope;
  } else {
    return param;
  }
}

// Calls f(Policy{}) with the policy serving `act` (host side).
template <typename F>
void with_activation_policy(Activation act, F&& f) {
  switch (act) {
    case Activation::kIdentity: return f(FixedActivation<Activation::kIdentity>{});
    case Activation::kRelu: return f(FixedActivation<Activation::kRelu>{});
    case Activation::kPrelu: return f(FixedActivation<Activation::kPrelu>{});  // its weight's gradient sums
    default: return f(AnyActivation{});
  }
}

}  // namespace fusedbn::cuda
