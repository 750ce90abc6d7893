"""Helpers shared by the tests of the anomaly-synthesis methods (test_artasyn, test_cutpaste, test_anatpaste,
test_nsa, test_fpi, test_source_methods, test_seeding, test_samples): the procedural phantom and the checks every
method's functions and transforms must pass.

The checks take a factory ``make(**kwargs)`` of the dictionary transform under test and a ``sample(container)``
factory of its input dictionary (``image``, ``lung`` and, for methods with a second image, its source key).
"""

import dataclasses

import numpy as np
import pytest
import torch
from monai.data import MetaTensor


def phantom(size=256, sides=(1, 2)):
    """Bright body (0.75) with two darker lungs (0.3) carrying rib-like stripes; labels 1 (image left), 2."""
    yy, xx = np.mgrid[:size, :size] / (size / 256.0)
    img = np.full((size, size), 0.75, np.float32)
    lung = np.zeros((size, size), np.uint8)
    for lab, cx in ((1, 80), (2, 176)):
        inside = ((yy - 128) / 80) ** 2 + ((xx - cx) / 35) ** 2 < 1
        img[inside] = 0.3 + 0.15 * (np.sin(yy[inside] / 6.0) > 0.6)  # ribs: brighter bands
        if lab in sides:
            lung[inside] = lab
    return img, lung


def stripes(size, period=4, vertical=True, lo=0.15, hi=0.9):
    """A source that differs strongly from the phantom: stripes of ``period`` px, every pixel an object."""
    idx = np.arange(size)
    band = (idx // (period // 2)) % 2 == 0
    img = np.where(band[None, :] if vertical else band[:, None], lo, hi)
    return np.broadcast_to(img, (size, size)).astype(np.float32).copy()


def sampler(image, lung, **inputs):
    """``sample(container=np.asarray, source=True)``: a fresh input dictionary of ``image``, ``lung`` and the
    other ``inputs`` (e.g. ``src=SRC``, left out with ``source=False``), each ``(1, H, W)`` in ``container``."""

    def sample(container=np.asarray, source=True):
        d = {"image": container(image[None].copy()), "lung": container(lung[None].copy())}
        if source:
            d.update({k: container(v[None].copy()) for k, v in inputs.items()})
        return d

    return sample


def meta_tensor(a):
    return MetaTensor(torch.as_tensor(a), meta={"filename_or_obj": "phantom.png", "spacing": [0.5, 0.5]})


CONTAINERS = pytest.mark.parametrize("container", [np.asarray, torch.as_tensor, meta_tensor],
                                     ids=["numpy", "torch", "MetaTensor"])  # a test's ``container`` argument


def as_np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def outputs(t, make_sample, seed, n_calls=4):
    """``(synthetic, mask)`` of every output of ``n_calls`` calls of ``t`` seeded with ``seed``."""
    t.set_random_state(seed=seed)
    res = []
    for _ in range(n_calls):
        out = t(make_sample())
        for d in (out if isinstance(out, list) else [out]):
            res.append((as_np(d["synthetic"]), as_np(d["mask"])))
    return res


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))


def assert_seed_replays(make, make_sample, name="the transform"):
    """The same seed gives the same outputs, another seed others; re-seeding one instance replays its stream."""
    a, b = outputs(make(), make_sample, 7), outputs(make(), make_sample, 7)
    assert same(a, b), f"{name}: the same seed gave different outputs"
    assert not same(a, outputs(make(), make_sample, 8)), f"{name}: the seed has no effect"
    t = make()
    assert same(outputs(t, make_sample, 3), outputs(t, make_sample, 3))


def assert_contract(out, d, ref, image):
    """``out = t(d)``: float32 outputs of the image's shape in its container, equal to ``ref`` (the same seed
    on numpy input), the input untouched and, for a ``MetaTensor``, a copy of its metadata."""
    for k in ("synthetic", "mask"):
        assert type(out[k]) is type(d["image"]) and tuple(out[k].shape) == (1, *image.shape)
        assert out[k].dtype in (np.float32, torch.float32)
        np.testing.assert_array_equal(as_np(out[k]), ref[k])  # the container does not change the result
    np.testing.assert_array_equal(as_np(out["image"]), image[None])  # input untouched
    if isinstance(d["image"], MetaTensor):
        name = d["image"].meta["filename_or_obj"]
        assert out["synthetic"].meta["filename_or_obj"] == name and out["mask"].meta["filename_or_obj"] == name
        out["synthetic"].meta["filename_or_obj"] = "changed"
        assert d["image"].meta["filename_or_obj"] == name


