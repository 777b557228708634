// The activations' math (epilogue.h) on torch's CPU vectors, at::vec::Vectorized, whose exp, erf and tanh
// are SLEEF's vectorized ones (as torch's own activation kernels use them): a span of values at a time, so
// the fused passes keep torch's speed for SiLU, GELU and ELU.
//
// Must come before any other include of ATen's vector headers: it picks the instruction set they use from
// the compiler's target (setup.py's builds, or -march=native), as torch's per-capability builds define it.
#pragma once

#if defined(__x86_64__) && !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY_AVX2
#endif
#endif

#include <ATen/cpu/vec/vec.h>

#include "../epilogue.h"

namespace fusedbn {

template <typename acc_t>
struct Math<at::vec::Vectorized<acc_t>> {
  using V = at::vec::Vectorized<acc_t>;
  static V exp(const V& v) { return v.exp(); }
  static V expm1(const V& v) { return v.expm1(); }
  static V erf(const V& v) { return v.erf(); }
  static V tanh(const V& v) { return v.tanh(); }
  static V select(const V& mask, const V& a, const V& b) { return V::blendv(b, a, mask); }
};

namespace cpu {

// z[j] = act(z[j]) for j < n.
template <Activation kAct, typename acc_t>
void activation_span(acc_t* z, int64_t n, acc_t param) {
  using V = at::vec::Vectorized<acc_t>;
  const V p(param);
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) ActivationFn<kAct>::forward(V::loadu(z + j), p).store(z + j);
  if (j < n) ActivationFn<kAct>::forward(V::loadu(z + j, n - j), p).store(z + j, n - j);
}

// g[j] = g[j] * act'(z[j]) for j < n.
template <Activation kAct, typename acc_t>
void activation_grad_span(acc_t* g, const acc_t* z, int64_t n, acc_t param) {
  using V = at::vec::Vectorized<acc_t>;
  const V p(param);
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) {
    ActivationFn<kAct>::grad(V::loadu(g + j), V::loadu(z + j), p).store(g + j);
  }
  if (j < n) ActivationFn<kAct>::grad(V::loadu(g + j, n - j), V::loadu(z + j, n - j), p).store(g + j, n - j);
}

}  // namespace cpu
}  // namespace fusedbn
