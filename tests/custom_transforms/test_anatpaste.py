"""AnatPaste synthesis (custom_transforms.synthesis.anatpaste) and its method override file.

All tests use the procedural phantom of test_artasyn (bright body, two dark elliptical lungs, labels drawn
directly) or the 64 px demo phantoms: no real data needed.
"""

import dataclasses
import math
import time

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from custom_transforms.synthesis.anatpaste import (
    LUNG_KEYS,
    AnatPaste,
    AnatPasted,
    AnatPasteParams,
    _draw,
    _jitter,
    _shape_box,
    lung_key_for,
    synthesize_anatpaste,
)
from custom_transforms.synthesis.samples import SyntheticCopiesd
from tests.custom_transforms.synthesis_helpers import (
    assert_contract,
    assert_input_errors,
    assert_key_handling,
    assert_prob_zero_and_empty_lung_clean,
    assert_seed_replays,
    assert_seeds_reproduce_and_differ,
    phantom,
)
from tests.helpers import CONFIGS

IMG, LUNG = phantom()
IMG64, LUNG64 = phantom(64)
HARD = dict(blur_radius=(0, 0), color_jitter=0.0, fill_range=(255, 255))  # alpha 1 on the shape, no jitter


def draw_for(seed, img=IMG, lung=LUNG, **overrides):
    """The random choices ``synthesize_anatpaste`` makes with ``default_rng(seed)`` (it draws them first)."""
    p = dataclasses.replace(AnatPasteParams(), **overrides)
    s = math.sqrt(img.size) / p.reference_size
    return _draw(np.random.default_rng(seed), np.flatnonzero(lung), img.shape, p, s), p, s


# ---------------------------------------------------------------------------------------------------
# the pure function


def test_outputs_shapes_dtypes_and_ranges():
    for seed in range(5):
        syn, mask = synthesize_anatpaste(IMG, LUNG, np.random.default_rng(seed))
        assert syn.shape == mask.shape == IMG.shape and syn.dtype == mask.dtype == np.float32
        assert 0.0 <= syn.min() and syn.max() <= 1.0
        assert 0.0 <= mask.min() and mask.max() <= 1.0 and mask.any()
        assert (syn != IMG).any()


def test_mask_is_the_soft_paste_alpha():
    d, _, _ = draw_for(1)
    _, mask = synthesize_anatpaste(IMG, LUNG, np.random.default_rng(1))
    assert mask.max() <= d.fill + 1e-6  # at most the shape's fill value U(150, 255) / 255
    _, mask = synthesize_anatpaste(IMG, LUNG, np.random.default_rng(1), blur_radius=(8, 8))
    assert len(np.unique(mask)) > 10  # blurred edge: a soft label, not 0/1
    _, mask = synthesize_anatpaste(IMG, LUNG, np.random.default_rng(1), **HARD)
    assert set(np.unique(mask)) == {0.0, 1.0}  # no blur, fill 255: the shape itself


@pytest.mark.parametrize("sides", [(1, 2), (1,), (2,)])
def test_mask_zero_outside_lungs_and_image_unchanged_where_mask_zero(sides):
    img, lung = phantom(sides=sides)
    for seed in range(8):
        syn, mask = synthesize_anatpaste(img, lung, np.random.default_rng(seed))
        assert mask.any() and not mask[lung == 0].any()
        np.testing.assert_array_equal(syn[mask == 0], img[mask == 0])


def test_paste_centre_is_a_lung_pixel_and_the_alpha_peaks_there():
    for seed in range(20):
        d, _, _ = draw_for(seed)
        assert LUNG[d.cy, d.cx] > 0
        _, mask = synthesize_anatpaste(IMG, LUNG, np.random.default_rng(seed))
        assert mask[d.cy, d.cx] > 0 and mask[d.cy, d.cx] >= 0.98 * mask.max()


def test_patch_is_cut_from_the_same_image_and_pasted_centred():
    for seed in range(6):
        d, _, _ = draw_for(seed, **HARD)
        syn, mask = synthesize_anatpaste(IMG, LUNG, np.random.default_rng(seed), **HARD)
        ys, xs = np.nonzero(mask)
        py0, px0 = d.cy - d.cut_h // 2, d.cx - d.cut_w // 2
        inside = (ys >= py0) & (ys < py0 + d.cut_h) & (xs >= px0) & (xs < px0 + d.cut_w)
        assert inside.all()  # no blur: the shape lies within the patch (criterion b)
        np.testing.assert_array_equal(syn[ys, xs], IMG[d.src_y + ys - py0, d.src_x + xs - px0])


