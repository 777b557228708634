"""Every autograd.Function of fusedbn, and when each is applied: the training and eval forwards
(fusedbn/functional.py's entry points), the fused backward as a Function of its own (so gradients of
gradients exist), SyncBatchNorm's (fusedbn/sync.py). Their derivative math is fusedbn/_derivatives.py.

PReLU's weight (``act_weight``, None for the other activations) is a tensor input of each Function, after the
activation's (name, parameter) pair, as the ops take it after theirs; it gets its gradient like the others.

Each Function comes in three variants: setup_context style (torch.func transforms, tracing), with a jvp rule
(forward-mode AD; torch.compile cannot trace a Function that has one, so it is a subclass used only then),
and one for plain eager autograd: the training and eval forwards' in C++ (csrc/autograd.cpp: the same saved
tensors and gradients), the backward's a classic-style twin (fusedbn/_autograd.py). The ops themselves carry
the same Functions as autograd kernels (fusedbn/_op_autograd.py).
"""
import torch
import torch.distributed as dist
from torch.autograd import forward_ad
from torch.autograd.function import once_differentiable

from . import _C, activations, ops
from ._autograd import CppFunction, Variants, below_autograd, cached_signature, eager_twin, function_for, pick
from ._derivatives import (BackwardTerms, backward_in_torch_ops, backward_jvp, backward_of_composition,
                           double_backward, forward_jvp, invstd_of, running_statistics, saved_for_activation, to_dtype)
from ._shapes import (act_weight_to_batch, act_weight_to_channels, channels_to_batch, input_to_channels,
                      param_to_channels, params_to_batch)


def gradients(ctx, saved, grad_output, mean, invstd, training):
    """The fused backward, itself differentiable for gradients of gradients: fusedbn/_derivatives.py where act'
    is piecewise constant, else (create_graph with SiLU, GELU, PReLU, ...) the composition in torch's ops,
    whose second derivatives torch has. `saved`: ctx.saved_tensors, read once by the caller (each read
    unpacks every saved tensor). Returns the gradients of (input, weight, bias, residual, act_weight)."""
    input, weight, bias, output, residual, act_weight = saved[:6]
    mask = list(ctx.needs_input_grad[:3])
    # A smooth activation's gradients that something will differentiate (where BackwardFunction would apply).
    if ctx.act[0] not in activations.PIECEWISE_LINEAR and function_for(BACKWARD, grad_output, input, weight, bias,
                                                                       residual, act_weight) is not None:
        return backward_in_torch_ops(ctx, saved, grad_output, training, mask)
    return batch_norm_backward(grad_output, input, weight, mean, invstd, training, mask, bias, output, residual,
                               ctx.act, ctx.needs_residual_grad, act_weight, ctx.needs_act_weight_grad)


def _save_activation_context(ctx, act, eps, residual, act_weight, residual_index):
    """What both forwards' setup_context record beside the saved tensors: the activation, eps, and which of
    the residual and PReLU's weight (the Function's inputs at ``residual_index`` and past the act) need
    gradients."""
    ctx.act, ctx.eps = act, eps
    ctx.needs_residual_grad = residual is not None and ctx.needs_input_grad[residual_index]
    ctx.needs_act_weight_grad = act_weight is not None and ctx.needs_input_grad[residual_index + 2]


@cached_signature
class TrainingFunction(torch.autograd.Function):
    """Batch statistics; updates the running statistics in place when given. Returns (output, mean,
    invstd); the statistics are not differentiable."""

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, momentum, eps, residual, act, act_weight):
        with below_autograd():
            return ops.forward_train(input, weight, bias, running_mean, running_var, momentum, eps, residual, *act,
                                     act_weight)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        input, weight, bias, _, _, _, eps, residual, act, act_weight = inputs
        output, mean, invstd = outputs
        ctx.save_for_backward(input, weight, *saved_for_activation(bias, output, residual, act, act_weight), mean,
                              invstd)
        ctx.mark_non_differentiable(mean, invstd)
        _save_activation_context(ctx, act, eps, residual, act_weight, residual_index=7)
        ctx.save_for_forward(input, weight, bias, output, residual, act_weight, mean, invstd)

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_invstd):
        saved = ctx.saved_tensors
        grads = gradients(ctx, saved, grad_output, *saved[6:], True)
        return *grads[:3], None, None, None, None, grads[3], None, grads[4]

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, running_mean, running_var, momentum, eps, residual, act, act_weight):
        if running_mean is not None or running_var is not None:
            raise RuntimeError(
                "fusedbn: vmap over a training-mode batch norm cannot update running_mean and running_var in "
                "place; use torch.func.replace_all_batch_norm_modules_ or track_running_stats=False")
        size = info.batch_size
        x = input_to_channels(input, in_dims[0], size)
        output, mean, invstd = pick(TRAINING).apply(
            x, param_to_channels(weight, in_dims[1], size), param_to_channels(bias, in_dims[2], size), None, None,
            momentum, eps, input_to_channels(residual, in_dims[7], size), act,
            act_weight_to_channels(act_weight, in_dims[9], size, x))
        return (channels_to_batch(output, size), params_to_batch(mean, size),
                params_to_batch(invstd, size)), (0, 0, 0)


