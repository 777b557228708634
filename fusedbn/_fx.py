"""What the torch.fx model rewrites (fuse_model, fold_conv_bn) share."""
import copy
import warnings
from collections import Counter

from torch import fx, nn


def traced_copy(model: nn.Module, caller: str, instead: str):
    """(a deep copy of ``model``, its ``torch.fx.GraphModule``), or (the copy, None) with a warning naming
    ``caller`` and what it does ``instead`` when torch.fx cannot trace the model."""
    model = copy.deepcopy(model)
    try:
        return model, fx.symbolic_trace(model)
    except Exception as error:  # noqa: BLE001 - FX raises many kinds of errors for untraceable code
        warnings.warn(f"fusedbn.{caller}: torch.fx cannot trace {type(model).__name__} ({error}); {instead}",
                      stacklevel=3)
        return model, None


def module_call_counts(gm: fx.GraphModule) -> Counter:
    """How many times the graph calls each submodule (a module called twice is shared: not rewritable)."""
    return Counter(node.target for node in gm.graph.nodes if node.op == "call_module")
