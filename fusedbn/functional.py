"""``batch_norm`` with ``torch.nn.functional.batch_norm``'s signature, ``batch_norm_act`` (BatchNorm, an
optional residual added, then an activation, in one op; ``batch_norm_relu`` its ReLU case), and their
autograd wiring. ``act`` below is an activation spec, (name, parameter) (fusedbn/activations.py)."""
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor
from torch.autograd import forward_ad

from . import activations, ops
from ._autograd import autograd_needed, below_autograd, cached_signature, eager_twin, plain_eager
from ._shapes import channel_view, channels_to_batch, input_to_channels, param_to_channels, params_to_batch
from .backward import ChannelTerms, batch_norm_backward


def _saved_for_activation(bias, output, residual, act):
    """(bias, output, residual): what the backward needs for act'(z), z = bn(x) [+ residual]. Nothing without
    an activation; for ReLU with a residual its output (its mask; torch's composition keeps it too); else the
    bias and the residual, to recompute z from x and the statistics."""
    if act[0] == "identity":
        return None, None, None
    if act[0] == "relu" and residual is not None:
        return None, output, None
    return bias, None, residual


def _backward(ctx, saved, grad_output, mean, invstd, training):
    """The fused backward, itself differentiable for gradients of gradients: fusedbn/backward.py where act'
    is piecewise constant, else (create_graph with SiLU, GELU, ...) the composition in torch's ops, whose
    second derivatives torch has. `saved`: ctx.saved_tensors, read once by the caller (each read unpacks
    every saved tensor)."""
    input, weight, bias, output, residual = saved[:5]
    mask = list(ctx.needs_input_grad[:3])
    if ctx.act[0] not in activations.PIECEWISE_LINEAR and autograd_needed(grad_output, input, weight, bias, residual):
        return _backward_in_torch_ops(ctx, saved, grad_output, training, mask)
    return batch_norm_backward(grad_output, input, weight, bias, output, residual, mean, invstd, training, ctx.act,
                               mask, ctx.needs_residual_grad)


def _backward_in_torch_ops(ctx, saved, grad_output, training, mask):
    """The gradients of act(bn(x) [+ residual]) recomputed in torch's ops with a graph (create_graph)."""
    input, weight, bias, _, residual, stat_a, stat_b = saved
    wanted = [input, weight, bias, residual]
    needed = mask + [ctx.needs_residual_grad]
    with torch.enable_grad():
        running = (None, None) if training else (stat_a, stat_b)
        z = F.batch_norm(input, *running, weight, bias, training, 0.0, ctx.eps)
        output = activations.apply(ctx.act, z if residual is None else z + residual)
        targets = [t for t, n in zip(wanted, needed) if n]
        grads = iter(torch.autograd.grad(output, targets, grad_output, create_graph=True, allow_unused=True))
    return tuple(next(grads) if n else None for n in needed)


def _tangent_through_epilogue(ctx, tangent, terms, bias, output, residual, residual_tangent):
    """The output's tangent from BatchNorm's: plus the residual's, then times act'(z) (ReLU's mask from the
    output where the backward reads it there, else z recomputed as the fused backward does)."""
    if residual_tangent is not None:
        tangent = tangent + residual_tangent
    name = ctx.act[0]
    if name == "identity":
        return tangent
    if name == "relu" and residual is not None:
        return torch.where(output > 0, tangent, 0)
    z = terms.alpha * (terms.x - terms.mean)
    if bias is not None:
        z = z + channel_view(bias.to(z.dtype), output)
    if residual is not None:
        z = z + residual.to(z.dtype)
    if name == "relu":  # its mask is the output's, on z rounded, as the fused backward takes it
        z = z.to(output.dtype).to(z.dtype)
    return (tangent.to(z.dtype) * activations.derivative(ctx.act, z)).to(output.dtype)


