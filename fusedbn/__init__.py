"""fusedbn: fused, exact BatchNorm kernels for PyTorch, drop-in for nn.BatchNorm1d/2d/3d."""
from ._version import __version__
from . import ops
from .report import Report
from ._info import info
from .convert import convert_model
from .functional import batch_norm, batch_norm_act, batch_norm_relu
from . import _op_autograd  # noqa: F401  (registers the ops' autograd)
from .fuse import fuse_model
from .revert import revert_model
from .inference import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, fold_conv_bn, freeze
from .sync import FusedSyncBatchNorm, convert_sync_batchnorm, sync_batch_norm
from .modules import (FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d, FusedBatchNormAct1d, FusedBatchNormAct2d,
                      FusedBatchNormAct3d, FusedBatchNormReLU1d, FusedBatchNormReLU2d, FusedBatchNormReLU3d)

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "fold_conv_bn", "freeze", "batch_norm",
           "batch_norm_act", "batch_norm_relu", "convert_model", "fuse_model", "Report", "revert_model",
           "FusedBatchNorm1d", "FusedBatchNorm2d", "FusedBatchNorm3d", "FusedBatchNormAct1d", "FusedBatchNormAct2d",
           "FusedBatchNormAct3d", "FusedBatchNormReLU1d", "FusedBatchNormReLU2d", "FusedBatchNormReLU3d",
           "FusedSyncBatchNorm", "convert_sync_batchnorm", "info", "ops", "sync_batch_norm", "__version__"]
