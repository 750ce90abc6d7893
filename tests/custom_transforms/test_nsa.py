"""NSA synthesis (custom_transforms.synthesis.nsa): the pure function, its MONAI transforms and its method file.

Inputs are procedural, no real data needed: the phantom of ``synthesis_helpers`` and striped sources (also the
PNGs of the source pool, written to ``tmp_path``).
"""

import time

import cv2
import numpy as np
import pytest
from skimage.filters import median
from skimage.morphology import disk

from custom_transforms.synthesis.base import SourcePool
from custom_transforms.synthesis.nsa import (
    NSA,
    NSA_CLONES,
    NSA_LABELS,
    NSAd,
    NSAParams,
    _draw_half_widths,
    _find_destination,
    synthesize_nsa,
)
from tests.custom_transforms import synthesis_helpers as checks
from tests.custom_transforms.synthesis_helpers import as_np, outputs, phantom, same, stripes

IMG, LUNG = phantom(64)
SRC = stripes(64)
IMG256, LUNG256 = phantom(256)
SRC256 = stripes(256)


def reference_label(syn, img):
    """NSA's label from its definition, computed independently (256 px: kernels 5, disk 5; scipy 'nearest')."""
    p = NSAParams()
    delta = np.rint((syn.astype(np.float64) - img) * 255)
    changed = (np.abs(delta) > p.change_tol).astype(np.uint8)
    support = cv2.medianBlur(changed, 5) & changed
    d = median(support * np.abs(delta), disk(5))  # skimage's float median = scipy.ndimage, mode "nearest"
    return support / (1 + np.exp(-p.logistic_k * (d - p.logistic_x0)))


# ---------------------------------------------------------------------------------------------------
# the pure function


@pytest.mark.parametrize("seed", range(4))
def test_outputs_ranges_label_definition_and_unchanged_pixels(seed):
    syn, mask = synthesize_nsa(IMG256, LUNG256, np.random.default_rng(seed), source=SRC256)
    assert syn.dtype == mask.dtype == np.float32 and syn.shape == mask.shape == IMG256.shape
    assert 0.0 <= syn.min() and syn.max() <= 1.0 and 0.0 <= mask.min() and mask.max() <= 1.0
    assert mask.any() and len(np.unique(mask)) > 10  # a soft label
    unchanged = syn == IMG256
    assert not mask[unchanged].any()  # mask == 0 (and synthetic == image) where the blend changed nothing
    assert np.all(np.abs(syn - IMG256)[mask > 0] > 1 / 255)  # labelled pixels changed by more than 1 level
    np.testing.assert_allclose(mask, reference_label(syn, IMG256), atol=1e-6)


def test_synthetic_equals_image_outside_the_mask_without_grain_removal():
    # the label marks every pixel changed by more than change_tol once the grain filter is off: the image
    # changes by at most change_tol (1 level) outside the mask
    for seed in range(4):
        syn, mask = synthesize_nsa(IMG256, LUNG256, np.random.default_rng(seed), source=SRC256, label_median=1)
        outside = mask == 0
        assert np.all(np.abs(syn - IMG256)[outside] <= 1 / 255 + 1e-6)
        assert np.array_equal(mask > 0, np.abs(np.rint((syn - IMG256) * 255)) > 1)
        # ... and with change_tol = 0 the image is untouched exactly wherever the label is 0
        syn, mask = synthesize_nsa(IMG256, LUNG256, np.random.default_rng(seed), source=SRC256, label_median=1,
                                   change_tol=0)
        assert mask.any() and np.array_equal(syn[mask == 0], IMG256[mask == 0])


