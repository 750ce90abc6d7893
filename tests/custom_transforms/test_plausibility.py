"""Plausibility gate: one test per reason, the MONAI transform, and no flag on real healthy radiographs."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, list_data_collate

from custom_transforms.lung.pbtseg import pbtseg
from custom_transforms.plausibility import (
    DEFAULT_THRESHOLDS,
    Plausibilityd,
    PlausibilityThresholds,
    frontal_reasons,
    inversion_reasons,
    lung_reasons,
    measure,
    plausibility_reasons,
)
from tests.helpers import REAL_CXR

REAL_HEALTHY = [REAL_CXR / "nih" / "train" / "healthy",
                REAL_CXR.parent / "zhanglab" / "chest_xray" / "train" / "NORMAL"]


def phantom(seed: int = 0, size: int = 256) -> np.ndarray:
    """A demo phantom (frontal chest radiograph drawing) as float32 in [0, 1]."""
    from scripts.data.phantoms import make_phantom

    img, _, _ = make_phantom(np.random.default_rng(seed), size=size)
    img = img.astype(np.float32)
    return (img - img.min()) / (img.max() - img.min())


def lateral_like(img: np.ndarray) -> np.ndarray:
    """The image's left half (one lung and the spine's edge) stretched to the full width."""
    import cv2

    h, w = img.shape
    return cv2.resize(np.ascontiguousarray(img[:, : w // 2]), (w, h), interpolation=cv2.INTER_LINEAR)


def reasons_of(img: np.ndarray) -> list[str]:
    return plausibility_reasons(img, pbtseg(img))


def two_lungs(size: int = 128, right=(30, 90, 20, 55), left=(30, 90, 73, 108)) -> np.ndarray:
    """Labels with two rectangular lungs ``(row0, row1, col0, col1)``: 1 on the image left, 2 on the right."""
    lab = np.zeros((size, size), np.uint8)
    lab[right[0]:right[1], right[2]:right[3]] = 1
    lab[left[0]:left[1], left[2]:left[3]] = 2
    return lab


# --------------------------------------------------------------------------------------------- each reason

@pytest.mark.parametrize("seed", range(4))
def test_healthy_phantoms_pass(seed):
    img = phantom(seed)
    assert reasons_of(img) == []
    assert reasons_of(phantom(seed, size=64)) == []  # the tiny bundle's input size


@pytest.mark.parametrize("seed", range(4))
def test_inverted_radiograph_is_flagged(seed):
    img = phantom(seed)
    reasons = reasons_of(1.0 - img)
    assert any(r.startswith("looks inverted") for r in reasons), reasons


def test_polarity_is_antisymmetric_under_inversion():
    img = phantom(1)
    assert measure(1.0 - img)["polarity"] == pytest.approx(-measure(img)["polarity"], abs=1e-5)
    assert measure(img)["polarity"] > DEFAULT_THRESHOLDS.polarity_margin


def test_lungs_brighter_than_mediastinum_and_body_is_inverted():
    lab = two_lungs()
    img = np.full((128, 128), 0.3, np.float32)
    img[lab > 0] = 0.7  # bright lungs, dark between and around them
    m = measure(img, lab)
    reasons = inversion_reasons(m)
    assert len(reasons) == 1 and "lungs brighter than the mediastinum" in reasons[0]
    assert "lungs brighter than the body around them" in reasons[0]
    img[lab > 0] = 0.1  # the usual polarity: dark lungs
    assert inversion_reasons(measure(img, lab)) == []


def test_lateral_like_and_rotated_images_are_not_frontal():
    img = phantom(0)
    for bad in (lateral_like(img), np.ascontiguousarray(np.rot90(img))):
        reasons = reasons_of(bad)
        assert any(r.startswith("not like a frontal chest radiograph") for r in reasons), reasons


def test_lung_layout_reasons():
    base = measure(np.random.default_rng(0).random((128, 128)).astype(np.float32), two_lungs())
    assert frontal_reasons({**base, "symmetry": 1.0, "spine_peak": 1.0}) == []
    # one lung above the other
    stacked = measure(np.zeros((128, 128), np.float32) + 0.5, two_lungs(right=(5, 40, 20, 55), left=(90, 126, 73, 108)))
    reasons = frontal_reasons({**stacked, "symmetry": 1.0, "spine_peak": 1.0})
    assert len(reasons) == 1 and "lungs not side by side" in reasons[0] and "of the height" in reasons[0]
    # very unequal areas
    unequal = measure(np.zeros((128, 128), np.float32) + 0.5, two_lungs(right=(30, 90, 20, 55), left=(50, 56, 80, 86)))
    assert "lung areas very unequal" in frontal_reasons({**unequal, "symmetry": 1.0, "spine_peak": 1.0})[0]
    # no spine column, no mirror symmetry
    reasons = frontal_reasons({**base, "symmetry": 0.0, "spine_peak": -0.1})
    assert "no bright spine column" in reasons[0] and "no left-right symmetry" in reasons[0]


def test_no_two_lungs():
    img = np.full((128, 128), 0.5, np.float32)
    assert lung_reasons(measure(img, np.zeros((128, 128), np.uint8))) == ["no two lungs: PBTSeg found no lung"]
    one = two_lungs()
    one[one == 2] = 0
    assert lung_reasons(measure(img, one)) == ["no two lungs: left lung not found"]
    small = two_lungs(right=(30, 90, 20, 55), left=(50, 53, 80, 83))  # 9 px of 16384: 0.05 %
    (reason,) = lung_reasons(measure(img, small))
    assert "left lung 0.1% of the image" in reason and "right" not in reason
    assert lung_reasons(measure(img, two_lungs())) == []
    assert lung_reasons(measure(img)) == []  # no labels: no lung check


def test_uniform_noise_is_flagged():
    noise = np.random.default_rng(0).random((256, 256)).astype(np.float32)
    reasons = reasons_of(noise)
    assert any(r.startswith("noise-like") for r in reasons), reasons
    assert measure(noise)["high_freq"] > 0.6 > 0.1 > measure(phantom(0))["high_freq"]


def test_near_constant_image_is_flagged():
    img = np.full((256, 256), 0.5, np.float32)
    img[np.random.default_rng(0).random(img.shape) < 0.3] += 1 / 255  # two adjacent 8-bit levels
    reasons = reasons_of(img)
    assert any(r.startswith("too uniform") for r in reasons), reasons
    assert any(r.startswith("too few grey levels") for r in reasons), reasons


def test_binary_image_has_too_few_grey_levels():
    binary = (phantom(2) > 0.5).astype(np.float32)
    reasons = reasons_of(binary)
    assert any(r.startswith("too few grey levels") for r in reasons), reasons


def test_native_resolution_is_left_to_the_reader():
    # images too small in their file are refused by the reader (custom_transforms.io.MIN_SIZE), not flagged here
    assert "min_native_size" not in {f.name for f in fields(PlausibilityThresholds)}
    with pytest.raises(ValueError, match="unknown plausibility threshold"):
        Plausibilityd(thresholds={"min_native_size": 16})


def test_thresholds_are_validated_and_applied():
    with pytest.raises(ValueError, match="min_symmetry"):
        PlausibilityThresholds(min_symmetry=float("nan"))
    img = phantom(3)
    strict = PlausibilityThresholds(min_symmetry=0.999)
    assert any("no left-right symmetry" in r for r in plausibility_reasons(img, pbtseg(img), strict))
    with pytest.raises(ValueError, match="do not match"):
        measure(img, np.zeros((64, 64), np.uint8))


# --------------------------------------------------------------------------------------------- MONAI transform

def test_plausibilityd_writes_a_string_and_leaves_the_image_alone():
    img = phantom(0, size=128)
    noise = np.random.default_rng(1).random((128, 128)).astype(np.float32)
    items = []
    for a in (img, noise):
        meta = {"filename_or_obj": "x.png", "original_spatial_shape": (512, 512)}
        t = MetaTensor(torch.from_numpy(a)[None], meta=meta)
        items.append({"image": t, "lung": MetaTensor(torch.from_numpy(pbtseg(a))[None])})
    before = [i["image"].clone() for i in items]
    out = [Plausibilityd(keys="image", lung_key="lung", flags_key="flags")(i) for i in items]
    assert out[0]["flags"] == ""
    assert "noise-like" in out[1]["flags"] and "; " in out[1]["flags"]
    for o, b in zip(out, before):
        assert torch.equal(o["image"], b)
    batch = list_data_collate(out)  # strings collate into a list
    assert batch["flags"] == [o["flags"] for o in out]


def test_plausibilityd_options():
    img = phantom(1, size=128)
    d = {"image": MetaTensor(torch.from_numpy(img)[None], meta={"original_spatial_shape": (20, 20)})}
    with pytest.raises(KeyError, match="lung key 'lung' not found"):
        Plausibilityd()(d)
    assert Plausibilityd(lung_key=None)(d)["flags"] == ""  # the file size in the metadata is the reader's check
    with pytest.raises(ValueError, match="unknown plausibility threshold"):
        Plausibilityd(thresholds={"min_symetry": 0.1})
    plain = {"image": img[None], "lung": pbtseg(img)[None]}  # numpy without metadata works too
    assert Plausibilityd(flags_key="why")(plain)["why"] == ""


# --------------------------------------------------------------------------------------------- real data

@pytest.mark.parametrize("folder", REAL_HEALTHY, ids=["nih", "zhanglab"])
def test_real_healthy_radiographs_are_not_flagged(folder):
    """None of the first 60 healthy radiographs of each real set is flagged at the bundle's 256 px."""
    from custom_transforms.io import load_cxr
    from scripts.data.datasets import list_images

    if not folder.is_dir():
        pytest.skip(f"real data not available: {folder}")
    flagged = {}
    for p in list_images(folder)[:60]:
        img = load_cxr(p, 256)
        reasons = plausibility_reasons(img, pbtseg(img))
        if reasons:
            flagged[p.name] = reasons
        inverted = plausibility_reasons(1.0 - img, pbtseg(1.0 - img))
        assert inverted, f"{p.name}: the inverted image is not flagged"
    assert not flagged, flagged


def test_demo_phantoms_are_not_flagged(tmp_path):
    from custom_transforms.io import load_cxr
    from scripts.data.phantoms import generate_demo_dataset

    generate_demo_dataset(tmp_path, size=256)
    files = sorted(p for p in (tmp_path / "train").rglob("*.png")) + sorted((tmp_path / "test").rglob("*.png"))
    assert len(files) >= 72
    flagged = {}
    for p in files:
        img = load_cxr(p, 256)
        reasons = plausibility_reasons(img, pbtseg(img))
        if reasons:
            flagged[p.name] = reasons
    assert not flagged, flagged
