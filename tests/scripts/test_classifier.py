"""AnatPaste's one-class classifier: network, feature density, Grad-CAM outputs, export and density fitting."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine

from scripts.classifier import (
    AnatPasteClassifier,
    DensityFitHandler,
    FeatureDensity,
    extract_features,
    ledoit_wolf_shrinkage,
)

SIZE = 64  # layer4 is 2x2 at 64 px


def make_net(seed: int = 0, **kwargs) -> AnatPasteClassifier:
    torch.manual_seed(seed)
    return AnatPasteClassifier(**kwargs)


def images(n: int, seed: int = 1, h: int = SIZE, w: int = SIZE) -> torch.Tensor:
    return torch.rand(n, 1, h, w, generator=torch.Generator().manual_seed(seed))


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1)


def round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True, map_location="cpu")


@pytest.fixture(scope="module")
def fitted():
    """An eval-mode classifier with a KDE fitted on a few images."""
    net = make_net().eval()
    with torch.no_grad():
        net.density.fit(net.embed(images(6, seed=2)))
    return net


# --- network --------------------------------------------------------------------------------------------------


def test_logits_gradients_and_unit_embedding():
    net = make_net().train()
    x, y = images(4), torch.tensor([0, 1, 0, 1])
    logits = net(x)
    assert logits.shape == (4, 2)
    F.cross_entropy(logits, y).backward()
    for name, p in [*net.backbone.named_parameters("backbone"), *net.head.named_parameters("head")]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    linears = [m for m in net.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 512), (512, 128), (128, 2)]  # three FCs
    with torch.no_grad():
        f = net.eval().embed(x)
    assert f.shape == (4, 512)
    torch.testing.assert_close(f.norm(dim=1), torch.ones(4))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="parzen") as e:
        AnatPasteClassifier(density="parzen")
    assert "parzen" in str(e.value) and "hparams#density" in str(e.value) and "kde" in str(e.value)
    with pytest.raises(ValueError, match="head_dims"):
        AnatPasteClassifier(head_dims=(256, 128))
    with pytest.raises(ValueError, match="bandwidth"):
        FeatureDensity(bandwidth=0.0)


# --- feature density ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["kde", "gaussian"])
def test_density_prefers_the_cluster_centre(kind):
    g = torch.Generator().manual_seed(0)
    centre = unit(torch.ones(1, 16))
    cluster = unit(centre + 0.1 * torch.randn(40, 16, generator=g))
    density = FeatureDensity(kind).fit(cluster)
    assert density.fitted
    log_p = density(torch.cat([centre, -centre]))
    assert log_p.shape == (2,) and torch.isfinite(log_p).all()
    assert log_p[0] > log_p[1]


def test_kde_matches_hand_computation():
    bank = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    q = torch.tensor([[0.6, 0.8, 0.0]])
    h = 0.5
    d2 = np.array([(0.6 - 1) ** 2 + 0.8**2, 0.6**2 + (0.8 - 1) ** 2])
    expected = math.log(np.mean(np.exp(-d2 / (2 * h * h)))) - 1.5 * math.log(2 * math.pi * h * h)
    got = FeatureDensity("kde", bandwidth=h).fit(bank)(q)
    assert got.item() == pytest.approx(expected, abs=1e-5)
    from sklearn.neighbors import KernelDensity  # the same normalised Gaussian KDE

    ref = KernelDensity(bandwidth=h).fit(bank.numpy()).score_samples(q.numpy())
    assert got.item() == pytest.approx(float(ref[0]), abs=1e-5)


def test_gaussian_matches_scipy_and_ledoit_wolf_matches_sklearn():
    from scipy.stats import multivariate_normal
    from sklearn.covariance import LedoitWolf

    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 5, generator=g) @ torch.randn(5, 5, generator=g)
    q = torch.randn(4, 5, generator=g)
    got = FeatureDensity("gaussian", shrinkage=0.0).fit(x)(q)
    ref = multivariate_normal(x.mean(0).double().numpy(), np.cov(x.double().numpy().T, bias=True)).logpdf(q.numpy())
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-3)
    few = torch.randn(10, 32, generator=g).double()  # fewer samples than dimensions
    lw = LedoitWolf().fit(few.numpy())
    assert ledoit_wolf_shrinkage(few - few.mean(0)) == pytest.approx(lw.shrinkage_, rel=1e-6)
    density = FeatureDensity("gaussian", shrinkage=None).fit(few)
    np.testing.assert_allclose(density.precision.double().numpy(), lw.precision_, rtol=1e-3, atol=1e-3)


def test_density_errors():
    with pytest.raises(RuntimeError, match="density not fitted"):
        FeatureDensity("kde")(torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match="density not fitted"):
        FeatureDensity("gaussian")(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureDensity().fit(torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        FeatureDensity().fit(torch.randn(3, 4))(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="singular"):
        FeatureDensity("gaussian", shrinkage=0.0).fit(torch.randn(3, 8))
    with torch.no_grad(), pytest.raises(RuntimeError, match="density not fitted"):
        make_net().eval().score(images(2))


@pytest.mark.parametrize("kind", ["kde", "gaussian"])
def test_state_dict_round_trip_into_an_unfitted_network(kind):
    net = make_net(density=kind).eval()
    x = images(3, seed=5)
    with torch.no_grad():
        net.density.fit(net.embed(images(6, seed=4)))
        expected = net.score(x)
    fresh = make_net(seed=9, density=kind).eval()
    assert not fresh.density.fitted
    fresh.load_state_dict(round_trip(net.state_dict()))  # strict: same keys, buffers resized
    assert fresh.density.fitted
    with torch.no_grad():
        torch.testing.assert_close(fresh.score(x), expected)  # float32 at |score| ~ 1e4
    fresh.load_state_dict(make_net().state_dict())  # and back to unfitted
    assert not fresh.density.fitted


def test_loading_a_density_of_the_other_kind_warns(caplog):
    kde = FeatureDensity("kde").fit(unit(torch.randn(4, 8)))
    gaussian = FeatureDensity("gaussian")
    with caplog.at_level("WARNING", logger="scripts.classifier"):
        gaussian.load_state_dict(kde.state_dict())
    assert "fitted kde density" in caplog.text and not gaussian.fitted


# --- Grad-CAM and scores --------------------------------------------------------------------------------------


def test_anomaly_outputs_under_no_grad(fitted):
    net = fitted
    x = images(2, seed=7, h=SIZE, w=48)
    net.train()
    net.backbone.bn1.eval()  # a mixed mode must survive
    first = next(net.parameters())
    first.grad = torch.ones_like(first)  # a pending gradient must survive too
    try:
        with torch.no_grad():
            out = net.anomaly_outputs(x)
            soft = net.anomaly_outputs(x, score="softmax")
        assert net.training and not net.backbone.bn1.training and net.head.training
        torch.testing.assert_close(first.grad, torch.ones_like(first))
        assert all(p.grad is None for p in list(net.parameters())[1:])
        assert all(p.requires_grad for p in net.parameters())
    finally:
        first.grad = None
        net.eval()
    amap = out["amap"]
    assert amap.shape == (2, 1, SIZE, 48) and torch.isfinite(amap).all()
    assert amap.min() >= 0 and amap.max() <= 1
    assert not amap.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(out["score"], net.score(x))  # scores come from eval mode
        torch.testing.assert_close(soft["score"], net(x).softmax(1)[:, 1])
    assert ((soft["score"] >= 0) & (soft["score"] <= 1)).all()
    torch.testing.assert_close(soft["amap"], amap)
    assert not net.backbone.layer4._forward_hooks and not net._forward_hooks  # hooks removed


def test_anomaly_outputs_matches_a_hand_grad_cam(fitted):
    net = fitted
    x = images(2, seed=8)
    acts = {}
    handle = net.backbone.layer4.register_forward_hook(lambda _m, _i, out: acts.__setitem__("a", out))
    try:
        logits = net(x)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[:, 1].sum(), acts["a"])
    cam = F.relu((grad.mean((2, 3), keepdim=True) * acts["a"]).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear")
    lo, hi = cam.amin((1, 2, 3), keepdim=True), cam.amax((1, 2, 3), keepdim=True)
    expected = torch.where(hi > lo, (cam - lo) / (hi - lo).clamp_min(1e-30), torch.zeros_like(cam))
    torch.testing.assert_close(net.anomaly_outputs(x)["amap"], expected, atol=1e-5, rtol=0)


def test_anomaly_outputs_needs_a_fitted_density_and_a_known_score():
    net = make_net().eval()
    with pytest.raises(RuntimeError, match="density not fitted"):
        net.anomaly_outputs(images(1))
    with pytest.raises(ValueError, match="'max'"):
        net.anomaly_outputs(images(1), score="max")


# --- export ---------------------------------------------------------------------------------------------------


def test_torchscript_forward_and_score(fitted):
    x = images(2, seed=11)
    scripted = torch.jit.script(fitted)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    traced = torch.jit.trace(fitted, x)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), fitted(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(traced(x), fitted(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded.embed(x), fitted.embed(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded.score(x), fitted.score(x), atol=1e-4, rtol=1e-6)


# --- pretrained backbone --------------------------------------------------------------------------------------


def test_pretrained_backbone(tmp_path, fitted):
    x = images(2, seed=12)
    path = tmp_path / "backbone.pt"
    torch.save(fitted.backbone.state_dict(), path)
    wrapped = tmp_path / "checkpoint.pt"
    torch.save({"model": fitted.state_dict()}, wrapped)
    with torch.no_grad():
        for p in (path, wrapped):
            other = make_net(seed=5, pretrained_path=str(p)).eval()
            torch.testing.assert_close(other.embed(x), fitted.embed(x), rtol=0, atol=0)
    bad = tmp_path / "rgb_backbone.pt"
    torch.save(make_net(in_channels=3).backbone.state_dict(), bad)
    with pytest.raises(ValueError, match="rgb_backbone.pt"):
        AnatPasteClassifier(pretrained_path=str(bad))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        AnatPasteClassifier(pretrained_path=str(tmp_path / "missing.pt"))


# --- density fitting after training ---------------------------------------------------------------------------


@pytest.mark.parametrize("wrapped", [True, False])
def test_density_fit_handler(tmp_path, wrapped):
    loader = [{"image": images(3, seed=20)}, {"image": images(2, seed=21)}]
    best = make_net(seed=1, density="gaussian").eval()
    ckpt = tmp_path / "model.pt"
    torch.save({"model": best.state_dict()} if wrapped else best.state_dict(), ckpt)
    net = make_net(seed=2, density="gaussian").train()  # the final weights differ from the best ones
    trainer = Engine(lambda engine, batch: None)
    DensityFitHandler(net, loader, ckpt).attach(trainer)
    trainer.run([0], max_epochs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left
    assert net.training  # mode restored
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = saved["model"] if wrapped else saved
    fresh = make_net(seed=3, density="gaussian").eval()
    fresh.load_state_dict(state)
    assert fresh.density.fitted and fresh.density.mean.shape == (512,)
    torch.testing.assert_close(state["backbone.conv1.weight"], best.backbone.conv1.weight)  # best weights kept
    x = images(2, seed=22)
    with torch.no_grad():
        torch.testing.assert_close(fresh.score(x), net.eval().score(x), rtol=1e-6, atol=1e-4)
        expected = best.density.fit(extract_features(best, loader)).forward(best.embed(x))
        torch.testing.assert_close(-fresh.score(x), expected, rtol=1e-6, atol=1e-4)


def test_density_fit_handler_without_checkpoint(tmp_path):
    loader = [{"image": images(2, seed=30)}]
    net = make_net()
    DensityFitHandler(net, loader, tmp_path / "sub" / "model.pt")()
    fresh = make_net(seed=4)
    fresh.load_state_dict(torch.load(tmp_path / "sub" / "model.pt", weights_only=True))
    assert fresh.density.bank.shape == (2, 512)
