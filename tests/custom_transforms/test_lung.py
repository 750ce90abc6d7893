"""PBTSeg (reference and robust) and AnatPaste's Otsu lung segmentation: contract, inputs, real data."""


import cv2
import numpy as np
import pytest
import torch
from monai.data import MetaTensor, list_data_collate

from custom_transforms.lung import LungNotFoundError, LungNotFoundWarning
from custom_transforms.lung.otsu import OtsuLungSegd, otsu_lung_seg
from custom_transforms.lung.pbtseg import PBTSegd, pbtseg, pbtseg_reference, pbtseg_robust
from tests.helpers import REAL_CXR

DATA = REAL_CXR
SEGMENTERS = {
    "reference": lambda x: pbtseg(x, mode="reference"),
    "robust": pbtseg,
    "otsu": otsu_lung_seg,
}


def phantom(size=256, seed=0, body=0.8, lung=0.3, air=0.05, noise=0.03, shift=0):
    """Dark lungs (two ellipses) in a bright body ellipse on a dark background, plus noise."""
    rng = np.random.default_rng(seed)
    s = size / 256
    img = np.full((size, size), air, np.float32)  # R = right lung (image left)
    c = size // 2 + int(shift * s)
    cv2.ellipse(img, (c, int(135 * s)), (int(115 * s), int(125 * s)), 0, 0, 360, body, -1)
    cv2.ellipse(img, (c - int(50 * s), int(120 * s)), (int(32 * s), int(70 * s)), 0, 0, 360, lung, -1)  # R
    cv2.ellipse(img, (c + int(52 * s), int(125 * s)), (int(30 * s), int(66 * s)), 0, 0, 360, lung, -1)  # L
    img += rng.normal(0, noise, img.shape).astype(np.float32)
    return np.clip(cv2.GaussianBlur(img, (5, 5), 1.5), 0, 1)


def both_sides_ok(lab, size=256):
    """Right lung (1) on the image left, left lung (2) on the image right."""
    cols = np.arange(size)
    if not ((lab == 1).any() and (lab == 2).any()):
        return False
    cx = [(cols * (lab == side)).sum() / (lab == side).sum() for side in (1, 2)]
    return cx[0] < size / 2 < cx[1]


# ---------------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SEGMENTERS))
def test_phantom_both_sides(name):
    lab = SEGMENTERS[name](phantom())
    assert lab.shape == (256, 256) and lab.dtype == np.uint8
    assert set(np.unique(lab)) <= {0, 1, 2}
    assert both_sides_ok(lab)


@pytest.mark.parametrize("size,shift,seed", [(128, 0, 1), (320, -20, 2), (256, 25, 3), (512, 0, 4)])
def test_robust_phantom_sizes_and_shifts(size, shift, seed):
    img = phantom(size, seed=seed, shift=shift)
    lab = pbtseg(img)
    assert lab.shape == (size, size)
    assert both_sides_ok(lab, size)
    truth = np.zeros((size, size), np.uint8)  # lungs cover most of the truth and little else
    s, c = size / 256, size // 2 + int(shift * size / 256)
    cv2.ellipse(truth, (c - int(50 * s), int(120 * s)), (int(32 * s), int(70 * s)), 0, 0, 360, 1, -1)
    cv2.ellipse(truth, (c + int(52 * s), int(125 * s)), (int(30 * s), int(66 * s)), 0, 0, 360, 1, -1)
    dice = 2 * ((lab > 0) & (truth > 0)).sum() / ((lab > 0).sum() + truth.sum())
    assert dice > 0.85


def test_input_types_agree():
    img = phantom()
    u8 = np.rint(img * 255).astype(np.uint8)
    ref = pbtseg(img)
    np.testing.assert_array_equal(pbtseg(u8), ref)
    np.testing.assert_array_equal(pbtseg(img[None]), ref)
    np.testing.assert_array_equal(pbtseg(torch.from_numpy(img)), ref)
    np.testing.assert_array_equal(pbtseg(img.astype(np.float64)), ref)
    np.testing.assert_array_equal(pbtseg(u8, mode="reference"), pbtseg_reference(img))


def test_robust_options():
    img = phantom()
    tight = pbtseg(img, fill="holes")
    hull = pbtseg(img)
    assert both_sides_ok(tight) and ((tight > 0) <= (hull > 0)).all()
    assert both_sides_ok(pbtseg_robust(img, clahe_clip=0, relaxed=None, mirror=False))
    with pytest.raises(ValueError, match="fill"):
        pbtseg(img, fill="box")
    with pytest.raises(ValueError, match="mode"):
        pbtseg(img, mode="fast")
    with pytest.raises(ValueError, match="reference mode takes no options"):
        pbtseg(img, mode="reference", fill="holes")


def test_robust_mirror_fallback():
    """One lung hidden (as bright as the body): the mirror fallback still returns both sides."""
    img = phantom()
    cv2.ellipse(img, (180, 125), (36, 72), 0, 0, 360, float(np.median(img[100:150, 110:146])), -1)
    assert not (pbtseg(img, relaxed=None, mirror=False) == 2).any()
    lab = pbtseg(img)
    assert both_sides_ok(lab)


@pytest.mark.parametrize("name", list(SEGMENTERS))
@pytest.mark.parametrize("bad,match", [
    (np.zeros((3, 64, 64), np.float32), "shape"),
    (np.zeros((64,), np.float32), "shape"),
    (np.zeros((0, 0), np.float32), "empty"),
    (np.zeros((4, 4), np.float32), "too small"),
    (np.full((64, 64), np.nan, np.float32), "NaN"),
    (np.full((64, 64), 200.0, np.float32), r"\[0, 1\]"),
    (np.full((64, 64), 1000, np.int32), "0..255"),
])
def test_bad_input(name, bad, match):
    with pytest.raises(ValueError, match=match):
        SEGMENTERS[name](bad)


