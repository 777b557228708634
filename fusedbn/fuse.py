"""``fuse_model``: in place, every ``act(bn(x))`` and ``act(bn(x) + r)`` a model's code computes becomes one
fused module call, wherever that provably computes what the model computed, in training and in eval. The
activations are those of fusedbn/activations.py, as modules (``nn.ReLU``, ``nn.ReLU6``, ``nn.Hardtanh(0, 6)``,
``nn.LeakyReLU``, ``nn.ELU``, ``nn.SiLU``, ``nn.Hardswish``, ``nn.GELU``, ``nn.PReLU``), functions (``F.relu``,
``torch.relu_``, ``F.silu``, ``F.gelu(approximate=...)``, ..., ``inplace=True`` included) or ``x.relu()``.

How. Each module's own ``forward`` is traced with torch.fx, every submodule call kept as a call (so the graph
is that forward's code alone), once in training mode and once in eval mode. Where the two graphs are the
same (the code does not branch on the mode) and hold a pattern, the module gets an instance-level forward
generated from the rewritten graph, which looks its submodules up on the module at every call; the
BatchNorm changes class to ``FusedBatchNormReLU*d`` (ReLU) or ``FusedBatchNormAct*d`` (the others, the
activation in its instance attributes), and the rewritten code calls it through ``activation_of_batch_norm``,
which still computes the activation if the module has been replaced since. An ``nn.PReLU`` keeps its weight:
the rewritten code passes ``self.<prelu>.weight`` to each call, so optimizers, ``state_dict`` and checkpoints
still see the ``nn.PReLU``'s parameter. Everything else stays: the
model's classes, methods, attributes and hooks. The forward of the model itself is never rewritten (its
submodules' are): torch.fx, and every tool built on it, traces the model it is given through its class's
forward, where it would see each fused module and the activation the model's code still applies after it.
A BatchNorm or activation module with hooks of its own is
not fused (a hook would see other values), nor a BatchNorm called from more than one place, nor an
``nn.PReLU`` called from more than one place or whose weight has neither 1 nor C values. A dropout of
probability 0 between the BatchNorm and the rest (MONAI's ``ADN`` blocks) is passed through: it returns its
input.

torch.fx freezes the rest of the Python it runs through: a branch on an attribute other than the mode (``if
self.use_res_connect``) takes the path that attribute chose at fuse time. So the rewritten forward checks the
module's plain attributes at every call, and should one have changed, it undoes that module's fusion (with a
warning) and runs the module's own forward (in eager mode; not while torch.compile traces it).
"""
import importlib
import inspect
import operator
import types
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx, nn

from . import activations
from ._fx import has_hooks, module_call_counts, modes_set
from .convert import convert_model
from .modules import (FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d, FusedBatchNormAct1d,
                      FusedBatchNormAct2d, FusedBatchNormAct3d, FusedBatchNormReLU1d, FusedBatchNormReLU2d,
                      FusedBatchNormReLU3d)
from .report import Report

# The BatchNorm classes fuse_model fuses -> (the fused class for ReLU, for the other activations); and each
# fused class -> the plain fusedbn class its fusion is undone to.
_FUSED_FOR, _PLAIN_FOR = {}, {}
for _torch, _plain, _relu, _act in (
        (nn.BatchNorm1d, FusedBatchNorm1d, FusedBatchNormReLU1d, FusedBatchNormAct1d),
        (nn.BatchNorm2d, FusedBatchNorm2d, FusedBatchNormReLU2d, FusedBatchNormAct2d),
        (nn.BatchNorm3d, FusedBatchNorm3d, FusedBatchNormReLU3d, FusedBatchNormAct3d)):
    _FUSED_FOR[_torch] = _FUSED_FOR[_plain] = (_relu, _act)
    _PLAIN_FOR[_relu] = _PLAIN_FOR[_act] = _plain
_ADD_FUNCTIONS = {operator.add, torch.add}


