"""FPI synthesis (custom_transforms.synthesis.fpi): the pure function, its MONAI transforms and its method file.

No real data needed: the images are the procedural phantom (``synthesis_helpers.phantom``) with a noise image as
the foreign one, and a few tiny grey PNGs in ``tmp_path`` make the source pool.
"""

import time

import cv2
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from custom_transforms.synthesis.base import SourcePool
from custom_transforms.synthesis.fpi import (
    FPI,
    FPI_LABELS,
    FPId,
    FPIParams,
    _draw_patch,
    _patch_slices,
    synthesize_fpi,
)
from tests.custom_transforms import synthesis_helpers as checks
from tests.custom_transforms.synthesis_helpers import as_np, outputs, phantom, same

IMG, LUNG = phantom(64)
SRC = np.random.default_rng(123).random(IMG.shape).astype(np.float32)  # differs from IMG at every pixel


def expected(img, src, seed, params=None, lung=None):
    """The square and alpha the pure function draws for ``seed``, and the output the method defines."""
    p = params or FPIParams()
    cy, cx, w, alpha = _draw_patch(img.shape, LUNG if lung is None else lung, np.random.default_rng(seed), p)
    rows, cols = _patch_slices(img.shape, cy, cx, w)
    a = np.float32(alpha)
    syn, mask = img.copy(), np.zeros(img.shape, np.float32)
    x, xo = img[rows, cols], src[rows, cols]
    syn[rows, cols] = np.where(x != xo, np.clip((1 - a) * x + a * xo, 0, 1), x)
    mask[rows, cols] = np.where(x != xo, a, 0)
    square = np.zeros(img.shape, bool)
    square[rows, cols] = True
    return syn, mask, square, a


# ---------------------------------------------------------------------------------------------------
# the pure function


@pytest.mark.parametrize("seed", range(8))
def test_interpolation_inside_the_square_image_outside_and_soft_label(seed):
    syn, mask = synthesize_fpi(IMG, LUNG, np.random.default_rng(seed), source=SRC)
    want_syn, want_mask, square, a = expected(IMG, SRC, seed)
    assert syn.dtype == mask.dtype == np.float32 and syn.shape == mask.shape == IMG.shape
    assert 0.0 <= syn.min() and syn.max() <= 1.0 and 0.05 <= a <= 0.95
    np.testing.assert_array_equal(syn, want_syn)
    np.testing.assert_array_equal(mask, want_mask)
    # x' = (1 - alpha) x + alpha x_other inside, x outside; label alpha inside (SRC != IMG everywhere), 0 outside
    np.testing.assert_array_equal(syn[square], ((1 - a) * IMG + a * SRC)[square])
    np.testing.assert_array_equal(syn[~square], IMG[~square])
    assert np.all(mask[square] == a) and not mask[~square].any()
    assert np.array_equal(syn != IMG, mask > 0)  # the image changes exactly under the label


def test_label_is_zero_and_image_kept_where_the_source_agrees():
    src = SRC.copy()
    src[:, ::2] = IMG[:, ::2]  # every other column identical to the image
    for seed in range(6):
        syn, mask = synthesize_fpi(IMG, LUNG, np.random.default_rng(seed), source=src)
        want_syn, want_mask, square, a = expected(IMG, src, seed)
        np.testing.assert_array_equal(syn, want_syn)
        np.testing.assert_array_equal(mask, want_mask)
        same = src == IMG
        assert not mask[same].any() and np.all(mask[square & ~same] == a)
        np.testing.assert_array_equal(syn[mask == 0], IMG[mask == 0])
    # a source equal to the image changes nothing and labels nothing
    syn, mask = synthesize_fpi(IMG, LUNG, np.random.default_rng(0), source=IMG.copy())
    assert np.array_equal(syn, IMG) and not mask.any()


