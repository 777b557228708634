// Test-only library `fusedbn_simt`: the CUDA kernels (csrc/cuda/kernels.cuh) and their host side
// (csrc/cuda/host_ops.h), compiled as host C++ with the SIMT emulator and registered for CPU tensors under
// the same schemas as `fusedbn`. The equivalence suite runs it as one more device.
#include <Python.h>

#include "simt.h"  // first: the emulator's FUSEDBN_LAUNCH, which csrc/cuda/launch.h then leaves alone
#include "../cuda/host_ops.h"
#include "../meta_kernels.h"
#include "../schemas.h"

namespace fusedbn::cuda {
namespace {

// An emulated device: few SMs and small blocks, so that small test shapes already take the multi-block
// paths (grid merge, several splits per channel) and each launch stays cheap in OS threads.
struct SimtContext {
  int stream = 0;
  int sm_count = 2;
  int max_threads = 64;
  int resident_threads_per_sm = 256;
  explicit SimtContext(const Tensor&) {}
  int scratch_key() const { return stream; }
  bool capturing() const { return false; }
};

}  // namespace

TORCH_LIBRARY(fusedbn_simt, m) { define_schemas(m); }

TORCH_LIBRARY_IMPL(fusedbn_simt, Meta, m) { meta::register_meta_kernels(m); }

TORCH_LIBRARY_IMPL(fusedbn_simt, CPU, m) { register_cuda_kernels<SimtContext>(m); }

}  // namespace fusedbn::cuda

namespace {
PyObject* launch_count(PyObject*, PyObject*) {
  return PyLong_FromUnsignedLongLong(fusedbn::simt::launch_count().load());
}
PyMethodDef methods[] = {
    {"launch_count", launch_count, METH_NOARGS, "Kernel launches the emulator has run since the process started."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" PyObject* PyInit__simt(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_simt", nullptr, -1, methods};
  return PyModule_Create(&module);
}
