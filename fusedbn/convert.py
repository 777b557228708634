"""``convert_model``: swap every ``nn.BatchNorm1d/2d/3d`` of a model for its fusedbn twin, in place."""
import warnings
from typing import Optional

from torch import nn

from .modules import FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d
from .report import Report

_FUSED_FOR = {nn.BatchNorm1d: FusedBatchNorm1d, nn.BatchNorm2d: FusedBatchNorm2d, nn.BatchNorm3d: FusedBatchNorm3d}
_TIMM_NORM_ACT = ("timm.layers.norm_act", "BatchNormAct2d")


def fused_twin(cls: type) -> Optional[type]:
    """The fusedbn class a module of class ``cls`` becomes (in place: the twins add no state), or None."""
    if (cls.__module__, cls.__qualname__) == _TIMM_NORM_ACT:
        from .norm_act import FusedTimmBatchNormAct2d
        return FusedTimmBatchNormAct2d
    return _FUSED_FOR.get(cls)


def original_class(cls: type) -> Optional[type]:
    """The class ``fused_twin`` turned into ``cls``, or None."""
    if cls.__module__ == "fusedbn.norm_act":
        from .norm_act import BatchNormAct2d
        return BatchNormAct2d
    return next((torch_class for torch_class, fused in _FUSED_FOR.items() if fused is cls), None)


def foreign_batch_norm(name: str, module: nn.Module, caller: str, report: Report) -> bool:
    """Whether ``module`` is a BatchNorm that is neither torch's own class nor fusedbn's: a subclass, which
    the transforms leave alone (recorded in ``report``, with a warning that names it when it has a forward
    of its own, e.g. timm's BatchNormAct2d: BatchNorm, then its drop and activation layers)."""
    cls = type(module)
    if (not isinstance(module, nn.modules.batchnorm._BatchNorm) or fused_twin(cls) is not None
            or cls.__module__.startswith(("fusedbn.", "torch.nn."))):
        return False
    base = next(c for c in cls.__mro__ if c in _FUSED_FOR or c is nn.modules.batchnorm._BatchNorm)
    if cls.forward is not base.forward:
        reason = f"{cls.__module__}.{cls.__qualname__} has a forward of its own, which fusedbn does not know"
        warnings.warn(f"fusedbn.{caller}: {name or 'the model'} left alone: {reason}", stacklevel=3)
    else:
        reason = f"{cls.__qualname__} is a subclass of {base.__name__}"
    report.skipped.append((name, reason))
    return True


def convert_model(model: nn.Module, *, report: Optional[Report] = None) -> nn.Module:
    """Replaces every ``nn.BatchNorm1d/2d/3d`` in ``model`` (the model itself included) by the matching
    ``FusedBatchNorm*d`` and returns ``model``; ``report`` (a :class:`fusedbn.Report`), when given,
    records each module converted and each BatchNorm left alone.

    The fused classes add no state, so each module changes class in place: its parameters, buffers,
    hooks, ``training`` flag, device and dtype stay exactly as they were, and optimizers holding its
    parameters keep working. timm's ``BatchNormAct2d`` becomes ``fusedbn.norm_act.FusedTimmBatchNormAct2d``
    (its drop and act layers kept). Other subclasses of the torch classes (``SyncBatchNorm``, lazy
    modules, timm's sync and frozen variants) are left alone, with a warning where they have a forward of
    their own.
    """
    report = Report() if report is None else report
    for name, module in model.named_modules():
        fused = fused_twin(type(module))
        if fused is not None:
            module.__class__ = fused
            report.done.append(("converted", name, ""))
        else:
            foreign_batch_norm(name, module, "convert_model", report)
    return model