def test_square_size_centre_and_alpha_ranges_over_many_seeds():
    p = FPIParams()
    rng = np.random.default_rng(0)
    draws = np.array([_draw_patch((256, 256), np.zeros((256, 256), np.uint8), rng, p) for _ in range(4000)])
    cy, cx, w, alpha = draws.T
    for c in (cy, cx):  # centre uniform over the central 80%: [25.6, 230.4) as integers
        assert c.min() == 25 and c.max() == 229
        assert abs(c.mean() - 127) < 3
    assert w.min() == 13 and w.max() == 50  # half-width round(0.05 x 256) .. round(0.2 x 256) (exclusive)
    assert abs(w.mean() - 31.5) < 1
    assert 0.05 <= alpha.min() < 0.07 and 0.93 < alpha.max() <= 0.95
    # the square, clipped to the image, as the mask shows it
    img, lung = phantom(256)
    src = np.clip(img + 0.2, 0, 1)  # differs everywhere (no pixel of the phantom is above 0.8)
    for seed in range(40):
        _, mask = synthesize_fpi(img, lung, np.random.default_rng(seed), source=src)
        c_y, c_x, hw, a = _draw_patch(img.shape, lung, np.random.default_rng(seed), p)
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        assert (rows[0], rows[-1] + 1) == (max(c_y - hw, 0), min(c_y + hw, 256))
        assert (cols[0], cols[-1] + 1) == (max(c_x - hw, 0), min(c_x + hw, 256))
        assert np.isclose(mask.max(), a)


def test_sizes_scale_with_the_image_and_non_square_images():
    p = FPIParams()
    draws = np.array([_draw_patch((512, 512), np.zeros((1, 1)), np.random.default_rng(s), p) for s in range(2000)])
    assert draws[:, 2].min() == 26 and draws[:, 2].max() == 101  # round(0.05 x 512) .. round(0.2 x 512) - 1
    draws = np.array([_draw_patch((100, 400), np.zeros((1, 1)), np.random.default_rng(s), p) for s in range(2000)])
    assert draws[:, 0].min() == 10 and draws[:, 0].max() == 89  # rows: central 80% of 100
    assert draws[:, 1].min() == 40 and draws[:, 1].max() == 359  # columns: central 80% of 400
    assert draws[:, 2].min() == 10 and draws[:, 2].max() == 39  # half-width from sqrt(100 x 400) = 200
    img, lung = phantom(64)
    syn, mask = synthesize_fpi(img[:, 8:56], lung[:, 8:56], np.random.default_rng(0), source=SRC[:, 8:56])
    assert syn.shape == mask.shape == (64, 48) and mask.any()


def test_lung_map_unused_by_default_and_restrict_to_lung():
    empty = np.zeros_like(LUNG)
    a = synthesize_fpi(IMG, LUNG, np.random.default_rng(3), source=SRC)
    b = synthesize_fpi(IMG, empty, np.random.default_rng(3), source=SRC)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[1].any()
    p = FPIParams(restrict_to_lung=True)
    for seed in range(50):
        cy, cx, w, _ = _draw_patch(IMG.shape, LUNG, np.random.default_rng(seed), p)
        assert LUNG[cy, cx] > 0
    syn, mask = synthesize_fpi(IMG, LUNG, np.random.default_rng(1), source=SRC, restrict_to_lung=True)
    np.testing.assert_array_equal(mask, expected(IMG, SRC, 1, p)[1])
    with pytest.raises(ValueError, match="no lung pixel"):
        synthesize_fpi(IMG, empty, np.random.default_rng(0), source=SRC, restrict_to_lung=True)


def test_binary_label_and_parameter_overrides():
    _, soft = synthesize_fpi(IMG, LUNG, np.random.default_rng(2), source=SRC)
    _, hard = synthesize_fpi(IMG, LUNG, np.random.default_rng(2), source=SRC, label="binary")
    np.testing.assert_array_equal(hard, (soft > 0).astype(np.float32))
    _, mask = synthesize_fpi(IMG, LUNG, np.random.default_rng(2), source=SRC, alpha_range=(0.5, 0.5))
    assert set(np.unique(mask)) == {0.0, 0.5}
    params = FPIParams(half_width_range=[0.1, 0.1], alpha_range=[1, 1])  # lists (JSON) become tuples
    assert params.half_width_range == (0.1, 0.1) and hash(params)
    syn, mask = synthesize_fpi(IMG, LUNG, np.random.default_rng(2), params=params, source=SRC)
    assert (mask > 0).sum() <= 12 * 12 and np.array_equal(syn[mask > 0], SRC[mask > 0])  # alpha 1: the source