@cached_signature
class _BatchNormTraining(torch.autograd.Function):
    """Batch statistics; updates the running statistics in place when given. Returns (output, mean,
    invstd); the statistics are not differentiable."""

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, momentum, eps, residual, act):
        with below_autograd():
            return ops.forward_train(input, weight, bias, running_mean, running_var, momentum, eps, residual, *act)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        input, weight, bias, _, _, _, eps, residual, act = inputs
        output, mean, invstd = outputs
        ctx.save_for_backward(input, weight, *_saved_for_activation(bias, output, residual, act), mean, invstd)
        ctx.save_for_forward(input, weight, bias, output, residual, mean, invstd)
        ctx.mark_non_differentiable(mean, invstd)
        ctx.act, ctx.eps = act, eps
        ctx.needs_residual_grad = residual is not None and ctx.needs_input_grad[7]

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_invstd):
        saved = ctx.saved_tensors
        grads = _backward(ctx, saved, grad_output, *saved[5:], True)
        return *grads[:3], None, None, None, None, grads[3], None

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, running_mean, running_var, momentum, eps, residual, act):
        if running_mean is not None or running_var is not None:
            raise RuntimeError(
                "fusedbn: vmap over a training-mode batch norm cannot update running_mean and running_var in "
                "place; use torch.func.replace_all_batch_norm_modules_ or track_running_stats=False")
        size = info.batch_size
        output, mean, invstd = training_function().apply(
            input_to_channels(input, in_dims[0], size), param_to_channels(weight, in_dims[1], size),
            param_to_channels(bias, in_dims[2], size), None, None, momentum, eps,
            input_to_channels(residual, in_dims[7], size), act)
        return (channels_to_batch(output, size), params_to_batch(mean, size),
                params_to_batch(invstd, size)), (0, 0, 0)


@cached_signature
class _BatchNormEval(torch.autograd.Function):
    """Running statistics: a per-channel affine map of the input."""

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, eps, residual, act):
        with below_autograd():
            return ops.forward_eval(input, weight, bias, running_mean, running_var, eps, residual, *act)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, running_mean, running_var, eps, residual, act = inputs
        ctx.save_for_backward(input, weight, *_saved_for_activation(bias, output, residual, act), running_mean,
                              running_var)
        ctx.save_for_forward(input, weight, bias, output, residual, running_mean, running_var)
        ctx.act, ctx.eps = act, eps
        ctx.needs_residual_grad = residual is not None and ctx.needs_input_grad[6]

    @staticmethod
    def backward(ctx, grad_output):
        saved = ctx.saved_tensors
        grads = _backward(ctx, saved, grad_output, *_running_statistics(ctx, saved[0], *saved[5:]), False)
        return *grads[:3], None, None, None, grads[3], None

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, running_mean, running_var, eps, residual, act):
        size = info.batch_size
        output = eval_function().apply(
            input_to_channels(input, in_dims[0], size), param_to_channels(weight, in_dims[1], size),
            param_to_channels(bias, in_dims[2], size), param_to_channels(running_mean, in_dims[3], size),
            param_to_channels(running_var, in_dims[4], size), eps, input_to_channels(residual, in_dims[6], size),
            act)
        return channels_to_batch(output, size), 0


def _jvp(ctx, input, weight, bias, output, residual, mean, invstd, training, d_input, d_weight, d_bias, d_residual):
    """Forward-mode derivative of y = x_hat * w + b: dy = w * d x_hat + x_hat * dw + db, where
    w * d x_hat = alpha * P(dx) under batch statistics (they move with x; P in fusedbn/backward.py) and
    alpha * dx under running ones (constants), alpha = w * invstd."""
    t = ChannelTerms(input, weight, mean, invstd)
    acc = t.x.dtype
    tangent = torch.zeros_like(t.x)
    if d_input is not None:
        dx = d_input.to(acc)
        tangent = t.alpha * (t.project(dx) if training else dx)
    if d_weight is not None:
        tangent = tangent + t.x_hat * channel_view(d_weight.to(acc), input)
    if d_bias is not None:
        tangent = tangent + channel_view(d_bias.to(acc), input)
    return _tangent_through_epilogue(ctx, tangent.to(input.dtype), t, bias, output, residual, d_residual)


