"""NSA synthesis (custom_transforms.synthesis.nsa): the pure function, its MONAI transforms and its method file.

All tests use the procedural phantom of ``test_artasyn`` (and a few tiny PNGs written to ``tmp_path`` for the
source pool): no real data needed.
"""

import dataclasses
import time

import cv2
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from skimage.filters import median
from skimage.morphology import disk

from custom_transforms.io import LoadCXRd
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
from custom_transforms.synthesis.samples import SyntheticCopiesd
from tests.custom_transforms.test_artasyn import phantom
from tests.helpers import CONFIGS


def stripes(size, period=4, vertical=True, lo=0.15, hi=0.9):
    """A source that differs strongly from the phantom: stripes of ``period`` px, every pixel an object."""
    idx = np.arange(size)
    band = (idx // (period // 2)) % 2 == 0
    img = np.where(band[None, :] if vertical else band[:, None], lo, hi)
    return np.broadcast_to(img, (size, size)).astype(np.float32).copy()


IMG, LUNG = phantom(64)
SRC = stripes(64)
IMG256, LUNG256 = phantom(256)
SRC256 = stripes(256)


def as_np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


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


def test_seeds_reproduce_and_differ():
    a = synthesize_nsa(IMG256, LUNG256, np.random.default_rng(42), source=SRC256)
    b = synthesize_nsa(IMG256, LUNG256, np.random.default_rng(42), source=SRC256)
    c = synthesize_nsa(IMG256, LUNG256, np.random.default_rng(43), source=SRC256)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_bad_inputs_and_parameters_give_clear_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="lung label map shape"):
        synthesize_nsa(IMG, LUNG[:-1], rng, source=SRC)
    with pytest.raises(ValueError, match="source image shape"):
        synthesize_nsa(IMG, LUNG, rng, source=SRC[:-1])
    with pytest.raises(ValueError, match="give source"):
        synthesize_nsa(IMG, LUNG, rng, source=None)
    with pytest.raises(TypeError):
        synthesize_nsa(IMG, LUNG, rng)  # source is a required keyword
    with pytest.raises(ValueError, match="2-D"):
        synthesize_nsa(IMG[None], LUNG[None], rng, source=SRC[None])
    with pytest.raises(ValueError, match="too small"):
        synthesize_nsa(IMG[:8, :8], LUNG[:8, :8], rng, source=SRC[:8, :8])
    with pytest.raises(ValueError, match="lung labels"):
        synthesize_nsa(IMG, LUNG * 100, rng, source=SRC)
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
    for field, values in bad.items():
        for v in values:
            with pytest.raises(ValueError, match=rf"NSAParams\.{field} \(nsa_{field}\)"):
                NSAParams(**{field: v})
    with pytest.raises(ValueError, match=r"clone \(nsa_clone\) must be one of \('mixed', 'normal'\)"):
        NSAParams(clone="seamless")
    with pytest.raises(ValueError, match=r"label \(nsa_label\) must be one of \('logistic', 'binary'\)"):
        NSAParams(label="soft")
    with pytest.raises(dataclasses.FrozenInstanceError):
        NSAParams().n_patches = 1
    assert NSA_CLONES == ("mixed", "normal") and NSA_LABELS == ("logistic", "binary")


# ---------------------------------------------------------------------------------------------------
# MONAI transforms


def sample(container=np.asarray, source=True):
    d = {"image": container(IMG[None].copy()), "lung": container(LUNG[None].copy())}
    if source:
        d["src"] = container(SRC[None].copy())
    return d


META = lambda a: MetaTensor(torch.as_tensor(a), meta={"filename_or_obj": "phantom.png", "spacing": [0.5, 0.5]})


