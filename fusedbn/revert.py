"""``revert_model``: every fusedbn module of a model back to torch's, in place, for deployment and for tools
that know only torch's classes."""
from typing import Optional

from torch import nn

from .convert import original_class
from .fuse import RewrittenForward, unfuse
from .modules import _FusedBatchNormAct
from .report import Report


def revert_model(model: nn.Module, *, report: Optional[Report] = None) -> nn.Module:
    """Undoes ``convert_model`` and ``fuse_model`` in place and returns ``model``: each module whose forward
    ``fuse_model`` rewrote gets its class's forward back (which calls the BatchNorm, then the activation
    module or function, as before fusing), and every ``FusedBatchNorm*d`` and fused BatchNorm becomes the
    ``nn.BatchNorm*d`` (or timm ``BatchNormAct2d``) it was, parameters, buffers and hooks unchanged. A
    ``FusedBatchNormReLU*d`` or ``FusedBatchNormAct*d`` built by hand (its own forward applies the activation;
    no torch BatchNorm does) is left as it is, recorded in ``report``."""
    report = Report() if report is None else report
    for name, owner in model.named_modules():
        if isinstance(owner.__dict__.get("forward"), RewrittenForward):
            unfuse(owner)
            report.done.append(("reverted", name, "forward"))
    for name, module in model.named_modules():
        torch_class = original_class(type(module))
        if torch_class is not None:
            module.__class__ = torch_class
            report.done.append(("reverted", name, torch_class.__name__))
        elif isinstance(module, _FusedBatchNormAct):
            report.skipped.append((name, f"a {type(module).__name__} not made by fuse_model: no torch module "
                                         f"computes BatchNorm and {module.activation} in one call"))
    return model
