// `import fusedbn._cpu_<build>` loads one build of the CPU kernels (ops.cpp), which registers them with the
// dispatcher; fusedbn/ops.py picks the build (setup.py builds one per instruction set, or one for
// FUSEDBN_CPU_ARCH). TORCH_EXTENSION_NAME is the module's name, which torch's build defines per extension.
#include <Python.h>

#define FUSEDBN_STRINGIFY(x) #x
#define FUSEDBN_NAME(x) FUSEDBN_STRINGIFY(x)
#define FUSEDBN_JOIN(a, b) a##b
#define FUSEDBN_MODULE_INIT(name) FUSEDBN_JOIN(PyInit_, name)

extern "C" PyObject* FUSEDBN_MODULE_INIT(TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, FUSEDBN_NAME(TORCH_EXTENSION_NAME), nullptr, -1,
                                      nullptr};
  return PyModule_Create(&module);
}
