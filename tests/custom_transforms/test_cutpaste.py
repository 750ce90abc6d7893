"""CutPaste synthesis (custom_transforms.synthesis.cutpaste): the pure function, its transforms, its method file.

All tests use the procedural phantom of ``test_artasyn`` (or a noise image, where a patch must be traced
back to the place it was cut from): no real data needed.
"""

import dataclasses
import math
import time

import cv2
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from custom_transforms.synthesis.cutpaste import (
    VARIANTS,
    CutPaste,
    CutPasted,
    CutPasteParams,
    _rotate,
    synthesize_cutpaste,
)
from custom_transforms.synthesis.samples import SyntheticCopiesd
from tests.custom_transforms.synthesis_helpers import (
    as_np,
    assert_clean,
    assert_contract,
    assert_input_errors,
    assert_key_handling,
    assert_seed_replays,
    phantom,
)
from tests.helpers import CONFIGS

IMG, LUNG = phantom(256)
NOISE = np.random.default_rng(123).random((128, 128)).astype(np.float32)  # every pixel value unique


def run(variant, seed, img=IMG, lung=LUNG, **kw):
    return synthesize_cutpaste(img, lung, np.random.default_rng(seed), variant=variant, **kw)


def box_of(mask):
    ys, xs = np.nonzero(mask)
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


def long_axis(mask):
    """(angle, elongation): the mask's long axis in deg from the image's vertical (counter-clockwise
    positive) and the ratio of its long to short principal axis."""
    ys, xs = np.nonzero(mask)
    w, v = np.linalg.eigh(np.cov(np.stack([xs, -ys]).astype(float)))  # y up
    x, y = v[:, 1] if v[1, 1] >= 0 else -v[:, 1]
    return math.degrees(math.atan2(-x, y)), math.sqrt(w[1] / max(w[0], 1e-9))


# ---------------------------------------------------------------------------------------------------
# the pure function


@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_shapes_dtypes_ranges_and_mask_support(variant):
    for seed in range(20):
        syn, mask = run(variant, seed)
        assert syn.shape == mask.shape == IMG.shape and syn.dtype == mask.dtype == np.float32
        assert set(np.unique(mask)) == {0.0, 1.0}
        assert 0.0 <= syn.min() and syn.max() <= 1.0
        np.testing.assert_array_equal(syn[mask == 0], IMG[mask == 0])  # the image changes only under the mask
    syn, mask = run(variant, 0, img=NOISE, lung=np.zeros(NOISE.shape, np.uint8))
    inside = mask > 0
    assert (syn[inside] != NOISE[inside]).mean() > 0.9  # a patch from elsewhere: nearly every pixel changes


def test_input_not_modified_and_lung_optional():
    img, lung = IMG.copy(), LUNG.copy()
    run("union", 1, img=img, lung=lung)
    assert np.array_equal(img, IMG) and np.array_equal(lung, LUNG)
    a, b = run("scar", 4), run("scar", 4, lung=None)  # not anatomy-aware: the lungs change nothing
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    c = run("scar", 4, lung=np.zeros_like(LUNG))
    assert np.array_equal(a[0], c[0])


def test_normal_patch_is_a_jittered_copy_of_another_place_of_the_same_image():
    """jitter = 0: the pasted rectangle equals a rectangle of the image itself (cut and paste, hard edges)."""
    moved = 0
    for seed in range(10):
        syn, mask = run("normal", seed, img=NOISE, lung=None, jitter=0.0)
        y0, y1, x0, x1 = box_of(mask)
        assert mask[y0:y1, x0:x1].all()  # the mask is exactly one filled rectangle
        patch = syn[y0:y1, x0:x1]
        sq = cv2.matchTemplate(NOISE, patch, cv2.TM_SQDIFF)
        cy, cx = np.unravel_index(np.argmin(sq), sq.shape)
        assert np.array_equal(NOISE[cy:cy + y1 - y0, cx:cx + x1 - x0], patch), "the patch is not a crop of the image"
        moved += (cy, cx) != (y0, x0)
    assert moved >= 8  # cut and paste places are independent
    # with jitter, brightness/contrast change the patch by at most 10% (+ the contrast pull to its mean)
    syn, mask = run("normal", 3, img=NOISE, lung=None)
    y0, y1, x0, x1 = box_of(mask)
    jittered = syn[y0:y1, x0:x1]
    same = run("normal", 3, img=NOISE, lung=None, jitter=0.0)[0][y0:y1, x0:x1]
    assert 0 < np.abs(jittered - same).max() < 0.25


