"""ART-ASyn losses: hand-computed values, gradient flow into the network, term skipping, argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from scripts.losses import (
    ARTASynLoss,
    feature_alignment_loss,
    global_loss,
    local_loss,
    soft_anomaly_mask,
    soft_dice_loss,
)
from scripts.networks import FeatureUNet


def t(*rows):
    """A (1, 1, H, W) tensor from rows."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


# -- values ------------------------------------------------------------------------------------------------
def test_local_loss_paper_per_sample_and_clean_samples_excluded():
    target = torch.zeros(3, 1, 2, 2)
    recon = torch.zeros(3, 1, 2, 2)
    mask = torch.zeros(3, 1, 2, 2)
    recon[0, 0, 0, 0], mask[0, 0, 0, 0] = 0.5, 1.0  # sample 0: one masked pixel, err 0.25 -> 0.25
    recon[1, 0] = 0.1
    recon[1, 0, 1, 1] = 0.3
    mask[1, 0, 1] = 1.0  # sample 1: mask row 1 (errs 0.01, 0.09) -> 0.05
    recon[2] = 0.9  # sample 2 is clean (empty mask): excluded, its error does not count
    got = local_loss(recon, target, mask)
    assert got.item() == pytest.approx((0.25 + 0.05) / 2, rel=1e-5)
    # authors: 2 * mean over all pixels of the batch of err * M = 2 * (0.25 + 0.1) / 12
    assert local_loss(recon, target, mask, mode="authors").item() == pytest.approx(2 * 0.35 / 12, rel=1e-5)


def test_local_loss_all_clean_is_zero_and_attached():
    recon = torch.rand(2, 1, 4, 4, requires_grad=True)
    got = local_loss(recon, torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4))
    assert got.item() == 0.0 and got.requires_grad
    got.backward()
    with pytest.raises(ValueError, match="mode"):
        local_loss(recon, recon, recon, mode="x")


def test_global_loss():
    assert global_loss(t([0.0, 1.0], [0.5, 0.5]), t([0.0, 0.0], [0.0, 1.0])).item() == pytest.approx(
        (0 + 1 + 0.25 + 0.25) / 4)


def test_feature_alignment_loss_values_and_detach():
    a = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 2.0], [6.0, 8.0]])  # orthogonal (loss 1), parallel at another scale (loss 0)
    assert feature_alignment_loss(a, b).item() == pytest.approx(0.5, abs=1e-6)
    assert feature_alignment_loss(-a, a).item() == pytest.approx(2.0, abs=1e-6)  # flattened (B, C, H, W) also
    assert feature_alignment_loss(torch.ones(2, 3, 2, 2), torch.ones(2, 3, 2, 2)).item() == pytest.approx(0, abs=1e-6)
    fs, fn = torch.randn(2, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)
    feature_alignment_loss(fs, fn).backward()
    assert fs.grad is not None and fn.grad is None
    fs2, fn2 = fs.detach().clone().requires_grad_(), fn.detach().clone().requires_grad_()
    feature_alignment_loss(fs2, fn2, detach_target=False).backward()
    assert fn2.grad is not None and fn2.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shapes"):
        feature_alignment_loss(torch.ones(2, 3), torch.ones(2, 4))


def test_soft_mask_and_dice_values():
    syn = t([0.0, 1.0])
    recon = t([0.0, 0.0])  # squared errors 0 and 1
    m = soft_anomaly_mask(recon, syn, tau=0.2, temperature=0.05)
    s0, s1 = 1 / (1 + math.exp(4.0)), 1 / (1 + math.exp(-16.0))
    torch.testing.assert_close(m, t([s0, s1]))
    z = soft_anomaly_mask(recon, syn, tau=0.2, temperature=0.05, zero_floor=True)
    torch.testing.assert_close(z, t([0.0, (s1 - s0) / (1 - s0)]))
    torch.testing.assert_close(soft_anomaly_mask(recon, syn, hard=True), t([0.0, 1.0]))
    mask = t([0.0, 1.0])
    want = 1 - (2 * s1 + 1) / (s0 + s1 + 1 + 1)
    assert soft_dice_loss(recon, syn, mask).item() == pytest.approx(want, rel=1e-5)
    assert soft_dice_loss(recon, syn, mask, hard=True).item() == pytest.approx(0.0, abs=1e-7)
    # clean sample (M = 0), nothing flagged by the hard mask: loss 0; flagged pixel: 1 - 1 / (1 + 1)
    assert soft_dice_loss(recon, recon, torch.zeros_like(mask), hard=True).item() == 0.0
    assert soft_dice_loss(recon, syn, torch.zeros_like(mask), hard=True).item() == pytest.approx(0.5)
    # per sample, then mean over the batch
    both = soft_dice_loss(torch.cat([recon, recon]), torch.cat([syn, syn]), torch.cat([mask, 0 * mask]), hard=True)
    assert both.item() == pytest.approx((0.0 + 0.5) / 2)


