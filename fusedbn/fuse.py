"""``fuse_model``: rewrite ``relu(bn(x))`` and ``relu(bn(x) + r)`` into fused fusedbn modules with torch.fx."""
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._fx import module_call_counts, traced_copy
from .convert import convert_model
from .modules import FusedBatchNormReLU1d, FusedBatchNormReLU2d, FusedBatchNormReLU3d

_FUSED_RELU_FOR = {nn.BatchNorm1d: FusedBatchNormReLU1d, nn.BatchNorm2d: FusedBatchNormReLU2d,
                   nn.BatchNorm3d: FusedBatchNormReLU3d}
_RELU_FUNCTIONS = {torch.relu, torch.relu_, F.relu}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


@dataclass
class FuseReport:
    """What ``fuse_model`` did: patterns fused, and BatchNorm layers left unfused (converted to fusedbn)."""

    bn_relu: int = 0
    bn_add_relu: int = 0
    converted: int = 0
    traced: bool = True

    def __str__(self) -> str:
        if not self.traced:
            return f"not traceable by torch.fx: {self.converted} BatchNorm layers converted, none fused"
        return (f"fused {self.bn_relu} BatchNorm+ReLU and {self.bn_add_relu} BatchNorm+Add+ReLU; "
                f"{self.converted} BatchNorm layers converted unfused")


@dataclass
class _Match:
    bn: fx.Node
    relu: fx.Node
    add: Optional[fx.Node] = None
    residual: Optional[fx.Node] = None


def _is_relu(node: fx.Node, modules) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def _other_add_operand(add: fx.Node, bn: fx.Node) -> Optional[fx.Node]:
    """The residual of ``bn + residual`` (either order), or None when ``add`` is not such a plain sum."""
    if add.op != "call_function" or add.target not in _ADD_FUNCTIONS or len(add.args) != 2 or add.kwargs:
        return None
    a, b = add.args
    other = b if a is bn else a if b is bn else None
    return other if isinstance(other, fx.Node) and other is not bn else None


def _find_matches(gm: fx.GraphModule):
    """Non-overlapping patterns in graph order (of ``bn2 + downsample_bn``, the first operand is fused)."""
    claimed = set()
    for match in _candidate_matches(gm):
        nodes = {match.bn, match.relu, match.add} - {None}
        if claimed.isdisjoint(nodes):
            claimed |= nodes
            yield match


def _candidate_matches(gm: fx.GraphModule):
    modules = dict(gm.named_modules())
    calls = module_call_counts(gm)
    for node in gm.graph.nodes:
        # A BatchNorm module called once, with no other user of its output than the pattern.
        if (node.op != "call_module" or type(modules[node.target]) not in _FUSED_RELU_FOR
                or calls[node.target] != 1 or len(node.args) != 1 or node.kwargs or len(node.users) != 1):
            continue
        user = next(iter(node.users))
        if _is_relu(user, modules):
            yield _Match(node, user)
            continue
        residual = _other_add_operand(user, node)
        if residual is not None and len(user.users) == 1 and _is_relu(next(iter(user.users)), modules):
            yield _Match(node, next(iter(user.users)), user, residual)


def fuse_model(model: nn.Module):
    """Returns ``(fused, report)``: a copy of ``model`` (a ``torch.fx.GraphModule``) in which every
    ``relu(bn(x))`` and ``relu(bn(x) + r)`` whose BatchNorm output feeds only that pattern is one
    ``FusedBatchNormReLU*d`` call, and every other ``nn.BatchNorm1d/2d/3d`` is converted by
    ``convert_model``; ``report`` (a :class:`FuseReport`) counts both. ``model`` itself is not changed.

    A model that torch.fx cannot trace is converted with ``convert_model`` instead, with a warning.
    """
    model, gm = traced_copy(model, "fuse_model", "converting its BatchNorm layers without fusing them")
    if gm is None:
        converted = sum(type(m) in _FUSED_RELU_FOR for m in model.modules())
        return convert_model(model), FuseReport(converted=converted, traced=False)

    report = FuseReport()
    modules = dict(gm.named_modules())
    replaced = {}  # a fused relu's node -> the fused call that now computes it (a later match's residual)
    for match in list(_find_matches(gm)):
        bn = modules[match.bn.target]
        bn.__class__ = _FUSED_RELU_FOR[type(bn)]
        source = replaced.get(match.bn.args[0], match.bn.args[0])
        args = (source,) if match.residual is None else (source, replaced.get(match.residual, match.residual))
        # The fused call goes where the relu was: after the residual is computed.
        with gm.graph.inserting_before(match.relu):
            fused = gm.graph.call_module(match.bn.target, args)
        match.relu.replace_all_uses_with(fused)
        replaced[match.relu] = fused
        for node in (match.relu, match.add, match.bn):
            if node is not None:
                gm.graph.erase_node(node)
        if match.residual is None:
            report.bn_relu += 1
        else:
            report.bn_add_relu += 1
    report.converted = sum(type(m) in _FUSED_RELU_FOR for m in gm.modules())
    convert_model(gm)
    gm.graph.lint()
    gm.recompile()
    return gm, report
