"""Inference helpers: ``fold_conv_bn`` (eval-mode BatchNorm folded into the preceding Conv/Linear),
``FrozenBatchNorm1d/2d/3d`` (statistics and affine frozen, as detection models use it) and ``freeze``."""
import operator
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from . import activations
from ._fx import as_fx_leaf, modes_set, module_call_counts, traced_copy
from .convert import foreign_batch_norm
from ._functions import batch_norm_eval
from .functional import computes_in_torch_ops, fuses_residual
from .modules import (ACTIVATION_WEIGHT, FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d, FusedBatchNormAct1d,
                      FusedBatchNormAct2d, FusedBatchNormAct3d, FusedBatchNormReLU1d, FusedBatchNormReLU2d,
                      FusedBatchNormReLU3d, own_activation_weight, prelu_weight_size)
from .report import Report

# The BatchNorm a layer folds into, and the dimensionality of the layer's output (batched, channels at dim 1)
# for which that BatchNorm normalizes exactly the layer's output channels.
_FOLDABLE = {nn.Linear: (nn.BatchNorm1d, 2), nn.Conv1d: (nn.BatchNorm1d, 3), nn.Conv2d: (nn.BatchNorm2d, 4),
             nn.Conv3d: (nn.BatchNorm3d, 5)}
_WITH_ACT = (FusedBatchNormReLU1d, FusedBatchNormReLU2d, FusedBatchNormReLU3d, FusedBatchNormAct1d,
             FusedBatchNormAct2d, FusedBatchNormAct3d)  # act(bn(x) [+ residual])
# The BatchNorm classes whose eval forward is BatchNorm (then, for _WITH_ACT, the activation kept after folding).
_FOLDS_AS_BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, FusedBatchNorm1d, FusedBatchNorm2d,
                        FusedBatchNorm3d) + _WITH_ACT


def _unprovable(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm, source: fx.Node, shaped: bool):
    """Why folding ``bn`` into ``layer`` (called at ``source``) is not provably equivalent, or None when it is.
    BatchNorm2d/3d take only 4-D/5-D input, so a Conv2d/3d before one ran batched; BatchNorm1d takes (N, C)
    and (N, C, L), so it normalizes the layer's output channels only for some shapes, seen with ``shaped``."""
    bn_class, dims = _FOLDABLE[type(layer)]
    if bn_class is not nn.BatchNorm1d:
        return None
    name = type(layer).__name__
    if not shaped:
        return f"BatchNorm1d takes 2-D or 3-D input: pass example_inputs to fold {name} -> BatchNorm1d"
    shape = tuple(getattr(source.meta.get("tensor_meta"), "shape", ()))
    if len(shape) == dims and shape[1] == bn.num_features:
        return None
    return f"{name} output {shape} is not {'(N, C)' if dims == 2 else '(N, C, L)'}: BatchNorm1d normalizes dim 1"


