"""The restoration network: MONAI's ``UNet`` with its bottleneck exposed for the feature-alignment loss."""

from __future__ import annotations

import torch
from monai.networks.layers import SkipConnection
from monai.networks.nets import UNet


def find_bottleneck(unet: UNet) -> torch.nn.Module:
    """The innermost ``SkipConnection``'s submodule of a MONAI UNet: the bottom (bottleneck) block."""
    inner = None
    for m in unet.modules():
        if isinstance(m, SkipConnection):
            inner = m  # modules() walks outer to inner, so the last one found is the innermost
    if inner is None:
        raise ValueError("network has no SkipConnection: not a MONAI UNet")
    return inner.submodule


class FeatureUNet(UNet):
    """MONAI ``UNet`` (same arguments, same ``forward``) whose bottleneck block is ``self.bottleneck``.

    ``forward(x)`` returns the reconstruction only, so MONAI inferers, ``verify_net_in_out`` and
    TorchScript export work unchanged; the ART-ASyn feature loss reads the bottleneck output ``f_enc``
    with a forward hook (``scripts.engine.forward_with_features``), which also works under DDP.
    No output activation: the target lies in [0, 1] and the MSE terms keep the output there; anomaly
    maps clamp the reconstruction to [0, 1].
    """

    __jit_unused_properties__ = ["bottleneck"]

    @property
    def bottleneck(self) -> torch.nn.Module:
        return find_bottleneck(self)
