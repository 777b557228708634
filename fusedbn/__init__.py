"""fusedbn: fused, exact BatchNorm kernels for PyTorch, drop-in for nn.BatchNorm1d/2d/3d."""
from . import ops
from .convert import convert_model
from .functional import batch_norm
from .modules import FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d

__all__ = ["batch_norm", "convert_model", "FusedBatchNorm1d", "FusedBatchNorm2d", "FusedBatchNorm3d", "ops"]
