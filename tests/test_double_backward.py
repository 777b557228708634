"""Gradients of gradients (fusedbn/_functions.py, fusedbn/_derivatives.py): gradgradcheck in float64 against finite differences, and
Hessians, Hessian-vector products and a gradient penalty against torch's batch norm under torch.autograd."""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import fusedbn

EPILOGUES = ["bn", "bn-relu", "bn-add-relu"]


def _problem(device, shape=(3, 4, 2, 3), layout="contiguous", affine=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(device)  # noqa: E731
    x = make(*shape)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    w = (make(c).abs() + 0.5) if affine else None
    b = make(c) if affine else None
    running = (make(c), make(c).abs() + 0.5)
    return x, w, b, make(*shape), running


def _fn(module, training, epilogue, running):
    """The op as a function of (x, weight, bias, residual); `module` is fusedbn or torch's F (+ relu)."""

    def fn(x, w, b, r):
        stats = [None if t is None else t.clone() for t in running]
        if module is fusedbn and epilogue != "bn":
            return fusedbn.batch_norm_relu(x, *stats, w, b, training=training,
                                           residual=r if epilogue == "bn-add-relu" else None)
        y = module.batch_norm(x, *stats, w, b, training=training)
        if epilogue == "bn-add-relu":
            y = y + r
        return torch.relu(y) if epilogue != "bn" else y

    return fn


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradgradcheck(backend, training, epilogue, affine, layout):
    device = backend.device
    x, w, b, r, running = _problem(device, layout=layout, affine=affine)
    inputs = [t.requires_grad_() for t in (x, w, b, r) if t is not None]
    fn = _fn(fusedbn, training, epilogue, running)

    def call(*args):
        args = list(args)
        return fn(args.pop(0), *(args.pop(0) if affine else None for _ in range(2)), args.pop(0))

    # The emulator is slow: there, gradcheck's fast mode (random projections of the Jacobians).
    fast = backend.name == "simt"
    assert gradcheck(call, inputs, fast_mode=fast)
    assert gradgradcheck(call, inputs, fast_mode=fast)


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (2, 3, 2, 2, 2)], ids=["1d", "2d-seq", "3d"])
def test_gradgradcheck_other_ranks(device, shape):
    x, w, b, _, _ = _problem(device, shape=shape)
    inputs = [t.requires_grad_() for t in (x, w, b)]
    fn = lambda x, w, b: fusedbn.batch_norm(x, None, None, w, b, training=True)  # noqa: E731
    assert gradgradcheck(fn, inputs, fast_mode=True)


def _hessian_problem(device, training, epilogue):
    x, w, b, r, running = _problem(device, shape=(3, 2, 4))
    running = running if not training else (None, None)  # vmap cannot update running statistics in place

    def loss(module):
        fn = _fn(module, training, epilogue, running)
        return lambda x, w: (fn(x, w, b, r).sin() * x).sum()

    return x, w, loss


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_hessian(device, training, epilogue):
    """torch.func.hessian (forward over reverse: the backward's jvp rule) and torch.autograd's (reverse over
    reverse) against torch.autograd's for torch's batch norm. (torch.func.hessian of torch's own batch
    norm gets d2/dx dw wrong in training: it is not the oracle.)"""
    x, w, loss = _hessian_problem(device, training, epilogue)
    expected = torch.autograd.functional.hessian(loss(F), (x, w))
    for actual in (torch.autograd.functional.hessian(loss(fusedbn), (x, w)),
                   torch.func.hessian(loss(fusedbn), argnums=(0, 1))(x, w),
                   torch.func.jacrev(torch.func.jacrev(loss(fusedbn), argnums=(0, 1)), argnums=(0, 1))(x, w)):
        for i, j in itertools.product(range(2), range(2)):
            torch.testing.assert_close(actual[i][j], expected[i][j], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_per_sample_hessian_vector_products(device, training):
    """vmap over samples of a forward-over-reverse HVP, against torch.autograd's double backward per sample."""
    _, w, loss = _hessian_problem(device, training, "bn-relu")
    gen = torch.Generator().manual_seed(1)
    xs, vs = (torch.randn(4, 3, 2, 4, generator=gen, dtype=torch.float64).to(device) for _ in range(2))
    ours = torch.func.vmap(
        lambda x, v: torch.func.jvp(torch.func.grad(lambda x: loss(fusedbn)(x, w)), (x,), (v,))[1])(xs, vs)
    for x, v, actual in zip(xs, vs, ours):
        expected = torch.autograd.functional.hvp(lambda x: loss(F)(x, w), x, v)[1]
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fused_relu", [False, True], ids=["bn", "bn-relu"])
def test_gradient_penalty(device, fused_relu):
    """WGAN-GP: the penalty (|d critic / d input| - 1)^2 trains the critic's parameters through the
    gradient; fusedbn's parameter gradients and running statistics equal nn.BatchNorm2d's."""
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.BatchNorm2d(2),
                           nn.ReLU(), nn.Flatten(), nn.Linear(2 * 2 * 2, 1)).to(device).double()
    ours = fusedbn.fuse_model(copy.deepcopy(critic)) if fused_relu else fusedbn.convert_model(copy.deepcopy(critic))
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64, device=device)
    grads = []
    for model in (critic, ours):
        model.zero_grad()
        x_in = x.clone().requires_grad_()
        (dx,) = torch.autograd.grad(model(x_in).sum(), x_in, create_graph=True)
        penalty = (dx.flatten(1).norm(dim=1) - 1).square().mean()
        penalty.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-9, atol=1e-9, msg=name)
    torch.testing.assert_close(ours.state_dict(), critic.state_dict(), rtol=1e-12, atol=1e-12)