_MODULE_INTERNALS = set(nn.Module().__dict__)  # training, _is_full_backward_hook, ...: torch's, not the model's


def _python_state(owner: nn.Module, dropouts=()) -> dict:
    """What torch.fx may have frozen into a traced forward besides the graph: the module's plain Python
    attributes (flags, sizes; not the mode), which of its submodule slots are set, and the probabilities
    of the dropouts a fused pattern passed through (``dropouts``: their names; _zero_dropouts_after)."""
    state = {k: v for k, v in owner.__dict__.items()
             if k not in _MODULE_INTERNALS and isinstance(v, (bool, int, float, str, tuple, type(None)))}
    state["submodules set"] = tuple((name, child is not None) for name, child in owner._modules.items())
    if dropouts:
        state["dropout p"] = tuple((name, getattr(owner._modules.get(name), "p", None)) for name in dropouts)
    return state


class RewrittenForward:
    """A module's forward generated from its rewritten torch.fx graph (``src``, with the names it uses in
    ``namespace``), called with the module as ``self``. Kept as the module's instance attribute ``forward``;
    ``revert_model`` deletes it, which restores the class's forward. Should one of the module's plain
    attributes change after fusing (``_python_state``: a branch the trace took may no longer be taken), the
    fusion of that module is undone with a warning and the class's forward runs from then on."""

    def __init__(self, owner: nn.Module, src: str, namespace: dict, fused: list, dropouts: list) -> None:
        self.owner, self.src, self.namespace = owner, src, namespace
        self.fused = fused  # the targets of the BatchNorm modules it calls fused
        self.dropouts = dropouts  # the targets of the dropouts of probability 0 the fused calls passed through
        self.state = _python_state(owner, dropouts)
        self._compile()

    def _compile(self) -> None:
        namespace = dict(self.namespace)
        exec(compile(self.src, f"<fusedbn rewritten {type(self.owner).__name__}.forward>", "exec"), namespace)
        self.function = namespace["forward"]

    # What a bound method offers, for tools that inspect a module's forward (torch.export reads its code).
    @property
    def __func__(self):
        return self.function

    @property
    def __self__(self):
        return self.owner

    @property
    def __code__(self):
        return self.function.__code__

    @property
    def __globals__(self):
        # torch.jit.script compiles a forward from its Python source, which a rewritten one has not.
        raise AttributeError(f"fusedbn: {type(self.owner).__name__}.forward was rewritten by fuse_model and has no "
                             "source for torch.jit.script: use torch.jit.trace (or torch.export), or script a "
                             "copy after fusedbn.revert_model(copy) or before fuse_model")

    @property
    def __signature__(self):
        signature = inspect.signature(self.function)
        return signature.replace(parameters=list(signature.parameters.values())[1:])

    def __call__(self, *args, **kwargs):
        # Eager only: dynamo does not trace the comparison (nor a warning) as Python runs it.
        now = self.state if torch.compiler.is_compiling() else _python_state(self.owner, self.dropouts)
        if now != self.state:
            changed = ", ".join(sorted(k for k in now.keys() | self.state.keys() if now.get(k) != self.state.get(k)))
            warnings.warn(f"fusedbn.fuse_model: {type(self.owner).__name__} changed since it was fused ({changed}); "
                          "its fusion is undone and its own forward runs", stacklevel=2)
            unfuse(self.owner)
            return type(self.owner).forward(self.owner, *args, **kwargs)  # inside the module's call: no hooks again
        return self.function(self.owner, *args, **kwargs)

    def __getstate__(self):  # modules in the namespace (torch, ...) pickle as their names
        namespace = {k: _ModuleName(v.__name__) if isinstance(v, types.ModuleType) else v
                     for k, v in self.namespace.items()}
        return {"owner": self.owner, "src": self.src, "namespace": namespace, "fused": self.fused,
                "dropouts": self.dropouts, "state": self.state}

    def __setstate__(self, state) -> None:
        state["namespace"] = {k: importlib.import_module(v) if isinstance(v, _ModuleName) else v
                              for k, v in state["namespace"].items()}
        state.setdefault("dropouts", [])  # pickled before fusions passed through dropouts
        self.__dict__.update(state)
        self._compile()


