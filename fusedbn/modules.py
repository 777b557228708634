"""``FusedBatchNorm1d/2d/3d``: subclasses of ``nn.BatchNorm1d/2d/3d`` whose forward runs fusedbn;
``FusedBatchNormAct1d/2d/3d``: the same BatchNorm followed by an activation (with an optional residual
added before it) in one op; ``FusedBatchNormReLU1d/2d/3d``: their ReLU case.

Constructor, parameters, buffers, ``state_dict``, ``.train()/.eval()`` and ``isinstance`` are torch's;
only ``forward`` differs (and a ``FusedBatchNormAct*d`` built with ``activation="prelu"`` holds PReLU's
weight too, the parameter ``activation_weight``).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import activations
from ._fx import as_fx_leaf
from .functional import computes_in_torch_ops, counted_apply, fuses_residual, run_ops


def running_statistics_use(training: bool, track_running_stats: bool, momentum: Optional[float],
                           num_batches_tracked: Optional[Tensor], running_mean: Optional[Tensor],
                           running_var: Optional[Tensor]) -> Tuple[bool, float, bool, bool]:
    """nn.BatchNorm*d's forward's decisions, one place for every module and TorchScript: (tracks: this batch
    is counted in num_batches_tracked; factor: the running statistics' update factor, momentum or, for
    momentum None, the cumulative average's 1 / (batches counted, this one included); use_batch_stats; and
    use_running: the running statistics are passed, to be updated or used)."""
    tracks = training and track_running_stats and num_batches_tracked is not None
    factor = 0.0 if momentum is None else momentum
    if tracks and momentum is None and num_batches_tracked is not None:
        factor = 1.0 / float(num_batches_tracked + 1)
    use_batch_stats = training or (running_mean is None and running_var is None)
    use_running = not training or track_running_stats
    return tracks, factor, use_batch_stats, use_running


# The tensors nn.BatchNorm*d registers: its parameters, then its buffers.
_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# Per class: whether its instances' attribute lookup reaches nn.Module.__getattr__ for those names (neither a
# class in its MRO defines one nor the class a lookup of its own), set at the class's first call.
_LOOKUP_REACHES_DICTS = {}


def _lookup_reaches_dicts(cls) -> bool:
    return (cls.__getattr__ is nn.Module.__getattr__ and cls.__getattribute__ is object.__getattribute__
            and not any(name in vars(c) for c in cls.__mro__ for name in _STATE))


def batch_norm_state(module: nn.Module) -> tuple:
    """(weight, bias, running_mean, running_var, num_batches_tracked): what ``module.<name>`` returns for each,
    read from the module's parameter and buffer dicts, where nn.Module.__getattr__ would read it (a Python call
    after a failed lookup, about 0.4 us a name: more than the rest of a small call's host time). Where any of
    them is elsewhere (an attribute of the instance or its class, as torch's parametrizations and FSDP's views
    make, or deleted), all through ``getattr``."""
    cls, attributes = type(module), module.__dict__
    reaches_dicts = _LOOKUP_REACHES_DICTS.get(cls)
    if reaches_dicts is None:
        reaches_dicts = _LOOKUP_REACHES_DICTS[cls] = _lookup_reaches_dicts(cls)
    if reaches_dicts and attributes.keys().isdisjoint(_STATE):
        parameters, buffers = attributes["_parameters"], attributes["_buffers"]
        try:
            return (parameters["weight"], parameters["bias"], buffers["running_mean"], buffers["running_var"],
                    buffers["num_batches_tracked"])
        except KeyError:  # not registered as nn.BatchNorm*d registers it
            pass
    return module.weight, module.bias, module.running_mean, module.running_var, module.num_batches_tracked


class _FusedForward:
    # The activation after BatchNorm (fusedbn/activations.py); the act modules set their own. Constants for
    # TorchScript, as nn.BatchNorm*d's hyperparameters are.
    activation, activation_param = activations.IDENTITY
    __constants__ = nn.modules.batchnorm._NormBase.__constants__ + ["activation", "activation_param"]

    def _scripted_forward(self, input: Tensor, residual: Optional[Tensor],
                          activation_weight: Optional[Tensor]) -> Tensor:
        """The forward TorchScript compiles (torch.jit.script): nn.BatchNorm*d's, then the residual and the
        activation, in torch's ops, so a scripted model runs wherever TorchScript runs, without fusedbn.
        PReLU's weight: the caller's, else the module's own (``activation_weight``)."""
        if activation_weight is None and hasattr(self, "activation_weight"):
            activation_weight = self.activation_weight
        activations.check_weight((self.activation, self.activation_param), activation_weight, input)
        self._check_input_dim(input)
        tracks, factor, use_batch_stats, use_running = running_statistics_use(
            self.training, self.track_running_stats, self.momentum, self.num_batches_tracked, self.running_mean,
            self.running_var)
        if tracks and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        output = F.batch_norm(input, self.running_mean if use_running else None,
                              self.running_var if use_running else None, self.weight, self.bias, use_batch_stats,
                              factor, self.eps)
        return activations.apply_scripted(self.activation, self.activation_param, output, residual, activation_weight)

    @torch.jit.unused
    def _fused_forward(self, input: Tensor, residual: Optional[Tensor], act: activations.Spec,
                       act_weight: Optional[Tensor] = None) -> Tensor:
        if computes_in_torch_ops():  # torch's own forward, line for line (momentum=None included)
            activations.check_weight(act, act_weight, input)  # before the BatchNorm updates its statistics
            output = nn.modules.batchnorm._BatchNorm.forward(self, input)
            return activations.apply(act, output, residual, act_weight)
        self._check_input_dim(input)
        weight, bias, running_mean, running_var, num_batches_tracked = batch_norm_state(self)
        activations.check_weight(act, act_weight, input)  # run_batch_norm's first step; run_ops takes the rest
        tracks, factor, use_batch_stats, use_running = running_statistics_use(
            self.training, self.track_running_stats, self.momentum, num_batches_tracked, running_mean, running_var)
        args = (input, running_mean if use_running else None, running_var if use_running else None, weight, bias,
                use_batch_stats, factor, self.eps, residual, act, act_weight)
        return counted_apply(num_batches_tracked, run_ops, *args) if tracks else run_ops(*args)


