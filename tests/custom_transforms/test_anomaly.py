"""AnomalyPostd (maps, scores, per-image masks, regions) and the evaluation handler's helpers.

Hand-computed values; the per-image mask rule must not depend on the other images of a batch; the
calibrated threshold is the quantile of held-out healthy maps; metrics.json, plots and MLflow logging.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from custom_transforms.anomaly import AnomalyPostd, dilate_region


def item(img, pred, **extra):
    f32 = torch.float32
    return {"image": torch.as_tensor(img, dtype=f32), "pred": torch.as_tensor(pred, dtype=f32), **extra}


# ------------------------------------------------------------------------------------------- AnomalyPostd

def test_maps_score_and_paper_mask_by_hand():
    img = torch.zeros(1, 4, 4)
    pred = torch.zeros(1, 4, 4)
    pred[0, 0, 0] = 1.5  # clamped to 1 -> A = 1.0
    pred[0, 1, 1] = 0.25
    pred[0, 2, 2] = 0.1
    pred[0, 3, 3] = -0.4  # clamped to 0 -> A = 0
    img[0, 3, 0] = 0.02  # A = 0.02
    d = AnomalyPostd()(item(img, pred, name="a.png"))
    expected_amap = torch.zeros(1, 4, 4)
    for (r, c), v in {(0, 0): 1.0, (1, 1): 0.25, (2, 2): 0.1, (3, 0): 0.02}.items():
        expected_amap[0, r, c] = v
    torch.testing.assert_close(d["amap"], expected_amap)
    assert d["score"].shape == (1,)
    assert d["score"].item() == pytest.approx((1.0 + 0.0625 + 0.01 + 0.0004) / 16)
    # paper rule: A >= max(0.03, 0.2 * max A) = 0.2 -> the 1.0 and 0.25 pixels
    assert d["pred_mask"].dtype == torch.float32 and d["pred_mask"].shape == (1, 4, 4)
    assert torch.nonzero(d["pred_mask"][0]).tolist() == [[0, 0], [1, 1]]
    assert d["name"] == "a.png" and "is_synthetic" not in d  # other keys pass through; no mask_key, no flags


def test_map_outputs_are_taken_as_they_are():
    """A model with its own map and score (AnatPaste's classifier) gets the same mask rules, no restoration maths."""
    amap = torch.zeros(1, 4, 4)
    amap[0, 0, 0], amap[0, 1, 1], amap[0, 2, 2] = 1.0, 0.5, 0.1
    d = AnomalyPostd(score="mse")(item(torch.rand(1, 4, 4), torch.zeros(1, 4, 4)) | {
        "pred": {"amap": amap, "score": torch.tensor(7.5)}})
    torch.testing.assert_close(d["amap"], amap)
    assert d["score"].tolist() == [7.5]  # not an MSE of image and map
    assert torch.nonzero(d["pred_mask"][0]).tolist() == [[0, 0], [1, 1]]  # >= max(0.03, 0.2 x 1.0)
    with pytest.raises(KeyError, match="lacks \\['score'\\]"):
        AnomalyPostd()({"image": torch.zeros(1, 4, 4), "pred": {"amap": amap}})
    with pytest.raises(ValueError, match="anomaly map shape"):
        AnomalyPostd()({"image": torch.zeros(1, 4, 4), "pred": {"amap": torch.zeros(1, 2, 2), "score": 1.0}})


def test_anomaly_inferer_dispatches_by_family():
    from scripts.engine import AnomalyInferer

    class MapNet(torch.nn.Module):
        def forward(self, x):
            return x.mean((1, 2, 3))

        def anomaly_outputs(self, x, score="density"):
            return {"amap": x, "score": torch.full((x.shape[0],), 1.0 if score == "density" else 0.5)}

    x = torch.rand(2, 1, 8, 8)
    restoration = torch.nn.Identity()
    assert torch.equal(AnomalyInferer()(x, restoration), x)
    assert AnomalyInferer("softmax")(x, MapNet())["score"].tolist() == [0.5, 0.5]
    assert AnomalyInferer()(x, MapNet())["score"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="classifier_score"):
        AnomalyInferer("logit")


def test_floor_applies_to_faint_maps():
    img = torch.zeros(1, 2, 2)
    pred = torch.tensor([[[0.04, 0.02], [0.025, 0.0]]])  # 0.2 * max = 0.008 < floor 0.03
    m = AnomalyPostd()(item(img, pred))["pred_mask"]
    assert m.tolist() == [[[1.0, 0.0], [0.0, 0.0]]]
    m = AnomalyPostd(floor=0.0, rel=0.5)(item(img, pred))["pred_mask"]
    assert m.tolist() == [[[1.0, 1.0], [1.0, 0.0]]]


def test_region_restricts_the_paper_rule():
    img = torch.zeros(1, 6, 6)
    pred = torch.zeros(1, 6, 6)
    pred[0, 0, 0] = 1.0  # strongest error, outside the lung even after a 1-px dilation
    pred[0, 1, 1] = 0.3  # just outside the lung, inside its 1-px dilation
    pred[0, 3, 3] = 0.5  # inside
    pred[0, 3, 4] = 0.05  # inside, below 0.2 * 0.5 = 0.1
    lung = torch.zeros(1, 6, 6, dtype=torch.uint8)
    lung[0, 2:5, 2:5] = 2
    m = AnomalyPostd(region_key="lung")(item(img, pred, lung=lung))["pred_mask"][0]
    assert torch.nonzero(m).tolist() == [[3, 3]]  # threshold from the max inside the region (0.5), not 1.0
    m = AnomalyPostd(region_key="lung", region_dilation=1)(item(img, pred, lung=lung))["pred_mask"][0]
    assert torch.nonzero(m).tolist() == [[1, 1], [3, 3]]
    m = AnomalyPostd()(item(img, pred, lung=lung))["pred_mask"][0]  # no region: max 1.0 -> threshold 0.2
    assert torch.nonzero(m).tolist() == [[0, 0], [1, 1], [3, 3]]


def test_fixed_threshold_with_region():
    img = torch.zeros(1, 3, 3)
    pred = torch.tensor([[[0.1, 0.3, 0.5], [0.2, 0.4, 0.6], [0.0, 0.35, 0.9]]])
    lung = torch.ones(1, 3, 3)
    lung[0, :, 2] = 0
    m = AnomalyPostd(threshold=0.3, region_key="lung")(item(img, pred, lung=lung))["pred_mask"][0]
    assert m.tolist() == [[0, 1, 0], [0, 1, 0], [0, 1, 0]]
    m = AnomalyPostd(threshold=0.3)(item(img, pred))["pred_mask"][0]
    assert m.tolist() == [[0, 1, 1], [0, 1, 1], [0, 1, 1]]


def test_mask_key_writes_target_and_flag():
    img, pred = torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)
    mask = torch.zeros(1, 4, 4)
    mask[0, 1, 1] = 1
    post = AnomalyPostd(mask_key="mask")
    d = post(item(img, pred, mask=mask))
    torch.testing.assert_close(d["target_mask"], mask)
    assert d["is_synthetic"].tolist() == [1.0]
    assert post(item(img, pred, mask=torch.zeros(1, 4, 4)))["is_synthetic"].tolist() == [0.0]