def test_patch_content_comes_from_the_source():
    """Vertical stripes pasted into the phantom: horizontal gradients appear where the label is."""
    gx = lambda a, r: np.abs(np.diff(a, axis=1))[r[:, 1:]].mean()
    gy = lambda a, r: np.abs(np.diff(a, axis=0))[r[1:]].mean()
    for seed in range(5):
        syn, mask = synthesize_nsa(IMG256, LUNG256, np.random.default_rng(seed), source=SRC256)
        r = mask > 0
        assert gx(syn, r) > 5 * gx(IMG256, r) + 0.01  # the stripes' edges
        assert gx(syn, r) > 2 * gy(syn, r)  # ... and mostly theirs: they are vertical
        _, mask_h = synthesize_nsa(IMG256, LUNG256, np.random.default_rng(seed), source=stripes(256, vertical=False))
        if mask_h.any():  # the same patches from horizontal stripes: vertical gradients instead
            syn_h = synthesize_nsa(IMG256, LUNG256, np.random.default_rng(seed), source=stripes(256, vertical=False))[0]
            assert gy(syn_h, mask_h > 0) > gx(syn_h, mask_h > 0)


def test_mixed_and_normal_cloning_of_a_constant_source():
    """A flat source: mixed gradients keep the image's own texture, the patch's gradients flatten it."""
    texture = cv2.GaussianBlur(np.random.default_rng(0).uniform(0.3, 0.7, (256, 256)).astype(np.float32), (0, 0), 1)
    const = np.full_like(texture, 0.6)
    grad = lambda a, r: np.abs(np.diff(a, axis=0))[r[1:]].mean() + np.abs(np.diff(a, axis=1))[r[:, 1:]].mean()
    for seed in range(4):
        syn, mask = synthesize_nsa(texture, LUNG256, np.random.default_rng(seed), source=const)
        assert not mask.any() and np.all(np.abs(syn - texture) <= 1 / 255 + 1e-6)  # at most OpenCV's rounding
        syn, mask = synthesize_nsa(texture, LUNG256, np.random.default_rng(seed), source=const, clone="normal")
        r = mask > 0
        assert r.sum() > 100 and grad(syn, r) < 0.3 * grad(texture, r)


def test_source_without_object_gives_up_every_patch():
    dark = np.full_like(IMG256, 10 / 255)  # below the object threshold (20 levels) everywhere
    syn, mask = synthesize_nsa(IMG256, LUNG256, np.random.default_rng(0), source=dark)
    assert np.array_equal(syn, IMG256) and not mask.any()
    syn, mask = synthesize_nsa(IMG256, LUNG256, np.random.default_rng(0), source=SRC256, max_attempts=1,
                               min_object=1.0, object_threshold=254)
    assert np.array_equal(syn, IMG256) and not mask.any()


def test_half_width_distribution_and_scaling():
    p = NSAParams()
    rng = np.random.default_rng(0)
    hw = np.array([_draw_half_widths(rng, (256, 256), p) for _ in range(4000)])
    assert hw.min() >= 8 and hw.max() <= 102  # round(0.03 x 256), round(0.4 x 256)
    assert abs(hw.mean() - (0.05 + 2 * 0.03) * 256) < 1.5  # offset + Gamma mean (shape x scale)
    assert (hw[:, 0] != hw[:, 1]).mean() > 0.9  # drawn per axis
    hw = np.array([_draw_half_widths(rng, (100, 400), p) for _ in range(2000)])
    assert hw[:, 0].min() >= 3 and hw[:, 0].max() <= 40 and hw[:, 1].min() >= 12 and hw[:, 1].max() <= 160
    img, lung = phantom(128)
    syn, mask = synthesize_nsa(img[:, 16:112], lung[:, 16:112], np.random.default_rng(1), source=stripes(128)[:, :96])
    assert syn.shape == mask.shape == (128, 96) and mask.any()


