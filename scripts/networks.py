"""The restoration network: MONAI's ``UNet`` with its bottleneck exposed for the feature-alignment loss.

:class:`FeatureUNet` subclasses :class:`monai.networks.nets.UNet` without touching its construction or
``forward``: the same arguments build the same modules with the same ``state_dict`` keys, so a plain UNet
checkpoint loads into it (and back), MONAI inferers, ``verify_net_in_out`` and TorchScript export
(``torch.jit.script`` and ``torch.jit.trace``, i.e. ``ckpt_export`` with or without ``use_trace``) see a
plain UNet. The bottleneck features ``f_enc`` are read with a forward hook on :attr:`FeatureUNet.bottleneck`.

Output activation: none (MONAI's UNet ends in a bare convolution). The target ``I_norm`` lies in [0, 1]
and every reconstruction term is an MSE, which already pulls the output into that range; a sigmoid
would saturate near the dark background (0) and bright bone (1), where its gradient vanishes, and would
make the identity mapping (most of the image) harder to learn. Anomaly maps clamp the reconstruction to
[0, 1] at inference (``custom_transforms.anomaly.AnomalyPostd``), so scores never see values outside it.
"""

from __future__ import annotations

import torch
from monai.networks.layers import SkipConnection
from monai.networks.nets import UNet

__all__ = ["FeatureUNet", "find_bottleneck", "forward_with_features", "model_state", "unwrap"]


def find_bottleneck(unet: torch.nn.Module) -> torch.nn.Module:
    """The innermost ``SkipConnection``'s submodule of a MONAI UNet: the bottom (bottleneck) block.

    Its output has ``channels[-1]`` channels at ``1 / prod(strides)`` of the input size.
    """
    inner = None
    for m in unet.modules():
        if isinstance(m, SkipConnection):
            inner = m  # modules() walks outer to inner, so the last one found is the innermost
    if inner is None:
        raise ValueError("network has no SkipConnection: not a MONAI UNet")
    return inner.submodule


class FeatureUNet(UNet):
    """MONAI ``UNet`` (same arguments, same ``forward``) that also exposes its bottleneck features.

    - ``forward(x)`` returns the reconstruction only (inferers, ``verify_net_in_out``, TorchScript);
    - ``forward_with_features(x) -> (y, f)``: the reconstruction and the bottleneck output ``f_enc(x)``,
      shape ``(B, channels[-1], H / prod(strides), W / prod(strides))``;
    - ``bottleneck``: the bottleneck module, for a forward hook when the network is wrapped
      (a wrapped network, e.g. DDP: :func:`forward_with_features` hooks the inner UNet and calls the wrapper).

    No output activation (see the module docstring): clamp to [0, 1] at inference.
    """

    __jit_unused_properties__ = ["bottleneck"]

    @property
    def bottleneck(self) -> torch.nn.Module:
        return find_bottleneck(self)

    @torch.jit.unused
    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(x), bottleneck output)``; gradients flow through both (eager mode only)."""
        return forward_with_features(self, x)


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel`` wrappers."""
    while isinstance(network, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        network = network.module
    return network


def model_state(checkpoint):
    """The network ``state_dict`` of a loaded checkpoint: ``checkpoint["model"]`` when it is wrapped as
    ``{"model": state_dict, ...}``, else ``checkpoint`` itself (a bare ``state_dict``, as MONAI's
    ``CheckpointSaver`` writes a single object). ``model_state(c) is not c`` tells whether it was wrapped."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        return checkpoint["model"]
    return checkpoint


def forward_with_features(network: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``network(x)`` -- through any DDP wrapper, so gradients stay synchronised -- and capture the
    bottleneck output with a forward hook on the bottleneck of the (unwrapped) MONAI UNet."""
    store: list[torch.Tensor] = []
    handle = find_bottleneck(unwrap(network)).register_forward_hook(lambda _m, _i, out: store.append(out))
    try:
        y = network(x)
    finally:
        handle.remove()
    return y, store[-1]