@pytest.mark.parametrize("container", [np.asarray, torch.as_tensor, META], ids=["numpy", "torch", "MetaTensor"])
def test_dict_contract_keys_shapes_dtypes_and_containers(container):
    n_labelled = 0
    for seed in range(4):  # tiny 64 px patches: OpenCV's blend leaves some of them unchanged
        d = sample(container)
        out = NSAd(keys="image", source_key="src").set_random_state(seed)(d)
        ref = NSAd(keys="image", source_key="src").set_random_state(seed)(sample())
        for k in ("synthetic", "mask"):
            assert type(out[k]) is type(d["image"]) and tuple(out[k].shape) == (1, 64, 64)
            assert out[k].dtype in (np.float32, torch.float32)
            np.testing.assert_array_equal(as_np(out[k]), ref[k])  # the container does not change the result
        m = as_np(out["mask"])
        n_labelled += bool(m.any())
        assert 0 <= m.min() and m.max() <= 1
        assert np.array_equal(as_np(out["image"]), IMG[None])  # input untouched
        if isinstance(d["image"], MetaTensor):
            assert out["synthetic"].meta["filename_or_obj"] == "phantom.png"
            out["synthetic"].meta["filename_or_obj"] = "changed"
            assert d["image"].meta["filename_or_obj"] == "phantom.png"
    assert n_labelled >= 2


def test_dict_delegates_to_array_transform_and_pure_function():
    d = NSAd(source_key="src").set_random_state(seed=11)(sample())
    syn, mask = NSA().set_random_state(seed=11)(IMG[None], LUNG[None], source=SRC[None])
    np.testing.assert_array_equal(d["synthetic"], syn)
    np.testing.assert_array_equal(d["mask"], mask)
    t = NSA().set_random_state(seed=11)
    t.randomize()
    want = synthesize_nsa(IMG, LUNG, np.random.default_rng(t._seed), source=SRC)
    np.testing.assert_array_equal(syn[0], want[0])
    np.testing.assert_array_equal(mask[0], want[1])


def outputs(t, make_sample, seed, n_calls=4):
    t.set_random_state(seed=seed)
    res = []
    for _ in range(n_calls):
        out = t(make_sample())
        for d in (out if isinstance(out, list) else [out]):
            res.append((as_np(d["synthetic"]), as_np(d["mask"])))
    return res


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))


@pytest.mark.parametrize("wrap", [False, True], ids=["NSAd", "SyntheticCopiesd(NSAd)"])
def test_same_seed_same_output_different_seed_different_output(wrap):
    make = lambda: SyntheticCopiesd(NSAd(source_key="src"), n_synthetic=(1, 3)) if wrap else NSAd(source_key="src")
    a, b = outputs(make(), sample, 7), outputs(make(), sample, 7)
    assert same(a, b)
    assert not same(a, outputs(make(), sample, 8))
    t = make()
    assert same(outputs(t, sample, 3), outputs(t, sample, 3))


def test_prob_zero_and_empty_lungs():
    out = NSAd(prob=0.0, source_key="src").set_random_state(0)(sample())
    assert np.array_equal(out["synthetic"], out["image"]) and not out["mask"].any()
    d = sample()
    d["lung"] = np.zeros_like(d["lung"])
    outs = [NSAd(source_key="src").set_random_state(s)(d) for s in range(4)]  # NSA ignores the lungs
    assert any(o["mask"].any() for o in outs)
    out = NSAd(source_key="src", restrict_to_lung=True).set_random_state(0)(d)  # now a clean sample
    assert np.array_equal(out["synthetic"], d["image"]) and not out["mask"].any()
    with pytest.raises(ValueError, match="no lung pixel"):
        NSAd(source_key="src", restrict_to_lung=True, on_empty_lung="raise")(d)


def write_pool(tmp_path, n=3):
    paths = []
    for i in range(n):
        p = tmp_path / f"train_{i}.png"
        cv2.imwrite(str(p), np.round(255 * stripes(64, period=4 + 2 * i)).astype(np.uint8))
        paths.append(str(p))
    return paths


def test_source_pool_path_reproducible_and_uses_the_pool_image(tmp_path):
    paths = write_pool(tmp_path)
    pool = SourcePool([{"image": p} for p in paths], loader=LoadCXRd("image", size=64))
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
    # an explicit source wins over the pool
    out = NSAd(source_pool=pool, source_key="src").set_random_state(1)(sample())
    ref = NSAd(source_key="src").set_random_state(1)(sample())
    np.testing.assert_array_equal(out["synthetic"], ref["synthetic"])


