"""``convert_model``: swap every ``nn.BatchNorm1d/2d/3d`` of a model for its fusedbn twin, in place."""
from torch import nn

from .modules import FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d

_FUSED_FOR = {nn.BatchNorm1d: FusedBatchNorm1d, nn.BatchNorm2d: FusedBatchNorm2d, nn.BatchNorm3d: FusedBatchNorm3d}


def convert_model(model: nn.Module) -> nn.Module:
    """Replaces every ``nn.BatchNorm1d/2d/3d`` in ``model`` (the model itself included) by the matching
    ``FusedBatchNorm*d`` and returns ``model``.

    The fused classes add no state, so each module changes class in place: its parameters, buffers,
    hooks, ``training`` flag, device and dtype stay exactly as they were, and optimizers holding its
    parameters keep working. Subclasses of the torch classes (e.g. ``SyncBatchNorm``, lazy modules)
    are left alone.
    """
    for module in model.modules():
        fused = _FUSED_FOR.get(type(module))
        if fused is not None:
            module.__class__ = fused
    return model
