// The one way fusedbn launches a kernel: FUSEDBN_LAUNCH(kernel, grid, block, shared_bytes, stream)(args...),
// a CUDA launch. A build that runs the kernels elsewhere defines its own FUSEDBN_LAUNCH and
// FUSEDBN_LAUNCH_CHECK before including the kernels (the SIMT emulator's, csrc/simt/simt.h, tests only), so
// this production header knows nothing of it.
#pragma once

#ifndef FUSEDBN_LAUNCH
#include <c10/cuda/CUDAException.h>
#define FUSEDBN_LAUNCH(kernel, grid, block, shared_bytes, stream) kernel<<<grid, block, shared_bytes, stream>>>
#define FUSEDBN_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#endif