class _ModuleName(str):
    """A Python module's name, standing for the module in a pickled RewrittenForward."""


class _OwnCode(fx.Tracer):
    """Traces ``owner``'s forward alone: every submodule it calls stays one call."""

    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        self.owner = owner

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m is not self.owner


def _batch_norms_called_by(owner: nn.Module) -> list:
    """The names (relative to ``owner``) of the BatchNorm modules fuse_model fuses that ``owner``'s forward
    may call: its children, and the children of its ModuleList and ModuleDict children (containers have no
    forward: their parent's code calls ``self.bns[i]``). None for a container itself."""
    if isinstance(owner, (nn.ModuleList, nn.ModuleDict)):
        return []
    names = []
    for name, child in owner.named_children():
        if type(child) in _FUSED_FOR:
            names.append(name)
        elif isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            names.extend(f"{name}.{key}" for key, m in child.named_children() if type(m) in _FUSED_FOR)
    return names


def _trace_in_mode(owner: nn.Module, training: bool) -> Optional[fx.Graph]:
    """``owner``'s forward as a graph, traced with every module under it in ``training`` mode (their flags
    restored after), or None where torch.fx cannot trace it or the graph would need constants it adds."""
    attributes = set(owner.__dict__)
    with modes_set(owner, training):
        try:
            graph = _OwnCode(owner).trace(owner)
        except Exception:  # noqa: BLE001 - torch.fx raises many kinds of errors for code it cannot trace
            graph = None
    added = set(owner.__dict__) - attributes  # tensor constants torch.fx stored on the module for the graph
    for name in added:
        delattr(owner, name)
    return None if added else graph


@dataclass
class _Match:
    bn: fx.Node
    act_node: fx.Node
    act: activations.Spec
    add: Optional[fx.Node] = None
    residual: Optional[fx.Node] = None
    dropouts: tuple = ()  # calls of dropouts of probability 0 between the BatchNorm and the rest, in order


def _activation(node: fx.Node, owner: nn.Module, bn: nn.Module, calls: Counter,
                references: Counter) -> Optional[activations.Spec]:
    """The activation ``node`` applies to its (first) input, where fuse_model fuses it (activations.AUTO_FUSED)
    after ``bn``, or None. An nn.PReLU's weight is passed to the fused call: the PReLU must be called once here
    and referenced once in the model (``calls``, ``references``), with 1 or C values."""
    act = None
    if node.op == "call_module":
        module = owner.get_submodule(node.target)
        plain_call = len(node.args) == 1 and not node.kwargs and not has_hooks(module)
        act = activations.of_module(module) if plain_call else None
        if act is not None and act[0] == "prelu" and not (
                calls[node.target] == 1 and references[id(module)] == 1
                and module.weight.numel() in (1, bn.num_features)):
            act = None
    elif node.op == "call_function":
        act = activations.of_call(node.target, node.args[1:], node.kwargs)
    elif node.op == "call_method":
        act = activations.of_method(node.target, node.args[1:], node.kwargs)
    return act if act is not None and act[0] in activations.AUTO_FUSED else None


def _other_add_operand(add: fx.Node, bn: fx.Node) -> Optional[fx.Node]:
    """The residual of ``bn + residual`` (either order; ``bn += residual``), or None when ``add`` is not
    such a plain sum. ``residual += bn`` would change the residual in place: not fused."""
    if add.op != "call_function" or len(add.args) != 2 or add.kwargs:
        return None
    a, b = add.args
    if add.target is operator.iadd:
        other = b if a is bn else None
    else:
        other = (b if a is bn else a if b is bn else None) if add.target in _ADD_FUNCTIONS else None
    return other if isinstance(other, fx.Node) and other is not bn else None