def test_soft_synthetic_labels_are_binarised_for_validation():
    """NSA/FPI/AnatPaste write soft labels; the validation target is ``mask >= target_threshold``."""
    img, pred = torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)
    soft = torch.tensor([[[0.0, 0.2, 0.5, 0.9]] * 4])
    d = AnomalyPostd(mask_key="mask")(item(img, pred, mask=soft))
    torch.testing.assert_close(d["target_mask"], (soft >= 0.5).float())
    faint = AnomalyPostd(mask_key="mask", target_threshold=0.95)(item(img, pred, mask=soft))
    assert faint["is_synthetic"].tolist() == [0.0] and not faint["target_mask"].any()
    with pytest.raises(ValueError, match="mask_target_threshold"):
        AnomalyPostd(mask_key="mask", target_threshold=0.0)


def test_bad_arguments_and_missing_keys():
    for kw in ({"floor": -0.1}, {"rel": 1.5}, {"rel": -0.1}):
        with pytest.raises(ValueError, match="floor"):
            AnomalyPostd(**kw)
    with pytest.raises(KeyError, match="'pred'.*available keys"):
        AnomalyPostd()({"image": torch.zeros(1, 2, 2)})


def test_dilate_region():
    lung = torch.zeros(2, 1, 7, 7, dtype=torch.uint8)
    lung[0, 0, 3, 3] = 1
    lung[1, 0, 0, 0] = 2
    assert dilate_region(lung, 0).dtype == torch.float32
    torch.testing.assert_close(dilate_region(lung, 0), (lung > 0).float())
    d = dilate_region(lung, 1)
    assert d.shape == lung.shape
    assert d[0, 0].sum() == 9 and d[0, 0, 2:5, 2:5].all()  # a 3 x 3 square around the pixel
    assert d[1, 0].sum() == 4 and d[1, 0, :2, :2].all()  # clipped at the border, images stay separate


