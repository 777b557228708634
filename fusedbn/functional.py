"""``batch_norm`` with ``torch.nn.functional.batch_norm``'s signature, ``batch_norm_act`` (BatchNorm, an
optional residual added, then an activation, in one op; ``batch_norm_relu`` its ReLU case), and
``run_batch_norm``, which every function goes through (and every module, by way of its second half
``run_ops``): torch's checks, then fusedbn's ops (their autograd.Functions in fusedbn/_functions.py) or, under
torch.compile, ONNX export and jit.trace, torch's own ops. ``act`` below is an activation spec, (name,
parameter), and ``act_weight`` PReLU's weight beside it (fusedbn/activations.py)."""
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from . import activations
from ._functions import batch_norm_eval, batch_norm_training
from ._shapes import flat_param


def check_eps(eps: float, training: bool) -> None:
    """torch.nn.functional.batch_norm's rule and wording."""
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
                torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble"}


def _check_running_stats(running_mean, running_var, training):
    """torch's checks that come before its kernel's (same exception types and wording)."""
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError("running_mean and running_var must be defined in evaluation mode")
    if torch.is_grad_enabled():
        mean_requires_grad = running_mean is not None and running_mean.requires_grad
        if mean_requires_grad or (running_var is not None and running_var.requires_grad):
            name = "running_mean" if mean_requires_grad else "running_var"
            raise RuntimeError(f"batch_norm is not differentiable with respect to argument '{name}'. This input "
                               "cannot have requires_grad True.")


def _empty_batch(input, weight, bias, residual, act, act_weight):
    """What torch's batch_norm returns for an input with no values, whatever the parameters' dtypes or
    sizes: the input's copy scaled by weight[0] plus bias[0] (so gradients still flow to them, as zeros),
    running statistics untouched."""
    output = input.clone()
    if weight is not None:
        output = output * weight[0]
    if bias is not None:
        output = output + bias[0]
    return activations.apply(act, output, residual, act_weight)


def _with_torch_ops(input, running_mean, running_var, weight, bias, training, momentum, eps, residual, act,
                    act_weight):
    """The same computation in torch's own ops, for torch.compile: inductor lowers torch's batch_norm into the
    code it generates and fuses it with the convolution epilogues, activations and adds around it, where a
    custom op is opaque to it (it can fuse nothing into or around one)."""
    output = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return activations.apply(act, output, residual, act_weight)


def computes_in_torch_ops() -> bool:
    """Whether this call computes in torch's own ops: under torch.compile, so a model compiles to what the
    same model with nn.BatchNorm*d compiles to; under ONNX export (both exporters), which then emits standard
    operators; under torch.jit.trace, so a saved trace runs wherever TorchScript runs, without fusedbn.
    torch.export (deployment, where nothing fuses around an op) keeps the fusedbn ops."""
    if torch.jit.is_tracing():  # the TorchScript-based ONNX exporter traces too
        return True
    if not torch.compiler.is_compiling():  # eager: the cheap checks first (is_in_onnx_export costs ~0.8 us)
        return False
    return not torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def fuses_residual(input: Tensor, residual: Optional[Tensor]) -> bool:
    """Whether the fused ops add ``residual``: one of the input's shape, dtype and device. Any other (broadcast
    or promoted, as ``+`` allows) a module adds after the op, unfused, so the result is still torch's."""
    return residual is None or (residual.shape == input.shape and residual.dtype == input.dtype
                                and residual.device == input.device)


def run_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, residual=None,
                   act=activations.IDENTITY, act_weight=None):
    activations.check_weight(act, act_weight, input)
    if computes_in_torch_ops():
        return _with_torch_ops(input, running_mean, running_var, weight, bias, training, momentum, eps, residual, act,
                               act_weight)
    return run_ops(input, running_mean, running_var, weight, bias, training, momentum, eps, residual, act, act_weight)


