"""BatchNorm's derivatives in torch's ops, for the autograd.Functions of fusedbn/_functions.py: what the
backward keeps for the activation, its gradients recomputed in torch's ops (create_graph with a smooth
activation), forward-mode tangents, and the second derivatives of the fused backward (double backward and
the jvp of the backward), differentiable again to any order.

Per channel, over the m values that share it, with x_hat = (x - mean) * invstd, alpha = weight * invstd,
g = dy * act'(z) (z = bn(x) [+ residual]), for the activations whose act' is piecewise constant (identity,
ReLU, ReLU6, LeakyReLU):

    training: grad_input = alpha * P(g),  P(v) = v - mean(v) - x_hat * mean(x_hat * v)
              d x_hat = invstd * P(dx),   d invstd = -invstd**2 * mean(x_hat * dx)
    eval:     grad_input = alpha * g      (mean and invstd are constants)
    both:     grad_weight = sum(g * x_hat),  grad_bias = sum(g),  grad_residual = g

P is symmetric, which makes the adjoints below short. act' gates g and contributes no derivative of its
own; the other activations' backward (PReLU's too: its act' is its weight, an input) is differentiated in
torch's ops (backward_in_torch_ops). ``act_weight`` is PReLU's weight (None for the other activations).
"""
import torch
import torch.nn.functional as F

from . import activations, ops
from ._shapes import channel_view


def saved_for_activation(bias, output, residual, act, act_weight):
    """(bias, output, residual, act_weight): what the backward needs for act'(z), z = bn(x) [+ residual].
    Nothing without an activation; for ReLU with a residual its output (its mask; torch's composition keeps it
    too); else the bias and the residual, to recompute z from x and the statistics (and PReLU's weight)."""
    if act[0] == "identity":
        return None, None, None, None
    if act[0] == "relu" and residual is not None:
        return None, output, None, None
    return bias, None, residual, act_weight


def backward_in_torch_ops(ctx, saved, grad_output, training, mask):
    """The gradients of act(bn(x) [+ residual]) recomputed in torch's ops with a graph (create_graph)."""
    input, weight, bias, _, residual, act_weight, stat_a, stat_b = saved
    wanted = [input, weight, bias, residual, act_weight]
    needed = mask + [ctx.needs_residual_grad, ctx.needs_act_weight_grad]
    with torch.enable_grad():
        running = (None, None) if training else (stat_a, stat_b)
        z = F.batch_norm(input, *running, weight, bias, training, 0.0, ctx.eps)
        output = activations.apply(ctx.act, z, residual, act_weight)
        targets = [t for t, n in zip(wanted, needed) if n]
        grads = iter(torch.autograd.grad(output, targets, grad_output, create_graph=True, allow_unused=True))
    return tuple(next(grads) if n else None for n in needed)


def backward_of_composition(ctx, saved, upstream):
    """The gradients of the fused backward op's outputs (grad_input, grad_weight, grad_bias, grad_residual,
    grad_act_weight), given those reaching them (``upstream``), through the op's computation in torch's ops:
    for activations whose act' is not piecewise constant (SiLU, GELU, PReLU, ...), which fusedbn/_derivatives.py's
    formulas leave out. Under batch statistics mean and invstd move with the input: recomputed from it (eps
    read off the saved invstd), so their values are the saved ones and their derivatives torch's.
    Returns a gradient for each of BackwardFunction's inputs."""
    grad_output, input, weight, bias, _, residual, act_weight, mean, invstd = saved
    needs = ctx.needs_input_grad
    with torch.enable_grad():
        dy, x, w, b, r, aw = (None if t is None else t.detach().requires_grad_()
                              for t in (grad_output, input, weight, bias, residual, act_weight))
        acc = x.to(mean.dtype)
        if ctx.training:
            dims = [d for d in range(acc.dim()) if d != 1]
            var = acc.var(dims, correction=0)
            mean, invstd = acc.mean(dims), torch.rsqrt(var + (invstd.pow(-2) - var).detach())
        z = (acc - channel_view(mean, acc)) * channel_view(invstd if w is None else invstd * w.to(acc.dtype), acc)
        if b is not None:
            z = z + channel_view(b.to(acc.dtype), acc)
        output = activations.apply(ctx.act, z, None if r is None else r.to(acc.dtype), aw)
        # The outputs the op computed, as functions of its inputs (dy included), with their upstream gradients.
        pairs = [(t, g) for t, g, dtype in zip((x, w, b, r, aw), upstream, ctx.output_dtypes)
                 if dtype is not None and g is not None]
        leaves = {0: dy, 1: x, 2: w, 7: b, 9: r, 12: aw}
        wanted = [i for i, t in leaves.items() if t is not None and needs[i]]
        result = [None] * len(needs)
        if not pairs or not wanted:
            return tuple(result)
        firsts = torch.autograd.grad(output, [t for t, _ in pairs], dy.to(output.dtype), create_graph=True)
        grads = torch.autograd.grad(firsts, [leaves[i] for i in wanted], [g.to(f.dtype) for f, (_, g) in
                                                                         zip(firsts, pairs)], materialize_grads=True)
    for i, g in zip(wanted, grads):
        result[i] = g.to(leaves[i].dtype)
    return tuple(result)