@cached_signature
class EvalFunction(torch.autograd.Function):
    """Running statistics: a per-channel affine map of the input."""

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, eps, residual, act, act_weight):
        with below_autograd():
            return ops.forward_eval(input, weight, bias, running_mean, running_var, eps, residual, *act, act_weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, running_mean, running_var, eps, residual, act, act_weight = inputs
        ctx.save_for_backward(input, weight, *saved_for_activation(bias, output, residual, act, act_weight),
                              running_mean, running_var)
        _save_activation_context(ctx, act, eps, residual, act_weight, residual_index=6)
        ctx.save_for_forward(input, weight, bias, output, residual, act_weight, running_mean, running_var)

    @staticmethod
    def backward(ctx, grad_output):
        saved = ctx.saved_tensors
        grads = gradients(ctx, saved, grad_output, *running_statistics(ctx, saved[0], *saved[6:]), False)
        return *grads[:3], None, None, None, grads[3], None, grads[4]

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, running_mean, running_var, eps, residual, act, act_weight):
        size = info.batch_size
        x = input_to_channels(input, in_dims[0], size)
        output = pick(EVAL).apply(
            x, param_to_channels(weight, in_dims[1], size), param_to_channels(bias, in_dims[2], size),
            param_to_channels(running_mean, in_dims[3], size), param_to_channels(running_var, in_dims[4], size), eps,
            input_to_channels(residual, in_dims[6], size), act, act_weight_to_channels(act_weight, in_dims[8], size, x))
        return channels_to_batch(output, size), 0


def _training_function_jvp(ctx, d_input, d_weight, d_bias, _d_rm, _d_rv, _d_momentum, _d_eps, d_residual, _d_act,
                           d_act_weight):
    saved = ctx.saved_tensors
    return forward_jvp(ctx, *saved, True, d_input, d_weight, d_bias, d_residual, d_act_weight), None, None


def _eval_function_jvp(ctx, d_input, d_weight, d_bias, _d_rm, _d_rv, _d_eps, d_residual, _d_act, d_act_weight):
    input, weight, bias, output, residual, act_weight, running_mean, running_var = ctx.saved_tensors
    return forward_jvp(ctx, input, weight, bias, output, residual, act_weight,
                       *running_statistics(ctx, input, running_mean, running_var), False, d_input, d_weight, d_bias,
                       d_residual, d_act_weight)


# Forward-mode AD needs a jvp rule, but torch.compile cannot trace an autograd.Function that has one: the
# rule lives in subclasses used only while forward-mode AD is active (torch.func.jvp/jacfwd, dual_level).
class TrainingFunctionWithJvp(TrainingFunction):
    jvp = staticmethod(_training_function_jvp)


class EvalFunctionWithJvp(EvalFunction):
    jvp = staticmethod(_eval_function_jvp)


TRAINING = Variants(TrainingFunction, TrainingFunctionWithJvp, CppFunction(_C.batch_norm_training))
EVAL = Variants(EvalFunction, EvalFunctionWithJvp, CppFunction(_C.batch_norm_eval))


def batch_norm_training(input, weight, bias, running_mean, running_var, momentum, eps, residual, act,
                        act_weight=None):
    """(output, mean, invstd), through the variant ``pick`` chooses; the eager one records a node only where
    something will differentiate the call."""
    return pick(TRAINING).apply(input, weight, bias, running_mean, running_var, momentum, eps, residual, act,
                                act_weight)