def test_missing_pool_and_source_is_a_clear_error():
    with pytest.raises(ValueError, match="give a source_pool"):
        NSAd()(sample(source=False))
    with pytest.raises(ValueError, match="give a source_pool"):
        NSAd(source_key="src")(sample(source=False))  # the key is absent from this sample
    out = NSAd(prob=0.0)(sample(source=False))  # a clean sample needs no source
    assert not out["mask"].any()
    bad = sample()
    bad["src"] = bad["src"][:, :-1]
    with pytest.raises(ValueError, match="source image shape"):
        NSAd(source_key="src")(bad)


def test_dict_errors_options_and_keys():
    with pytest.raises(ValueError, match=r"on_empty_lung must be one of"):
        NSAd(on_empty_lung="skip")
    with pytest.raises(ValueError, match=r"clone \(nsa_clone\)"):
        NSAd(clone="poisson")
    with pytest.raises(ValueError, match=r"label \(nsa_label\)"):
        NSA(label="soft")
    with pytest.raises(ValueError, match=r"nsa_resize_bounds"):
        NSA(resize_bounds=(1.3, 0.7))
    with pytest.raises(ValueError, match=r"synthesis_prob"):
        NSAd(prob=2)
    with pytest.raises(TypeError, match="unknown parameter"):
        NSAd(n_patch=2)
    with pytest.raises(TypeError, match="unknown parameter"):
        NSA(size=3)
    d = sample()
    del d["lung"]
    with pytest.raises(KeyError, match="lung"):
        NSAd(source_key="src")(d)
    assert "synthetic" not in NSAd(source_key="src", allow_missing_keys=True)(d)
    out = NSAd(keys="img", lung_key="lungs", synthetic_key="syn", mask_key="m", source_key="s").set_random_state(0)(
        {"img": IMG[None], "lungs": LUNG[None], "s": SRC[None]})
    assert out["syn"].shape == (1, 64, 64) and out["m"].any()
    t = NSAd(params=NSAParams(n_patches=1), label="binary")
    assert t.synthesizer.params == NSAParams(n_patches=1, label="binary")
    assert t.synthesizer.needs_source and not t.synthesizer.needs_lung
    assert NSAd(restrict_to_lung=True).synthesizer.needs_lung


# ---------------------------------------------------------------------------------------------------
# the method file


def test_method_file_parses_and_preprocessing_writes_synthetic_and_mask(tmp_path):
    from monai.bundle import ConfigParser

    from scripts.data.phantoms import generate_demo_dataset

    t0 = time.perf_counter()
    generate_demo_dataset(tmp_path / "demo", n_train=4, n_test_healthy=1, n_test_diseased=1, size=64)
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "methods" / "nsa.json")])
    parser.update({"dataset_dir": str(tmp_path / "demo"), "hparams#image_size": 64})
    hp = parser.get_parsed_content("hparams")
    assert hp["method"] == "nsa" and hp["mask_target_threshold"] == 0.5  # validation target: d >= x0 (4 levels)
    defaults = NSAParams()
    for f in dataclasses.fields(NSAParams):  # every tunable is a named hparam with the published default
        if f.name != "reference_size":
            v = hp[f"nsa_{f.name}"]
            assert (tuple(v) if isinstance(v, list) else v) == getattr(defaults, f.name), f.name
    synth = parser.get_parsed_content("synthesis")
    assert isinstance(synth, NSAd) and synth.synthesizer.params == defaults
    assert isinstance(synth.synthesizer.source_pool, SourcePool)
    item = parser.get_parsed_content("data_split")[0][0]
    preprocessing = parser.get_parsed_content("train#preprocessing")
    masks = []
    for seed in range(3):
        out = preprocessing.set_random_state(seed)(item)
        assert isinstance(out, list) and len(out) >= 2  # clean + 1..3 synthetic copies
        for d in out:
            assert tuple(d["synthetic"].shape) == tuple(d["mask"].shape) == (1, 64, 64)
            assert d["synthetic"].dtype == d["mask"].dtype == torch.float32
            assert 0 <= float(d["mask"].min()) and float(d["mask"].max()) <= 1
        assert not as_np(out[0]["mask"]).any()
        masks += [as_np(d["mask"]) for d in out[1:]]
    assert any(m.any() for m in masks)
    assert time.perf_counter() - t0 < 10
