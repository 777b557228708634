"""BatchNorm's backward as an autograd.Function of its own, so gradients of gradients exist (double
backward for gradient penalties, Hessian-vector products, meta-learning).

Its forward is the fused ``ops.backward``. Its backward and jvp are BatchNorm's second derivatives,
written in torch ops (so they are differentiable again, to any order). Per channel, over the m values
that share it, with x_hat = (x - mean) * invstd, alpha = weight * invstd, g = dy * act'(z) (z = bn(x)
[+ residual]), for the activations whose act' is piecewise constant (identity, ReLU, ReLU6, LeakyReLU):

    training: grad_input = alpha * P(g),  P(v) = v - mean(v) - x_hat * mean(x_hat * v)
              d x_hat = invstd * P(dx),   d invstd = -invstd**2 * mean(x_hat * dx)
    eval:     grad_input = alpha * g      (mean and invstd are constants)
    both:     grad_weight = sum(g * x_hat),  grad_bias = sum(g),  grad_residual = g

P is symmetric, which makes the adjoints below short. act' gates g and contributes no derivative of its
own. (fusedbn/functional.py differentiates the other activations' backward in torch's ops.)
"""
import torch
from torch.autograd import forward_ad

from . import activations, ops
from ._autograd import autograd_needed, below_autograd, cached_signature, eager_twin, plain_eager
from ._shapes import channel_view, channels_to_batch, input_to_channels, param_to_channels, params_to_batch


class ChannelTerms:
    """x_hat, alpha and the per-channel reductions of one call, in the statistics' dtype, broadcast over the
    input (N, C, *)."""

    def __init__(self, input, weight, mean, invstd):
        acc = mean.dtype
        self.dims = [d for d in range(input.dim()) if d != 1]
        self.x = input.to(acc)
        self.mean, self.invstd = channel_view(mean, input), channel_view(invstd, input)
        self.x_hat = (self.x - self.mean) * self.invstd
        self.alpha = self.invstd if weight is None else self.invstd * channel_view(weight.to(acc), input)

    def channel_mean(self, t):
        return t.mean(self.dims, keepdim=True)

    def channel_sum(self, t):
        return t.sum(self.dims)

    def project(self, v):
        """P(v): v without its channel mean and its component along x_hat."""
        return v - self.channel_mean(v) - self.x_hat * self.channel_mean(self.x_hat * v)


class _Terms(ChannelTerms):
    """ChannelTerms plus what the backward's derivatives need: act'(z) and g, dy gated by it."""

    def __init__(self, grad_output, input, weight, bias, output, residual, mean, invstd, act):
        super().__init__(input, weight, mean, invstd)
        self.slope = None
        if act[0] == "relu" and output is not None:  # the mask as the fused kernels take it (csrc/epilogue.h)
            self.slope = (output > 0).to(self.x.dtype)
        elif act[0] != "identity":
            z = (self.x - self.mean) * self.alpha
            if bias is not None:
                z = z + channel_view(bias.to(self.x.dtype), input)
            if residual is not None:
                z = z + residual.to(self.x.dtype)
            if act[0] == "relu":  # its mask is the output's, on z rounded (grad_through_activation)
                z = z.to(input.dtype).to(self.x.dtype)
            self.slope = activations.derivative(act, z)
        self.g = self.gate(grad_output.to(self.x.dtype))

    def gate(self, t):
        return t if self.slope is None else torch.where(self.slope == 0, 0, t * self.slope)


def _double_backward(terms, training, gg_input, gg_weight, gg_bias, gg_residual, needs):
    """The adjoint of (grad_input, grad_weight, grad_bias, grad_residual) with respect to (grad_output,
    input, weight), given the gradients gg_* that reach those outputs."""
    t = terms
    gg_w = channel_view(gg_weight, t.x)
    gg_b = channel_view(gg_bias, t.x)
    d_grad_output = d_input = d_weight = None
    if needs[0]:
        d_g = torch.zeros_like(t.x)
        if gg_input is not None:
            d_g = d_g + t.alpha * (t.project(gg_input) if training else gg_input)
        if gg_w is not None:
            d_g = d_g + gg_w * t.x_hat
        if gg_b is not None:
            d_g = d_g + gg_b
        if gg_residual is not None:
            d_g = d_g + gg_residual
        d_grad_output = t.gate(d_g)
    if needs[2] and gg_input is not None:
        d_weight = t.channel_sum(gg_input * (t.project(t.g) if training else t.g)) * t.invstd.flatten()
    if needs[1]:
        # grad_weight depends on x through x_hat; in training grad_input does too, and through invstd:
        # d_input = invstd * P(v) - alpha * invstd * mean(gg_input * P(g)) * x_hat, with v below.
        v = torch.zeros_like(t.x) if gg_w is None else gg_w * t.g
        if not training:
            d_input = t.invstd * v
        elif gg_input is None:
            d_input = t.invstd * t.project(v)
        else:
            v = v - t.alpha * (t.channel_mean(t.x_hat * t.g) * gg_input + t.channel_mean(gg_input * t.x_hat) * t.g)
            d_input = t.invstd * t.project(v) - t.alpha * t.invstd * t.channel_mean(
                gg_input * t.project(t.g)) * t.x_hat
    return d_grad_output, d_input, d_weight