def test_shape_is_inset_by_the_margin_and_rectangle_or_ellipse():
    full = np.ones_like(LUNG)
    for seed in range(10):
        for p_ellipse in (0.0, 1.0):
            kw = dict(HARD, p_ellipse=p_ellipse)
            d, p, s = draw_for(seed, lung=full, **kw)
            y0, y1, x0, x1 = _shape_box(d, int(round(p.shape_margin * s)))
            assert y1 - y0 <= max(d.cut_h - 2 * 10, 0) and x1 - x0 <= max(d.cut_w - 2 * 10, 0)
            _, mask = synthesize_anatpaste(IMG, full, np.random.default_rng(seed), **kw)
            box = np.zeros_like(mask)
            box[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = 1.0
            assert not mask[box == 0].any()
            if p_ellipse == 0.0:  # the rectangle fills its box (within the image)
                np.testing.assert_array_equal(mask, box)
            elif (y1 - y0) > 20 and (x1 - x0) > 20 and y0 >= 0 and x0 >= 0 and y1 < 256 and x1 < 256:
                assert abs(mask.sum() / box.sum() - math.pi / 4) < 0.05  # an inscribed ellipse
                assert mask[y0, x0] == 0 and mask[y1, x1] == 0


def test_thin_patches_keep_a_1px_shape_and_still_paste():
    # a patch side of at most 2 x 10 px margin: the shape keeps 1 px on that axis (Pillow refuses an empty box)
    seen = 0
    for seed in range(60):
        d, p, s = draw_for(seed, area_ratio=(0.02, 0.02))
        if min(d.cut_h, d.cut_w) > 20:
            continue
        seen += 1
        y0, y1, x0, x1 = _shape_box(d, 10)
        assert (y0 == y1 == d.cy) or (x0 == x1 == d.cx)
        _, mask = synthesize_anatpaste(IMG, LUNG, np.random.default_rng(seed), area_ratio=(0.02, 0.02))
        assert mask[d.cy, d.cx] > 0
    assert seen >= 3


def test_draw_distributions():
    p = AnatPasteParams()
    rng = np.random.default_rng(0)
    lung_idx = np.flatnonzero(LUNG)
    draws = [_draw(rng, lung_idx, IMG.shape, p, 1.0) for _ in range(2000)]
    area = np.array([d.cut_h * d.cut_w for d in draws]) / IMG.size
    aspect = np.array([d.cut_w / d.cut_h for d in draws])
    assert 0.02 * 0.9 < area.min() and area.max() < 0.15 * 1.1
    assert 0.3 * 0.9 < aspect.min() and aspect.max() < 1.1 / 0.3
    assert abs(np.median(np.log(aspect))) < 0.05  # log-uniform, symmetric around 1
    assert abs(np.mean([d.ellipse for d in draws]) - 0.5) < 0.05
    fill = np.array([d.fill for d in draws])
    sigma = np.array([d.sigma for d in draws])
    assert 150 / 255 <= fill.min() and fill.max() <= 1.0 and 0.0 <= sigma.min() and sigma.max() <= 15.0
    for f in ("brightness", "contrast"):
        v = np.array([getattr(d, f) for d in draws])
        assert 0.9 <= v.min() and v.max() <= 1.1 and v.std() > 0.05
    assert all(d.src_y + d.cut_h <= 256 and d.src_x + d.cut_w <= 256 for d in draws)


def pillow_jitter(u8, d):
    """torchvision's ColorJitter on a gray PIL image: ImageEnhance brightness and contrast, in the drawn order."""
    im = Image.fromarray(u8)
    bright, contrast = ImageEnhance.Brightness, ImageEnhance.Contrast
    order = [(bright, d.brightness), (contrast, d.contrast)]
    for enhancer, factor in order if d.brightness_first else order[::-1]:
        im = enhancer(im).enhance(factor)
    return np.asarray(im, np.float32)


def test_jitter_matches_pillow_colorjitter_on_gray():
    u8 = np.round(IMG[60:140, 40:120] * 255).astype(np.uint8)
    for seed in range(8):
        d, _, _ = draw_for(seed)
        ours = _jitter(u8 / np.float32(255), d) * 255
        assert np.abs(ours - pillow_jitter(u8, d)).max() <= 2.0  # Pillow rounds to 8 bits per step
    assert len({draw_for(seed)[0].brightness_first for seed in range(8)}) == 2  # both orders were tried


def test_blur_radius_means_pillow_radius():
    """"Radius r" = Pillow's GaussianBlur(radius=r) (sigma = r) of the drawn shape (away from the image edge)."""
    full = np.ones_like(LUNG)
    for r in (4.0, 12.0):
        kw = dict(blur_radius=(r, r), fill_range=(255, 255), p_ellipse=0.0)
        for seed in range(100):  # a paste whose blur stays inside the image
            d, p, s = draw_for(seed, lung=full, **kw)
            y0, y1, x0, x1 = _shape_box(d, int(round(p.shape_margin * s)))
            if min(y0, x0) > 4 * r + 2 and max(y1, x1) < 255 - 4 * r - 2:
                break
        ref = Image.new("L", (256, 256))
        ImageDraw.Draw(ref).rectangle((x0, y0, x1, y1), fill=255)
        ref = np.asarray(ref.filter(ImageFilter.GaussianBlur(r)), np.float32)
        _, mask = synthesize_anatpaste(IMG, full, np.random.default_rng(seed), **kw)
        diff = np.abs(mask * 255 - ref)
        # Pillow approximates the Gaussian by three box blurs: ~4 levels at most on a hard 0/255 edge
        assert diff.max() < 5.0 and diff.mean() < 0.5  # 8-bit levels
        # a different radius convention (e.g. sigma = r / 2) would be far off
        _, half = synthesize_anatpaste(IMG, full, np.random.default_rng(seed), **dict(kw, blur_radius=(r / 2, r / 2)))
        assert np.abs(half * 255 - ref).max() > 30.0


def test_lengths_scale_with_image_size():
    for size in (128, 384):
        img, lung = phantom(size)
        d, p, s = draw_for(0, img, lung)
        assert math.isclose(s, size / 256)
        syn, mask = synthesize_anatpaste(img, lung, np.random.default_rng(0))
        assert syn.shape == (size, size) and mask.any()
    syn, mask = synthesize_anatpaste(IMG[:, 20:236], LUNG[:, 20:236], np.random.default_rng(0))  # non-square
    assert syn.shape == (256, 216) and mask.any()


def test_seeds_reproduce_and_differ():
    assert_seeds_reproduce_and_differ(synthesize_anatpaste, IMG, LUNG)


def test_params_and_overrides():
    p = AnatPasteParams(area_ratio=[0.05, 0.1], fill_range=[200, 255])  # lists from JSON configs
    assert p.area_ratio == (0.05, 0.1) and p.fill_range == (200.0, 255.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.aspect_ratio = 0.5
    a = synthesize_anatpaste(IMG, LUNG, np.random.default_rng(1), params=p)
    b = synthesize_anatpaste(IMG, LUNG, np.random.default_rng(1), area_ratio=(0.05, 0.1), fill_range=(200, 255))
    assert np.array_equal(a[0], b[0])
    with pytest.raises(TypeError, match="unknown parameter"):
        synthesize_anatpaste(IMG, LUNG, np.random.default_rng(0), blur_radus=(0, 3))


@pytest.mark.parametrize("field,value,match", [
    ("area_ratio", (0.2, 0.1), r"area_ratio \(config key anatpaste_area_ratio\) must be \(low, high\)"),
    ("area_ratio", (0.0, 0.1), "0 < low"),
    ("area_ratio", 0.1, "area_ratio"),
    ("aspect_ratio", 1.5, r"aspect_ratio .* must be in \(0, 1\], got 1.5"),
    ("aspect_ratio", 0, "aspect_ratio"),
    ("color_jitter", -0.1, r"color_jitter .* in \[0, 1\)"),
    ("shape_margin", -1, "shape_margin"),
    ("p_ellipse", 2, "p_ellipse .* probability"),
    ("fill_range", (150, 300), "fill_range .* 255"),
    ("blur_radius", (5, 1), "blur_radius"),
    ("blur_radius", ("a", 1), "blur_radius"),
    ("reference_size", 0, "reference_size must be a positive integer"),
])
def test_param_validation_names_field_value_and_range(field, value, match):
    with pytest.raises(ValueError, match=match):
        AnatPasteParams(**{field: value})


def test_bad_inputs_give_clear_errors():
    assert_input_errors(synthesize_anatpaste, IMG, LUNG, small=8, needs_lung=True)
    with pytest.raises(TypeError, match="AnatPasteParams"):
        synthesize_anatpaste(IMG, LUNG, np.random.default_rng(0), params={"aspect_ratio": 0.3})


def test_lung_option_maps_to_key_and_names_the_config_key():
    assert lung_key_for("otsu") == "lung_otsu" and lung_key_for("pbtseg") == "lung"
    assert LUNG_KEYS == {"otsu": "lung_otsu", "pbtseg": "lung"}
    with pytest.raises(ValueError, match=r"\(anatpaste_lung\) must be one of \('otsu', 'pbtseg'\), got 'unet'"):
        lung_key_for("unet")


# ---------------------------------------------------------------------------------------------------
# MONAI transforms


def sample(container=np.asarray):
    return {"image": container(IMG64[None].copy()), "lung": container(LUNG64[None].copy())}


@pytest.mark.parametrize("container", [np.asarray, torch.as_tensor,
                                       lambda a: MetaTensor(torch.as_tensor(a), meta={"filename_or_obj": "x.png"})])
def test_contract_keys_shapes_dtypes_containers(container):
    d = sample(container)
    ref = AnatPasted().set_random_state(2)(sample())
    assert ref["mask"].any()
    assert_contract(AnatPasted().set_random_state(2)(d), d, ref, IMG64)


@pytest.mark.parametrize("make", [lambda: AnatPasted(), lambda: AnatPasted(prob=0.5),
                                  lambda: SyntheticCopiesd(AnatPasted(), n_synthetic=(1, 3))],
                         ids=["AnatPasted", "AnatPasted(prob=0.5)", "SyntheticCopiesd(AnatPasted)"])
def test_same_seed_same_output_different_seed_different_output(make):
    assert_seed_replays(make, sample)


def test_prob_zero_and_empty_lung_give_clean_samples():
    assert_prob_zero_and_empty_lung_clean(AnatPasted, sample)
    with pytest.raises(ValueError, match="on_empty_lung must be one of"):
        AnatPasted(on_empty_lung="skip")
    with pytest.raises(ValueError, match=r"prob \(synthesis_prob\)"):
        AnatPasted(prob=1.5)


def test_lung_key_selects_the_lung_map():
    """``lung_key_for(anatpaste_lung)`` picks Otsu (``lung_otsu``) or PBTSeg (``lung``) labels."""
    img, right = phantom(64, sides=(1,))
    _, left = phantom(64, sides=(2,))
    d = {"image": img[None], "lung": left[None], "lung_otsu": right[None]}
    for option, lung in (("otsu", right), ("pbtseg", left)):
        t = AnatPasted(lung_key=lung_key_for(option))
        for seed in range(4):
            mask = t.set_random_state(seed)(d)["mask"][0]
            assert mask.any() and not mask[lung == 0].any(), option


def test_wrapper_key_handling_and_parameter_errors():
    assert_key_handling(AnatPasted, sample, IMG64, LUNG64)
    with pytest.raises(TypeError, match="AnatPasted got unknown parameter"):
        AnatPasted(bluur=3)
    with pytest.raises(TypeError, match="AnatPaste got unknown parameter"):
        AnatPaste(bluur=3)
    with pytest.raises(ValueError, match="anatpaste_area_ratio"):
        AnatPasted(area_ratio=(0.5, 0.1))
    t = AnatPasted(params=AnatPasteParams(p_ellipse=0.0), blur_radius=(0, 0))
    assert t.synthesizer.params.p_ellipse == 0.0 and t.synthesizer.params.blur_radius == (0.0, 0.0)


# ---------------------------------------------------------------------------------------------------
# the method override file


def test_method_override_file_builds_the_preprocessing(tmp_path):
    from monai.bundle import ConfigParser

    from scripts.data.phantoms import generate_demo_dataset

    t0 = time.perf_counter()
    generate_demo_dataset(tmp_path, n_train=4, n_test_healthy=1, n_test_diseased=1, size=64)
    for option, key in LUNG_KEYS.items():
        p = ConfigParser()
        p.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "methods" / "anatpaste.json")])
        p.update({"dataset_dir": str(tmp_path), "hparams#image_size": 64, "hparams#anatpaste_lung": option})
        assert p.get_parsed_content("hparams#method") == "anatpaste"
        synth = p.get_parsed_content("synthesis")
        assert isinstance(synth, AnatPasted) and synth.lung_key == key
        assert synth.synthesizer.params == AnatPasteParams()  # the config's hparams are the published defaults
        item = p.get_parsed_content("data_split")[0][0]
        samples = p.get_parsed_content("train#preprocessing")(item)
        assert ("lung_otsu" in samples[0]) == (option == "otsu") and "lung" in samples[0]
        assert not samples[0]["mask"].any()  # the clean sample
        for s in samples[1:]:
            assert tuple(s["synthetic"].shape) == tuple(s["mask"].shape) == (1, 64, 64)
            assert s["synthetic"].dtype == s["mask"].dtype == torch.float32
            assert s["mask"].any() and not s["mask"][s[key] == 0].any()
    p = ConfigParser()
    p.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "methods" / "anatpaste.json")])
    p.update({"hparams#anatpaste_lung": "unet"})
    with pytest.raises(RuntimeError) as err:  # MONAI wraps the error of lung_key_for
        p.get_parsed_content("synthesis")
    assert "(anatpaste_lung) must be one of ('otsu', 'pbtseg'), got 'unet'" in str(err.value.__cause__)
    assert time.perf_counter() - t0 < 5.0
