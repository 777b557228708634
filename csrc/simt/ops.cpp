// Test-only library `fusedbn_simt`: the CUDA kernels (csrc/cuda/kernels.cuh) and their host side
// (csrc/cuda/host_ops.h), compiled as host C++ with the SIMT emulator and registered for CPU tensors under
// the same schemas as `fusedbn`. The equivalence suite runs it as one more device. Every op runs sanitized
// (simt.h, host_checks.h): its allocations poisoned, its reused scratch poisoned and its arrival counters
// checked at zero before and after.
#include <Python.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "simt.h"  // first: the emulator's FUSEDBN_LAUNCH and device memory, which the CUDA headers then use
#include "../cuda/host_ops.h"
#include "../meta_kernels.h"
#include "../schemas.h"
#include "host_checks.h"
#include "python_controls.h"

namespace fusedbn::cuda {
namespace {

// The GPU the host code sizes its launches for, read as CudaContext reads a real one (ops.cu):
//   small - few SMs and small blocks, so that small test shapes already take the multi-block paths (grid
//           merge, several splits per channel) and each launch stays cheap in OS threads: the suite's
//           default, as it reaches more of the kernels' paths per second than an H200's grids would;
//   h200  - an H200 as the CUDA build sees it: 132 SMs, blocks of up to kMaxBlockThreads, grids sized for
//           kMinResidentThreads a SM (its 2048 threads, 64K registers and 228 KB of shared memory a SM
//           allow that at 64 registers a thread, which tests/test_kernel_resources.py checks).
struct EmulatedDevice {
  const char* name;
  int sm_count;
  int max_threads;
  int resident_threads_per_sm;
};
constexpr EmulatedDevice kDevices[] = {{"small", 2, 64, 256}, {"h200", 132, kMaxBlockThreads, kMinResidentThreads}};

// The one the host code sees: FUSEDBN_SIMT_DEVICE (small unless it says h200), or set_device below.
EmulatedDevice& device() {
  static EmulatedDevice d = [] {
    const char* name = std::getenv("FUSEDBN_SIMT_DEVICE");
    for (const auto& known : kDevices) {
      if (name && std::strcmp(known.name, name) == 0) return known;
    }
    return kDevices[0];
  }();
  return d;
}

struct SimtContext {
  int stream = 0;
  int sm_count = device().sm_count;
  int max_threads = device().max_threads;
  explicit SimtContext(const Tensor&) {}
  // The emulated device's occupancy: the threads every kernel keeps resident (kMinResidentThreads on an
  // H200-shaped device, what the kernels' launch bounds guarantee; tests/test_launch_grids.py checks the
  // grids against the sm_90 build's real occupancy too).
  int blocks_per_sm(const void*, int threads) const { return std::max(1, device().resident_threads_per_sm / threads); }
  int scratch_key() const { return stream; }
  bool capturing() const { return false; }
  // Scratch taken by an op: its bytes poisoned (partials and per-channel terms are written before they are
  // read, in every launch), its counters registered, so that Sanitized checks them when the op returns.
  void on_scratch(const Scratch& s) const {
    if (s.bytes.defined() && !simt::settings().record_only) simt::poison(s.bytes.data_ptr(), s.bytes.numel());
    if (s.counters.defined()) simt::register_counters(s.counters);
  }
};

// An op run sanitized: what it allocates is poisoned (unless launches are only recorded), and its counters
// must be at rest when it returns.
template <auto Op>
struct Sanitized;
template <typename R, typename... Args, R (*Op)(Args...)>
struct Sanitized<Op> {
  static R call(Args... args) {
    R result = [&] {
      if (simt::settings().record_only) return Op(args...);  // nothing runs: nothing to poison
      const simt::PoisonAllocations poisoned;
      return Op(args...);
    }();
    simt::check_counters_at_rest("an op");
    return result;
  }
};

}  // namespace

TORCH_LIBRARY(fusedbn_simt, m) { define_schemas(m); }

TORCH_LIBRARY_IMPL(fusedbn_simt, Meta, m) { meta::register_meta_kernels(m); }

TORCH_LIBRARY_IMPL(fusedbn_simt, CPU, m) { register_cuda_kernels<SimtContext, Sanitized>(m); }

}  // namespace fusedbn::cuda

namespace {

PyObject* set_device(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (!name) return nullptr;
  for (const auto& d : fusedbn::cuda::kDevices) {
    if (std::strcmp(d.name, name) == 0) {
      fusedbn::cuda::device() = d;
      Py_RETURN_NONE;
    }
  }
  PyErr_Format(PyExc_ValueError, "unknown emulated device '%s' (small, h200)", name);
  return nullptr;
}
PyObject* device(PyObject*, PyObject*) {
  const auto& d = fusedbn::cuda::device();
  return Py_BuildValue("{s:s,s:i,s:i,s:i}", "name", d.name, "sm_count", d.sm_count, "max_threads", d.max_threads,
                       "resident_threads_per_sm", d.resident_threads_per_sm);
}

PyMethodDef methods[] = {
    FUSEDBN_SIMT_PYTHON_CONTROLS,
    {"set_device", set_device, METH_O, "The GPU the host code sizes its launches for: 'small' or 'h200'."},
    {"device", device, METH_NOARGS, "The emulated GPU's description."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" PyObject* PyInit__simt(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_simt", nullptr, -1, methods};
  return PyModule_Create(&module);
}