def test_destination_overlap_rule_and_restrict_to_lung():
    p = NSAParams()
    dst_obj = np.zeros((256, 256), np.uint8)
    dst_obj[:, :128] = 1  # only the left half is object
    obj = np.ones((40, 30), np.uint8)
    for seed in range(30):
        y, x = _find_destination(np.random.default_rng(seed), dst_obj, obj, None, p)
        assert dst_obj[y:y + 40, x:x + 30].mean() >= 0.7
        assert 1 <= y and y + 40 <= 255 and 1 <= x and x + 30 <= 255  # one pixel inside the image
    assert _find_destination(np.random.default_rng(0), np.zeros_like(dst_obj), obj, None, p) is None
    centres = np.nonzero(LUNG256)
    for seed in range(30):
        y, x = _find_destination(np.random.default_rng(seed), np.ones_like(dst_obj), obj, centres, p)
        assert LUNG256[y + 20, x + 15] > 0  # the centre is a lung pixel
    a = synthesize_nsa(IMG256, LUNG256, np.random.default_rng(3), source=SRC256)
    b = synthesize_nsa(IMG256, np.zeros_like(LUNG256), np.random.default_rng(3), source=SRC256)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])  # the lungs are unused by default
    with pytest.raises(ValueError, match="no lung pixel"):
        synthesize_nsa(IMG256, np.zeros_like(LUNG256), np.random.default_rng(0), source=SRC256,
                       restrict_to_lung=True)


def test_binary_label_and_parameter_overrides():
    _, soft = synthesize_nsa(IMG256, LUNG256, np.random.default_rng(2), source=SRC256)
    _, hard = synthesize_nsa(IMG256, LUNG256, np.random.default_rng(2), source=SRC256, label="binary")
    np.testing.assert_array_equal(hard, (soft > 0).astype(np.float32))
    one = [synthesize_nsa(IMG256, LUNG256, np.random.default_rng(s), source=SRC256, n_patches=1)[1] for s in range(4)]
    assert all(m.any() for m in one)
    params = NSAParams(width_bounds=[0.05, 0.1], resize_bounds=[1, 1])  # lists (JSON) become tuples
    assert params.width_bounds == (0.05, 0.1) and hash(params)
    n = 0
    for seed in range(4):
        _, mask = synthesize_nsa(IMG256, LUNG256, np.random.default_rng(seed), params=params, source=SRC256,
                                 n_patches=1)
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        if rows.size:
            n += 1
            assert rows[-1] - rows[0] < 2 * 26 and cols[-1] - cols[0] < 2 * 26  # half-width <= round(0.1 x 256)
    assert n >= 2


def test_bad_parameters_give_clear_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="NaN"):
        synthesize_nsa(IMG, LUNG, rng, source=np.full_like(SRC, np.nan))
    with pytest.raises(TypeError, match="unknown parameter"):
        synthesize_nsa(IMG, LUNG, rng, source=SRC, patches=2)
    bad = {
        "n_patches": [0, 1.5, True, "3"],
        "p_extra_patch": [-0.1, 1.5, "x"],
        "gamma_shape": [0.0, -1.0],
        "width_bounds": [(0.0, 0.2), (0.3, 0.2), (0.1, 0.6), (0.1,), "ab"],
        "resize_bounds": [(0.0, 1.0), (1.3, 0.7), None],
        "object_threshold": [-1, 256],
        "min_object": [1.5],
        "min_overlap": [-0.5],
        "max_attempts": [0],
        "min_clone_area": [0.5],
        "logistic_k": [0.0],
        "label_median": [0],
        "restrict_to_lung": ["yes", 1],
    }
    checks.assert_bad_values_named(NSAParams, "nsa", bad)
    with pytest.raises(ValueError, match=r"clone \(nsa_clone\) must be one of \('mixed', 'normal'\)"):
        NSAParams(clone="seamless")
    with pytest.raises(ValueError, match=r"label \(nsa_label\) must be one of \('logistic', 'binary'\)"):
        NSAParams(label="soft")
    assert NSA_CLONES == ("mixed", "normal") and NSA_LABELS == ("logistic", "binary")


# ---------------------------------------------------------------------------------------------------
# MONAI transforms


sample = checks.sampler(IMG, LUNG, src=SRC)


