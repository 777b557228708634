"""Autograd kernels registered on the ops themselves (the Autograd dispatch key), for whatever runs the op
graph rather than fusedbn's Python: a torch.export'ed program's module (training included), AOTAutograd,
opcheck, TorchScript, a user calling ``torch.ops.fusedbn.*`` directly. (torch.library.register_autograd
refuses ops that mutate an argument, as forward_train does its running statistics, so the kernels are
registered as it would register them.)

Each differentiable op's kernel applies fusedbn's own autograd.Function (fusedbn/_functions.py): one formula for both layers. fusedbn's eager calls apply those Functions directly, as
they add what an op-level kernel cannot reach (forward-mode AD's jvp rules and the classic-style twin, a few
microseconds less host time per call), and their forwards run the ops below the Autograd key
(``below_autograd``), so these kernels are not entered twice. batch_stats, grad_sums and backward_elemt are
pieces of SyncBatchNorm's Function (fusedbn/sync.py), not differentiable on their own: their kernels only
step below autograd, as torch asks of a non-differentiable op.
"""
import torch

from ._autograd import below_autograd
from ._functions import BackwardFunction, EvalFunction, TrainingFunction
from ._shapes import flat_param
from .functional import _check_running_stats

_LIBRARIES = []  # a torch.library.Library's registrations last as long as the object


def _register(library, name, function_args=None, function=None):
    """The Autograd kernel of the op ``name``: ``function.apply(*function_args(op_args))`` where grad mode
    is on and a tensor argument requires grad, else the op below autograd."""
    op = getattr(getattr(torch.ops, library.ns), name).default
    defaults = [a.default_value for a in op._schema.arguments]

    def kernel(keyset, *args):
        if function is not None and torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            if name.startswith("forward"):  # the kernels' own check, which the Function's no-grad forward skips
                _check_running_stats(args[3], args[4], training=True)
            # The dispatcher drops trailing arguments equal to their defaults; the Functions take them all.
            return function.apply(*function_args(args + tuple(defaults[len(args):])))
        with below_autograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    library.impl(name, kernel, "Autograd", with_keyset=True)




def _flat_params(args, weight, bias):
    args = list(args)
    args[weight], args[bias] = flat_param(args[weight]), flat_param(args[bias])
    return args


def _training_args(args):
    # The op takes the activation as two arguments, the Functions as one (name, parameter) pair; otherwise
    # each Function takes its op's arguments in its op's order.
    *rest, name, param, act_weight = args
    return *_flat_params(rest, weight=1, bias=2), (name, param), act_weight


def _backward_args(args):
    *rest, name, param, grad_residual, act_weight, grad_act_weight = args
    return *_flat_params(rest, weight=2, bias=7), (name, param), grad_residual, act_weight, grad_act_weight


def register_autograd_kernels(namespace: str) -> None:
    """Registers the kernels for the ops of ``namespace``: "fusedbn", and the tests' "fusedbn_simt" (the same
    schemas, csrc/schemas.h)."""
    library = torch.library.Library(namespace, "IMPL")
    _register(library, "forward_train", _training_args, TrainingFunction)
    _register(library, "forward_eval", _training_args, EvalFunction)
    _register(library, "backward", _backward_args, BackwardFunction)
    for name in ("batch_stats", "grad_sums", "backward_elemt"):
        _register(library, name)
    _LIBRARIES.append(library)


register_autograd_kernels("fusedbn")