def _training_jvp(ctx, d_input, d_weight, d_bias, _d_rm, _d_rv, _d_momentum, _d_eps, d_residual, _d_act):
    saved = ctx.saved_tensors
    return _jvp(ctx, *saved, True, d_input, d_weight, d_bias, d_residual), None, None


def _eval_jvp(ctx, d_input, d_weight, d_bias, _d_rm, _d_rv, _d_eps, d_residual, _d_act):
    input, weight, bias, output, residual, running_mean, running_var = ctx.saved_tensors
    return _jvp(ctx, input, weight, bias, output, residual,
                *_running_statistics(ctx, input, running_mean, running_var), False, d_input, d_weight, d_bias,
                d_residual)


def _running_statistics(ctx, input, running_mean, running_var):
    """(mean, invstd) of eval mode, in the statistics' dtype."""
    acc = ops.acc_dtype(input.dtype)
    return running_mean.to(acc), torch.rsqrt(running_var.to(acc) + ctx.eps)


# Forward-mode AD needs a jvp rule, but torch.compile cannot trace an autograd.Function that has one: the
# rule lives in subclasses used only while forward-mode AD is active (torch.func.jvp/jacfwd, dual_level).
class _BatchNormTrainingForwardAD(_BatchNormTraining):
    jvp = staticmethod(_training_jvp)


class _BatchNormEvalForwardAD(_BatchNormEval):
    jvp = staticmethod(_eval_jvp)


_BatchNormTrainingEager = eager_twin(_BatchNormTraining)
_BatchNormEvalEager = eager_twin(_BatchNormEval)


def training_function():
    """The training autograd.Function to apply: with a jvp rule when forward-mode AD is active, the
    classic-style twin in plain eager autograd."""
    if forward_ad._current_level >= 0:
        return _BatchNormTrainingForwardAD
    return _BatchNormTrainingEager if plain_eager() else _BatchNormTraining


def eval_function():
    """The eval autograd.Function to apply, chosen as training_function chooses."""
    if forward_ad._current_level >= 0:
        return _BatchNormEvalForwardAD
    return _BatchNormEvalEager if plain_eager() else _BatchNormEval


def check_eps(eps: float, training: bool) -> None:
    """torch.nn.functional.batch_norm's rule and wording."""
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def batch_norm_training(input, weight, bias, running_mean, running_var, momentum, eps, residual, act):
    """(output, mean, invstd), through the autograd.Function only when something will differentiate it."""
    args = (input, weight, bias, running_mean, running_var, momentum, eps, residual, act)
    if autograd_needed(input, weight, bias, residual):
        return training_function().apply(*args)
    return _BatchNormTraining.forward(*args)


def _has_tangent(*tensors):
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def batch_norm_eval(input, weight, bias, running_mean, running_var, eps, residual, act):
    """The output with running statistics, through the autograd.Function only when something will
    differentiate it."""
    # torch's rule, checked here: the jvp rule cannot, as autograd hands it zeros for tangent-less inputs.
    if (forward_ad._current_level >= 0 and _has_tangent(running_mean, running_var)
            and _has_tangent(input, weight, bias, residual)):
        raise RuntimeError("batch_norm is not differentiable wrt running_mean and running_var, they cannot have "
                           "forward grad defined")
    args = (input, weight, bias, running_mean, running_var, eps, residual, act)
    if autograd_needed(input, weight, bias, residual):
        return eval_function().apply(*args)
    return _BatchNormEval.forward(*args)


_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
                torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble"}


def _check_running_stats(running_mean, running_var, training):
    """torch's checks that come before its kernel's (same exception types and wording)."""
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError("running_mean and running_var must be defined in evaluation mode")
    if torch.is_grad_enabled():
        for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
            if stat is not None and stat.requires_grad:
                raise RuntimeError(f"batch_norm is not differentiable with respect to argument '{name}'. This "
                                   "input cannot have requires_grad True.")


def _empty_batch(input, weight, bias, residual, act):
    """What torch's batch_norm returns for an input with no values, whatever the parameters' dtypes or
    sizes: the input's copy scaled by weight[0] plus bias[0] (so gradients still flow to them, as zeros),
    running statistics untouched."""
    output = input.clone()
    if weight is not None:
        output = output * weight[0]
    if bias is not None:
        output = output + bias[0]
    if residual is not None:
        output = output + residual
    return activations.apply(act, output)


