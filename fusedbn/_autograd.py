"""Keeping autograd.Function overhead off the hot path: which variant of a Function a call applies, and none at
all where nothing will differentiate the call; its forward's signature computed once; for plain eager autograd,
a classic-style twin or a function in C++."""
import inspect
from typing import NamedTuple

import torch
from torch.autograd import forward_ad

from . import ops


class Variants(NamedTuple):
    """An autograd.Function in the three variants fusedbn/_functions.py defines for each: ``function``, the
    setup_context style (torch.func transforms, tracing); ``with_jvp``, its subclass with a jvp rule
    (forward-mode AD); ``eager``, for plain eager autograd: its classic-style twin (``eager_twin``) or a
    ``CppFunction``. Each has ``apply``."""

    function: type
    with_jvp: type
    eager: type


def pick(variants: Variants) -> type:
    """Which variant to apply: ``with_jvp`` while forward-mode AD is active; ``function`` under a torch.func
    transform or torch.compile / torch.export tracing (as Function.apply itself asks); else ``eager``."""
    if forward_ad._current_level >= 0:
        return variants.with_jvp
    if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        return variants.function
    return variants.eager


def function_for(variants: Variants, *tensors):
    """``pick(variants)`` where something will differentiate a call on ``tensors``: forward-mode AD, a torch.func
    transform, torch.export tracing (which expects the Function), or a tensor that requires grad while grad
    mode is on. Otherwise None, and the op runs alone: an autograd.Function's apply costs more host time than
    the kernel takes at small sizes."""
    function = pick(variants)
    if function is not variants.eager:
        return function
    if torch.is_grad_enabled():
        for t in tensors:  # a loop: any() over a generator costs twice as much
            if t is not None and t.requires_grad:
                return function
    return None


def cached_signature(function_class):
    """Class decorator for a setup_context-style autograd.Function: apply() binds the forward's arguments
    through inspect.signature on every call; computed once here (inspect returns a function's
    ``__signature__`` when it has one), that saves about 45 us of host time per call."""
    forward = function_class.forward
    forward.__signature__ = inspect.signature(forward)
    return function_class


def eager_twin(function_class):
    """A classic-style twin (``forward(ctx, *args)``) of a setup_context-style autograd.Function, with the
    same forward and backward. torch binds a setup_context-style Function's arguments through inspect.signature
    on every apply (about 10 us of host time, more than the kernel at small sizes); the classic style skips
    that. torch.func transforms, forward-mode AD and tracing need the setup_context style: ``pick`` says which
    to apply. The twin never runs under forward-mode AD, so it keeps only what backward needs
    (``function_class.setup_backward``, setup_context less ``save_for_forward``), and it leaves the gradients
    of outputs marked non-differentiable (the training statistics), which backward ignores, unmaterialized
    where torch would make a zeros tensor of each (as torch's AOTAutograd does for its Functions)."""

    def forward(ctx, *args):
        outputs = function_class.forward(*args)
        function_class.setup_backward(ctx, args, outputs)
        ctx._materialize_non_diff_grads = False
        return outputs

    name = function_class.__name__ + "Eager"
    return type(name, (torch.autograd.Function,), {
        "__doc__": f"{function_class.__name__} for plain eager autograd (fusedbn._autograd.eager_twin).",
        "__qualname__": name, "__module__": function_class.__module__,
        "forward": staticmethod(forward), "backward": staticmethod(function_class.backward)})


class CppFunction:
    """The eager variant of a Function implemented in C++ (csrc/autograd.cpp): ``apply(*args)`` with the
    Function's arguments calls ``entry(namespace, *args)``, ``namespace`` that of the ops fusedbn/ops.py holds
    (fusedbn's, or the tests' emulator's), whose ops the C++ code runs."""

    def __init__(self, entry):
        self.entry = entry

    def apply(self, *args):
        return self.entry(ops.namespace, *args)


# The ops carry autograd of their own (fusedbn/_op_autograd.py), a Python kernel at the Autograd key; an
# autograd.Function's forward, or a call nothing differentiates, runs them below it (a C++ guard, well under
# a microsecond, where entering that kernel to learn that nothing needs gradients costs several).
below_autograd = torch._C._AutoDispatchBelowAutograd