def _zero_dropouts_after(node: fx.Node, owner: nn.Module, calls: Counter) -> tuple:
    """The chain of calls after ``node`` of ``owner``'s own dropout children of probability 0 (``nn.Dropout*d``,
    no hooks, called once, each the only user of the one before): they return their input in training and
    eval alike, so a pattern may pass through them (MONAI's ``ADN``: BatchNorm, Dropout(0.0), activation).
    ``_python_state`` records their probabilities, so a fusion through one whose ``p`` changes is undone
    (in eager mode, as for the module's other attributes)."""
    chain = []
    while len(node.users) == 1:
        user = next(iter(node.users))
        module = owner.get_submodule(user.target) if user.op == "call_module" and "." not in user.target else None
        if not (isinstance(module, nn.modules.dropout._DropoutNd) and type(module).__module__ == "torch.nn.modules.dropout"
                and module.p == 0 and user.args == (node,) and not user.kwargs and not has_hooks(module)
                and calls[user.target] == 1):
            break
        chain.append(user)
        node = user
    return tuple(chain)


def _matches(graph: fx.Graph, owner: nn.Module, references: Counter):
    """Non-overlapping patterns in graph order: a BatchNorm of ours to fuse (no hooks, called once here and
    referenced once in the model) whose output feeds only the activation, or only the sum feeding only the
    activation."""
    calls = module_call_counts(graph)
    claimed = set()
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs or len(node.users) != 1:
            continue
        bn = owner.get_submodule(node.target)
        if type(bn) not in _FUSED_FOR or calls[node.target] != 1 or references[id(bn)] != 1 or has_hooks(bn):
            continue
        dropouts = _zero_dropouts_after(node, owner, calls)
        head = dropouts[-1] if dropouts else node
        if len(head.users) != 1:
            continue
        user = next(iter(head.users))
        match = None
        act = _activation(user, owner, bn, calls, references) if user.args[0] is head else None
        if act is not None:
            match = _Match(node, user, act, dropouts=dropouts)
        else:
            residual = _other_add_operand(user, head)
            after = next(iter(user.users)) if residual is not None and len(user.users) == 1 else None
            act = (_activation(after, owner, bn, calls, references) if after is not None and after.args[0] is user
                   else None)
            if act is not None:
                match = _Match(node, after, act, user, residual, dropouts)
        nodes = {match.bn, match.act_node, match.add, *match.dropouts} - {None} if match is not None else set()
        if nodes and claimed.isdisjoint(nodes):
            claimed |= nodes
            yield match


def unfuse(owner: nn.Module) -> None:
    """Undoes fuse_model's rewrite of ``owner``: its class's forward back, and each BatchNorm it fused back to
    the plain fusedbn module (unless replaced since)."""
    forward = owner.__dict__.pop("forward")
    for target in forward.fused:
        bn = owner.get_submodule(target)
        if type(bn) in _PLAIN_FOR:
            bn.__class__ = _PLAIN_FOR[type(bn)]
            bn.__dict__.pop("activation", None)
            bn.__dict__.pop("activation_param", None)


def _fuse_activation(bn: nn.Module, act: activations.Spec) -> None:
    """Makes ``bn`` (a BatchNorm fuse_model fuses) compute ``act`` after itself, in place."""
    relu_class, act_class = _FUSED_FOR[type(bn)]
    if act == activations.RELU:
        bn.__class__ = relu_class
    else:
        bn.__class__ = act_class
        bn.activation, bn.activation_param = act


def activation_of_batch_norm(bn: nn.Module, name: str, param: float, input, residual=None, weight=None):
    """``act(bn(input) [+ residual])`` (``weight``: PReLU's, the nn.PReLU's parameter): what a rewritten forward
    computes where the model's code did, in one call of ``bn`` while it computes that activation itself (the
    fused module fuse_model made it, a ``FrozenBatchNorm*d`` that ``freeze`` made of it), else (the module
    replaced since, e.g. by torch's ``SyncBatchNorm.convert_sync_batchnorm``, or reverted) as the model's code
    computed it."""
    if getattr(bn, "act", None) == (name, param):
        if weight is not None:
            return bn(input, residual, weight)
        return bn(input) if residual is None else bn(input, residual)
    output = bn(input)
    return activations.apply((name, param), output, residual, weight)


