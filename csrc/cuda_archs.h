// The GPU architectures fusedbn's CUDA kernels were compiled for, and whether a GPU can run them.
//
// setup.py compiles nvcc's codes into fusedbn._C as FUSEDBN_CUDA_ARCHS, comma-separated: sm_XY is machine
// code, which runs on GPUs of compute capability X.Y' with the same X and Y' >= Y (sm_XYa, the
// architecture-specific kind, on X.Y alone); compute_XY is PTX, which the driver compiles at first use for any
// GPU of capability X.Y or later.
#pragma once

#include <string>

namespace fusedbn {

// The codes ("sm_80,sm_90,compute_90"); "" in a CPU-only build.
const char* built_cuda_archs();

// "" where a GPU of compute capability major.minor, called `name`, runs kernels built for `archs` (codes as
// above), else the error to raise: the architectures built, the GPU's, and the TORCH_CUDA_ARCH_LIST to
// rebuild with.
std::string unsupported_gpu_message(const std::string& archs, int major, int minor, const std::string& name);

}  // namespace fusedbn