def run_ops(input, running_mean, running_var, weight, bias, training, momentum, eps, residual, act, act_weight):
    """``run_batch_norm`` past its first two steps (PReLU's weight checked, not computing in torch's ops), for
    callers that took them already: torch's checks, then fusedbn's ops."""
    check_eps(eps, training)
    if input.dim() < 2:
        # torch.nn.functional.batch_norm's exception types: IndexError where it indexes the missing dims (a
        # 0-d input in training, or nothing per-channel to check against), else RuntimeError.
        indexes = (training and input.dim() == 0) or all(t is None for t in (running_mean, running_var, weight, bias))
        raise (IndexError if indexes else RuntimeError)(
            f"batch_norm: expected an input of at least 2 dims (N, C, *), got {input.dim()} dims")
    if input.numel() == 0:
        return _empty_batch(input, weight, bias, residual, act, act_weight)
    _check_running_stats(running_mean, running_var, training)
    if input.dtype not in _SUPPORTED_DTYPES:  # the ops raise it too, but FakeTensor tracing would retype it
        raise NotImplementedError(f'"batch_norm" not implemented for \'{_DTYPE_NAMES.get(input.dtype, input.dtype)}\'')
    weight, bias = flat_param(weight), flat_param(bias)
    if training:
        return batch_norm_training(input, weight, bias, running_mean, running_var, momentum, eps, residual, act,
                                   act_weight)[0]
    return batch_norm_eval(input, weight, bias, running_mean, running_var, eps, residual, act, act_weight)


# What torch.utils.checkpoint raises to end a recomputation early, once it has the tensors it needs.
_STOP_RECOMPUTATION = getattr(torch.utils.checkpoint, "_StopRecomputationError", ())


def counted_apply(num_batches_tracked: Tensor, run, *args) -> Tensor:
    """``run(*args)`` (``run_batch_norm`` or ``run_ops``) for a module that tracks its batches: the batch counted
    first, as torch's BatchNorm counts it (a non-reentrant checkpoint stops recomputing right after the BatchNorm
    op, so torch's module counts the recomputed batch again, and so must this), and uncounted if the call is
    rejected, so a rejected input leaves the module as it was."""
    num_batches_tracked.add_(1)
    try:
        return run(*args)
    except _STOP_RECOMPUTATION:
        raise
    except BaseException:
        num_batches_tracked.sub_(1)
        raise


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
    return run_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


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
    in one fused op: ``batch_norm_act`` with ``activation="relu"``. For backward it keeps only the input
    alive without a residual (relu's mask is recomputed from it), and the input and the output with one."""
    return run_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, residual=residual,
                          act=activations.RELU)


def batch_norm_act(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
    activation: str = "relu",
    activation_param: Optional[float] = None,
    activation_weight: Optional[Tensor] = None,
) -> Tensor:
    """``act(batch_norm(input, ...) + residual)`` in one fused op (``residual`` optional, of the input's shape
    and dtype). ``activation``: ``"identity"``, ``"relu"``, ``"relu6"``, ``"leaky_relu"``
    (``activation_param``: negative_slope, default 0.01), ``"elu"`` (alpha, default 1.0), ``"silu"``,
    ``"hardswish"``, ``"gelu"``, ``"gelu_tanh"`` (GELU with ``approximate="tanh"``), ``"prelu"`` (its weight
    ``activation_weight``, as nn.PReLU's: 1 or C values, of the input's dtype or float32, required; it gets a
    gradient; no other activation takes one). BatchNorm's output and the activation are computed in float32
    (float64 for float64 input) and rounded once. For backward it keeps the input (and the residual, if any)
    alive and recomputes the pre-activation from them, where torch's composition keeps the input and the
    pre-activation as well (ReLU with a residual keeps its output instead, as torch's does)."""
    act = activations.spec(activation, activation_param)
    return run_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, residual=residual,
                          act=act, act_weight=activation_weight)
