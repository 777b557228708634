// What may follow BatchNorm inside the fused ops, per value, shared by every backend:
//   z = bn(x) [+ residual],  out = act(z),
// z and act(z) in the accumulation type, the output rounded once (torch's composition rounds z to the
// input's dtype first: for float16 and bfloat16 ours is the more exact). Each activation's math is written once, as a template over the value
// type T: the accumulation scalar (CUDA, the SIMT emulator, CPU scalar code) or, on the CPU, a vector of
// them (csrc/cpu/vec_math.h). Forward and derivative follow torch's own kernels (aten Activation.cpp), so
// a tie (ReLU at 0, ReLU6 at 0 and 6, Hardswish at -3 and 3) gets torch's one-sided gradient.
//
// The backward needs act'(z). It is recomputed from x, the channel's coefficients (and the residual) exactly
// as the forward computed z, so only x (and the residual) stay alive for backward; ReLU with a residual
// reads its mask from the output instead (torch's composition keeps that output anyway).
//
// Rounding (host_device.h): normalized fuses its product and sum explicitly (mul_add), as nvcc would: the
// same bits on the GPU, the SIMT emulator and the CPU's FMA builds, and the same in every pass of one
// backend (the recomputed z is the forward's); the x86-64 baseline CPU build rounds the product apart.
// dx_of is left to the compiler (see there). The activations are left to each compiler too: those without
// exp, erf or tanh have no product feeding a sum (identity, ReLU, ReLU6, leaky ReLU, Hardswish: the same
// bits everywhere for the same z); the others differ between backends in their elementary functions
// anyway (CUDA's, libm's, the CPU vectors'), and nvcc contracts parts of them: they agree within the tests'
// tolerances, not to the bit.
#pragma once

#include <cmath>
#include <cstdint>
#include <string_view>

#include "host_device.h"

