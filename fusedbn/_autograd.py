"""Keeping autograd.Function overhead off the hot path: when a call needs its Function at all, its
forward's signature computed once, and a classic-style twin for plain eager autograd."""
import inspect

import torch
from torch.autograd import forward_ad


def autograd_needed(*tensors) -> bool:
    """Whether something will differentiate this call: a tensor that requires grad while grad mode is on,
    forward-mode AD, a torch.func transform, or torch.export tracing (which expects the Function).
    Otherwise the op runs alone: torch binds an autograd.Function's arguments with inspect.signature on
    every call, tens of microseconds of host time, more than the kernel takes at small sizes."""
    if torch.compiler.is_compiling() or forward_ad._current_level >= 0:
        return True
    if torch._C._are_functorch_transforms_active():  # as torch.autograd.Function.apply itself asks
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def cached_signature(function_class):
    """Class decorator for a setup_context-style autograd.Function: apply() binds the forward's arguments
    through inspect.signature on every call; computed once here (inspect returns a function's
    ``__signature__`` when it has one), that saves about 45 us of host time per call."""
    forward = function_class.forward
    forward.__signature__ = inspect.signature(forward)
    return function_class


def eager_twin(function_class):
    """A classic-style twin (``forward(ctx, *args)``) of a setup_context-style autograd.Function, with the
    same forward, saved state and backward. torch binds a setup_context-style Function's arguments through
    inspect.signature on every apply (about 10 us of host time, more than the kernel at small sizes); the
    classic style skips that. torch.func transforms, forward-mode AD and tracing need the setup_context
    style: ``pick`` says which to apply."""

    def forward(ctx, *args):
        outputs = function_class.forward(*args)
        function_class.setup_context(ctx, args, outputs)
        return outputs

    name = function_class.__name__ + "Eager"
    return type(name, (torch.autograd.Function,), {
        "__doc__": f"{function_class.__name__} for plain eager autograd (fusedbn._autograd.eager_twin).",
        "__qualname__": name, "__module__": function_class.__module__,
        "forward": staticmethod(forward), "backward": staticmethod(function_class.backward)})


def pick(function, with_jvp, eager):
    """Which variant of an autograd.Function to apply: ``with_jvp`` (the subclass with its jvp rule) while
    forward-mode AD is active; ``eager`` (its ``eager_twin``) in plain eager autograd; else ``function`` (the
    setup_context style that torch.func transforms and tracing need)."""
    if forward_ad._current_level >= 0:
        return with_jvp
    if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        return function
    return eager


# The ops carry autograd of their own (fusedbn/_op_autograd.py), a Python kernel at the Autograd key; an
# autograd.Function's forward, or a call nothing differentiates, runs them below it (a C++ guard, well under
# a microsecond, where entering that kernel to learn that nothing needs gradients costs several).
below_autograd = torch._C._AutoDispatchBelowAutograd
