"""The activations the fused ops apply after BatchNorm (and an optional residual), by the names the ops take
(csrc/epilogue.h), each with its parameter: ``leaky_relu``'s negative_slope, ``elu``'s alpha (others take
none, 0.0). ``prelu``'s slopes are a tensor, its weight (1 or C values, nn.PReLU's), passed beside the spec
wherever the spec goes (``weight`` here, ``act_weight`` in fusedbn's internals, ``activation_weight`` in the
ops and the public API). Here in torch's ops: the function itself (for paths that compute the composition
unfused) and its derivative as the fused backward takes it (torch's one-sided gradient at ties); and which
torch modules and functional calls compute each, for ``fuse_model``."""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (name, parameter): what a fused module or op applies.
Spec = Tuple[str, float]

IDENTITY: Spec = ("identity", 0.0)
RELU: Spec = ("relu", 0.0)

# name -> (function, its arguments after z): act(z) = function(z, *args) in torch's ops, p the parameter.
_TORCH_CALLS = {
    "identity": lambda p: (None, ()),
    "relu": lambda p: (torch.relu, ()),
    "relu6": lambda p: (F.hardtanh, (0.0, 6.0)),
    "leaky_relu": lambda p: (F.leaky_relu, (p,)),
    "elu": lambda p: (F.elu, (p,)),
    "silu": lambda p: (F.silu, ()),
    "hardswish": lambda p: (F.hardswish, ()),
    "gelu": lambda p: (F.gelu, ()),
    "gelu_tanh": lambda p: (_gelu_tanh, ()),
    "prelu": lambda p: (_prelu, ()),  # its weight: torch_call appends it
}


def _gelu_tanh(z: Tensor) -> Tensor:
    return F.gelu(z, approximate="tanh")


def _prelu(z: Tensor, weight: Tensor) -> Tensor:
    """F.prelu with the weight as the ops read it: flattened, and float32 slopes beside half-precision input
    cast to it (F.prelu promotes no types)."""
    return F.prelu(z, weight.reshape(-1).to(z.dtype))


NAMES = tuple(_TORCH_CALLS)
DEFAULT_PARAM = {"leaky_relu": 0.01, "elu": 1.0}
# act' is piecewise constant: it gates the gradient and has no derivative of its own (double backward).
# Not PReLU: its act' is its weight, a differentiable input.
PIECEWISE_LINEAR = frozenset({"identity", "relu", "relu6", "leaky_relu"})
# What fuse_model (and timm's norm-act twin) fuse on their own. Exact GELU and ELU are left to torch's
# composition: on the CPU their fused kernels measured slower than it (benchmarks/results/cpu/
# activations.txt: GELU eval 1.3-1.75x, ELU 1.0-1.2x, both bound by their erf / expm1), and a transform
# must not make a model slower. FusedBatchNormAct*d and batch_norm_act compute them when asked.
AUTO_FUSED = frozenset(NAMES) - {"gelu", "elu"}


def spec(name: str, param: Optional[float] = None) -> Spec:
    """A checked (name, parameter) pair; the parameter defaults to torch's (0.01 for leaky_relu, 1.0 for elu)."""
    if name not in _TORCH_CALLS:
        raise ValueError(f"fusedbn: unknown activation {name!r}; expected one of {', '.join(NAMES)}")
    if param is not None and name not in DEFAULT_PARAM:
        raise ValueError(f"fusedbn: activation {name!r} takes no parameter, got {param}")
    return name, float(DEFAULT_PARAM.get(name, 0.0) if param is None else param)


def check_weight(act: Spec, weight: Optional[Tensor], input: Optional[Tensor] = None) -> None:
    """The ops' rule (csrc/checks.h, same exceptions and words), checked before any state changes on paths that
    apply the activation after BatchNorm: PReLU needs its weight, and no other activation takes one; where
    ``input`` is given, the weight has 1 or C values (its channels), is on its device and of its dtype (or
    float32 for float16 and bfloat16 input)."""
    if act[0] == "prelu" and weight is None:
        raise ValueError("fusedbn: activation 'prelu' needs its weight (activation_weight), got None")
    if act[0] != "prelu" and weight is not None:
        raise ValueError(f"fusedbn: activation_weight is PReLU's weight, but the activation is '{act[0]}'")
    if weight is not None and input is not None and input.dim() >= 2:
        channels = input.shape[1]
        if weight.numel() != 1 and weight.numel() != channels:
            raise RuntimeError(f"fusedbn: PReLU's weight (activation_weight) should have 1 or {channels} elements "
                               f"(the input's channels), got {weight.numel()}")
        if weight.device != input.device:
            raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                               f"{input.device} and {weight.device}! (activation_weight)")
        reduced = input.dtype == torch.float16 or input.dtype == torch.bfloat16
        if weight.dtype != input.dtype and not (reduced and weight.dtype == torch.float32):
            raise RuntimeError(f"mixed dtype: expect PReLU's weight (activation_weight) to have scalar type of "
                               f"{input.dtype}{' or torch.float32' if reduced else ''}, but it is {weight.dtype}")