namespace fusedbn {

enum class Activation : int {
  kIdentity,
  kRelu,
  kRelu6,      // hardtanh(z, 0, 6)
  kLeakyRelu,  // param: negative_slope
  kElu,        // param: alpha
  kSilu,
  kHardswish,
  kGelu,       // exact, erf
  kGeluTanh,   // approximate="tanh"
  kPrelu,      // leaky ReLU with a learned slope per channel (activation_weight)
};

// The schema's names (schemas.h); false for an unknown one.
inline bool parse_activation(std::string_view name, Activation& act) {
  constexpr std::pair<std::string_view, Activation> kNames[] = {
      {"identity", Activation::kIdentity}, {"relu", Activation::kRelu},       {"relu6", Activation::kRelu6},
      {"leaky_relu", Activation::kLeakyRelu}, {"elu", Activation::kElu},      {"silu", Activation::kSilu},
      {"hardswish", Activation::kHardswish}, {"gelu", Activation::kGelu},     {"gelu_tanh", Activation::kGeluTanh},
      {"prelu", Activation::kPrelu}};
  for (const auto& [n, a] : kNames) {
    if (n == name) {
      act = a;
      return true;
    }
  }
  return false;
}

// Elementary functions of the value type: scalars here, CPU vectors in csrc/cpu/vec_math.h.
template <typename T>
struct Math;

template <>
struct Math<float> {
  FUSEDBN_HOST_DEVICE static float exp(float v) { return ::expf(v); }
  FUSEDBN_HOST_DEVICE static float expm1(float v) { return ::expm1f(v); }
  FUSEDBN_HOST_DEVICE static float erf(float v) { return ::erff(v); }
  FUSEDBN_HOST_DEVICE static float tanh(float v) { return ::tanhf(v); }
  FUSEDBN_HOST_DEVICE static float select(bool m, float a, float b) { return m ? a : b; }
};

template <>
struct Math<double> {
  FUSEDBN_HOST_DEVICE static double exp(double v) { return ::exp(v); }
  FUSEDBN_HOST_DEVICE static double expm1(double v) { return ::expm1(v); }
  FUSEDBN_HOST_DEVICE static double erf(double v) { return ::erf(v); }
  FUSEDBN_HOST_DEVICE static double tanh(double v) { return ::tanh(v); }
  FUSEDBN_HOST_DEVICE static double select(bool m, double a, double b) { return m ? a : b; }
};

// act(z) and dz = g * act'(z) for one activation; `p` its parameter (negative_slope, alpha), else unused.
// Comparisons keep NaN flowing as torch does (a NaN z gives a NaN output and passes g through ReLU).
template <Activation kAct>
struct ActivationFn;

template <>
struct ActivationFn<Activation::kIdentity> {
  static constexpr bool kTranscendental = false;
  template <typename T>
  FUSEDBN_HOST_DEVICE static T forward(T z, T) { return z; }
  template <typename T>
  FUSEDBN_HOST_DEVICE static T grad(T g, T, T) { return g; }
};

template <>
struct ActivationFn<Activation::kRelu> {  // torch.relu; threshold_backward: no gradient where z <= 0
  static constexpr bool kTranscendental = false;
  template <typename T, typename M = Math<T>>
  FUSEDBN_HOST_DEVICE static T forward(T z, T) { return M::select(z < T(0), T(0), z); }
  template <typename T, typename M = Math<T>>
  FUSEDBN_HOST_DEVICE static T grad(T g, T z, T) { return M::select(z <= T(0), T(0), g); }
};

template <>
struct ActivationFn<Activation::kRelu6> {  // hardtanh(0, 6); hardtanh_backward: none at or beyond the bounds
  static constexpr bool kTranscendental = false;
  template <typename T, typename M = Math<T>>
  FUSEDBN_HOST_DEVICE static T forward(T z, T) { return M::select(z < T(0), T(0), M::select(z > T(6), T(6), z)); }
  template <typename T, typename M = Math<T>>
  FUSEDBN_HOST_DEVICE static T grad(T g, T z, T) {
    return M::select(z <= T(0), T(0), M::select(z >= T(6), T(0), g));
  }
};

template <>
struct ActivationFn<Activation::kLeakyRelu> {
  static constexpr bool kTranscendental = false;
  template <typename T, typename M = Math<T>>
  FUSEDBN_HOST_DEVICE static T forward(T z, T slope) { return M::select(z > T(0), z, z * slope); }
  template <typename T, typename M = Math<T>>
  FUSEDBN_HOST_DEVICE static T grad(T g, T z, T slope) { return M::select(z > T(0), g, g * slope); }
};

// torch.prelu and its backward: leaky ReLU's math, the slope the channel's weight (param_for).
template <>
struct ActivationFn<Activation::kPrelu> : ActivationFn<Activation::kLeakyRelu> {
  // d act / d slope, times g: PReLU's weight gradient of one value (torch's: z > 0 ? 0 : z * g).
  template <typename T, typename M = Math<T>>
  FUSEDBN_HOST_DEVICE static T grad_slope(T g, T z) { return M::select(z > T(0), T(0), z * g); }
};

// The activation's parameter for a value of channel c: PReLU's slope of the channel (slope[c]), else the
// op's one parameter (the slopes are not read).
template <Activation kAct, typename acc_t>
FUSEDBN_HOST_DEVICE inline acc_t param_for(acc_t param, const acc_t* slope, int64_t c) {
  if constexpr (kAct == Activation::kPrelu) {
    return slope[c];
  } else {
    return param;
  }
}

template <>
struct ActivationFn<Activation::kElu> {  // scale = input_scale = 1
  static constexpr bool kTranscendental = true;
  template <typename T, typename M = Math<T>>
  FUSEDBN_HOST_DEVICE static T forward(T z, T alpha) { return M::select(z <= T(0), M::expm1(z) * alpha, z); }
  template <typename T, typename M = Math<T>>
  FUSEDBN_HOST_DEVICE static T grad(T g, T z, T alpha) { return M::select(z <= T(0), g * alpha * M::exp(z), g); }
};

template <>
struct ActivationFn<Activation::kSilu> {  // z * sigmoid(z)
  static constexpr bool kTranscendental = true;
  template <typename T, typename M = Math<T>>
  FUSEDBN_HOST_DEVICE static T forward(T z, T) { return z / (T(1) + M::exp(T(0) - z)); }
  template <typename T, typename M = Math<T>>
  FUSEDBN_HOST_DEVICE static T grad(T g, T z, T) {
    const T s = T(1) / (T(1) + M::exp(T(0) - z));
    return g * s * (T(1) + z * (T(1) - s));
  }
};

template <>
struct ActivationFn<Activation::kHardswish> {  // z * relu6(z + 3) / 6
  static constexpr bool kTranscendental = false;
  template <typename T, typename M = Math<T>>
  FUSEDBN_HOST_DEVICE static T forward(T z, T) {
    return z * ActivationFn<Activation::kRelu6>::forward<T, M>(z + T(3), T(0)) / T(6);
  }
  template <typename T, typename M = Math<T>>
  FUSEDBN_HOST_DEVICE static T grad(T g, T z, T) {
    return M::select(z < T(-3), T(0), M::select(z <= T(3), g * (z / T(3) + T(0.5)), g));
  }
};

template <>
struct ActivationFn<Activation::kGelu> {  // z * Phi(z)
  static constexpr bool kTranscendental = true;
  template <typename T, typename M = Math<T>>
  FUSEDBN_HOST_DEVICE static T forward(T z, T) { return z * T(0.5) * (T(1) + M::erf(z * T(M_SQRT1_2))); }
  template <typename T, typename M = Math<T>>
  FUSEDBN_HOST_DEVICE static T grad(T g, T z, T) {
    const T cdf = T(0.5) * (T(1) + M::erf(z * T(M_SQRT1_2)));
    const T pdf = M::exp(T(-0.5) * z * z) * T(M_2_SQRTPI * M_SQRT1_2 * 0.5);
    return g * (cdf + z * pdf);
  }
};

template <>
struct ActivationFn<Activation::kGeluTanh> {  // 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))
  static constexpr bool kTranscendental = true;
  template <typename T, typename M = Math<T>>
  FUSEDBN_HOST_DEVICE static T forward(T z, T) {
    return T(0.5) * z * (T(1) + M::tanh(T(kBeta) * (z + T(kKappa) * z * z * z)));
  }
  template <typename T, typename M = Math<T>>
  FUSEDBN_HOST_DEVICE static T grad(T g, T z, T) {
    const T t = M::tanh(T(kBeta) * (z + T(kKappa) * z * z * z));
    const T d_inner = (T(1) - t * t) * T(kBeta) * (T(1) + T(3 * kKappa) * z * z);
    return g * (T(0.5) * (T(1) + t) + T(0.5) * z * d_inner);
  }
  static constexpr double kBeta = M_SQRT2 * M_2_SQRTPI * 0.5;
  static constexpr double kKappa = 0.044715;
};

// Calls f(std::integral_constant<Activation, act>{}): a run-time activation made a template argument.
// kWithPrelu false: PReLU's code left out (the CUDA kernels that never see it; it runs as identity there).
template <bool kWithPrelu = true, typename F>
FUSEDBN_HOST_DEVICE inline auto with_activation(Activation act, F&& f) {
  using A = Activation;
  switch (act) {
    case A::kRelu: return f(std::integral_constant<A, A::kRelu>{});
    case A::kRelu6: return f(std::integral_constant<A, A::kRelu6>{});
    case A::kLeakyRelu: return f(std::integral_constant<A, A::kLeakyRelu>{});
    case A::kElu: return f(std::integral_constant<A, A::kElu>{});
    case A::kSilu: return f(std::integral_constant<A, A::kSilu>{});
    case A::kHardswish: return f(std::integral_constant<A, A::kHardswish>{});
    case A::kGelu: return f(std::integral_constant<A, A::kGelu>{});
    case A::kGeluTanh: return f(std::integral_constant<A, A::kGeluTanh>{});
    case A::kPrelu:
      if constexpr (kWithPrelu) return f(std::integral_constant<A, A::kPrelu>{});
      [[fallthrough]];
    default: return f(std::integral_constant<A, A::kIdentity>{});
  }
}

// Whether the activation computes an exp, erf or tanh.
inline bool is_transcendental(Activation act) {
  return with_activation(act, [](auto kind) { return ActivationFn<decltype(kind)::value>::kTranscendental; });
}

// The activation and its parameter, as the ops take them.
struct Epilogue {
  Activation act = Activation::kIdentity;
  double param = 0;
};

// bn(x) = (x - mean) * alpha + beta with alpha = weight * invstd, beta = bias: the one expression every
// pass uses, so a recomputed value equals the forward's bit for bit (its fma explicit, not left to the
// compiler's contraction, which could differ between passes). Centering before scaling keeps it exact for
// inputs whose mean is large next to their spread.
template <typename acc_t>
FUSEDBN_HOST_DEVICE inline acc_t normalized(acc_t x, acc_t mean, acc_t alpha, acc_t beta) {
  return mul_add(x - mean, alpha, beta);
}

// z rounded to the input's dtype: ReLU's mask is taken on it, so that it is the mask of the output, as
// torch's threshold_backward takes it (a z that rounds to 0 gets no gradient).
template <typename scalar_t, typename acc_t>
FUSEDBN_HOST_DEVICE inline acc_t as_stored(acc_t z) {
  return static_cast<acc_t>(static_cast<scalar_t>(z));
}

// Where the backward gets dz, the gradient reaching BatchNorm's output, from dy:
//   kDy        no activation: dz = dy;
//   kOutput    ReLU with a residual: dy where the forward's output is > 0 (torch's threshold_backward);
//   kRecompute act'(z) with z recomputed from x and the channel's coefficients (plus the residual).
enum class GradFrom { kDy, kOutput, kRecompute };

// dz of one value: dy `g`, input `x`, output `out` (kOutput), residual `r` (kRecompute with one, else 0),
// the channel's forward coefficients (mean, alpha, beta) and the activation's parameter.
template <Activation kAct, GradFrom kFrom, typename scalar_t, typename acc_t>
FUSEDBN_HOST_DEVICE inline acc_t grad_through_activation(acc_t g, acc_t x, scalar_t out, acc_t r, acc_t mean,
                                                         acc_t alpha, acc_t beta, acc_t param) {
  if constexpr (kFrom == GradFrom::kOutput) {
    return static_cast<acc_t>(out) <= acc_t(0) ? acc_t(0) : g;
  } else if constexpr (kFrom == GradFrom::kRecompute) {
    const acc_t z = normalized(x, mean, alpha, beta) + r;
    return ActivationFn<kAct>::grad(g, kAct == Activation::kRelu ? as_stored<scalar_t>(z) : z, param);
  } else {
    return g;
  }
}

// dx of one value from its dz: (dz - mean_dz - (x - mean) * proj) * alpha (kCentered: training), dz * alpha
// under eval statistics (x does not enter: a NaN input keeps a finite gradient, as in torch). Subtracting
// before scaling by alpha = w * invstd avoids the cancellation between alpha*dz and alpha*mean_dz when
// invstd is large. The product and its difference are left to the compiler (nvcc fuses them, as g++ does
// for an FMA target; the SIMT emulator and the x86-64 baseline CPU build round the product first): an
// explicit fma here costs the one-value backward passes 1-2 registers on sm_90 (40 -> 42, and fewer
// resident threads), for a last bit that the backends' differing sums (mean_dz, proj) blur anyway.
template <bool kCentered, typename acc_t>
FUSEDBN_HOST_DEVICE inline acc_t dx_of(acc_t dz, acc_t x, acc_t mean, acc_t mean_dz, acc_t proj, acc_t alpha) {
  if constexpr (kCentered) {
    return (dz - mean_dz - (x - mean) * proj) * alpha;
  } else {
    return dz * alpha;
  }
}

}  // namespace fusedbn
