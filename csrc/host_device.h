// FUSEDBN_HOST_DEVICE marks the small math functions every backend shares (CPU, CUDA, and the CUDA
// kernels compiled as host C++ under the SIMT emulator).
#pragma once

#if defined(__CUDACC__)
#define FUSEDBN_HOST_DEVICE __host__ __device__
#else
#define FUSEDBN_HOST_DEVICE
#endif
