// The fusedbn library: its schemas (schemas.h); each backend registers its kernels with
// TORCH_LIBRARY_IMPL in its own file (csrc/cpu/ops.cpp, csrc/cuda/ops.cu); the meta kernels
// (meta_kernels.h) are registered here; the module's functions are the eager autograd (autograd.cpp).
#include <Python.h>

#include "autograd.h"
#include "cuda_archs.h"
#include "meta_kernels.h"
#include "schemas.h"

// `import fusedbn._C` loads this library, which registers the ops with the dispatcher.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fusedbn::autograd::python_methods()};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(fusedbn, m) {
  fusedbn::define_schemas(m);
  // What the CUDA kernels were built for (cuda_archs.h), for fusedbn.info() and its tests.
  m.def("_cuda_archs() -> str", [] { return std::string(fusedbn::built_cuda_archs()); });
  m.def("_unsupported_gpu_message(str archs, int major, int minor, str name) -> str",
        [](c10::string_view archs, int64_t major, int64_t minor, c10::string_view name) {
          return fusedbn::unsupported_gpu_message(std::string(archs), static_cast<int>(major), static_cast<int>(minor),
                                                  std::string(name));
        });
}

TORCH_LIBRARY_IMPL(fusedbn, Meta, m) { fusedbn::meta::register_meta_kernels(m); }