def _with_torch_ops(input, running_mean, running_var, weight, bias, training, momentum, eps, residual, act):
    """The same computation in torch's own ops, for torch.compile: inductor lowers torch's batch_norm into the
    code it generates and fuses it with the convolution epilogues, activations and adds around it, where a
    custom op is opaque to it (it can fuse nothing into or around one)."""
    output = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        output = output + residual
    return activations.apply(act, output)


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


def _apply(input, running_mean, running_var, weight, bias, training, momentum, eps, residual, act):
    if computes_in_torch_ops():
        return _with_torch_ops(input, running_mean, running_var, weight, bias, training, momentum, eps, residual, act)
    check_eps(eps, training)
    if input.dim() < 2:
        # torch.nn.functional.batch_norm's exception types: IndexError where it indexes the missing dims (a
        # 0-d input in training, or nothing per-channel to check against), else RuntimeError.
        indexes = (training and input.dim() == 0) or all(t is None for t in (running_mean, running_var, weight, bias))
        raise (IndexError if indexes else RuntimeError)(
            f"batch_norm: expected an input of at least 2 dims (N, C, *), got {input.dim()} dims")
    if input.numel() == 0:
        return _empty_batch(input, weight, bias, residual, act)
    _check_running_stats(running_mean, running_var, training)
    if input.dtype not in _SUPPORTED_DTYPES:  # the ops raise it too, but FakeTensor tracing would retype it
        raise NotImplementedError(f'"batch_norm" not implemented for \'{_DTYPE_NAMES.get(input.dtype, input.dtype)}\'')
    # Any shape with C elements, as torch reads weight and bias; autograd returns their gradients in it.
    weight = weight.reshape(-1) if weight is not None and weight.dim() != 1 else weight
    bias = bias.reshape(-1) if bias is not None and bias.dim() != 1 else bias
    if training:
        return batch_norm_training(input, weight, bias, running_mean, running_var, momentum, eps, residual, act)[0]
    return batch_norm_eval(input, weight, bias, running_mean, running_var, eps, residual, act)


# What torch.utils.checkpoint raises to end a recomputation early, once it has the tensors it needs.
_STOP_RECOMPUTATION = getattr(torch.utils.checkpoint, "_StopRecomputationError", ())


def counted_apply(num_batches_tracked: Tensor, *args) -> Tensor:
    """``_apply(*args)`` for a module that tracks its batches: the batch counted first, as torch's BatchNorm
    counts it (a non-reentrant checkpoint stops recomputing right after the BatchNorm op, so torch's module
    counts the recomputed batch again, and so must this), and uncounted if the call is rejected, so a rejected
    input leaves the module as it was."""
    num_batches_tracked.add_(1)
    try:
        return _apply(*args)
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
    return _apply(input, running_mean, running_var, weight, bias, training, momentum, eps, None, activations.IDENTITY)


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
    return _apply(input, running_mean, running_var, weight, bias, training, momentum, eps, residual, activations.RELU)


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
) -> Tensor:
    """``act(batch_norm(input, ...) + residual)`` in one fused op (``residual`` optional, of the input's shape
    and dtype). ``activation``: ``"identity"``, ``"relu"``, ``"relu6"``, ``"leaky_relu"``
    (``activation_param``: negative_slope, default 0.01), ``"elu"`` (alpha, default 1.0), ``"silu"``,
    ``"hardswish"``, ``"gelu"``, ``"gelu_tanh"`` (GELU with ``approximate="tanh"``). BatchNorm's output and
    the activation are computed in float32 (float64 for float64 input) and rounded once. For backward it keeps the
    input (and the residual, if any) alive and recomputes the pre-activation from them, where torch's
    composition keeps the input and the pre-activation as well (ReLU with a residual keeps its output
    instead, as torch's does)."""
    act = activations.spec(activation, activation_param)
    return _apply(input, running_mean, running_var, weight, bias, training, momentum, eps, residual, act)
