"""``batch_norm`` with ``torch.nn.functional.batch_norm``'s signature, ``batch_norm_relu`` (BatchNorm, an
optional residual added, then ReLU, in one op), and their autograd wiring."""
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import ops


def _saved_for_relu_mask(bias, output, residual, relu):
    """What the backward needs for relu's mask: nothing without relu; the output with a residual (the mask
    cannot be recomputed without it); else the bias, to recompute bn(x) from x and the statistics."""
    if not relu:
        return None, None
    if residual is not None:
        return None, output
    return bias, None


def _backward(ctx, grad_output, mean, invstd, training):
    input, weight, bias, output = ctx.saved_tensors[:4]
    mask = list(ctx.needs_input_grad[:3])
    grad_input, grad_weight, grad_bias, grad_residual = ops.backward(
        grad_output, input, weight, mean, invstd, training, mask, bias, output, ctx.relu, ctx.needs_residual_grad
    )
    return grad_input, grad_weight, grad_bias, grad_residual


class _BatchNormTraining(torch.autograd.Function):
    """Batch statistics; updates the running statistics in place when given."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, residual, relu):
        output, mean, invstd = ops.forward_train(
            input, weight, bias, running_mean, running_var, momentum, eps, residual, relu
        )
        mask_bias, mask_output = _saved_for_relu_mask(bias, output, residual, relu)
        ctx.save_for_backward(input, weight, mask_bias, mask_output, mean, invstd)
        ctx.relu = relu
        ctx.needs_residual_grad = residual is not None and ctx.needs_input_grad[7]
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        mean, invstd = ctx.saved_tensors[4:]
        grads = _backward(ctx, grad_output, mean, invstd, True)
        return *grads[:3], None, None, None, None, grads[3], None


class _BatchNormEval(torch.autograd.Function):
    """Running statistics: a per-channel affine map of the input."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, residual, relu):
        output = ops.forward_eval(input, weight, bias, running_mean, running_var, eps, residual, relu)
        mask_bias, mask_output = _saved_for_relu_mask(bias, output, residual, relu)
        ctx.save_for_backward(input, weight, mask_bias, mask_output, running_mean, running_var)
        ctx.eps = eps
        ctx.relu = relu
        ctx.needs_residual_grad = residual is not None and ctx.needs_input_grad[6]
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, running_mean, running_var = ctx.saved_tensors[0], *ctx.saved_tensors[4:]
        acc = ops.acc_dtype(input.dtype)
        invstd = torch.rsqrt(running_var.to(acc) + ctx.eps)
        grads = _backward(ctx, grad_output, running_mean.to(acc), invstd, False)
        return *grads[:3], None, None, None, grads[3], None


def check_eps(eps: float, training: bool) -> None:
    """torch.nn.functional.batch_norm's rule and wording."""
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _apply(input, running_mean, running_var, weight, bias, training, momentum, eps, residual, relu):
    check_eps(eps, training)
    if training:
        return _BatchNormTraining.apply(
            input, weight, bias, running_mean, running_var, momentum, eps, residual, relu
        )
    if running_mean is None or running_var is None:
        raise RuntimeError("running_mean and running_var must be defined in evaluation mode")
    return _BatchNormEval.apply(input, weight, bias, running_mean, running_var, eps, residual, relu)


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
    return _apply(input, running_mean, running_var, weight, bias, training, momentum, eps, None, False)


def batch_norm_relu(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """``relu(batch_norm(input, ...) + residual)`` (``residual`` optional, of the input's shape and dtype)
    in one fused op. For backward it keeps only the input alive without a residual (relu's mask is
    recomputed from it), and the input and the output with one."""
    return _apply(input, running_mean, running_var, weight, bias, training, momentum, eps, residual, True)
