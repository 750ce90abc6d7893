"""Seed forwarding: every random dictionary transform gives the same output for the same seed.

The dictionary wrappers own their array transform and forward ``set_random_state`` to it (MONAI's
``RandGaussianNoised`` pattern), so a seeded pipeline is reproducible, also through ``SyntheticCopiesd``.
"""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from custom_transforms import AnatPasted, ARTASyn, ARTASynd, CutPasted, FPId, NSAd, SeededPerSampled, SyntheticCopiesd
from tests.custom_transforms.test_artasyn import phantom

IMG, LUNG = phantom(64)


SOURCE = np.ascontiguousarray(IMG[:, ::-1] * 0.8 + 0.1)  # a second image for NSA and FPI


def sample(container=np.asarray):
    return {"image": container(IMG[None].copy()), "lung": container(LUNG[None].copy()),
            "source": container(SOURCE[None].copy())}


def as_np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


DICT_TRANSFORMS = {
    "ARTASynd": lambda: ARTASynd(keys="image"),
    "ARTASynd(prob=0.5)": lambda: ARTASynd(keys="image", prob=0.5),
    "SyntheticCopiesd(ARTASynd)": lambda: SyntheticCopiesd(ARTASynd(keys="image"), n_synthetic=(1, 3)),
    "CutPasted": lambda: CutPasted(keys="image", variant="union"),
    "AnatPasted": lambda: AnatPasted(keys="image"),
    "NSAd": lambda: NSAd(keys="image", source_key="source"),
    "FPId": lambda: FPId(keys="image", source_key="source"),
    "SyntheticCopiesd(FPId)": lambda: SyntheticCopiesd(FPId(keys="image", source_key="source"), n_synthetic=(1, 3)),
    "SyntheticCopiesd(NSAd)": lambda: SyntheticCopiesd(NSAd(keys="image", source_key="source"), n_synthetic=(1, 3)),
}


def outputs(t, seed, n_calls=4):
    t.set_random_state(seed=seed)
    res = []
    for _ in range(n_calls):
        out = t(sample())
        for d in (out if isinstance(out, list) else [out]):
            res.append((as_np(d["synthetic"]), as_np(d["mask"])))
    return res


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))


@pytest.mark.parametrize("name", sorted(DICT_TRANSFORMS))
def test_same_seed_same_output_different_seed_different_output(name):
    make = DICT_TRANSFORMS[name]
    a, b = outputs(make(), 7), outputs(make(), 7)
    assert same(a, b), f"{name}: the same seed gave different outputs"
    assert not same(a, outputs(make(), 8)), f"{name}: the seed has no effect"
    t = make()  # re-seeding one instance replays its stream
    assert same(outputs(t, 3), outputs(t, 3))


def test_dictionary_transform_delegates_to_its_array_transform():
    """``ARTASynd(seed)`` == ``ARTASyn(seed)``: the wrapper forwards the seed and adds nothing random."""
    d = ARTASynd(keys="image").set_random_state(seed=11)(sample())
    syn, mask = ARTASyn().set_random_state(seed=11)(IMG[None], LUNG[None])
    np.testing.assert_array_equal(d["synthetic"], syn)
    np.testing.assert_array_equal(d["mask"], mask)
    assert mask.any()


def test_seeded_per_sample_fixes_the_output_per_file():
    t = SeededPerSampled(SyntheticCopiesd(ARTASynd(keys="image"), n_synthetic=1), seed=5)

    def run(name):
        s = sample(torch.as_tensor)
        s["image"] = MetaTensor(s["image"], meta={"filename_or_obj": name})
        return [as_np(d["mask"]) for d in t(s)]

    first = run("a.png")
    for _ in range(2):  # whatever ran in between
        run("b.png")
        assert all(np.array_equal(x, y) for x, y in zip(first, run("a.png")))
    assert not all(np.array_equal(x, y) for x, y in zip(first, run("b.png")))


@pytest.mark.parametrize("container", [np.asarray, torch.as_tensor,
                                       lambda a: MetaTensor(torch.as_tensor(a), meta={"filename_or_obj": "x.png"})])
def test_container_kept_and_seed_independent_of_container(container):
    ref = ARTASynd(keys="image").set_random_state(seed=2)(sample())
    out = ARTASynd(keys="image").set_random_state(seed=2)(sample(container))
    for k in ("synthetic", "mask"):
        assert type(out[k]) is type(out["image"])
        np.testing.assert_array_equal(as_np(out[k]), ref[k])
    if isinstance(out["image"], MetaTensor):
        assert out["synthetic"].meta["filename_or_obj"] == "x.png"
