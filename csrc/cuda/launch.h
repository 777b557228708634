// The one way fusedbn launches a kernel: FUSEDBN_LAUNCH(kernel, grid, block, shared_bytes, stream)(args...).
// Under nvcc it is a CUDA launch; under the SIMT emulator (FUSEDBN_SIMT, tests only) it runs the same
// kernel on CPU threads, so the kernel source is exercised where no GPU exists.
#pragma once

#if defined(FUSEDBN_SIMT)
#include "../simt/simt.h"
#define FUSEDBN_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  ::fusedbn::simt::launch(kernel, grid, block, shared_bytes)
#define FUSEDBN_LAUNCH_CHECK() ((void)0)
#else
#include <c10/cuda/CUDAException.h>
#define FUSEDBN_LAUNCH(kernel, grid, block, shared_bytes, stream) kernel<<<grid, block, shared_bytes, stream>>>
#define FUSEDBN_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#endif
