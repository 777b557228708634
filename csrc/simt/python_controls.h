// The emulator's settings as Python functions, for the modules built with it (fusedbn._simt and the
// self-test's): each module has its own copy of the settings, so each exposes these.
//   set_seed(int) / seed()                   the block order's seed (launches count from the set_seed)
//   set_concurrent_blocks(int) / concurrent_blocks()
//   set_sanitize(bool) / sanitize()
//   launch_count()                           kernel launches since the process started
//   nonzero_arrival_counters() -> [str]      counters not back at zero (reset once reported)
//   set_record_only(bool) / record_only()    launches recorded, not run (Settings::record_only)
//   recorded_launches() -> [dict]            the launches recorded since the last call: kernel, grid,
//                                            block, shared (dynamic shared bytes)
#pragma once

#include <Python.h>

#include <string>
#include <vector>

#include "host_checks.h"
#include "simt.h"

namespace fusedbn::simt::python {

inline PyObject* set_seed(PyObject*, PyObject* arg) {
  const unsigned long long v = PyLong_AsUnsignedLongLongMask(arg);
  if (PyErr_Occurred()) return nullptr;
  fusedbn::simt::set_seed(v);
  Py_RETURN_NONE;
}
inline PyObject* seed(PyObject*, PyObject*) { return PyLong_FromUnsignedLongLong(settings().seed.load()); }

inline PyObject* set_concurrent_blocks(PyObject*, PyObject* arg) {
  const long v = PyLong_AsLong(arg);
  if (PyErr_Occurred()) return nullptr;
  if (v < 1) {
    PyErr_SetString(PyExc_ValueError, "concurrent_blocks must be >= 1");
    return nullptr;
  }
  settings().concurrent_blocks = static_cast<unsigned>(v);
  Py_RETURN_NONE;
}
inline PyObject* concurrent_blocks(PyObject*, PyObject*) { return PyLong_FromUnsignedLong(settings().concurrent_blocks.load()); }

inline PyObject* set_sanitize(PyObject*, PyObject* arg) {
  const int v = PyObject_IsTrue(arg);
  if (v < 0) return nullptr;
  settings().sanitize = v != 0;
  Py_RETURN_NONE;
}
inline PyObject* sanitize(PyObject*, PyObject*) { return PyBool_FromLong(settings().sanitize.load()); }

inline PyObject* launch_count(PyObject*, PyObject*) { return PyLong_FromUnsignedLongLong(fusedbn::simt::launch_count().load()); }

inline PyObject* nonzero_arrival_counters(PyObject*, PyObject*) {
  const std::vector<std::string> found = fusedbn::simt::nonzero_arrival_counters();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(found.size()));
  for (size_t i = 0; i < found.size(); ++i) PyList_SET_ITEM(list, i, PyUnicode_FromString(found[i].c_str()));
  return list;
}

inline PyObject* set_record_only(PyObject*, PyObject* arg) {
  const int v = PyObject_IsTrue(arg);
  if (v < 0) return nullptr;
  settings().record_only = v != 0;
  Py_RETURN_NONE;
}
inline PyObject* record_only(PyObject*, PyObject*) { return PyBool_FromLong(settings().record_only.load()); }

inline PyObject* recorded_launches(PyObject*, PyObject*) {
  std::vector<RecordedLaunch> taken;
  {
    const std::lock_guard lock(recorded().mutex);
    taken.swap(recorded().launches);
  }
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(taken.size()));
  for (size_t i = 0; i < taken.size(); ++i) {
    const RecordedLaunch& l = taken[i];
    PyList_SET_ITEM(list, i,
                    Py_BuildValue("{s:s,s:(III),s:(III),s:n}", "kernel", l.kernel.c_str(), "grid", l.grid.x, l.grid.y,
                                  l.grid.z, "block", l.block.x, l.block.y, l.block.z, "shared",
                                  static_cast<Py_ssize_t>(l.dynamic_shared_bytes)));
  }
  return list;
}

#define FUSEDBN_SIMT_PYTHON_CONTROLS                                                                                 \
  {"set_seed", ::fusedbn::simt::python::set_seed, METH_O, "Seed the blocks' order; launches count from here."},      \
      {"seed", ::fusedbn::simt::python::seed, METH_NOARGS, "The blocks' order seed."},                               \
      {"set_concurrent_blocks", ::fusedbn::simt::python::set_concurrent_blocks, METH_O, "Blocks run at once."},       \
      {"concurrent_blocks", ::fusedbn::simt::python::concurrent_blocks, METH_NOARGS, "Blocks run at once."},         \
      {"set_sanitize", ::fusedbn::simt::python::set_sanitize, METH_O, "Turn the sanitizer's checks on or off."},     \
      {"sanitize", ::fusedbn::simt::python::sanitize, METH_NOARGS, "Whether the sanitizer checks."},                 \
      {"launch_count", ::fusedbn::simt::python::launch_count, METH_NOARGS, "Kernel launches since the start."},      \
      {"nonzero_arrival_counters", ::fusedbn::simt::python::nonzero_arrival_counters, METH_NOARGS,                   \
       "Arrival counters not back at zero (each reset once reported)."},                                        \
      {"set_record_only", ::fusedbn::simt::python::set_record_only, METH_O, "Record launches instead of running."}, \
      {"record_only", ::fusedbn::simt::python::record_only, METH_NOARGS, "Whether launches are only recorded."},     \
      {"recorded_launches", ::fusedbn::simt::python::recorded_launches, METH_NOARGS,                               \
       "The launches recorded since the last call, as dicts (kernel, grid, block, shared)."}

}  // namespace fusedbn::simt::python
