"""fusedbn under PyTorch Lightning (needs ``lightning``, an optional extra: ``pip install fusedbn[lightning]``).

``Trainer(sync_batchnorm=True)`` makes every BatchNorm torch's ``SyncBatchNorm`` through Lightning's
``TorchSyncBatchNorm`` plugin, fusedbn's modules included. Two ways to keep fusedbn::

    trainer = Trainer(sync_batchnorm=True, plugins=[SyncBatchNormPlugin()])  # fusedbn's SyncBatchNorm
    trainer = Trainer(sync_batchnorm=True, callbacks=[FuseBatchNorm("fuse")])  # fuses, and swaps the plugin

``SyncBatchNormPlugin`` converts with :func:`fusedbn.convert_sync_batchnorm` (fused activations kept: the code
``fuse_model`` rewrote applies them) and, when training ends, gives back the single-process modules each layer
was before. ``FuseBatchNorm`` converts or fuses the LightningModule when the Trainer sets it up and reports
what it did through Lightning's loggers.
"""
import logging
import weakref
from typing import Dict, Optional

from torch import nn

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError("fusedbn.lightning needs PyTorch Lightning: pip install lightning") from error

from .convert import convert_model, fused_twin
from .fuse import fuse_model
from .report import Report
from .sync import FusedSyncBatchNorm, convert_sync_batchnorm

__all__ = ["FuseBatchNorm", "SyncBatchNormPlugin"]

log = logging.getLogger("lightning.pytorch")

# Where SyncBatchNormPlugin.apply left a layer's single-process class and its fused activation.
_SINGLE_PROCESS = "_fusedbn_single_process"
_ACTIVATION_ATTRIBUTES = ("activation", "activation_param")


class SyncBatchNormPlugin(TorchSyncBatchNorm):
    """Lightning's ``LayerSync`` plugin for fusedbn: every BatchNorm becomes a :class:`fusedbn.FusedSyncBatchNorm`
    (one collective per layer, the fusedbn kernels) instead of torch's ``SyncBatchNorm``.

    A subclass of Lightning's ``TorchSyncBatchNorm``, so it may be passed beside ``sync_batchnorm=True``, where
    it takes that plugin's place. ``revert`` gives each converted layer back the class it had before ``apply``
    (a torch BatchNorm comes back as its fusedbn twin); a ``FusedSyncBatchNorm`` made of a SyncBatchNorm, or that
    the model had already, stays: outside a process group it is the single-device fusedbn BatchNorm.
    ``report`` (a :class:`fusedbn.Report`) records the last ``apply``.
    """

    def __init__(self, process_group=None) -> None:
        self.process_group = process_group
        self.report = Report()

    def apply(self, model: nn.Module) -> nn.Module:
        before = {name: _single_process_state(module) for name, module in model.named_modules()
                  if isinstance(module, nn.modules.batchnorm._BatchNorm)
                  and not isinstance(module, (FusedSyncBatchNorm, nn.SyncBatchNorm))}
        self.report = Report()
        model = convert_sync_batchnorm(model, self.process_group, report=self.report)
        for name, state in before.items():
            setattr(model.get_submodule(name), _SINGLE_PROCESS, state)
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, FusedSyncBatchNorm) and _SINGLE_PROCESS in child.__dict__:
                    setattr(parent, child_name, _single_process(child))
        if isinstance(model, FusedSyncBatchNorm) and _SINGLE_PROCESS in model.__dict__:
            model = _single_process(model)
        return model


def _single_process_state(module: nn.Module) -> tuple:
    """The class (fusedbn's) and fused-activation attributes ``module`` gets back from ``revert``."""
    cls = fused_twin(type(module)) or type(module)
    return cls, {key: module.__dict__[key] for key in _ACTIVATION_ATTRIBUTES if key in module.__dict__}


def _single_process(module: FusedSyncBatchNorm) -> nn.Module:
    """A module of the recorded class holding ``module``'s parameters, buffers and submodules. fusedbn's
    classes add no state to torch's BatchNorm, so the class changes on a module built as their common base."""
    cls, attributes = module.__dict__[_SINGLE_PROCESS]
    reverted = nn.modules.batchnorm._BatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                              module.track_running_stats)
    reverted.__class__ = cls
    reverted.__dict__.update(attributes)
    for name in ("weight", "bias"):
        if module.affine:
            setattr(reverted, name, getattr(module, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(reverted, name, getattr(module, name))
    reverted.training = module.training
    if hasattr(module, "qconfig"):
        reverted.qconfig = module.qconfig
    for name, child in module.named_children():
        reverted.add_module(name, child)
    return reverted


class FuseBatchNorm(Callback):
    """Converts (``mode="convert"``: :func:`fusedbn.convert_model`) or fuses (``mode="fuse"``:
    :func:`fusedbn.fuse_model`) the LightningModule's BatchNorm layers when the Trainer sets it up, before any
    strategy wraps it (once per module: later stages find it done), and logs what it did (counts to every
    logger of the Trainer as ``fusedbn/<action>``, the summary to the ``lightning.pytorch`` logger). Where the
    Trainer was given ``sync_batchnorm=True``, its torch plugin is replaced by :class:`SyncBatchNormPlugin`, so
    the layers stay fusedbn's. ``report`` holds the :class:`fusedbn.Report` of the last module transformed.

    Callbacks are set up before the LightningModule's own ``setup`` and ``configure_model`` hooks: layers
    built there are not seen (``sync_batchnorm`` still makes them fusedbn's); call ``fusedbn.fuse_model(self)``
    at the end of such a hook instead. A model with layers ``convert_sync_batchnorm`` refuses (timm's norm-act
    layers) fails loudly under ``sync_batchnorm`` rather than lose their activation, as torch's conversion would.
    """

    def __init__(self, mode: str = "fuse") -> None:
        if mode not in ("fuse", "convert"):
            raise ValueError(f"FuseBatchNorm: mode must be 'fuse' or 'convert', got {mode!r}")
        self.mode = mode
        self.report: Optional[Report] = None
        self._done = weakref.WeakSet()

    def __getstate__(self) -> dict:  # ddp_spawn pickles the callbacks; a WeakSet does not pickle
        return {**self.__dict__, "_done": list(self._done)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _done=weakref.WeakSet(state["_done"]))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if pl_module not in self._done:
            self._done.add(pl_module)
            self.report = Report()
            (fuse_model if self.mode == "fuse" else convert_model)(pl_module, report=self.report)
            counts: Dict[str, float] = {}
            for action, _, _ in self.report.done:
                counts[f"fusedbn/{action}"] = counts.get(f"fusedbn/{action}", 0.0) + 1.0
            for logger in trainer.loggers:
                logger.log_metrics(counts, step=0)
            log.info("fusedbn.%s_model: %s", self.mode, self.report)
        strategy = trainer.strategy
        if type(getattr(strategy, "_layer_sync", None)) is TorchSyncBatchNorm:
            strategy._layer_sync = SyncBatchNormPlugin()
            log.info("fusedbn: sync_batchnorm uses fusedbn.FusedSyncBatchNorm (fusedbn.lightning.SyncBatchNormPlugin)")
