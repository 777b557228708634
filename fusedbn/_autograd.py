"""Keeping autograd.Function overhead off the hot path: when a call needs its Function at all, and its
forward's signature computed once."""
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