def _fold_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """layer(x) then bn in eval is layer'(x) with W' = W * s and b' = (b - mean) * s + beta per output
    channel, s = gamma / sqrt(running_var + eps); computed in float64 and cast back to the layer's dtype."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    weight = layer.weight.double() * scale.view(-1, *([1] * (layer.weight.dim() - 1)))
    bias = shift if layer.bias is None else layer.bias.double() * scale + shift
    layer.weight = nn.Parameter(weight.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(bias.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)


def fold_conv_bn(model: nn.Module, example_inputs=None, *, report: Optional[Report] = None) -> nn.Module:
    """Returns a ``torch.fx`` copy of ``model`` in which every BatchNorm in eval mode
    with running statistics (torch's or fusedbn's) that directly follows a Conv1d/2d/3d or Linear (of
    matching dimensionality, called once, its output used by nothing else) is folded into that layer's
    weight and bias and removed, where that is provably equivalent. Training-mode BatchNorm and shared
    layers are left alone; ``model`` itself is not changed.

    Conv2d/3d -> BatchNorm2d/3d always fold. Linear/Conv1d -> BatchNorm1d fold only given
    ``example_inputs`` (a tuple of inputs to ``model``, or one tensor), through which the traced copy is run
    once in eval mode (no grad, parameters and buffers unchanged) to see the layer's output shape: they fold
    where it is (N, C) for Linear, (N, C, L) for Conv1d, i.e. where BatchNorm1d normalizes the layer's
    output channels (not so for a Linear on (N, L, F) or an unbatched Conv1d). The folded model is then
    equivalent for inputs of those shapes. ``report`` (a :class:`fusedbn.Report`), when given, records each
    fold (``("folded", bn, layer)``) and each pair not folded for this, with the reason.

    A model torch.fx cannot trace is returned as an unfolded copy, with a warning."""
    report = Report() if report is None else report
    model, gm = traced_copy(model, "fold_conv_bn", "nothing folded", leaves=(nn.modules.batchnorm._BatchNorm,))
    if gm is None:
        report.skipped.append(("", "torch.fx cannot trace the model: nothing folded"))
        return model
    if example_inputs is not None:
        _propagate_shapes(gm, (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs))
    modules = dict(gm.named_modules())
    calls = module_call_counts(gm.graph)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not 1 <= len(node.args) <= 3 or not isinstance(node.args[0], fx.Node):
            continue
        bn, source = modules[node.target], node.args[0]
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and type(bn) not in _FOLDS_AS_BATCH_NORM:
            if not foreign_batch_norm(node.target, bn, "fold_conv_bn", report):  # e.g. timm's norm-act twin
                report.skipped.append((node.target, f"{type(bn).__name__} computes more than BatchNorm: not folded"))
            continue
        if (not isinstance(bn, nn.modules.batchnorm._BatchNorm) or node.kwargs
                or (len(node.args) >= 2 and not isinstance(bn, _WITH_ACT))
                or bn.training or bn.running_mean is None or source.op != "call_module"
                or len(source.users) != 1 or calls[source.target] != 1 or calls[node.target] != 1):
            continue
        layer = modules[source.target]
        if (type(layer) not in _FOLDABLE or not isinstance(bn, _FOLDABLE[type(layer)][0])
                or layer.weight.shape[0] != bn.num_features):
            continue
        reason = _unprovable(layer, bn, source, example_inputs is not None)
        if reason is not None:
            report.skipped.append((node.target, f"not folded into {source.target}: {reason}"))
            continue
        _fold_into(layer, bn)
        replacement = source
        if isinstance(bn, _WITH_ACT):  # the fused module's activation (and residual) stay, after the folded layer
            residual = node.args[1] if len(node.args) > 1 else None
            weight = node.args[2] if len(node.args) > 2 else None  # PReLU's, passed by fuse_model's code
            with gm.graph.inserting_before(node):
                if residual is not None:
                    replacement = gm.graph.call_function(operator.add, (source, residual))
                if bn.act[0] == "prelu" and weight is None:  # the module's own PReLU weight
                    weight = gm.graph.get_attr(f"{node.target}.{ACTIVATION_WEIGHT}")
                function, args = activations.torch_call(bn.act, weight)
                if function is not None:
                    replacement = gm.graph.call_function(function, (replacement, *args))
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        report.done.append(("folded", node.target, source.target))
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


def _propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Records each node's output shape in ``node.meta["tensor_meta"]``, running ``gm`` once in eval mode
    without grad; its modules' training flags are restored after, and eval mode changes no buffer."""
    with modes_set(gm, False), torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)