def _has_tangent(*tensors):
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def batch_norm_eval(input, weight, bias, running_mean, running_var, eps, residual, act, act_weight=None):
    """The output with running statistics, as ``batch_norm_training``."""
    # torch's rule, checked here: the jvp rule cannot, as autograd hands it zeros for tangent-less inputs.
    if (forward_ad._current_level >= 0 and _has_tangent(running_mean, running_var)
            and _has_tangent(input, weight, bias, residual, act_weight)):
        raise RuntimeError("batch_norm is not differentiable wrt running_mean and running_var, they cannot have "
                           "forward grad defined")
    return pick(EVAL).apply(input, weight, bias, running_mean, running_var, eps, residual, act, act_weight)


@cached_signature
class BackwardFunction(torch.autograd.Function):
    """(grad_input, grad_weight, grad_bias, grad_residual, grad_act_weight) of the fused ops, differentiable;
    outputs not asked for by ``output_mask`` / ``grad_residual`` / ``grad_act_weight`` are None. Its arguments
    are ops.backward's, in its order (the activation as one (name, parameter) pair). Its own derivatives:
    fusedbn/_derivatives.py's where act' is piecewise constant, else those of the composition in torch's ops."""

    @staticmethod
    def forward(grad_output, input, weight, mean, invstd, training, output_mask, bias, output, residual, act,
                grad_residual, act_weight, grad_act_weight):
        with below_autograd():
            return tuple(ops.backward(grad_output, input, weight, mean, invstd, training, output_mask, bias, output,
                                      residual, *act, grad_residual, act_weight, grad_act_weight))

    @staticmethod
    def setup_backward(ctx, inputs, outputs):
        """setup_context's part that backward needs (all the eager twin keeps)."""
        grad_output, input, weight, mean, invstd, training, _, bias, output, residual, act, _, act_weight, _ = inputs
        ctx.save_for_backward(grad_output, input, weight, bias, output, residual, act_weight, mean, invstd)
        ctx.training, ctx.act = training, act
        ctx.output_dtypes = [None if o is None else o.dtype for o in outputs]
        ctx.set_materialize_grads(False)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        BackwardFunction.setup_backward(ctx, inputs, outputs)
        grad_output, input, weight, mean, invstd, _, _, bias, output, residual, _, _, act_weight, _ = inputs
        ctx.save_for_forward(grad_output, input, weight, bias, output, residual, act_weight, mean, invstd)

    @staticmethod
    def backward(ctx, gg_input, gg_weight, gg_bias, gg_residual, gg_act_weight):
        if ctx.act[0] not in activations.PIECEWISE_LINEAR:
            return backward_of_composition(ctx, ctx.saved_tensors, (gg_input, gg_weight, gg_bias, gg_residual,
                                                                    gg_act_weight))
        grad_output, input, weight, *rest = ctx.saved_tensors
        terms = BackwardTerms(grad_output, input, weight, *rest, ctx.act)
        upstream = (to_dtype(g, terms.x.dtype) for g in (gg_input, gg_weight, gg_bias, gg_residual))
        d_grad_output, d_input, d_weight = double_backward(terms, ctx.training, *upstream, ctx.needs_input_grad[:3])
        # bias, output and residual reach the backward only through act', piecewise constant: zero gradient,
        # as torch's threshold_backward reports it (zeros, not None, so optimizers treat the bias as torch's do).
        d_bias, d_output, d_residual = (torch.zeros_like(t) if needed and t is not None else None
                                        for t, needed in zip(rest[:3], ctx.needs_input_grad[7:10]))
        return (to_dtype(d_grad_output, grad_output.dtype), to_dtype(d_input, input.dtype),
                to_dtype(d_weight, None if weight is None else weight.dtype), None, None, None, None, d_bias, d_output,
                d_residual, None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, grad_output, input, weight, mean, invstd, training, output_mask, bias, output, residual,
             act, grad_residual, act_weight, grad_act_weight):
        size = info.batch_size
        to_input = lambda t, i: input_to_channels(t, in_dims[i], size)  # noqa: E731
        to_param = lambda t, i: param_to_channels(t, in_dims[i], size)  # noqa: E731
        x = to_input(input, 1)
        grads = batch_norm_backward(
            to_input(grad_output, 0), x, to_param(weight, 2), to_param(mean, 3), to_param(invstd, 4), training,
            output_mask, to_param(bias, 7), to_input(output, 8), to_input(residual, 9), act, grad_residual,
            act_weight_to_channels(act_weight, in_dims[12], size, x), grad_act_weight)
        # PReLU's weight gradient per problem, in the shape of one problem's weight.
        problem_shape = None if act_weight is None else (
            act_weight.shape if in_dims[12] is None else act_weight.movedim(in_dims[12], 0).shape[1:])
        unbatch = (channels_to_batch, params_to_batch, params_to_batch, channels_to_batch,
                   lambda g, size: act_weight_to_batch(g, size, problem_shape))
        return (tuple(None if g is None else f(g, size) for f, g in zip(unbatch, grads)),
                tuple(None if g is None else 0 for g in grads))