# ----------------------------------------------------------------------------------- batch independence

class Half(torch.nn.Module):
    """A stand-in restoration network: I_hat = I / 2, so A = I / 2 differs from image to image."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return 0.5 * x + 0.0 * self.w


def _evaluate(images, batch_size, post):
    """Run a MONAI SupervisedEvaluator over ``images``; return the per-item outputs."""
    from ignite.engine import Events
    from monai.data import DataLoader
    from monai.engines import SupervisedEvaluator

    data = [{"image": torch.as_tensor(im)[None], "label": torch.as_tensor(im)[None]} for im in images]
    loader = DataLoader(data, batch_size=batch_size)
    ev = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=Half(),
                             postprocessing=post)
    outs = []
    ev.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outs.extend(e.state.output))
    ev.run()
    return outs


def test_mask_independent_of_batch_composition_in_evaluator():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.0, 0.3, (16, 16)).astype(np.float32)  # a faint image
    # much brighter companions
    others = [rng.uniform(0.0, 1.0, (16, 16)).astype(np.float32) for _ in range(3)]
    alone = _evaluate([a], 1, AnomalyPostd())[0]
    together = _evaluate([a] + others, 4, AnomalyPostd())
    assert len(together) == 4
    for k in ("amap", "pred_mask", "score"):
        torch.testing.assert_close(together[0][k], alone[k], rtol=0, atol=0, msg=k)
    # the mask really is per image: a batch-wide maximum would have flagged fewer pixels of the faint image
    amap_all = np.stack([0.5 * x for x in [a] + others])
    batch_rule = (0.5 * a) >= max(0.03, 0.2 * amap_all.max())
    assert alone["pred_mask"][0].numpy().astype(bool).sum() > batch_rule.sum()


def test_collated_batch_gives_per_image_results():
    rng = np.random.default_rng(1)
    imgs = torch.as_tensor(rng.uniform(0, 1, (3, 1, 8, 8)), dtype=torch.float32)
    preds = imgs * torch.tensor([0.9, 0.5, 0.1]).reshape(3, 1, 1, 1)
    batched = AnomalyPostd()(item(imgs, preds))
    for i in range(3):
        single = AnomalyPostd()(item(imgs[i], preds[i]))
        torch.testing.assert_close(batched["pred_mask"][i], single["pred_mask"])
        assert batched["score"][i].item() == pytest.approx(single["score"].item())


# ----------------------------------------------------------------------------------- evaluation handler
