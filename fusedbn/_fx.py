"""What the torch.fx model rewrites (fold_conv_bn; fuse_model for module_call_counts) share."""
import contextlib
import copy
import warnings
from collections import Counter

from torch import fx, nn


class _Tracer(fx.Tracer):
    """torch.fx's tracer, also keeping instances of ``leaves`` (e.g. fusedbn's modules) as module calls."""

    def __init__(self, leaves: tuple) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def traced_copy(model: nn.Module, caller: str, instead: str, leaves: tuple = ()):
    """(a deep copy of ``model``, its ``torch.fx.GraphModule``), or (the copy, None) with a warning naming
    ``caller`` and what it does ``instead`` when torch.fx cannot trace the model. Submodules that are
    instances of ``leaves`` stay module calls, as torch.nn's own do."""
    model = copy.deepcopy(model)
    try:
        tracer = _Tracer(leaves)
        graph = tracer.trace(model)
        return model, fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as error:  # noqa: BLE001 - FX raises many kinds of errors for untraceable code
        warnings.warn(f"fusedbn.{caller}: torch.fx cannot trace {type(model).__name__} ({error}); {instead}",
                      stacklevel=3)
        return model, None


def as_fx_leaf(module: nn.Module, input, *rest):
    """While torch.fx traces ``module`` (``input`` a Proxy), its call recorded as one ``call_module`` node, as
    torch.fx records torch.nn's own modules: any tracer (torch.fx.symbolic_trace's, quantization's) then keeps
    fusedbn's modules whole, and the traced model runs them (train and eval alike). None otherwise. ``rest``:
    further arguments, trailing Nones dropped."""
    if not isinstance(input, fx.Proxy):
        return None
    args = (input, *rest)
    while args[-1] is None:
        args = args[:-1]
    return input.tracer.create_proxy("call_module", input.tracer.path_of_module(module), args, {})


def module_call_counts(graph: fx.Graph) -> Counter:
    """How many times the graph calls each submodule (a module called twice is shared: not rewritable)."""
    return Counter(node.target for node in graph.nodes if node.op == "call_module")


def has_hooks(module: nn.Module) -> bool:
    """Forward or backward hooks of its own: fused into another op, the module would skip them (and what they
    see or change of its output and gradient)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


@contextlib.contextmanager
def modes_set(module: nn.Module, training: bool):
    """``module`` and every module under it in ``training`` mode for the block, each one's own flag restored
    after (also where the block raises)."""
    modes = {m: m.training for m in module.modules()}
    module.train(training)
    try:
        yield module
    finally:
        for m, mode in modes.items():
            m.training = mode