class _FusedBatchNorm(_FusedForward):
    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(input, None, None)
        return self._eager_forward(input)

    @torch.jit.unused
    def _eager_forward(self, input: Tensor) -> Tensor:
        leaf = as_fx_leaf(self, input)
        return self._fused_forward(input, None, activations.IDENTITY) if leaf is None else leaf


def _check_addable(input: Tensor, residual: Tensor) -> None:
    """Raises what ``bn(input) + residual`` would raise (shapes that do not broadcast, another device),
    where it would."""
    torch.broadcast_shapes(input.shape, residual.shape)
    if residual.device != input.device and not (residual.dim() == 0 and residual.device.type == "cpu"):
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                           f"{input.device} and {residual.device}! (residual)")


class _FusedBatchNormAct(_FusedForward):
    """``act(bn(x) [+ residual])``: ``activation`` and ``activation_param`` name the activation (fusedbn/
    activations.py), class attributes of the ReLU modules, instance attributes of the others (plain
    Python state, kept by pickle and ``copy.deepcopy``; not in the ``state_dict``, which stays
    ``nn.BatchNorm*d``'s). PReLU's weight is the caller's (``activation_weight``: what ``fuse_model``'s code
    passes, the ``nn.PReLU``'s own), else the module's own parameter ``activation_weight`` (built by hand)."""

    activation, activation_param = activations.RELU

    @property
    def act(self) -> activations.Spec:
        return self.activation, self.activation_param

    def forward(self, input: Tensor, residual: Optional[Tensor] = None,
                activation_weight: Optional[Tensor] = None) -> Tensor:
        """``act(batch_norm(input) + residual)``, ``residual`` optional; ``activation_weight``: PReLU's weight
        (1 or C values), by default the module's own. A residual of another shape, dtype or device (broadcast or
        promoted, as ``+`` allows) is added unfused, so the result is still torch's."""
        if torch.jit.is_scripting():
            return self._scripted_forward(input, residual, activation_weight)
        return self._eager_forward(input, residual, activation_weight)

    @torch.jit.unused
    def _eager_forward(self, input: Tensor, residual: Optional[Tensor], activation_weight: Optional[Tensor]) -> Tensor:
        leaf = as_fx_leaf(self, input, residual, activation_weight)
        if leaf is not None:
            return leaf
        act_weight = own_activation_weight(self) if activation_weight is None else activation_weight
        if not fuses_residual(input, residual):
            activations.check_weight(self.act, act_weight, input)  # before the BatchNorm updates its statistics
            _check_addable(input, residual)
            output = self._fused_forward(input, None, activations.IDENTITY)
            return activations.apply(self.act, output, residual, act_weight)
        return self._fused_forward(input, residual, self.act, act_weight)

    def extra_repr(self) -> str:
        name, param = self.act
        detail = f"activation={name!r}" + (f", activation_param={param}" if name in activations.DEFAULT_PARAM else "")
        return super().extra_repr() + (", relu=True" if self.act == activations.RELU else ", " + detail)