ACTIVATIONS = [("relu6", None), ("leaky_relu", 0.2), ("elu", 0.7), ("silu", None), ("hardswish", None), ("gelu", None),
               ("gelu_tanh", None), ("prelu", None)]


def _activation_inputs(activation, device, channels=4):
    """The activation's tensor inputs: PReLU's weight (a slope per channel, one negative), none for the others."""
    if activation != "prelu":
        return []
    return [torch.tensor([0.3, -0.2, 0.7, 0.1][:channels], dtype=torch.float64, device=device)]


def _batch_norm_act(training, running, activation, param):
    """batch_norm_act as a function of (x, w, b, residual or None, PReLU's weight for prelu)."""

    def fn(x, w, b, r=None, *act_weight):
        stats = [None if t is None else t.clone() for t in running]
        return fusedbn.batch_norm_act(x, *stats, w, b, training=training, residual=r, activation=activation,
                                      activation_param=param, activation_weight=act_weight[0] if act_weight else None)

    return fn


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["bn-act", "bn-add-act"])
@pytest.mark.parametrize("activation,param", ACTIVATIONS, ids=[a for a, _ in ACTIVATIONS])
def test_gradgradcheck_activations(device, training, with_residual, activation, param):
    """First and second derivatives of every activation epilogue against finite differences, in float64:
    piecewise-linear ones through fusedbn/_derivatives.py, the others (PReLU: its weight too) through their
    torch-op recomputation."""
    x, w, b, r, running = _problem(device, shape=(3, 4, 2, 3))
    x = x * 2  # values across ReLU6's and Hardswish's kinks (none within finite differences' reach of one)
    act_inputs = _activation_inputs(activation, device)
    inputs = [t.requires_grad_() for t in [x, w, b] + [r if with_residual else None] + act_inputs if t is not None]
    fn = _batch_norm_act(training, running, activation, param)
    call = fn if with_residual else lambda x, w, b, *act_weight: fn(x, w, b, None, *act_weight)
    assert gradcheck(call, inputs)
    assert gradgradcheck(call, inputs, fast_mode=True)


@pytest.mark.parametrize("activation,param", ACTIVATIONS, ids=[a for a, _ in ACTIVATIONS])
def test_forward_mode_ad_of_activations(device, activation, param):
    """jvp (the forward's jvp rule, act'(z) recomputed; PReLU's weight's tangent too) against reverse mode's
    Jacobian, training and eval."""
    x, w, b, r, running = _problem(device, shape=(3, 4, 2, 3))
    primals = (x, w, b, r, *_activation_inputs(activation, device))
    for training in (True, False):
        fn = _batch_norm_act(training, (None, None) if training else running, activation, param)
        tangents = tuple(torch.randn_like(t) for t in primals)
        _, ours = torch.func.jvp(fn, primals, tangents)
        # Reverse mode's vector-Jacobian products give the Jacobian; its product with the tangents is the oracle.
        jac = torch.autograd.functional.jacobian(fn, primals)
        expected = sum((j.flatten(x.dim()) @ t.flatten()).reshape(x.shape) for j, t in zip(jac, tangents))
        torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)
