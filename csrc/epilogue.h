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

}  // namespace fusedbn
