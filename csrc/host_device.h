// FUSEDBN_HOST_DEVICE marks the small math functions every backend shares (CPU, CUDA, and the CUDA
// kernels compiled as host C++ under the SIMT emulator).
//
// Floating-point contraction. nvcc fuses a*b + c into one fma by default (-fmad=true, also ptxas on a
// mul.f32 feeding an add.f32), g++ wherever the target has FMA instructions (-ffp-contract=fast is its
// default for C++, -std=c++20 included: the CPU's AVX2, AVX-512 and -march=native builds), and neither
// rounds the same way as the other or as a target without FMA (the x86-64 baseline CPU build, the SIMT
// emulator). So a formula whose bits are promised never leaves the choice to the compiler: it is written
// with one of these two, or has no product feeding a sum (csrc/README.md lists which formula is which).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define FUSEDBN_HOST_DEVICE __host__ __device__
#else
#define FUSEDBN_HOST_DEVICE
#endif

namespace fusedbn {

// a * b + c rounded once, on every backend: the GPU's fma (what nvcc contracts the expression to anyway),
// std::fma on the host (one instruction where the target has FMA, else libm's, correctly rounded as well,
// but a call). For the formulas run once per channel, whose bits every backend shares.
template <typename T>
FUSEDBN_HOST_DEVICE inline T fma_exact(T a, T b, T c) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) {
    return __fmaf_rn(a, b, c);
  } else {
    return __fma_rn(a, b, c);
  }
#else
  return std::fma(a, b, c);
#endif
}

// a * b + c of the formulas run per value: rounded once where FMA is an instruction (the GPU; the CPU
// builds for AVX2, AVX-512, and -march=native or aarch64 with FMA, where GCC defines __FP_FAST_FMA(F)), and
// in the SIMT emulator (FUSEDBN_EXACT_FMA, setup.py: libm's fma, so that the emulator computes the GPU's
// bits on any x86-64), as a*b then + c otherwise (the x86-64 baseline CPU build, where a libm call per
// value would stop the loops vectorizing): within half an ulp of a*b of the fused value there.
template <typename T>
FUSEDBN_HOST_DEVICE inline T mul_add(T a, T b, T c) {
#if defined(__CUDA_ARCH__)
  return fma_exact(a, b, c);
#else
#if defined(FUSEDBN_EXACT_FMA)
  constexpr bool kFused = true;
#elif defined(__FP_FAST_FMA) && defined(__FP_FAST_FMAF)
  constexpr bool kFused = true;
#else
  constexpr bool kFused = false;
#endif
  if constexpr (kFused) {
    return std::fma(a, b, c);
  } else {
    return a * b + c;
  }
#endif
}

}  // namespace fusedbn