# -- ARTASynLoss -------------------------------------------------------------------------------------------
def _batch(seed=0, b=2, size=8):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(b, 1, size, size, generator=g)
    mask = torch.zeros(b, 1, size, size)
    mask[0, 0, 2:5, 2:5] = 1.0  # sample 1 stays clean
    synthetic = (target + 0.6 * mask).clamp(0, 1)
    recon = torch.rand(b, 1, size, size, generator=g)
    return recon, target, synthetic, mask, torch.randn(b, 5, generator=g), torch.randn(b, 5, generator=g)


def test_total_is_weighted_sum_of_terms():
    recon, target, syn, mask, fs, fn = _batch()
    loss = ARTASynLoss(w_local=0.5, w_global=2.0, w_feat=3.0, w_dice=0.25)
    out = loss(recon, target, syn, mask, fs, fn)
    assert set(out) == {"loss", "local", "global", "feat", "dice"}
    torch.testing.assert_close(out["local"], local_loss(recon, target, mask))
    torch.testing.assert_close(out["global"], global_loss(recon, target))
    torch.testing.assert_close(out["feat"], feature_alignment_loss(fs, fn))
    torch.testing.assert_close(out["dice"], soft_dice_loss(recon, syn, mask, 0.2, 0.05))
    want = 0.5 * out["local"] + 2 * out["global"] + 3 * out["feat"] + 0.25 * out["dice"]
    torch.testing.assert_close(out["loss"], want)


def test_zero_weight_skips_term(monkeypatch):
    import scripts.losses as L

    def boom(*a, **k):
        raise AssertionError("a term with weight 0 was computed")

    monkeypatch.setattr(L, "soft_dice_loss", boom)
    monkeypatch.setattr(L, "feature_alignment_loss", boom)
    recon, target, syn, mask, _, _ = _batch()
    out = ARTASynLoss(w_feat=0, w_dice=0)(recon, target, syn, mask)  # no features needed either
    assert set(out) == {"loss", "local", "global"}
    torch.testing.assert_close(out["loss"], out["local"] + out["global"])


@pytest.mark.parametrize("kwargs", [
    dict(w_local=-1.0), dict(w_dice=float("nan")), dict(w_global="1"), dict(w_local=0, w_global=0, w_feat=0, w_dice=0),
    dict(tau=0.0), dict(tau=1.0), dict(tau=-0.1), dict(temperature=0.0), dict(temperature=-1.0),
    dict(local_mode="mean"), dict(dice_smooth=0.0),
])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        ARTASynLoss(**kwargs)


def test_forward_checks():
    recon, target, syn, mask, fs, fn = _batch()
    with pytest.raises(ValueError, match="features"):
        ARTASynLoss()(recon, target, syn, mask)
    with pytest.raises(ValueError, match="mask shape"):
        ARTASynLoss()(recon, target, syn, mask[:, :, :4], fs, fn)


# -- gradients reach the network ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return FeatureUNet(2, 1, 1, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


def _net_batch():
    g = torch.Generator().manual_seed(1)
    target = torch.rand(2, 1, 32, 32, generator=g) * 0.5
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, 0, 8:20, 10:22] = 1.0
    synthetic = target + 0.5 * mask
    return target, synthetic, mask


def _grad_norm(net):
    return sum(float(p.grad.abs().sum()) for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("term", ["local", "global", "feat", "dice"])
def test_each_term_alone_trains_the_network(tiny_net, term):
    target, syn, mask = _net_batch()
    weights = {f"w_{k}": float(k == term) for k in ("local", "global", "feat", "dice")}
    loss_fn = ARTASynLoss(**weights, tau=0.1, temperature=0.05)
    tiny_net.zero_grad(set_to_none=True)
    recon, f_syn = tiny_net.forward_with_features(syn)
    with torch.no_grad():
        _, f_norm = tiny_net.forward_with_features(target)
    out = loss_fn(recon, target, syn, mask, f_syn, f_norm)
    assert set(out) == {"loss", term}
    out["loss"].backward()
    assert _grad_norm(tiny_net) > 0


def test_hard_dice_passes_no_gradient(tiny_net):
    target, syn, mask = _net_batch()
    recon = tiny_net(syn)
    out = ARTASynLoss(w_local=0, w_global=0, w_feat=0, w_dice=1, hard_dice=True)(recon, target, syn, mask)
    assert not out["loss"].requires_grad  # nothing to back-propagate: the published Dice term trains nothing
    tiny_net.zero_grad(set_to_none=True)
    both = ARTASynLoss(w_local=0, w_global=1, w_feat=0, w_dice=1, hard_dice=True)
    out_g = both(tiny_net(syn), target, syn, mask)
    out_g["loss"].backward()
    g_both = [p.grad.clone() for p in tiny_net.parameters()]
    tiny_net.zero_grad(set_to_none=True)
    ARTASynLoss(w_local=0, w_global=1, w_feat=0, w_dice=0)(tiny_net(syn), target, syn, mask)["loss"].backward()
    for a, p in zip(g_both, tiny_net.parameters()):
        torch.testing.assert_close(a, p.grad)  # the hard Dice adds exactly nothing to the gradient
