// fusedbn._C's Python functions: the training and eval forwards with plain eager autograd in C++
// (autograd.cpp).
#pragma once

#include <Python.h>

namespace fusedbn::autograd {

// The methods of the module fusedbn._C, terminated by a null entry.
PyMethodDef* python_methods();

}  // namespace fusedbn::autograd
