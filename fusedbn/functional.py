"""``batch_norm`` with ``torch.nn.functional.batch_norm``'s signature, and its autograd wiring."""
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import ops


class _BatchNormTraining(torch.autograd.Function):
    """Batch statistics; updates the running statistics in place when given."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps):
        output, mean, invstd = ops.forward_train(input, weight, bias, running_mean, running_var, momentum, eps)
        ctx.save_for_backward(input, weight, mean, invstd)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, mean, invstd = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        grad_input, grad_weight, grad_bias = ops.backward(grad_output, input, weight, mean, invstd, True, mask)
        return grad_input, grad_weight, grad_bias, None, None, None, None


class _BatchNormEval(torch.autograd.Function):
    """Running statistics: a per-channel affine map of the input."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps):
        ctx.save_for_backward(input, weight, running_mean, running_var)
        ctx.eps = eps
        return ops.forward_eval(input, weight, bias, running_mean, running_var, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, running_mean, running_var = ctx.saved_tensors
        acc = ops.acc_dtype(input.dtype)
        invstd = torch.rsqrt(running_var.to(acc) + ctx.eps)
        mask = list(ctx.needs_input_grad[:3])
        grad_input, grad_weight, grad_bias = ops.backward(
            grad_output, input, weight, running_mean.to(acc), invstd, False, mask
        )
        return grad_input, grad_weight, grad_bias, None, None, None


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Drop-in for :func:`torch.nn.functional.batch_norm`, computed by the fusedbn kernels."""
    if training:
        return _BatchNormTraining.apply(input, weight, bias, running_mean, running_var, momentum, eps)
    if running_mean is None or running_var is None:
        raise RuntimeError("running_mean and running_var must be defined in evaluation mode")
    return _BatchNormEval.apply(input, weight, bias, running_mean, running_var, eps)