def _backward_jvp(terms, training, d_grad_output, d_input, d_weight):
    """The tangents of (grad_input, grad_weight, grad_bias, grad_residual) given those of (grad_output,
    input, weight)."""
    t = terms
    zero = torch.zeros_like(t.x)
    d_g = zero if d_grad_output is None else t.gate(d_grad_output)
    dx = zero if d_input is None else d_input
    d_x_hat = t.invstd * (t.project(dx) if training else dx)  # eval holds the statistics still
    d_alpha = zero if d_weight is None else t.invstd * channel_view(d_weight, t.x)
    if training:
        d_alpha = d_alpha - t.alpha * t.invstd * t.channel_mean(t.x_hat * dx)
        d_p_g = t.project(d_g) - d_x_hat * t.channel_mean(t.x_hat * t.g) - t.x_hat * t.channel_mean(d_x_hat * t.g)
        d_grad_input = d_alpha * t.project(t.g) + t.alpha * d_p_g
    else:
        d_grad_input = d_alpha * t.g + t.alpha * d_g
    d_grad_weight = t.channel_sum(d_g * t.x_hat + t.g * d_x_hat)
    return d_grad_input, d_grad_weight, t.channel_sum(d_g), d_g


@cached_signature
class BatchNormBackward(torch.autograd.Function):
    """(grad_input, grad_weight, grad_bias, grad_residual) of the fused ops, differentiable; outputs not
    asked for by ``output_mask`` / ``grad_residual`` are None."""

    @staticmethod
    def forward(grad_output, input, weight, bias, output, residual, mean, invstd, training, act, output_mask,
                grad_residual):
        with below_autograd():
            return tuple(ops.backward(grad_output, input, weight, mean, invstd, training, output_mask, bias, output,
                                      residual, *act, grad_residual))

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        grad_output, input, weight, bias, output, residual, mean, invstd, training, act, _, _ = inputs
        ctx.save_for_backward(grad_output, input, weight, bias, output, residual, mean, invstd)
        ctx.save_for_forward(grad_output, input, weight, bias, output, residual, mean, invstd)
        ctx.training, ctx.act = training, act
        ctx.output_dtypes = [None if o is None else o.dtype for o in outputs]
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, gg_input, gg_weight, gg_bias, gg_residual):
        grad_output, input, weight, *rest = ctx.saved_tensors
        terms = _Terms(grad_output, input, weight, *rest, ctx.act)
        upstream = (_to(g, terms.x.dtype) for g in (gg_input, gg_weight, gg_bias, gg_residual))
        d_grad_output, d_input, d_weight = _double_backward(terms, ctx.training, *upstream, ctx.needs_input_grad[:3])
        # bias, output and residual reach the backward only through act', piecewise constant: zero gradient,
        # as torch's threshold_backward reports it (zeros, not None, so optimizers treat the bias as torch's do).
        d_bias, d_output, d_residual = (torch.zeros_like(t) if needed and t is not None else None
                                        for t, needed in zip(rest[:3], ctx.needs_input_grad[3:6]))
        return (_to(d_grad_output, grad_output.dtype), _to(d_input, input.dtype),
                _to(d_weight, None if weight is None else weight.dtype), d_bias, d_output, d_residual,
                None, None, None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, grad_output, input, weight, bias, output, residual, mean, invstd, training, act,
             output_mask, grad_residual):
        size = info.batch_size
        to_input = lambda t, i: input_to_channels(t, in_dims[i], size)  # noqa: E731
        to_param = lambda t, i: param_to_channels(t, in_dims[i], size)  # noqa: E731
        grads = batch_norm_backward(
            to_input(grad_output, 0), to_input(input, 1), to_param(weight, 2), to_param(bias, 3),
            to_input(output, 4), to_input(residual, 5), to_param(mean, 6), to_param(invstd, 7), training, act,
            output_mask, grad_residual)
        unbatch = (channels_to_batch, params_to_batch, params_to_batch, channels_to_batch)
        return (tuple(None if g is None else f(g, size) for f, g in zip(unbatch, grads)),
                tuple(None if g is None else 0 for g in grads))


def _jvp(ctx, d_grad_output, d_input, d_weight, *_):
    grad_output, input, weight, *rest = ctx.saved_tensors
    terms = _Terms(grad_output, input, weight, *rest, ctx.act)
    tangents = _backward_jvp(terms, ctx.training, *(_to(d, terms.x.dtype) for d in (d_grad_output, d_input, d_weight)))
    return tuple(_to(t, dtype) if dtype is not None else None for t, dtype in zip(tangents, ctx.output_dtypes))


def _to(t, dtype):
    return None if t is None else t.to(dtype)


# As in functional.py: the jvp rule only while forward-mode AD is active, for torch.compile's sake.
class _BatchNormBackwardForwardAD(BatchNormBackward):
    jvp = staticmethod(_jvp)


_BatchNormBackwardEager = eager_twin(BatchNormBackward)


def batch_norm_backward(*args):
    """``BatchNormBackward.apply`` (with its jvp rule when forward-mode AD is active, its classic-style twin
    in plain eager autograd) where something will differentiate the gradients (``create_graph=True``,
    torch.func); else the fused op alone."""
    if not autograd_needed(*args[:6]):
        return BatchNormBackward.forward(*args)
    if forward_ad._current_level >= 0:
        return _BatchNormBackwardForwardAD.apply(*args)
    return (_BatchNormBackwardEager if plain_eager() else BatchNormBackward).apply(*args)
