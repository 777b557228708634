// CUDA registration of the fusedbn ops: their host side (host_ops.h) run on the input's device and its
// current stream.
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "host_ops.h"

namespace fusedbn::cuda {
namespace {

// Everything a launch needs about the input's device, with the device made current for the op.
struct CudaContext {
  c10::cuda::CUDAGuard guard;
  c10::cuda::CUDAStream current;
  cudaStream_t stream;
  int sm_count;
  int max_threads = kMaxBlockThreads;
  int resident_threads_per_sm = kMinResidentThreads;

  explicit CudaContext(const Tensor& input)
      : guard(input.device()), current(c10::cuda::getCurrentCUDAStream(input.device().index())),
        stream(current.stream()) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, input.device().index()));
  }
  std::pair<int, c10::StreamId> scratch_key() const { return {current.device_index(), current.id()}; }
  bool capturing() const { return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None; }
  void on_scratch(const Scratch&) const {}
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedbn, CUDA, m) { register_cuda_kernels<CudaContext>(m); }

}  // namespace fusedbn::cuda