def test_normal_area_and_aspect_in_the_published_range():
    areas, aspects = [], []
    for seed in range(400):
        _, mask = run("normal", seed, lung=None)
        y0, y1, x0, x1 = box_of(mask)
        areas.append(mask.mean())
        aspects.append((x1 - x0) / (y1 - y0))
    areas, aspects = np.array(areas), np.array(aspects)
    assert areas.min() >= 0.02 * 0.97 and areas.max() <= 0.15 * 1.03  # rounding of the sides
    assert areas.min() < 0.025 and areas.max() > 0.14  # the whole range is used
    assert abs(np.median(areas) - 0.085) < 0.01  # uniform
    assert aspects.min() >= 0.3 * 0.95 and aspects.max() <= 1 / 0.3 * 1.05
    assert aspects.min() < 0.4 and aspects.max() > 2.5
    assert abs(np.median(np.log(aspects))) < 0.15  # log-uniform: symmetric about 1


def test_scar_size_rotation_and_scaling():
    # unrotated: the mask is the h x w rectangle, h in [10, 25] px and w in [2, 16] px at 256 px
    hs, ws = [], []
    for seed in range(300):
        _, mask = run("scar", seed, lung=None, scar_rotation=(0.0, 0.0))
        y0, y1, x0, x1 = box_of(mask)
        assert mask[y0:y1, x0:x1].all()
        hs.append(y1 - y0)
        ws.append(x1 - x0)
    assert min(hs) == 10 and max(hs) == 25 and min(ws) == 2 and max(ws) == 16
    # rotated: the area stays about w x h, the long axis within +-45 deg of vertical, both signs
    angles, areas = [], []
    for seed in range(300):
        _, mask = run("scar", seed, lung=None)
        areas.append(mask.sum())
        pts = np.argwhere(mask)
        diameter = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1).max())
        assert diameter <= math.hypot(16, 25)  # pixel centres inside one rotated rectangle of at most 16 x 25
        angle, elongation = long_axis(mask)
        if elongation > 2.5:  # thin enough to read an orientation
            angles.append(angle)
    assert 10 <= min(areas) and max(areas) <= 1.2 * 16 * 25
    angles = np.array(angles)
    assert np.abs(angles).max() <= 50 and angles.min() < -25 and angles.max() > 25
    # lengths scale with sqrt(H W) / 256: 512 px doubles them
    img, lung = phantom(512)
    hs = [box_of(run("scar", s, img=img, lung=lung, scar_rotation=(0, 0))[1])[1]
          - box_of(run("scar", s, img=img, lung=lung, scar_rotation=(0, 0))[1])[0] for s in range(100)]
    assert 19 <= min(hs) <= 24 and 46 <= max(hs) <= 50


def test_rotation_is_nearest_neighbour_and_counter_clockwise():
    patch = np.arange(24, dtype=np.float32).reshape(6, 4)
    out, support = _rotate(patch, 0.0, (64, 64))
    assert np.array_equal(out, patch) and support.all()
    out, support = _rotate(patch, 90.0, (64, 64))
    assert np.array_equal(out, np.rot90(patch)) and support.all()  # numpy's rot90 is counter-clockwise
    out, support = _rotate(patch, 30.0, (64, 64))
    assert set(np.unique(out[support])) <= set(patch.ravel())  # pixels are copied, never interpolated
    assert abs(support.sum() - patch.size) <= 6
    for deg in (30.0, -30.0):  # a whole scar: the long axis turns counter-clockwise for positive angles
        mask = run("scar", 1, lung=None, scar_width=(3, 3), scar_height=(24, 24), scar_rotation=(deg, deg))[1]
        assert abs(long_axis(mask)[0] - deg) < 3
    out, support = _rotate(np.ones((20, 4), np.float32), 45.0, (10, 12))  # box larger than the image: cropped
    assert out.shape == support.shape == (10, 12)


def test_rotated_scar_pixels_come_from_one_place_of_the_image():
    syn, mask = run("scar", 5, img=NOISE, lung=None, jitter=0.0)
    values = syn[mask > 0]
    pos = {v: i for i, v in enumerate(NOISE.ravel())}
    src = np.array([divmod(pos[v], NOISE.shape[1]) for v in values])  # every value is an image pixel
    assert np.hypot(*np.ptp(src, axis=0)) <= math.hypot(8, 12.5) + 2  # from one scar-sized region (128 px)


