// The fusedbn library: its schemas (schemas.h); each backend registers its kernels with
// TORCH_LIBRARY_IMPL in its own file (csrc/cpu/ops.cpp, csrc/cuda/ops.cu); the meta kernels
// (meta_kernels.h) are registered here; the module's functions are the eager autograd (autograd.cpp).
#include <Python.h>

#include "autograd.h"
#include "meta_kernels.h"
#include "schemas.h"

// `import fusedbn._C` loads this library, which registers the ops with the dispatcher.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fusedbn::autograd::python_methods()};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(fusedbn, m) { fusedbn::define_schemas(m); }

TORCH_LIBRARY_IMPL(fusedbn, Meta, m) { fusedbn::meta::register_meta_kernels(m); }