def assert_clean(out, image=None):
    """A clean sample: ``synthetic`` equals the image and the mask is all zero."""
    assert np.array_equal(as_np(out["synthetic"]), as_np(out["image"] if image is None else image))
    assert not as_np(out["mask"]).any()


def assert_prob_zero_and_empty_lung_clean(make, sample):
    """``prob=0`` and an empty lung map (``on_empty_lung="clean"``) give clean samples; ``"raise"`` raises."""
    assert_clean(make(prob=0.0).set_random_state(0)(sample()))
    d = sample()
    d["lung"] = np.zeros_like(d["lung"])
    assert_clean(make().set_random_state(0)(d), d["image"])
    with pytest.raises(ValueError, match="no lung pixel"):
        make(on_empty_lung="raise")(d)


def assert_key_handling(make, sample, image, lung, **inputs):
    """A missing lung key raises ``KeyError``, or leaves the sample unchanged with ``allow_missing_keys``; other
    key names (``keys``, ``lung_key``, ``synthetic_key``, ``mask_key``; ``inputs``: more entries) work. Returns
    the output with the other key names."""
    d = sample()
    del d["lung"]
    with pytest.raises(KeyError, match="lung"):
        make()(d)
    assert "synthetic" not in make(allow_missing_keys=True)(d)
    out = make(keys="img", lung_key="lungs", synthetic_key="syn", mask_key="m").set_random_state(0)(
        {"img": image[None], "lungs": lung[None], **inputs})
    assert out["syn"].shape == (1, *image.shape) and out["m"].any()
    return out


def assert_seeds_reproduce_and_differ(synthesize, image, lung, compare=0, **kwargs):
    """A pure function ``synthesize(image, lung, rng, **kwargs)``: the same seed, the same output; another seed,
    another output ``compare`` (0: the synthetic image, 1: the mask)."""
    a = synthesize(image, lung, np.random.default_rng(42), **kwargs)
    b = synthesize(image, lung, np.random.default_rng(42), **kwargs)
    c = synthesize(image, lung, np.random.default_rng(43), **kwargs)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[compare], c[compare])


def assert_input_errors(synthesize, image, lung, small=None, needs_lung=False, **inputs):
    """The input errors of a pure function ``synthesize(image, lung, rng, **inputs)``: a lung map of another
    shape, more than one image, bad lung labels, an image ``small`` px a side (too small) and, for a method
    that ``needs_lung``, a lung map without lung pixels."""
    rng = np.random.default_rng(0)
    crop = lambda a: a[:small, :small]
    with pytest.raises(ValueError, match="does not match"):
        synthesize(image, lung[:-1], rng, **inputs)
    with pytest.raises(ValueError, match="2-D"):
        synthesize(image[None], lung[None], rng, **{k: v[None] for k, v in inputs.items()})
    with pytest.raises(ValueError, match="lung labels"):
        synthesize(image, lung * 100, rng, **inputs)
    if small is not None:
        with pytest.raises(ValueError, match="too small"):
            synthesize(crop(image), crop(lung), rng, **{k: crop(v) for k, v in inputs.items()})
    if needs_lung:
        with pytest.raises(ValueError, match="no lung pixel"):
            synthesize(image, np.zeros_like(lung), rng, **inputs)


def assert_source_input_errors(synthesize, image, lung, source, small):
    """:func:`assert_input_errors` for a pure function with a second image, and the errors of the source: of
    another shape, missing."""
    assert_input_errors(synthesize, image, lung, small=small, source=source)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="source image shape"):
        synthesize(image, lung, rng, source=source[:-1])
    with pytest.raises(ValueError, match="give source"):
        synthesize(image, lung, rng, source=None)
    with pytest.raises(TypeError):
        synthesize(image, lung, rng)  # source is a required keyword


def assert_source_errors(make, sample):
    """A method with a second image: no pool and no source is a clear error (unless the sample is clean),
    and so is a source of another shape; ``make`` takes no ``source_key`` of its own."""
    with pytest.raises(ValueError, match="give a source_pool"):
        make()(sample(source=False))
    with pytest.raises(ValueError, match="give a source_pool"):
        make(source_key="src")(sample(source=False))  # the key is absent from this sample
    assert not make(prob=0.0)(sample(source=False))["mask"].any()  # a clean sample needs no source
    bad = sample()
    bad["src"] = bad["src"][:, :-1]
    with pytest.raises(ValueError, match="source image shape"):
        make(source_key="src")(bad)