def test_union_mixes_normal_and_scar():
    areas = np.array([run("union", seed, lung=None)[1].sum() for seed in range(200)])
    scar = areas <= 1.2 * 16 * 25  # a normal patch covers >= 2% = 1310 px of 256 x 256
    assert np.all(scar | (areas >= 0.02 * 0.97 * IMG.size))
    assert 0.38 < scar.mean() < 0.62
    assert np.all([run("union", s, lung=None, union_scar_prob=1.0)[1].sum() <= 480 for s in range(20)])
    assert np.all([run("union", s, lung=None, union_scar_prob=0.0)[1].sum() >= 1270 for s in range(20)])


def test_restrict_to_lung_places_the_paste_centre_on_the_lungs():
    near_lung = cv2.dilate((LUNG > 0).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    for seed in range(40):
        _, mask = run("scar", seed, restrict_to_lung=True)
        ys, xs = np.nonzero(mask)
        cy, cx = int(round((ys.min() + ys.max()) / 2)), int(round((xs.min() + xs.max()) / 2))
        assert near_lung[cy, cx]
    outside = [(run("scar", s)[1] * (LUNG == 0)).sum() == run("scar", s)[1].sum() for s in range(40)]
    assert any(outside)  # the published method places patches anywhere
    with pytest.raises(ValueError, match="no lung pixel"):
        run("normal", 0, lung=np.zeros_like(LUNG), restrict_to_lung=True)


def test_seeds_reproduce_and_differ():
    for variant in VARIANTS:
        a, b, c = run(variant, 42), run(variant, 42), run(variant, 43)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        assert not np.array_equal(a[1], c[1])


def test_other_image_sizes():
    for shape in ((64, 64), (200, 300), (10, 400)):
        img = np.random.default_rng(0).random(shape).astype(np.float32)
        for variant in VARIANTS:
            for seed in range(10):
                syn, mask = run(variant, seed, img=img, lung=None)
                assert syn.shape == mask.shape == shape and mask.any()


def test_parameters_validated_with_clear_errors():
    p = CutPasteParams(area_ratio=[0.05, 0.1], scar_width=[1, 3])  # lists from a config
    assert p.area_ratio == (0.05, 0.1) and p.scar_width == (1.0, 3.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.jitter = 0.2
    bad = {
        "area_ratio": [(0.2, 0.1), (0.0, 0.1), (0.1, 1.5), "ab", (0.1,), (0.1, float("nan"))],
        "aspect_ratio": [0.0, 1.5, -1, "x"],
        "jitter": [1.0, -0.1, True],
        "scar_width": [(0, 3), (5, 2)],
        "scar_height": [(-1, 3), None],
        "scar_rotation": [(-200, 0), (10, -10)],
        "union_scar_prob": [1.5, -0.1],
        "reference_size": [0, 2.5],
    }
    for field, values in bad.items():
        for value in values:
            with pytest.raises(ValueError, match=rf"CutPasteParams\.{field} must be .*, got"):
                CutPasteParams(**{field: value})
    msg = r"area_ratio must be \(low, high\) with 0 < low <= high <= 1, got \(0.2, 0.1\)"
    with pytest.raises(ValueError, match=msg):
        CutPasteParams(area_ratio=(0.2, 0.1))


def test_bad_inputs_give_clear_errors():
    assert_input_errors(synthesize_cutpaste, IMG, LUNG, small=4)
    rng = np.random.default_rng(0)
    nan = IMG.copy()
    nan[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        synthesize_cutpaste(nan, LUNG, rng)
    with pytest.raises(ValueError, match=r"CutPaste variant \(cutpaste_variant\) must be one of"):
        synthesize_cutpaste(IMG, LUNG, rng, variant="3way")
    with pytest.raises(ValueError, match=r"cutpaste_restrict_to_lung"):
        synthesize_cutpaste(IMG, LUNG, rng, restrict_to_lung="yes")
    with pytest.raises(ValueError, match="needs a lung label map"):
        synthesize_cutpaste(IMG, None, rng, restrict_to_lung=True)
    with pytest.raises(TypeError, match="unknown parameter"):
        synthesize_cutpaste(IMG, LUNG, rng, area=0.1)
    with pytest.raises(ValueError, match=r"CutPasteParams\.jitter"):
        synthesize_cutpaste(IMG, LUNG, rng, jitter=2.0)


# ---------------------------------------------------------------------------------------------------
# MONAI transforms


def sample(container=np.asarray, lung=LUNG):
    return {"image": container(IMG[None].copy()), "lung": container(lung[None].copy())}


def meta(a):
    return MetaTensor(torch.as_tensor(a), meta={"filename_or_obj": "phantom.png"})


@pytest.mark.parametrize("container", [np.asarray, torch.as_tensor, meta], ids=["numpy", "tensor", "metatensor"])
def test_dict_contract_containers_and_metadata(container):
    ref = CutPasted(keys="image", variant="union").set_random_state(seed=2)(sample())
    d = sample(container)
    out = CutPasted(keys="image", variant="union").set_random_state(seed=2)(d)
    assert as_np(out["mask"]).any() and set(np.unique(as_np(out["mask"]))) <= {0.0, 1.0}
    assert_contract(out, d, ref, IMG)


@pytest.mark.parametrize("make", [
    lambda: CutPasted(keys="image", variant="union"),
    lambda: CutPasted(keys="image", prob=0.5),
    lambda: SyntheticCopiesd(CutPasted(keys="image", variant="union"), n_synthetic=(1, 3)),
], ids=["CutPasted", "CutPasted(prob=0.5)", "SyntheticCopiesd(CutPasted)"])
def test_same_seed_same_output_different_seed_different_output(make):
    assert_seed_replays(make, sample)


def test_prob_zero_clean_and_empty_lung_still_synthesised():
    assert_clean(CutPasted(prob=0.0).set_random_state(0)(sample()))
    empty = np.zeros_like(LUNG)
    out = CutPasted().set_random_state(0)(sample(lung=empty))  # CutPaste does not need the lungs
    assert out["mask"].any()
    t = CutPaste()
    assert t.needs_lung is False and CutPaste(restrict_to_lung=True).needs_lung is True
    assert_clean(CutPasted(restrict_to_lung=True).set_random_state(0)(sample(lung=empty)))  # on_empty_lung="clean"
    with pytest.raises(ValueError, match="no lung pixel"):
        CutPasted(restrict_to_lung=True, on_empty_lung="raise")(sample(lung=empty))


def test_dict_keys_overrides_and_errors():
    out = assert_key_handling(lambda **kw: CutPasted(variant="scar", scar_rotation=(0, 0), **kw), sample, IMG, LUNG)
    y0, y1, x0, x1 = box_of(out["m"][0])
    assert 10 <= y1 - y0 <= 25 and 2 <= x1 - x0 <= 16
    params = CutPasteParams(area_ratio=(0.1, 0.1))
    out = CutPasted(params=params, aspect_ratio=1.0).set_random_state(0)(sample())
    assert abs(out["mask"].mean() - 0.1) < 0.005
    for cls in (CutPaste, CutPasted):
        with pytest.raises(ValueError, match=r"CutPaste variant \(cutpaste_variant\) must be one of"):
            cls(variant="3-way")
        with pytest.raises(ValueError, match="cutpaste_restrict_to_lung"):
            cls(restrict_to_lung="no")
        with pytest.raises(TypeError, match="unknown parameter"):
            cls(area=0.1)
        with pytest.raises(ValueError, match=r"CutPasteParams\.aspect_ratio"):
            cls(aspect_ratio=3.0)
        with pytest.raises(ValueError, match="synthesis_prob"):
            cls(prob=2.0)


# ---------------------------------------------------------------------------------------------------
# the method file configs/methods/cutpaste.json


def test_method_file_selects_cutpaste_in_train_preprocessing(tmp_path):
    from monai.bundle import ConfigParser

    from scripts.data.phantoms import generate_demo_dataset

    t0 = time.perf_counter()
    generate_demo_dataset(tmp_path, n_train=4, n_test_healthy=1, n_test_diseased=1, size=64)
    p = ConfigParser()
    p.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "methods" / "cutpaste.json")])
    p.update({"dataset_dir": str(tmp_path), "hparams#image_size": 64})
    hp = p.get_parsed_content("hparams")
    assert hp["method"] == "cutpaste" and hp["cutpaste_variant"] in VARIANTS
    synth = p.get_parsed_content("synthesis")
    assert isinstance(synth, CutPasted) and synth.synthesizer.variant == hp["cutpaste_variant"]
    fields = {f.name for f in dataclasses.fields(CutPasteParams)} - {"reference_size"}
    assert {f"cutpaste_{f}" for f in fields} | {"cutpaste_variant", "cutpaste_restrict_to_lung"} <= set(hp)
    assert synth.synthesizer.params == CutPasteParams()  # the method file holds the published defaults
    item = p.get_parsed_content("data_split")[0][0]
    out = p.get_parsed_content("train#preprocessing")(item)
    assert isinstance(out, list) and len(out) >= 2  # 1 clean + 1-3 synthetic copies
    for d in out:
        assert tuple(d["synthetic"].shape) == tuple(d["mask"].shape) == (1, 64, 64)
    assert not out[0]["mask"].any() and all(d["mask"].any() for d in out[1:])
    assert time.perf_counter() - t0 < 5.0
