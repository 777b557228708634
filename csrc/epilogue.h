// What may follow BatchNorm inside the fused ops, per value, shared by every backend:
//   z = bn(x) [+ residual],  out = relu(z) when asked.
// The backward needs relu's mask. With a residual it comes from the op's output; without one it is
// recomputed from x and the channel's coefficients exactly as the forward computed the value, so only x
// stays alive for backward.
#pragma once

#include "host_device.h"

namespace fusedbn {

// Where the backward finds relu's mask, if there was a relu.
enum class ReluMask { kNone, kFromOutput, kFromInput };

// bn(x) = (x - mean) * alpha + beta with alpha = weight * invstd, beta = bias: the one expression every
// pass uses, so a recomputed value equals the forward's bit for bit. Centering before scaling keeps it
// exact for inputs whose mean is large next to their spread.
template <typename acc_t>
FUSEDBN_HOST_DEVICE inline acc_t normalized(acc_t x, acc_t mean, acc_t alpha, acc_t beta) {
  return (x - mean) * alpha + beta;
}

// torch.relu: NaN passes through.
template <typename acc_t>
FUSEDBN_HOST_DEVICE inline acc_t relu(acc_t z) {
  return z < acc_t(0) ? acc_t(0) : z;
}

// relu's backward as torch's threshold_backward computes it: zero wherever the output is <= 0 (so a tie
// at exactly zero gets no gradient). `out` is the output in the tensor's dtype.
template <typename acc_t, typename scalar_t>
FUSEDBN_HOST_DEVICE inline acc_t relu_grad(acc_t grad, scalar_t out) {
  return static_cast<acc_t>(out) <= acc_t(0) ? acc_t(0) : grad;
}

// dz, the gradient reaching BatchNorm's output, of one value: dy `g` gated by relu's mask when there was
// a relu, the mask read from the output `out` (kFromOutput) or recomputed from the input `x` with the
// channel's forward coefficients (kFromInput).
template <ReluMask kMask, typename scalar_t, typename acc_t>
FUSEDBN_HOST_DEVICE inline acc_t grad_through_relu(acc_t g, acc_t x, scalar_t out, acc_t mean, acc_t alpha,
                                                   acc_t beta) {
  if constexpr (kMask == ReluMask::kFromOutput) {
    return relu_grad(g, out);
  } else if constexpr (kMask == ReluMask::kFromInput) {
    return relu_grad(g, static_cast<scalar_t>(normalized(x, mean, alpha, beta)));
  } else {
    return g;
  }
}

}  // namespace fusedbn
