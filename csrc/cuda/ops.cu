// CUDA registration of the fusedbn ops: their host side (host_ops.h) run on the input's device and its
// current stream.
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <tuple>

#include "../cuda_archs.h"
#include "host_ops.h"

namespace fusedbn::cuda {
namespace {

// Raises unsupported_gpu_message's error where the kernels built cannot run on the device, before any launch
// could fail with the runtime's "no kernel image is available".
void check_architecture(int device) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  cudaDeviceProp properties{};
  C10_CUDA_CHECK(cudaGetDeviceProperties(&properties, device));
  const std::string message = unsupported_gpu_message(built_cuda_archs(), major, minor, properties.name);
  TORCH_CHECK(message.empty(), message);
}

// A device's SM count, read once per device, whose architecture is checked then.
int sm_count_of(int device) {
  static std::mutex mutex;
  static std::map<int, int> counts;
  const std::lock_guard lock(mutex);
  if (const auto it = counts.find(device); it != counts.end()) return it->second;
  check_architecture(device);
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return counts[device] = count;
}

// Everything a launch needs about the input's device, with the device made current for the op.
struct CudaContext {
  c10::cuda::CUDAGuard guard;
  c10::cuda::CUDAStream current;
  cudaStream_t stream;
  int sm_count;
  int max_threads = kMaxBlockThreads;

  explicit CudaContext(const Tensor& input)
      : guard(input.device()), current(c10::cuda::getCurrentCUDAStream(input.device().index())),
        stream(current.stream()), sm_count(sm_count_of(input.device().index())) {}
  // The kernel's occupancy as the driver computes it for this device, once per (device, kernel, block).
  int blocks_per_sm(const void* kernel, int threads) const {
    static std::mutex mutex;
    static std::map<std::tuple<int, const void*, int>, int> blocks;
    const std::lock_guard lock(mutex);
    auto [it, fresh] = blocks.try_emplace({current.device_index(), kernel, threads}, 0);
    if (fresh) C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&it->second, kernel, threads, 0));
    return it->second;
  }
  std::pair<int, c10::StreamId> scratch_key() const { return {current.device_index(), current.id()}; }
  bool capturing() const { return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None; }
  void on_scratch(const Scratch&) const {}
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedbn, CUDA, m) { register_cuda_kernels<CudaContext>(m); }

}  // namespace fusedbn::cuda
