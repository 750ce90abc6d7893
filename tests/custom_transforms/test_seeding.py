"""Seed forwarding: every random dictionary transform gives the same output for the same seed.

The dictionary wrappers own their array transform and forward ``set_random_state`` to it (MONAI's
``RandGaussianNoised`` pattern), so a seeded pipeline is reproducible, also through ``SyntheticCopiesd``.
"""

from functools import partial

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from custom_transforms import AnatPasted, ARTASyn, ARTASynd, CutPasted, FPId, NSAd, SeededPerSampled, SyntheticCopiesd
from custom_transforms.synthesis import (
    FPI,
    NSA,
    AnatPaste,
    CutPaste,
    synthesize_anatpaste,
    synthesize_artasyn,
    synthesize_cutpaste,
    synthesize_fpi,
    synthesize_nsa,
)
from tests.custom_transforms.synthesis_helpers import as_np, assert_delegates, assert_seed_replays, phantom

IMG, LUNG = phantom(64)


SOURCE = np.ascontiguousarray(IMG[:, ::-1] * 0.8 + 0.1)  # a second image for NSA and FPI


def sample(container=np.asarray):
    return {"image": container(IMG[None].copy()), "lung": container(LUNG[None].copy()),
            "source": container(SOURCE[None].copy())}


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


@pytest.mark.parametrize("name", sorted(DICT_TRANSFORMS))
def test_same_seed_same_output_different_seed_different_output(name):
    assert_seed_replays(DICT_TRANSFORMS[name], sample, name)


DELEGATES = {  # name: (dictionary transform, its array transform built alike, the pure function they call)
    "ARTASyn": lambda: (ARTASynd(keys="image"), ARTASyn(), synthesize_artasyn),
    "CutPaste(scar)": lambda: (CutPasted(keys="image", variant="scar"), CutPaste(variant="scar"),
                               partial(synthesize_cutpaste, variant="scar")),
    "AnatPaste": lambda: (AnatPasted(keys="image"), AnatPaste(), synthesize_anatpaste),
    "NSA": lambda: (NSAd(keys="image", source_key="source"), NSA(), synthesize_nsa),
    "FPI": lambda: (FPId(keys="image", source_key="source"), FPI(), synthesize_fpi),
}


@pytest.mark.parametrize("name", sorted(DELEGATES))
def test_dictionary_transform_delegates_to_its_array_transform(name):
    """``ARTASynd(seed)`` == ``ARTASyn(seed)`` == ``synthesize_artasyn(default_rng(its seed))``, and so for each
    method: the wrapper forwards the seed and adds nothing random; the array transform calls the pure function."""
    dict_t, array_t, synthesize = DELEGATES[name]()
    inputs = {"source": SOURCE} if array_t.needs_source else {}
    mask = assert_delegates(dict_t, array_t, synthesize, sample, IMG, LUNG, **inputs)
    assert mask.any() or name == "NSA"  # NSA's patches at 64 px may change nothing


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