def _backward_function_jvp(ctx, d_grad_output, d_input, d_weight, *_):
    if ctx.act[0] not in activations.PIECEWISE_LINEAR:
        raise NotImplementedError(
            f"fusedbn: forward-mode AD of the backward op with activation '{ctx.act[0]}' is not implemented; "
            "differentiate fusedbn's functions or modules (their backward is then torch's ops)")
    grad_output, input, weight, *rest = ctx.saved_tensors
    terms = BackwardTerms(grad_output, input, weight, *rest, ctx.act)
    tangents = backward_jvp(terms, ctx.training, *(to_dtype(d, terms.x.dtype) for d in (d_grad_output, d_input, d_weight)))
    tangents = (*tangents, None)  # no PReLU weight here: its gradient is not an output
    return tuple(to_dtype(t, dtype) if dtype is not None else None for t, dtype in zip(tangents, ctx.output_dtypes))


# As in functional.py: the jvp rule only while forward-mode AD is active, for torch.compile's sake.
class BackwardFunctionWithJvp(BackwardFunction):
    jvp = staticmethod(_backward_function_jvp)


BackwardFunctionEager = eager_twin(BackwardFunction)
BACKWARD = Variants(BackwardFunction, BackwardFunctionWithJvp, BackwardFunctionEager)


def batch_norm_backward(*args):
    """``BackwardFunction`` applied (the variant fusedbn._autograd.pick chooses) where something will
    differentiate the gradients (``create_graph=True``, torch.func); else the fused op alone."""
    grad_output, input, weight, _, _, _, _, bias, output, residual, _, _, act_weight, _ = args
    function = function_for(BACKWARD, grad_output, input, weight, bias, output, residual, act_weight)
    return BackwardFunction.forward(*args) if function is None else function.apply(*args)


class SyncFunction(torch.autograd.Function):
    """Normalizes with the group's (mean, biased var); backward sums two per-channel terms over the group."""

    @staticmethod
    def forward(ctx, input, weight, bias, mean, var, total, eps, group):
        # forward_eval takes weight and bias in the statistics' dtype (float32 for half and bfloat16 input:
        # exact), whatever dtype the parameters are kept in.
        weight_acc = None if weight is None else weight.to(mean.dtype)
        bias_acc = None if bias is None else bias.to(mean.dtype)
        with below_autograd():
            output = ops.forward_eval(input, weight_acc, bias_acc, mean, var, eps)
        invstd = invstd_of(var, eps)  # forward_eval's, to rounding
        ctx.save_for_backward(input, weight_acc, mean, invstd, total)
        ctx.group = group
        ctx.params = [(p.dtype, p.shape) if p is not None else None for p in (weight, bias)]
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, mean, invstd, total = ctx.saved_tensors
        channels = input.shape[1]
        if input.numel() == 0:
            zeros = mean.new_zeros(channels)
            sum_dz, sum_dz_xmu = zeros, zeros
        else:
            sum_dz, sum_dz_xmu, _ = ops.grad_sums(grad_output, input, weight, mean, invstd)
        packed = torch.cat([sum_dz, sum_dz_xmu])
        dist.all_reduce(packed, group=ctx.group)
        global_dz, global_dz_xmu = packed[:channels], packed[channels:]
        n = total.to(mean.dtype).clamp(min=1)
        grad_input = None
        if ctx.needs_input_grad[0]:
            if input.numel() == 0:
                grad_input = torch.zeros_like(input)
            else:
                grad_input, _ = ops.backward_elemt(grad_output, input, weight, mean, invstd, global_dz / n,
                                                   invstd * invstd * global_dz_xmu / n)
        # Parameter gradients are this process's (DistributedDataParallel averages them), in their dtype.
        grads = [None, None]
        for i, term in enumerate((sum_dz_xmu * invstd, sum_dz)):
            if ctx.needs_input_grad[1 + i]:
                dtype, shape = ctx.params[i]
                grads[i] = term.to(dtype).view(shape)
        return grad_input, *grads, None, None, None, None, None