@checks.CONTAINERS
def test_dict_contract_keys_shapes_dtypes_and_containers(container):
    n_labelled = 0
    for seed in range(4):  # tiny 64 px patches: OpenCV's blend leaves some of them unchanged
        d = sample(container)
        out = NSAd(keys="image", source_key="src").set_random_state(seed)(d)
        ref = NSAd(keys="image", source_key="src").set_random_state(seed)(sample())
        m = as_np(out["mask"])
        n_labelled += bool(m.any())
        assert 0 <= m.min() and m.max() <= 1
        checks.assert_contract(out, d, ref, IMG)
    assert n_labelled >= 2


def test_empty_lungs_still_synthesised():
    d = sample()
    d["lung"] = np.zeros_like(d["lung"])
    outs = [NSAd(source_key="src").set_random_state(s)(d) for s in range(4)]  # NSA ignores the lungs
    assert any(o["mask"].any() for o in outs)


def write_pool(tmp_path, n=3):
    paths = []
    for i in range(n):
        p = tmp_path / f"train_{i}.png"
        cv2.imwrite(str(p), np.round(255 * stripes(64, period=4 + 2 * i)).astype(np.uint8))
        paths.append(str(p))
    return paths


def test_source_pool_path_reproducible_and_uses_the_pool_image(tmp_path):
    pool = checks.make_pool(write_pool(tmp_path))
    t = NSAd(source_pool=pool)
    a, b = outputs(t, lambda: sample(source=False), 5), outputs(t, lambda: sample(source=False), 5)
    assert same(a, b) and any(m.any() for _, m in a)
    assert not same(a, outputs(t, lambda: sample(source=False), 6))
    # the array transform draws the pool index in randomize(); the result is the pure function on that image
    arr = NSA(source_pool=pool)
    for seed in range(4):
        syn, mask = arr.set_random_state(seed)(IMG[None], LUNG[None])
        ref = NSA().set_random_state(seed)(IMG[None], LUNG[None], source=pool.load(arr._source_index))
        np.testing.assert_array_equal(syn, ref[0])
        np.testing.assert_array_equal(mask, ref[1])


def test_dict_errors_options_and_keys():
    with pytest.raises(ValueError, match=r"clone \(nsa_clone\)"):
        NSAd(clone="poisson")
    with pytest.raises(ValueError, match=r"label \(nsa_label\)"):
        NSA(label="soft")
    with pytest.raises(ValueError, match=r"nsa_resize_bounds"):
        NSA(resize_bounds=(1.3, 0.7))
    with pytest.raises(TypeError, match="unknown parameter"):
        NSAd(n_patch=2)


# ---------------------------------------------------------------------------------------------------
# the method file


def test_method_file_parses_and_preprocessing_writes_synthetic_and_mask(tmp_path):
    t0 = time.perf_counter()
    parser = checks.method_parser("nsa", checks.write_demo(tmp_path / "demo"))
    hp = parser.get_parsed_content("hparams")
    assert hp["method"] == "nsa" and hp["mask_target_threshold"] == 0.5  # validation target: d >= x0 (4 levels)
    # every tunable is a named hparam with the published default
    checks.assert_hparams_are_defaults(hp, NSAParams, "nsa", skip=("reference_size",))
    synth = parser.get_parsed_content("synthesis")
    assert isinstance(synth, NSAd) and synth.synthesizer.params == NSAParams()
    assert isinstance(synth.synthesizer.source_pool, SourcePool)
    item = parser.get_parsed_content("data_split")[0][0]
    preprocessing = parser.get_parsed_content("train#preprocessing")
    masks = []
    for seed in range(3):
        out = preprocessing.set_random_state(seed)(item)
        checks.assert_training_samples(out)
        masks += [as_np(d["mask"]) for d in out[1:]]
        assert all(0 <= m.min() and m.max() <= 1 for m in masks)
    assert any(m.any() for m in masks)
    assert time.perf_counter() - t0 < 10