def test_bad_parameters_give_clear_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(TypeError, match="unknown parameter"):
        synthesize_fpi(IMG, LUNG, rng, source=SRC, alpha=0.5)
    bad = {
        "core_fraction": [0.0, 1.5, "x"],
        "half_width_range": [(0.0, 0.2), (0.3, 0.2), (0.1, 0.6), (0.1,), "ab"],
        "alpha_range": [(-0.1, 0.5), (0.6, 0.5), (0.5, 1.1), None],
        "restrict_to_lung": ["yes", 1],
    }
    checks.assert_bad_values_named(FPIParams, "fpi", bad)
    with pytest.raises(ValueError, match=r"label \(fpi_label\) must be one of \('alpha', 'binary'\)"):
        FPIParams(label="soft")
    assert FPI_LABELS == ("alpha", "binary") and FPIParams().label == "alpha"


# ---------------------------------------------------------------------------------------------------
# MONAI transforms


sample = checks.sampler(IMG, LUNG, src=SRC)


@checks.CONTAINERS
def test_dict_contract_keys_shapes_dtypes_and_containers(container):
    d = sample(container)
    out = FPId(keys="image", source_key="src").set_random_state(4)(d)
    ref = FPId(keys="image", source_key="src").set_random_state(4)(sample())
    assert as_np(out["mask"]).any()
    checks.assert_contract(out, d, ref, IMG)


def test_empty_lungs_still_synthesised():
    d = sample()
    d["lung"] = np.zeros_like(d["lung"])
    assert FPId(source_key="src").set_random_state(0)(d)["mask"].any()  # FPI ignores the lungs


def write_pool(tmp_path, n=3):
    paths = []
    ramp = np.arange(64, dtype=np.uint8)[None] // 8  # PNG readers reject constant images
    for i in range(n):
        p = tmp_path / f"train_{i}.png"
        cv2.imwrite(str(p), np.repeat(40 + 60 * i + ramp, 64, axis=0).astype(np.uint8))  # a distinct grey each
        paths.append(str(p))
    return paths


def used_source(syn, mask, pool_images):
    """Which pool image the synthetic sample interpolated towards (solving the FPI formula for x_other)."""
    syn, mask = as_np(syn)[0], as_np(mask)[0]
    m = mask > 0
    alpha = mask[m][0]
    x_other = (syn[m] - (1 - alpha) * IMG[m]) / alpha
    errs = [np.abs(x_other - src[m]).max() for src in pool_images]
    assert min(errs) < 1e-4, errs
    return int(np.argmin(errs))


def test_source_pool_path_reproducible_and_excludes_the_image(tmp_path):
    paths = write_pool(tmp_path)
    pool = checks.make_pool(paths)
    pool_images = [as_np(pool.load(i))[0] for i in range(3)]
    t = FPId(source_pool=pool)
    a, b = outputs(t, lambda: sample(source=False), 5, 8), outputs(t, lambda: sample(source=False), 5, 8)
    assert same(a, b) and all(m.any() for _, m in a)
    used = {used_source(syn, mask, pool_images) for syn, mask in a}
    assert len(used) > 1  # the pool index is drawn per call
    # the image itself (same file) is never its own source
    img = MetaTensor(torch.as_tensor(IMG[None]), meta={"filename_or_obj": paths[0]})
    t = FPI(source_pool=checks.make_pool(paths[:2]))
    for seed in range(6):
        assert used_source(*t.set_random_state(seed)(img, LUNG[None]), pool_images) == 1


def test_dict_errors_options_and_keys():
    with pytest.raises(ValueError, match=r"label \(fpi_label\)"):
        FPId(label="soft")
    with pytest.raises(ValueError, match=r"fpi_alpha_range"):
        FPI(alpha_range=(0.9, 0.1))
    with pytest.raises(TypeError, match="unknown parameter"):
        FPId(alpah_range=(0, 1))


# ---------------------------------------------------------------------------------------------------
# the method file


def test_method_file_parses_and_preprocessing_writes_synthetic_and_mask(tmp_path):
    t0 = time.perf_counter()
    parser = checks.method_parser("fpi", checks.write_demo(tmp_path / "demo"))
    hp = parser.get_parsed_content("hparams")
    assert hp["method"] == "fpi"
    checks.assert_hparams_are_defaults(hp, FPIParams, "fpi")  # every tunable is a named hparam, published default
    synth = parser.get_parsed_content("synthesis")
    assert isinstance(synth, FPId) and synth.synthesizer.params == FPIParams()
    assert isinstance(synth.synthesizer.source_pool, SourcePool)
    out = parser.get_parsed_content("train#preprocessing")(parser.get_parsed_content("data_split")[0][0])
    checks.assert_training_samples(out)
    assert all(as_np(d["mask"]).any() for d in out[1:])
    assert time.perf_counter() - t0 < 10