class _FrozenBatchNorm(nn.Module):
    """BatchNorm with frozen statistics and affine parameters (buffers, not parameters), computed by the
    fusedbn eval kernel, then ``activation`` (``fusedbn.batch_norm_act``'s; ``"identity"``: none) after
    adding an optional residual; gradients flow to the inputs only. Loads a ``nn.BatchNorm*d`` state_dict.
    For ``"prelu"`` its weight is the caller's (``activation_weight``; what ``fuse_model``'s code passes),
    else the module's own buffer ``activation_weight`` (``activation_num_parameters`` values, 1 or
    num_features, the default; 0.25 as nn.PReLU's, or the weight of the module it was frozen from)."""

    _dims: tuple  # the input dimensionalities the torch class takes
    _dims_text: str  # in words, for the error
    __constants__ = ["num_features", "eps", "activation", "activation_param", "_dims", "_dims_text"]

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None, *,
                 activation: str = "identity", activation_param: Optional[float] = None,
                 activation_num_parameters: Optional[int] = None) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.activation, self.activation_param = activations.spec(activation, activation_param)
        size = prelu_weight_size(activation, num_features, activation_num_parameters)
        options = dict(device=device, dtype=dtype)
        self.register_buffer("weight", torch.ones(num_features, **options))
        self.register_buffer("bias", torch.zeros(num_features, **options))
        self.register_buffer("running_mean", torch.zeros(num_features, **options))
        self.register_buffer("running_var", torch.ones(num_features, **options))
        if size is not None:
            self.register_buffer(ACTIVATION_WEIGHT, torch.full((size,), 0.25, **options))

    @property
    def act(self) -> activations.Spec:
        return self.activation, self.activation_param

    @classmethod
    def from_batch_norm(cls, bn: nn.modules.batchnorm._BatchNorm,
                        act: activations.Spec = activations.IDENTITY) -> "_FrozenBatchNorm":
        """``bn`` frozen, followed by ``act`` (that of a fused BatchNorm+activation; PReLU's weight frozen too
        where ``bn`` holds it, else left to the caller, as for the BatchNorms fuse_model fused)."""
        own_weight = own_activation_weight(bn)
        frozen = cls(bn.num_features, bn.eps, device=bn.running_mean.device, dtype=bn.running_mean.dtype,
                     activation=act[0], activation_param=act[1] if act[0] in activations.DEFAULT_PARAM else None,
                     activation_num_parameters=None if own_weight is None else own_weight.numel())
        with torch.no_grad():
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            if bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
            if own_weight is not None:
                frozen.activation_weight.copy_(own_weight)
            elif act[0] == "prelu":
                del frozen.activation_weight
        return frozen

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BatchNorm state_dict has one
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None,
                activation_weight: Optional[Tensor] = None) -> Tensor:
        if torch.jit.is_scripting():
            return self._in_torch_ops(input, residual, activation_weight)
        return self._eager_forward(input, residual, activation_weight)

    def _in_torch_ops(self, input: Tensor, residual: Optional[Tensor], activation_weight: Optional[Tensor]) -> Tensor:
        """The forward in torch's ops: what TorchScript compiles, jit.trace and ONNX export record."""
        if activation_weight is None and hasattr(self, "activation_weight"):
            activation_weight = self.activation_weight
        self._check_call(input, residual, activation_weight)
        output = F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return activations.apply_scripted(self.activation, self.activation_param, output, residual, activation_weight)

    def _check_call(self, input: Tensor, residual: Optional[Tensor], activation_weight: Optional[Tensor]) -> None:
        if input.dim() not in self._dims:
            raise ValueError(f"expected {self._dims_text} input (got {input.dim()}D input)")
        if residual is not None and self.activation == "identity":
            raise TypeError("a FrozenBatchNorm takes a residual only with an activation")
        activations.check_weight((self.activation, self.activation_param), activation_weight, input)

    @torch.jit.unused
    def _eager_forward(self, input: Tensor, residual: Optional[Tensor], activation_weight: Optional[Tensor]) -> Tensor:
        leaf = as_fx_leaf(self, input, residual, activation_weight)
        if leaf is not None:
            return leaf
        if computes_in_torch_ops():
            return self._in_torch_ops(input, residual, activation_weight)
        activation_weight = own_activation_weight(self) if activation_weight is None else activation_weight
        self._check_call(input, residual, activation_weight)
        if not fuses_residual(input, residual):
            frozen = batch_norm_eval(input, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
                                     None, activations.IDENTITY)
            # The residual broadcast or promoted, as + allows.
            return activations.apply(self.act, frozen, residual, activation_weight)
        return batch_norm_eval(input, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
                               residual, self.act, activation_weight)

    def extra_repr(self) -> str:
        name, param = self.act
        detail = "" if name == "identity" else f", activation={name!r}"
        if name in activations.DEFAULT_PARAM:
            detail += f", activation_param={param}"
        return f"{self.num_features}, eps={self.eps}" + detail


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """Frozen :class:`torch.nn.BatchNorm1d` (see ``_FrozenBatchNorm``)."""

    _dims, _dims_text = (2, 3), "2D or 3D"


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """Frozen :class:`torch.nn.BatchNorm2d`, as detection models use it (see ``_FrozenBatchNorm``)."""

    _dims, _dims_text = (4,), "4D"


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """Frozen :class:`torch.nn.BatchNorm3d` (see ``_FrozenBatchNorm``)."""

    _dims, _dims_text = (5,), "5D"


