"""Training-sample composition: clean samples, synthetic copies, per-file seeds, collation."""

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor

from custom_transforms.synthesis.artasyn import ARTASynd
from custom_transforms.synthesis.base import SourcePool
from custom_transforms.synthesis.samples import CleanSampled, RandPoolImaged, SeededPerSampled, SyntheticCopiesd
from tests.custom_transforms.synthesis_helpers import phantom

IMG, LUNG = phantom(64)


def sample(name="a.png"):
    return {"image": MetaTensor(torch.from_numpy(IMG)[None], meta={"filename_or_obj": name}),
            "lung": torch.from_numpy(LUNG)[None], "label": 0}


def test_clean_sample_copies_image_and_empty_mask():
    d = CleanSampled()(sample())
    assert torch.equal(d["synthetic"], d["image"]) and d["synthetic"] is not d["image"]
    assert d["mask"].shape == d["image"].shape and d["mask"].sum() == 0
    with pytest.raises(KeyError, match="image"):
        CleanSampled()({"x": 1})


def test_copies_paper_composition_and_reproducible():
    t = SyntheticCopiesd(ARTASynd(keys="image"), n_synthetic=(1, 3)).set_random_state(5)
    counts = []
    for _ in range(12):
        out = t(sample())
        counts.append(len(out) - 1)
        assert out[0]["mask"].sum() == 0 and torch.equal(out[0]["synthetic"], out[0]["image"])
        assert all(o["mask"].sum() > 0 for o in out[1:])
        assert all((o["synthetic"] >= o["image"] - 1e-6).all() for o in out[1:])  # lighten-only
    assert set(counts) <= {1, 2, 3} and len(set(counts)) > 1
    a = SyntheticCopiesd(ARTASynd(keys="image"), (1, 3)).set_random_state(9)(sample())
    b = SyntheticCopiesd(ARTASynd(keys="image"), (1, 3)).set_random_state(9)(sample())
    assert len(a) == len(b) and all(torch.equal(x["synthetic"], y["synthetic"]) for x, y in zip(a, b))


def test_baseline_composition_and_bad_values():
    out = SyntheticCopiesd(None, n_synthetic=0, include_clean=True)(sample())
    assert len(out) == 1 and out[0]["mask"].sum() == 0
    with pytest.raises(ValueError, match="synthesis transform"):
        SyntheticCopiesd(None, n_synthetic=(1, 2))
    with pytest.raises(ValueError, match="no samples"):
        SyntheticCopiesd(None, n_synthetic=0, include_clean=False)
    with pytest.raises(ValueError, match="n_synthetic"):
        SyntheticCopiesd(ARTASynd(keys="image"), n_synthetic=(3, 1))


def test_seeded_per_sample_is_fixed_per_file():
    t = SeededPerSampled(SyntheticCopiesd(ARTASynd(keys="image"), 1, include_clean=False), seed=0)
    a1, a2, b = t(sample("a.png")), t(sample("a.png")), t(sample("b.png"))
    assert torch.equal(a1[0]["synthetic"], a2[0]["synthetic"])
    assert not torch.equal(a1[0]["synthetic"], b[0]["synthetic"])
    with pytest.raises(TypeError):
        SeededPerSampled(CleanSampled())


def test_lists_flatten_in_monai_dataloader():
    t = SyntheticCopiesd(ARTASynd(keys="image"), n_synthetic=2)
    loader = DataLoader(Dataset([sample(f"{i}.png") for i in range(2)], transform=t), batch_size=2)
    batch = next(iter(loader))
    assert batch["synthetic"].shape == (6, 1, 64, 64) and batch["mask"].shape == (6, 1, 64, 64)
    assert batch["lung"].dtype == torch.uint8
    assert np.count_nonzero(batch["mask"].flatten(1).sum(1).numpy()) == 4


def test_rand_pool_image_draws_reproducibly_from_the_pool():
    images = [torch.full((1, 4, 4), float(i)) for i in range(5)]
    pool = SourcePool([{"image": i} for i in range(5)], loader=lambda d: {"image": images[d["image"]]})
    draws = []
    for _ in range(2):
        t = RandPoolImaged(pool, key="unlabelled").set_random_state(seed=3)
        draws.append([float(t({"image": torch.zeros(1, 4, 4)})["unlabelled"][0, 0, 0]) for _ in range(20)])
    assert draws[0] == draws[1]  # seeded: the same images in the same order
    assert set(draws[0]) == {0.0, 1.0, 2.0, 3.0, 4.0}  # uniform over the pool: every image drawn in 20 tries
    out = RandPoolImaged(pool)({"image": torch.zeros(1, 4, 4), "name": "a"})
    assert set(out) == {"image", "name", "unlabelled"}


def test_source_pool_cache_reads_each_file_once():
    calls = []

    def loader(d):
        calls.append(d["image"])
        return {"image": torch.full((1, 4, 4), float(d["image"]))}

    pool = SourcePool([{"image": i} for i in range(3)], loader=loader, cache=True)
    assert [float(pool.load(i % 3)[0, 0, 0]) for i in range(9)] == [0.0, 1.0, 2.0] * 3
    assert calls == [0, 1, 2]  # loaded once each
    uncached = SourcePool([{"image": i} for i in range(3)], loader=loader)
    calls.clear()
    uncached.load(1), uncached.load(1)
    assert calls == [1, 1]