def apply_scripted(name: str, param: float, z: Tensor, residual: Optional[Tensor] = None,
                   weight: Optional[Tensor] = None) -> Tensor:
    """``apply((name, param), z, residual, weight)`` in TorchScript's subset of Python (which cannot call the
    lambdas above); tests/test_deployment.py checks the two agree for every activation."""
    check_weight((name, param), weight)
    if residual is not None:
        z = z + residual
    if name == "prelu" and weight is not None:
        return F.prelu(z, weight.reshape(-1).to(z.dtype))
    if name == "relu":
        return torch.relu(z)
    if name == "relu6":
        return F.hardtanh(z, 0.0, 6.0)
    if name == "leaky_relu":
        return F.leaky_relu(z, param)
    if name == "elu":
        return F.elu(z, param)
    if name == "silu":
        return F.silu(z)
    if name == "hardswish":
        return F.hardswish(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    return z


def torch_call(act: Spec, weight=None):
    """(function, args) with act(z) = function(z, *args) in torch's ops; function None for identity.
    ``weight``: PReLU's (a tensor, or a torch.fx node standing for one), its one argument."""
    name, param = act
    function, args = _TORCH_CALLS[name](param)
    return function, args + ((weight,) if name == "prelu" else ())


def apply(act: Spec, z: Tensor, residual: Optional[Tensor] = None, weight: Optional[Tensor] = None) -> Tensor:
    """act(z [+ residual]) in torch's ops (the residual added as ``+`` adds it: broadcast or promoted);
    ``weight``: PReLU's."""
    check_weight(act, weight)
    if residual is not None:
        z = z + residual
    function, args = torch_call(act, weight)
    return z if function is None else function(z, *args)


def per_channel(weight: Tensor, z: Tensor) -> Tensor:
    """PReLU's weight (1 or C values) in z's dtype, broadcast against z (N, C, *)."""
    return weight.reshape(1, -1, *([1] * (z.dim() - 2))).to(z.dtype)


def derivative(act: Spec, z: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """act'(z) in torch's ops, as the fused backward takes it (zero at ReLU's 0, ReLU6's 0 and 6; Hardswish's
    middle piece up to 3 inclusive, as torch's backward kernels choose; PReLU's weight at 0)."""
    name, p = act
    one, zero = torch.ones_like(z), torch.zeros_like(z)
    if name == "identity":
        return one
    if name == "prelu":
        return torch.where(z > 0, one, per_channel(weight, z))
    if name == "relu":
        return torch.where(z > 0, one, zero)
    if name == "relu6":
        return torch.where((z > 0) & (z < 6), one, zero)
    if name == "leaky_relu":
        return torch.where(z > 0, one, one * p)
    if name == "elu":
        return torch.where(z <= 0, p * torch.exp(z), one)
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if name == "hardswish":
        return torch.where(z < -3, zero, torch.where(z <= 3, z / 3 + 0.5, one))
    if name == "gelu":
        return 0.5 * (1 + torch.erf(z * math.sqrt(0.5))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    beta, kappa = math.sqrt(2 / math.pi), 0.044715  # gelu_tanh
    t = torch.tanh(beta * (z + kappa * z ** 3))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * beta * (1 + 3 * kappa * z * z)


def of_module(m: nn.Module) -> Optional[Spec]:
    """The activation a torch activation module computes (its own class, not a subclass), or None. For
    ``nn.PReLU`` its weight is the module's (``m.weight``)."""
    cls = type(m)
    if cls is nn.PReLU:
        return "prelu", 0.0
    if cls in (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish):
        return {nn.ReLU: RELU, nn.ReLU6: ("relu6", 0.0), nn.SiLU: ("silu", 0.0), nn.Hardswish: ("hardswish", 0.0)}[cls]
    if cls is nn.Hardtanh and (m.min_val, m.max_val) == (0.0, 6.0):
        return "relu6", 0.0
    if cls is nn.LeakyReLU:
        return "leaky_relu", float(m.negative_slope)
    if cls is nn.ELU:
        return "elu", float(m.alpha)
    if cls is nn.GELU and m.approximate in ("none", "tanh"):
        return ("gelu", 0.0) if m.approximate == "none" else ("gelu_tanh", 0.0)
    return None


# Functional calls: function -> (name, names of its arguments after the input, their defaults).
_CALLS = {
    torch.relu: ("relu", (), ()), torch.relu_: ("relu", (), ()), F.relu: ("relu", ("inplace",), (False,)),
    F.relu6: ("relu6", ("inplace",), (False,)),
    F.hardtanh: ("hardtanh", ("min_val", "max_val", "inplace"), (-1.0, 1.0, False)),
    F.leaky_relu: ("leaky_relu", ("negative_slope", "inplace"), (0.01, False)),
    F.elu: ("elu", ("alpha", "inplace"), (1.0, False)),
    F.silu: ("silu", ("inplace",), (False,)), F.hardswish: ("hardswish", ("inplace",), (False,)),
    F.gelu: ("gelu", ("approximate",), ("none",)),
}
_METHODS = {"relu": RELU, "relu_": RELU}


def of_call(function, args: tuple, kwargs: dict) -> Optional[Spec]:
    """The activation ``function(input, *args, **kwargs)`` computes (a torch.fx call_function node's target
    and arguments after the input), or None where it is not one of ours or an argument is not a constant."""
    if function not in _CALLS:
        return None
    name, arg_names, defaults = _CALLS[function]
    if len(args) > len(arg_names) or not set(kwargs) <= set(arg_names):
        return None
    values = dict(zip(arg_names, defaults))
    values.update(zip(arg_names, args))
    values.update(kwargs)
    if not all(isinstance(v, (bool, int, float, str)) for v in values.values()):
        return None
    if name == "hardtanh":
        return ("relu6", 0.0) if (values["min_val"], values["max_val"]) == (0.0, 6.0) else None
    if name == "gelu":
        return {"none": ("gelu", 0.0), "tanh": ("gelu_tanh", 0.0)}.get(values["approximate"])
    if name in DEFAULT_PARAM:
        key = "negative_slope" if name == "leaky_relu" else "alpha"
        return name, float(values[key])
    return name, 0.0


def of_method(method: str, args: tuple, kwargs: dict) -> Optional[Spec]:
    """The activation ``input.method()`` computes (``x.relu()``, ``x.relu_()``), or None."""
    return _METHODS.get(method) if not args and not kwargs else None