# The frozen class freeze makes of each BatchNorm class (a fused one's activation kept).
_FROZEN_FOR = {nn.BatchNorm1d: FrozenBatchNorm1d, FusedBatchNorm1d: FrozenBatchNorm1d,
               FusedBatchNormReLU1d: FrozenBatchNorm1d, FusedBatchNormAct1d: FrozenBatchNorm1d,
               nn.BatchNorm2d: FrozenBatchNorm2d, FusedBatchNorm2d: FrozenBatchNorm2d,
               FusedBatchNormReLU2d: FrozenBatchNorm2d, FusedBatchNormAct2d: FrozenBatchNorm2d,
               nn.BatchNorm3d: FrozenBatchNorm3d, FusedBatchNorm3d: FrozenBatchNorm3d,
               FusedBatchNormReLU3d: FrozenBatchNorm3d, FusedBatchNormAct3d: FrozenBatchNorm3d}


def freeze(model: nn.Module, *, report: Optional[Report] = None) -> nn.Module:
    """Replaces every BatchNorm1d/2d/3d with running statistics under ``model`` (torch's or fusedbn's, not
    ``model`` itself) by a ``FrozenBatchNorm1d/2d/3d`` holding its statistics and affine parameters, in
    place, and returns ``model``; a fused BatchNorm+activation keeps its activation. Any other BatchNorm
    (timm's BatchNormAct2d or its fusedbn twin, SyncBatchNorm, ...) is left
    alone, with a warning. ``report`` (a :class:`fusedbn.Report`), when given, records what was frozen and left."""
    report = Report() if report is None else report
    for parent_name, parent in model.named_modules():
        for name, child in list(parent.named_children()):
            full_name = f"{parent_name}.{name}" if parent_name else name
            frozen = _FROZEN_FOR.get(type(child))
            if frozen is not None and child.track_running_stats and child.running_mean is not None:
                act = getattr(child, "act", activations.IDENTITY)
                setattr(parent, name, frozen.from_batch_norm(child, act))
                report.done.append(("frozen", full_name,
                                    frozen.__name__ + ("" if act == activations.IDENTITY else " + " + act[0])))
            elif frozen is None and isinstance(child, nn.modules.batchnorm._BatchNorm) and not foreign_batch_norm(
                    full_name, child, "freeze", report):
                reason = f"{type(child).__name__} has no frozen twin, its statistics stay as they are"
                warnings.warn(f"fusedbn.freeze: {full_name} left alone: {reason}", stacklevel=2)
                report.skipped.append((full_name, reason))
    return model