def _rewrite(graph: fx.Graph, owner: nn.Module, matches) -> list:
    """Replaces each match by an activation_of_batch_norm call of its BatchNorm, which becomes fused; returns
    (name, detail) pairs."""
    fused = []
    replaced = {}  # a fused activation's node -> the fused call that now computes it (a later match's input)
    for match in matches:
        _fuse_activation(owner.get_submodule(match.bn.target), match.act)
        source = replaced.get(match.bn.args[0], match.bn.args[0])
        args = (source,) if match.residual is None else (source, replaced.get(match.residual, match.residual))
        with graph.inserting_before(match.act_node):  # where the activation was: after the residual is computed
            if match.act[0] == "prelu":  # its weight, read from the nn.PReLU at each call
                weight = graph.get_attr(match.act_node.target + ".weight")
                args = (source, None if match.residual is None else args[1], weight)
            call = graph.call_function(activation_of_batch_norm,
                                       (graph.get_attr(match.bn.target), *match.act, *args))
        match.act_node.replace_all_uses_with(call)
        replaced[match.act_node] = call
        for node in (match.act_node, match.add, *reversed(match.dropouts), match.bn):
            if node is not None:
                graph.erase_node(node)
        fused.append((match.bn.target, match.act[0] if match.residual is None else "add+" + match.act[0]))
    graph.lint()
    return fused


def fuse_model(model: nn.Module, *, report: Optional[Report] = None) -> nn.Module:
    """Fuses, in place, every ``act(bn(x))`` and ``act(bn(x) + r)`` of ``model``'s code that provably
    computes the same in training and eval (see this module's docstring), converts every other
    ``nn.BatchNorm1d/2d/3d`` with ``convert_model``, and returns ``model``. ``report`` (a
    :class:`fusedbn.Report`), when given, records each fusion (``("fused", name, "silu")``, ``"add+relu"``),
    each conversion, and the BatchNorm layers left unfused because their caller's code could not be
    rewritten. ``fusedbn.revert_model`` undoes it."""
    report = Report() if report is None else report
    references = Counter(id(child) for m in model.modules() for child in m._modules.values() if child is not None)
    names = {id(m): name for name, m in model.named_modules()}
    for owner in list(model.modules()):
        candidates = _batch_norms_called_by(owner)
        if isinstance(owner.__dict__.get("forward"), RewrittenForward) or not candidates:
            continue
        prefix = names[id(owner)] + "." if names[id(owner)] else ""
        graphs = [_trace_in_mode(owner, training) for training in (True, False)] if owner is not model else []
        if owner is model:
            reason = ("the model's own forward is not rewritten (torch.fx traces a model from its class's forward); "
                      "fuse a module that holds the model to fuse these")
        elif any(graph is None for graph in graphs):
            reason = f"torch.fx cannot trace the forward of {type(owner).__name__}"
        elif graphs[0].python_code("self").src != graphs[1].python_code("self").src:
            reason = f"the forward of {type(owner).__name__} differs between training and eval"
        else:
            matches = list(_matches(graphs[0], owner, references))
            if matches:
                dropouts = [node.target for match in matches for node in match.dropouts]
                fused = _rewrite(graphs[0], owner, matches)
                code = graphs[0].python_code("self")
                owner.forward = RewrittenForward(owner, code.src, code.globals, [target for target, _ in fused],
                                                 dropouts)
                report.done.extend(("fused", prefix + target, detail) for target, detail in fused)
            continue
        report.skipped.extend((prefix + name, f"not fused: {reason}") for name in candidates)
    convert_model(model, report=report)
    return model
