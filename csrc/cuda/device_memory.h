// The memory the kernels share between threads and read or write in global memory, spelled so that a
// build running the kernels elsewhere can check every access (the SIMT emulator, csrc/simt/simt.h, defines
// FUSEDBN_SIMT_DEVICE_MEMORY and its own checked versions; this production header knows nothing of it):
//   SharedArray<T, N>  - `__shared__ SharedArray<T, N> name;` is a block's shared array, name[i] its
//                        element (a plain array on the GPU: the same machine code as `T name[N]`);
//   BlockPartials<T>   - the blocks' partials of a grid merge in global memory, written by each block and
//                        read by the last block of its group after the arrival protocol
//                        (kernels.cuh last_block_of_group);
//   Restrict<T>        - a `T* __restrict__` into global memory: nothing else touches what it accesses
//                        during a launch where either writes it;
//   Global<T>          - a plain `T*` into global memory;
//   reading(p, n) / writing(p, n) - the address of n elements at p, about to be read / written as one
//                        access (a vector load or store).
#pragma once

#include <cstdint>
#include <memory>
#include <type_traits>

namespace fusedbn::cuda {

#if defined(FUSEDBN_SIMT_DEVICE_MEMORY)
template <typename T, int N>
using SharedArray = ::fusedbn::simt::SharedArray<T, N>;
template <typename T>
using BlockPartials = ::fusedbn::simt::BlockPartials<T>;
template <typename T>
using Restrict = ::fusedbn::simt::Restrict<T>;
template <typename T>
using Global = ::fusedbn::simt::Global<T>;
using ::fusedbn::simt::reading;
using ::fusedbn::simt::writing;
#else
template <typename T, int N>
struct SharedArray {
  T items[N];
  template <typename I>
  __device__ __forceinline__ T& operator[](I i) {
    return items[i];
  }
};

template <typename T>
struct BlockPartials {
  T* data;
  __device__ __forceinline__ T& operator[](int64_t i) const { return data[i]; }
};

template <typename T>
using Restrict = T* __restrict__;
template <typename T>
using Global = T*;

template <typename T>
__device__ __forceinline__ const T* reading(const T* p, int) {
  return p;
}
template <typename T>
__device__ __forceinline__ T* writing(T* p, int) {
  return p;
}
#endif

// The element type a pointer (or the emulator's pointer object) points to.
template <typename P>
using pointee_t = std::remove_cv_t<typename std::pointer_traits<P>::element_type>;

}  // namespace fusedbn::cuda
