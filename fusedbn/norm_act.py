"""fusedbn's twin of timm's ``BatchNormAct2d`` (BatchNorm, then its ``drop`` and ``act`` layers, in one
``nn.BatchNorm2d`` subclass, as timm's EfficientNets, MobileNetV3, RegNets and CSPNets use it). Imported by
``convert_model`` only for a model that holds one, so fusedbn does not need timm."""
import torch
from torch import Tensor, nn
from timm.layers.norm_act import BatchNormAct2d

from . import activations
from ._fx import as_fx_leaf, has_hooks
from .modules import _FusedForward


class FusedTimmBatchNormAct2d(_FusedForward, BatchNormAct2d):
    """timm's ``BatchNormAct2d`` with fusedbn's BatchNorm: ``act(drop(bn(x)))``; one fused op where ``drop`` is
    an ``nn.Identity`` and ``act`` an activation module fusedbn fuses (``nn.ReLU``, ``nn.SiLU``, ``nn.PReLU`` with 1
    or C values, ..., fusedbn/activations.py's AUTO_FUSED) or ``nn.Identity``, neither with hooks; else the BatchNorm
    op, then timm's layers as they are."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # torch's BatchNorm, then timm's layers, as timm's module scripts
            return self.act(self.drop(self._scripted_forward(x, None, None)))
        return self._eager_forward(x)

    @torch.jit.unused
    def _eager_forward(self, x: Tensor) -> Tensor:
        leaf = as_fx_leaf(self, x)
        if leaf is not None:
            return leaf
        drop, act = self.drop, self.act
        if type(drop) is nn.Identity and not has_hooks(drop) and not has_hooks(act):
            spec = activations.IDENTITY if type(act) is nn.Identity else activations.of_module(act)
            weight = act.weight if spec is not None and spec[0] == "prelu" else None
            if (spec is not None and spec[0] in activations.AUTO_FUSED
                    and (weight is None or weight.numel() in (1, self.num_features))):
                return self._fused_forward(x, None, spec, weight)
        return act(drop(self._fused_forward(x, None, activations.IDENTITY)))