def assert_delegates(dict_t, array_t, synthesize, sample, image, lung, **inputs):
    """``dict_t`` seeded with 11 gives what ``array_t`` seeded the same gives on ``(image, lung, **inputs)``, and
    that is ``synthesize(image, lung, rng, **inputs)`` with the generator the array transform seeded. Returns
    the mask."""
    d = dict_t.set_random_state(seed=11)(sample())
    syn, mask = array_t.set_random_state(seed=11)(image[None], lung[None], **{k: v[None] for k, v in inputs.items()})
    np.testing.assert_array_equal(d["synthetic"], syn)
    np.testing.assert_array_equal(d["mask"], mask)
    ref = synthesize(image, lung, np.random.default_rng(array_t._seed), **inputs)
    np.testing.assert_array_equal(syn[0], ref[0])
    np.testing.assert_array_equal(mask[0], ref[1])
    return mask


def assert_common_errors(*classes):
    """Each transform class rejects a bad ``on_empty_lung`` or ``prob`` and an unknown parameter name (naming
    itself in the error)."""
    for cls in classes:
        with pytest.raises(ValueError, match="on_empty_lung must be one of"):
            cls(on_empty_lung="skip")
        with pytest.raises(ValueError, match=r"prob \(synthesis_prob\)"):
            cls(prob=2)
        with pytest.raises(TypeError, match=f"^{cls.__name__} got unknown parameter"):
            cls(no_such_parameter=3)


def make_pool(paths, size=64):
    """A :class:`SourcePool` of image files, loaded at ``size`` px."""
    from custom_transforms.io import LoadCXRd
    from custom_transforms.synthesis.base import SourcePool

    return SourcePool([{"image": p} for p in paths], loader=LoadCXRd("image", size=size))


def assert_explicit_source_wins(cls, pool, sample):
    """With a pool and a source key present, the dictionary transform ``cls`` uses the sample's source."""
    out = cls(source_pool=pool, source_key="src").set_random_state(1)(sample())
    ref = cls(source_key="src").set_random_state(1)(sample())
    np.testing.assert_array_equal(out["synthetic"], ref["synthetic"])


def method_parser(method, dataset_dir=None, **updates):
    """A ``ConfigParser`` of ``configs/train.json`` with ``configs/methods/<method>.json`` at 64 px."""
    from monai.bundle import ConfigParser

    from tests.helpers import CONFIGS

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "methods" / f"{method}.json")])
    parser.update({"hparams#image_size": 64, **updates})
    if dataset_dir is not None:
        parser.update({"dataset_dir": str(dataset_dir)})
    return parser


def write_demo(path):
    """The 64 px demo data set (4 training images) at ``path``."""
    from scripts.data.phantoms import generate_demo_dataset

    generate_demo_dataset(path, n_train=4, n_test_healthy=1, n_test_diseased=1, size=64)
    return path


def assert_hparams_are_defaults(hp, params_class, prefix, skip=()):
    """Every field of ``params_class`` (but ``skip``) is the hparam ``<prefix>_<field>`` with its default."""
    defaults = params_class()
    for f in dataclasses.fields(params_class):
        if f.name not in skip:
            v = hp[f"{prefix}_{f.name}"]
            assert (tuple(v) if isinstance(v, list) else v) == getattr(defaults, f.name), f.name


def assert_training_samples(samples, clean_first=True):
    """Training-preprocessing output: a list of float32 ``(1, 64, 64)`` samples, a clean one first."""
    assert isinstance(samples, list) and len(samples) >= 2  # clean + 1..3 synthetic copies
    for d in samples:
        assert tuple(d["synthetic"].shape) == tuple(d["mask"].shape) == (1, 64, 64)
        assert d["synthetic"].dtype == d["mask"].dtype == torch.float32
    if clean_first:
        assert not as_np(samples[0]["mask"]).any()


def assert_bad_values_named(params_class, prefix, bad):
    """Each of the ``bad`` values (``{field: [value, ...]}``) raises a ``ValueError`` that names the field and
    its config key, ``<Params>.<field> (<prefix>_<field>)``; the parameters are frozen."""
    for field, values in bad.items():
        for v in values:
            with pytest.raises(ValueError, match=rf"{params_class.__name__}\.{field} \({prefix}_{field}\)"):
                params_class(**{field: v})
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(params_class(), dataclasses.fields(params_class)[0].name, None)
