"""Evaluation metrics against hand-computed values; the per-image mask rule; calibration; ignite metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from custom_transforms.anomaly import anomaly_map, calibrate_threshold, image_score, paper_mask, threshold_mask
from scripts.metrics import dice_micro, dice_per_image, dice_score, image_auroc_ap, pr_curve_points, roc_curve_points


def test_anomaly_map_and_scores():
    img = np.array([[0.0, 0.5], [1.0, 0.2]], np.float32)
    rec = np.array([[0.1, 0.5], [0.6, 0.2]], np.float32)
    np.testing.assert_allclose(anomaly_map(img, rec), [[0.1, 0.0], [0.4, 0.0]], atol=1e-6)
    assert image_score(img, rec, "mse") == pytest.approx((0.01 + 0.16) / 4)
    assert image_score(img, rec, "mean_abs") == pytest.approx(0.5 / 4)
    assert image_score(img, rec, "topk_mean") == pytest.approx(0.4)  # 1 % of 4 pixels -> the top 1
    assert image_score(img, rec, "topk_mean", topk_fraction=0.5) == pytest.approx(0.25)
    # a stack gives one score per image, the same as scoring each image alone; torch in, torch out
    stack = torch.tensor(np.stack([img, rec]))[:, None]
    recs = torch.tensor(np.stack([rec, rec]))[:, None]
    s = image_score(stack, recs, "mse")
    assert isinstance(s, torch.Tensor) and s.shape == (2,)
    assert s[0].item() == pytest.approx(image_score(img, rec, "mse")) and s[1].item() == 0.0
    with pytest.raises(ValueError, match="kind"):
        image_score(img, rec, "max")


def test_paper_mask_rule_per_image():
    a = np.array([[0.0, 0.02], [0.1, 0.5]], np.float32)  # max 0.5 -> threshold max(0.03, 0.1) = 0.1
    np.testing.assert_array_equal(paper_mask(a), [[False, False], [True, True]])
    low = np.array([[0.0, 0.02], [0.031, 0.04]], np.float32)  # 0.2 * 0.04 < floor 0.03
    np.testing.assert_array_equal(paper_mask(low), [[False, False], [True, True]])
    assert not paper_mask(np.zeros((3, 3))).any()


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_paper_mask_independent_of_batch_composition(lib):
    rng = np.random.default_rng(0)
    batch = rng.uniform(0, 0.2, (4, 1, 16, 16)).astype(np.float32)
    other = batch.copy()
    other[1:] *= 5.0  # very different companions (the batch max changes a lot)
    conv = torch.as_tensor if lib == "torch" else np.asarray
    m1, m2 = paper_mask(conv(batch)), paper_mask(conv(other))
    single = paper_mask(conv(batch[0, 0]))
    assert m1.shape == batch.shape
    np.testing.assert_array_equal(np.asarray(m1[0]), np.asarray(m2[0]))
    np.testing.assert_array_equal(np.asarray(m1[0, 0]), np.asarray(single))
    # whereas a batch-wide max (the published code) would have changed the first image's mask
    assert not np.array_equal(batch[0] >= 0.2 * batch.max(), other[0] >= 0.2 * other.max())


def test_calibrate_threshold_quantiles_and_region():
    maps = np.arange(100, dtype=np.float32).reshape(1, 10, 10) / 100.0  # values 0.00 .. 0.99
    assert calibrate_threshold(maps, 0.5) == pytest.approx(0.495)
    thr = calibrate_threshold(maps, 0.9)
    assert (maps >= thr).mean() == pytest.approx(0.1)  # ~1 - q of the healthy pixels flagged
    assert calibrate_threshold(maps, 0.99) > thr  # higher quantile, higher threshold
    region = np.zeros_like(maps)
    region[0, :5] = 1  # only values 0.00 .. 0.49 count
    assert calibrate_threshold(maps, 0.5, region=region) == pytest.approx(0.245)
    assert calibrate_threshold(torch.as_tensor(maps), 0.5) == pytest.approx(0.495)
    for q in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="quantile"):
            calibrate_threshold(maps, q)
    with pytest.raises(ValueError, match="no pixels"):
        calibrate_threshold(maps, 0.5, region=np.zeros_like(maps))
    with pytest.raises(ValueError, match="shape"):
        calibrate_threshold(maps, 0.5, region=np.ones((10, 10)))


def test_threshold_mask():
    a = np.array([[0.1, 0.3], [0.5, 0.7]])
    np.testing.assert_array_equal(threshold_mask(a, 0.3), [[False, True], [True, True]])
    region = np.array([[1, 1], [0, 1]])
    np.testing.assert_array_equal(threshold_mask(a, 0.3, region), [[False, True], [False, True]])
    tm = threshold_mask(torch.as_tensor(a), 0.3, region)
    assert isinstance(tm, torch.Tensor) and tm.tolist() == [[False, True], [False, True]]


def test_auroc_ap_known_case():
    labels = [0, 0, 1, 1]
    scores = [0.1, 0.4, 0.35, 0.8]
    auroc, ap = image_auroc_ap(scores, labels)
    assert auroc == pytest.approx(0.75)  # 3 of the 4 (diseased, healthy) pairs ranked correctly
    assert ap == pytest.approx(0.5 * 1.0 + 0.5 * (2 / 3))  # recall 0.5 at precision 1, recall 1 at 2/3
    assert image_auroc_ap([1, 2, 3, 4], [0, 0, 1, 1]) == (1.0, 1.0)
    fpr, tpr, _ = roc_curve_points(scores, labels)
    assert fpr[0] == 0 and tpr[-1] == 1 and np.trapezoid(tpr, fpr) == pytest.approx(0.75)
    rec, prec, _ = pr_curve_points(scores, labels)
    assert rec.shape == prec.shape and rec.max() == 1.0
    with pytest.raises(ValueError, match="one class"):
        image_auroc_ap([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="labels"):
        image_auroc_ap([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="scores for"):
        image_auroc_ap([0.1, 0.2, 0.3], [0, 1])


def test_dice_micro_vs_per_image():
    p = np.zeros((3, 1, 2, 2), bool)
    g = np.zeros((3, 1, 2, 2), bool)
    g[0, 0, 0] = True  # 2 GT pixels, predicted exactly -> Dice 1
    p[0, 0, 0] = True
    g[1, 0, :, :] = True  # 4 GT pixels, 1 predicted -> Dice 2 * 1 / 5 = 0.4
    p[1, 0, 0, 0] = True
    p[2, 0, 1, 1] = True  # empty GT, one false positive: left out per image, counts in micro
    assert dice_per_image(p, g) == pytest.approx((1.0 + 0.4) / 2)
    assert dice_micro(p, g) == pytest.approx(2 * 3 / (4 + 6))
    # an empty prediction on an image with a lesion scores 0
    assert dice_per_image(np.zeros((1, 4, 4)), np.ones((1, 4, 4))) == 0.0
    assert dice_micro(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    with pytest.raises(ValueError, match="non-empty"):
        dice_per_image(p[2:], g[2:])
    assert dice_score(p[2], g[2]) == 0.0 and dice_score(g[2], g[2]) == 1.0 and dice_score(p[1], g[1]) == 0.4
    # float and torch masks (> 0.5 is foreground)
    assert dice_micro(torch.as_tensor(p, dtype=torch.float32), g.astype(np.float32)) == dice_micro(p, g)
