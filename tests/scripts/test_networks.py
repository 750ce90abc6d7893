"""FeatureUNet: same behaviour as MONAI's UNet, bottleneck features, TorchScript export."""

from __future__ import annotations

import pytest
import torch
from monai.networks import convert_to_torchscript
from monai.networks.nets import UNet

from scripts.networks import FeatureUNet, find_bottleneck
from tests.helpers import REPO

TINY = dict(spatial_dims=2, in_channels=1, out_channels=1, channels=(4, 8, 16), strides=(2, 2), num_res_units=2)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    plain = UNet(**TINY).eval()
    net = FeatureUNet(**TINY).eval()
    net.load_state_dict(plain.state_dict())  # same keys: strict load succeeds
    return plain, net


def test_same_output_and_state_dict_as_monai_unet(pair):
    plain, net = pair
    assert set(plain.state_dict()) == set(net.state_dict())
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain(x), rtol=0, atol=0)
        y, _ = net.forward_with_features(x)
    torch.testing.assert_close(y, plain(x), rtol=0, atol=0)
    UNet(**TINY).load_state_dict(net.state_dict())  # and back


def test_bottleneck_features_shape_and_gradient(pair):
    _, net = pair
    x = torch.rand(3, 1, 32, 32)
    y, f = net.forward_with_features(x)
    assert y.shape == x.shape
    assert f.shape == (3, TINY["channels"][-1], 32 // 4, 32 // 4)
    assert net.bottleneck is find_bottleneck(net)
    f.pow(2).mean().backward()  # features are part of the graph: gradient reaches the encoder
    enc = next(net.model.children())  # first down block
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    net.zero_grad()
    assert not net.bottleneck._forward_hooks  # the hook is removed


def test_default_network_of_train_config():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "train.json"))
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, FeatureUNet) and tuple(net.channels) == (32, 64, 128, 256, 512)
    assert tuple(net.strides) == (2, 2, 2, 2) and net.num_res_units == 2
    with torch.no_grad():
        y, f = net.eval().forward_with_features(torch.rand(1, 1, 64, 64))
    assert y.shape == (1, 1, 64, 64) and f.shape == (1, 512, 4, 4)


def test_find_bottleneck_rejects_other_networks():
    with pytest.raises(ValueError, match="SkipConnection"):
        find_bottleneck(torch.nn.Conv2d(1, 1, 3))


@pytest.mark.parametrize("use_trace", [False, True])
def test_torchscript_export(pair, use_trace, tmp_path):
    _, net = pair
    x = torch.rand(2, 1, 32, 32)
    path = tmp_path / "model.ts"
    ts = convert_to_torchscript(net, filename_or_obj=str(path), verify=True, inputs=[x], use_trace=use_trace)
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        ref = net(x)
        torch.testing.assert_close(ts(x), ref)
        torch.testing.assert_close(loaded(x), ref)
        x2 = torch.rand(1, 1, 64, 64)  # other batch and image sizes also work after tracing (no shape branches)
        torch.testing.assert_close(loaded(x2), net(x2))
