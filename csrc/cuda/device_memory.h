// The two kinds of memory the kernels share between threads, spelled so that a build running the kernels
// elsewhere can check every access (the SIMT emulator, csrc/simt/simt.h, defines
// FUSEDBN_SIMT_DEVICE_MEMORY and its own checked versions; this production header knows nothing of it):
//   SharedArray<T, N>  - `__shared__ SharedArray<T, N> name;` is a block's shared array, name[i] its
//                        element (a plain array on the GPU: the same machine code as `T name[N]`);
//   BlockPartials<T>   - the blocks' partials of a grid merge in global memory, written by each block and
//                        read by the last block of its group after the arrival protocol
//                        (kernels.cuh last_block_of_group).
#pragma once

#include <cstdint>

namespace fusedbn::cuda {

#if defined(FUSEDBN_SIMT_DEVICE_MEMORY)
template <typename T, int N>
using SharedArray = ::fusedbn::simt::SharedArray<T, N>;
template <typename T>
using BlockPartials = ::fusedbn::simt::BlockPartials<T>;
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
#endif

}  // namespace fusedbn::cuda