@pytest.mark.parametrize("mode", ["reference", "robust"])
def test_no_lung_returns_zeros(mode):
    assert not pbtseg(np.full((128, 128), 0.7, np.float32), mode=mode).any()
    assert not pbtseg(np.zeros((128, 128), np.float32), mode=mode).any()


def test_otsu_empty_means_whole_image():
    lab = otsu_lung_seg(np.full((64, 64), 0.5, np.float32))
    assert (lab[:, :32] == 1).all() and (lab[:, 32:] == 2).all()


# ---------------------------------------------------------------------------------------------------
# MONAI wrappers
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [PBTSegd, OtsuLungSegd])
def test_wrapper_numpy(cls):
    img = phantom()[None]
    out = cls(keys="image")({"image": img, "label": 0})
    assert isinstance(out["lung"], np.ndarray) and out["lung"].shape == (1, 256, 256)
    assert out["lung"].dtype == np.uint8 and out["label"] == 0 and out["image"] is img
    assert both_sides_ok(out["lung"][0])


@pytest.mark.parametrize("cls", [PBTSegd, OtsuLungSegd])
def test_wrapper_metatensor(cls):
    meta = {"filename_or_obj": "a.png", "original_spatial_shape": (512, 512)}
    img = MetaTensor(torch.from_numpy(phantom())[None], meta=meta)
    out = cls(keys="image", lung_key="lungs")({"image": img})
    lung = out["lungs"]
    assert isinstance(lung, MetaTensor) and lung.shape == (1, 256, 256) and lung.dtype == torch.uint8
    assert lung.meta["filename_or_obj"] == "a.png" and lung.meta["original_spatial_shape"] == (512, 512)
    lung.meta["filename_or_obj"] = "changed"  # a copy, not the image's own dict
    assert img.meta["filename_or_obj"] == "a.png"
    plain = cls()({"image": torch.from_numpy(phantom())[None]})["lung"]
    assert type(plain) is torch.Tensor and plain.dtype == torch.uint8
    batch = list_data_collate([out, out])
    assert batch["lungs"].shape == (2, 1, 256, 256)


def test_wrapper_keys():
    img = phantom()[None]
    t = PBTSegd(keys=("image", "other"), lung_key=("lung", "lung_other"), allow_missing_keys=True)
    out = t({"image": img})
    assert "lung" in out and "lung_other" not in out
    out = t({"image": img, "other": img})
    np.testing.assert_array_equal(out["lung"], out["lung_other"])
    with pytest.raises(KeyError):
        PBTSegd(keys="image")({"img": img})
    with pytest.raises(ValueError, match=r"\(1, H, W\)"):
        PBTSegd()({"image": np.stack([phantom()] * 3)})
    with pytest.raises(ValueError, match="NaN"):
        PBTSegd()({"image": np.full((1, 64, 64), np.nan, np.float32)})
    with pytest.raises(ValueError, match="on_missing"):
        PBTSegd(on_missing="skip")
    with pytest.raises(ValueError, match="mode"):
        PBTSegd(mode="fast")


def test_wrapper_reference_mode_and_options():
    img = phantom()[None]
    np.testing.assert_array_equal(PBTSegd(mode="reference")({"image": img})["lung"][0],
                                  pbtseg(img[0], mode="reference"))
    np.testing.assert_array_equal(PBTSegd(options={"fill": "holes"})({"image": img})["lung"][0],
                                  pbtseg(img[0], fill="holes"))


def test_missing_lungs_behaviour():
    flat = {"image": MetaTensor(torch.full((1, 64, 64), 0.6), meta={"filename_or_obj": "flat.png"})}
    t = PBTSegd(on_missing="raise")
    with pytest.raises(LungNotFoundError, match="flat.png"):
        t(flat)
    assert t.missing_count == 1
    t = PBTSegd()  # default: warn and count
    with pytest.warns(LungNotFoundWarning, match="no lung found"):
        out = t(flat)
    assert not out["lung"].any() and out["lung"].shape == (1, 64, 64) and t.missing_count == 1
    t = PBTSegd(on_missing="ignore")
    t(flat)
    t(flat)
    t({"image": phantom()[None]})
    assert t.missing_count == 2 and t.partial_count == 0


# ---------------------------------------------------------------------------------------------------
# real data (../shared/data/cxr)
# ---------------------------------------------------------------------------------------------------
def load_real():
    if not DATA.is_dir():
        pytest.skip(f"real chest X-rays not found at {DATA} (see docs/data.md)")
    from scripts.benchmarks.pbtseg import load_dataset

    return load_dataset(DATA)


@pytest.fixture(scope="module")
def real():
    return load_real()


@pytest.mark.realdata
def test_real_robust_targets(real):
    from scripts.benchmarks.pbtseg import evaluate_quality

    q = evaluate_quality(pbtseg, real)
    assert q["n_nih"] == 297 and q["n_masks"] == 35
    assert q["both_rate"] >= 0.97, q
    assert q["dice"] >= 0.65, q


@pytest.mark.realdata
def test_real_robust_beats_reference_and_otsu(real):
    from scripts.benchmarks.pbtseg import evaluate_quality

    sub = {"nih": real["nih"][::6], "lung_images": real["lung_images"], "lung_masks": real["lung_masks"]}
    robust = evaluate_quality(pbtseg, sub)
    reference = evaluate_quality(SEGMENTERS["reference"], sub)
    assert robust["both_rate"] > reference["both_rate"] and robust["dice"] > reference["dice"]
    assert robust["dice"] > evaluate_quality(otsu_lung_seg, sub)["dice"]