# Where a module built with activation="prelu" holds PReLU's weight (a parameter; FrozenBatchNorm*d's, a buffer).
ACTIVATION_WEIGHT = "activation_weight"


def own_activation_weight(module: nn.Module) -> Optional[Tensor]:
    """The PReLU weight ``module`` holds itself (``activation_weight``), or None."""
    return module._parameters.get(ACTIVATION_WEIGHT, module._buffers.get(ACTIVATION_WEIGHT))


def prelu_weight_size(activation: str, num_features: int, activation_num_parameters: Optional[int]) -> Optional[int]:
    """How many values the PReLU weight of a module built with ``activation`` holds: ``activation_num_parameters``
    (nn.PReLU's num_parameters: 1, or num_features, the default); None for the other activations."""
    if activation != "prelu":
        if activation_num_parameters is not None:
            raise ValueError(f"fusedbn: activation_num_parameters is PReLU's, but the activation is {activation!r}")
        return None
    size = num_features if activation_num_parameters is None else activation_num_parameters
    if size not in (1, num_features):
        raise ValueError(f"fusedbn: activation_num_parameters should be 1 or num_features ({num_features}), got "
                         f"{activation_num_parameters}")
    return size


class _FusedBatchNormActConstructor(_FusedBatchNormAct):
    """``_FusedBatchNormAct`` built with its activation: nn.BatchNorm*d's arguments, then ``activation`` and
    ``activation_param`` (keywords); for ``"prelu"`` ``activation_num_parameters`` (1 or num_features, the
    default) sizes its weight, the parameter ``activation_weight``, initialized to 0.25 as nn.PReLU's."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, activation: str = "relu",
                 activation_param: Optional[float] = None, activation_num_parameters: Optional[int] = None) -> None:
        act = activations.spec(activation, activation_param)  # checked before the module is built
        size = prelu_weight_size(activation, num_features, activation_num_parameters)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.activation, self.activation_param = act
        if size is not None:
            self.activation_weight = nn.Parameter(torch.empty(size, device=device, dtype=dtype))
            self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if ACTIVATION_WEIGHT in self._parameters:
            nn.init.constant_(self.activation_weight, 0.25)


class FusedBatchNorm1d(_FusedBatchNorm, nn.BatchNorm1d):
    """Drop-in for :class:`torch.nn.BatchNorm1d`."""


class FusedBatchNorm2d(_FusedBatchNorm, nn.BatchNorm2d):
    """Drop-in for :class:`torch.nn.BatchNorm2d`."""


class FusedBatchNorm3d(_FusedBatchNorm, nn.BatchNorm3d):
    """Drop-in for :class:`torch.nn.BatchNorm3d`."""


class FusedBatchNormReLU1d(_FusedBatchNormAct, nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` then ReLU (after adding an optional residual), fused."""


class FusedBatchNormReLU2d(_FusedBatchNormAct, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` then ReLU (after adding an optional residual), fused."""


class FusedBatchNormReLU3d(_FusedBatchNormAct, nn.BatchNorm3d):
    """:class:`torch.nn.BatchNorm3d` then ReLU (after adding an optional residual), fused."""


class FusedBatchNormAct1d(_FusedBatchNormActConstructor, nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` then ``activation`` (after adding an optional residual), fused:
    ``FusedBatchNormAct1d(C, activation="silu")``; the activations of ``fusedbn.batch_norm_act``."""


class FusedBatchNormAct2d(_FusedBatchNormActConstructor, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` then ``activation`` (after adding an optional residual), fused:
    ``FusedBatchNormAct2d(C, activation="silu")``; the activations of ``fusedbn.batch_norm_act``."""


class FusedBatchNormAct3d(_FusedBatchNormActConstructor, nn.BatchNorm3d):
    """:class:`torch.nn.BatchNorm3d` then ``activation`` (after adding an optional residual), fused:
    ``FusedBatchNormAct3d(C, activation="silu")``; the activations of ``fusedbn.batch_norm_act``."""