def tangent_through_epilogue(ctx, tangent, terms, bias, output, residual, act_weight, residual_tangent,
                             act_weight_tangent):
    """The output's tangent from BatchNorm's: plus the residual's, then times act'(z) (ReLU's mask from the
    output where the backward reads it there, else z recomputed as the fused backward does); for PReLU plus
    min(z, 0) times its weight's tangent."""
    if residual_tangent is not None:
        tangent = tangent + residual_tangent
    name = ctx.act[0]
    if name == "identity":
        return tangent
    if name == "relu" and residual is not None:
        return torch.where(output > 0, tangent, 0)
    z = terms.pre_activation(bias, residual, ctx.act, output.dtype)
    tangent = tangent.to(z.dtype) * activations.derivative(ctx.act, z, act_weight)
    if act_weight_tangent is not None:
        tangent = tangent + z.clamp(max=0) * activations.per_channel(act_weight_tangent, z)
    return tangent.to(output.dtype)


def forward_jvp(ctx, input, weight, bias, output, residual, act_weight, mean, invstd, training, d_input, d_weight,
                d_bias, d_residual, d_act_weight):
    """Forward-mode derivative of y = x_hat * w + b: dy = w * d x_hat + x_hat * dw + db, where
    w * d x_hat = alpha * P(dx) under batch statistics (they move with x; P above) and
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
    return tangent_through_epilogue(ctx, tangent.to(input.dtype), t, bias, output, residual, act_weight, d_residual,
                                    d_act_weight)


def invstd_of(var, eps):
    """1 / sqrt(var + eps): the ops' invstd_of (csrc/welford.h) on the Python side, for the eval backward and
    SyncBatchNorm. Within two units in the last place of the ops' (theirs is correctly rounded; torch's CPU
    rsqrt goes through a vector math library, its CUDA rsqrt is the hardware approximation): the gradients
    it enters change by as much, relatively."""
    return (var + eps).rsqrt_()  # in place on the sum, a tensor of its own: one allocation fewer


def running_statistics(ctx, input, running_mean, running_var):
    """(mean, invstd) of eval mode, in the statistics' dtype."""
    acc = ops.acc_dtype(input.dtype)
    return to_dtype(running_mean, acc), invstd_of(to_dtype(running_var, acc), ctx.eps)


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

    def pre_activation(self, bias, residual, act, dtype):
        """z = bn(x) [+ residual], recomputed from x and the statistics as the fused backward recomputes it;
        for ReLU rounded to the output's ``dtype`` first, since its mask is the output's (csrc/epilogue.h)."""
        z = (self.x - self.mean) * self.alpha
        if bias is not None:
            z = z + channel_view(bias.to(self.x.dtype), self.x)
        if residual is not None:
            z = z + residual.to(self.x.dtype)
        return z.to(dtype).to(self.x.dtype) if act[0] == "relu" else z

    def channel_mean(self, t):
        return t.mean(self.dims, keepdim=True)

    def channel_sum(self, t):
        return t.sum(self.dims)

    def project(self, v):
        """P(v): v without its channel mean and its component along x_hat."""
        return v - self.channel_mean(v) - self.x_hat * self.channel_mean(self.x_hat * v)


class BackwardTerms(ChannelTerms):
    """ChannelTerms plus what the backward's derivatives need: act'(z) and g, dy gated by it."""

    def __init__(self, grad_output, input, weight, bias, output, residual, act_weight, mean, invstd, act):
        super().__init__(input, weight, mean, invstd)
        self.slope = None
        if act[0] == "relu" and output is not None:  # the mask as the fused kernels take it (csrc/epilogue.h)
            self.slope = (output > 0).to(self.x.dtype)
        elif act[0] != "identity":
            self.slope = activations.derivative(act, self.pre_activation(bias, residual, act, input.dtype), act_weight)
        self.g = self.gate(grad_output.to(self.x.dtype))

    def gate(self, t):
        return t if self.slope is None else torch.where(self.slope == 0, 0, t * self.slope)


def double_backward(terms, training, gg_input, gg_weight, gg_bias, gg_residual, needs):
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


def backward_jvp(terms, training, d_grad_output, d_input, d_weight):
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


def to_dtype(t, dtype):
    """``t.to(dtype)``, None for None; ``t`` itself where it has that dtype (as Tensor.to returns it, but without
    the dispatch, which costs more host time than the check)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)
