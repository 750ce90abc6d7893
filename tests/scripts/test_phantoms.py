"""Demo phantoms (scripts/data/phantoms.py): determinism, contract, dataset layout, manifest, PBTSeg on them.

The phantoms are for smoke runs and tests only; nothing here measures accuracy on real radiographs.
"""

import hashlib
import json
import os
import time

import cv2
import numpy as np
import pytest

from scripts.data import phantoms as dd
from scripts.data.datasets import discover
from tests.helpers import sha256_arrays

SMALL = dict(n_train=3, n_test_healthy=2, n_test_diseased=2, size=64, seed=3, n_unlabelled=2)


def phantom(seed=0, size=256, lesions=0):
    return dd.make_phantom(np.random.default_rng(seed), size=size, lesions=lesions)


def digest(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def tree(root):
    """{relative path: (size, mtime_ns)} of every file under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


# ---------------------------------------------------------------- make_phantom

@pytest.mark.parametrize("size", [64, 256, 300])
def test_shapes_dtypes_values(size):
    img, les, lung = phantom(1, size, lesions=2)
    for a in (img, les, lung):
        assert a.shape == (size, size) and a.dtype == np.uint8
    assert set(np.unique(les)) <= {0, 255}
    assert set(np.unique(lung)) == {0, 1, 2}
    assert img.max() - img.min() > 150  # a full-range radiograph, not a flat image


def test_same_seed_identical_different_seeds_differ():
    a = phantom(7, lesions=2)
    b = phantom(7, lesions=2)
    assert digest(*a) == digest(*b)
    c = phantom(8, lesions=2)
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[2], c[2])


# sha256 over (dtype, shape, bytes) of image, lesion mask and lung labels of
# make_phantom(phantom_rng(0, split, index), size, lesions). They pin the output for the numpy and
# OpenCV versions pinned in setup.cfg; another version of either may legitimately change them.
PINNED = {
    ("train_healthy", 1, 0, 64): "cb8ca0bc34636732711be73cb68eea0121cd8bcb1d1a67f597e36b9cd274c705",
    ("train_healthy", 1, 0, 256): "7f5e113bf3d49537213f48c4c5732d51380359420e9ffc99404abdbf478d5401",
    ("train_healthy", 7, 0, 64): "02c49b0c33c09974a52cddb6c7f14c98b0b35514a1b4c71e1617463cc29583e6",
    ("train_healthy", 7, 0, 256): "c6269a787b45538c8cbbbd2997b61846b936bf4609492925e762169c5d6dbdc8",
    ("test_diseased", 3, 2, 64): "3a1d71b2bc19a902c8055f02e8d610acb6a3e16c73e79134e84eb5be43e04651",
    ("test_diseased", 3, 2, 256): "e4f9ecc2f76efef0858b0d56303544657b0e63833cff193e9e1120432d8d676c",
    ("test_diseased", 5, 1, 64): "340fc184a19e9125eb04259254df5c5e4c19ab3b97d4a82c762ecec333258e1c",
    ("test_diseased", 5, 1, 256): "589286d7039dbd54d83eab396b47ad979cc7253ed36519358c6304bb9d77a34c",
}


@pytest.mark.parametrize("split,index,lesions,size", sorted(PINNED))
def test_output_pinned(split, index, lesions, size):
    out = dd.make_phantom(dd.phantom_rng(0, split, index), size=size, lesions=lesions)
    assert sha256_arrays(*out) == PINNED[(split, index, lesions, size)]


def test_healthy_has_empty_lesion_mask():
    for seed in range(5):
        _, les, _ = phantom(seed, lesions=0)
        assert not les.any()


@pytest.mark.parametrize("seed", range(8))
def test_lesions_non_empty_inside_lungs_and_brighter(seed):
    n = 1 + seed % 3
    img, les, lung = phantom(seed, lesions=n)
    assert (les > 0).sum() > 20
    grown = cv2.dilate((lung > 0).astype(np.uint8), np.ones((5, 5), np.uint8))
    assert not ((les > 0) & (grown == 0)).any(), "lesion mask leaves the (slightly dilated) lungs"
    healthy, _, _ = dd.make_phantom(np.random.default_rng(seed), lesions=0)
    # the same rng draws the same anatomy up to the lesions: lesion pixels became brighter on average
    m = les > 0
    assert img[m].astype(float).mean() > healthy[m].astype(float).mean() + 5


def test_lung_anatomy():
    for seed in range(10):
        img, _, lung = phantom(seed)
        S = img.shape[0]
        right, left = lung == 1, lung == 2
        # right lung (label 1) on the image left, left lung (label 2) on the image right
        assert np.nonzero(right)[1].mean() < S / 2 < np.nonzero(left)[1].mean()
        # each lung: a sizeable field, taller than wide, away from the image border
        for m in (right, left):
            ys, xs = np.nonzero(m)
            assert 0.04 < m.mean() < 0.2
            assert np.ptp(ys) > np.ptp(xs)
            assert ys.min() > 2 and xs.min() > 2 and ys.max() < S - 3 and xs.max() < S - 3
        assert left.sum() < 1.1 * right.sum()  # the heart takes room from the left lung


def test_lungs_darker_than_mediastinum_and_body():
    for seed in range(10):
        img, _, lung = phantom(seed)
        S = img.shape[0]
        img = img.astype(float)
        rows = np.nonzero((lung > 0).any(1))[0]
        r0, r1 = rows.min(), rows.max()
        band = slice(r0 + (r1 - r0) // 4, r1 - (r1 - r0) // 4)
        mediastinum = img[band, S // 2 - S // 40: S // 2 + S // 40]
        lungs = img[lung > 0]
        assert lungs.mean() < mediastinum.mean() - 60
        # soft tissue between the lungs and the body outline is brighter than the lungs
        body = cv2.dilate((lung > 0).astype(np.uint8), np.ones((9, 9), np.uint8)) - (lung > 0)
        ring = img[body > 0]
        assert lungs.mean() < ring.mean() - 30
        # the air outside the body (image corners at the top) is dark too
        assert img[:S // 16, :S // 16].mean() < lungs.mean()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        phantom(size=16)
    with pytest.raises(ValueError):
        phantom(lesions=-1)


@pytest.mark.slow  # wall-clock bound: a benchmark, not a default test
def test_speed():
    rng = np.random.default_rng(0)
    dd.make_phantom(rng)
    ts = []
    for i in range(10):
        t0 = time.perf_counter()
        dd.make_phantom(rng, lesions=i % 3)
        ts.append(time.perf_counter() - t0)
    assert np.median(ts) < 0.1  # ~15 ms on a laptop core; loose bound for slow CI machines


# ---------------------------------------------------------------- dataset on disk

def test_layout_manifest_and_discovery(tmp_path):
    root = tmp_path / "demo"
    summary = dd.generate_demo_dataset(root, **SMALL)
    assert summary["generated"] is True
    names = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    expected = ({f"train/healthy/phantom_{i:05d}.png" for i in (1, 2, 3)}
                | {f"test/healthy/phantom_{i:05d}.png" for i in (10001, 10002)}
                | {f"test/diseased/phantom_{i:05d}.png" for i in (20001, 20002)}
                | {f"ground_truth/diseased/phantom_{i:05d}.png" for i in (20001, 20002)}
                | {f"train/unlabelled/phantom_{i:05d}.png" for i in (30001, 30002)}
                | {"demo.json"})
    assert names == expected  # also: no temporary files left behind
    manifest = json.loads((root / "demo.json").read_text())
    assert manifest["counts"] == {"train_healthy": 3, "test_healthy": 2, "test_diseased": 2, "train_unlabelled": 2}
    assert manifest["seed"] == 3 and manifest["size"] == 64
    assert manifest["generator_version"] == dd.GENERATOR_VERSION
    assert "NOT for judging accuracy" in manifest["note"]
    for rel in expected - {"demo.json"}:
        a = cv2.imread(str(root / rel), cv2.IMREAD_UNCHANGED)
        assert a.shape == (64, 64) and a.dtype == np.uint8
    for name in ("phantom_20001.png", "phantom_20002.png"):
        gt = cv2.imread(str(root / "ground_truth/diseased" / name), cv2.IMREAD_UNCHANGED)
        assert set(np.unique(gt)) == {0, 255}
    test = discover(root, "test")
    assert [d["label"] for d in test] == [0, 0, 1, 1]
    assert all(("gt_mask" in d) == (d["label"] == 1) for d in test)
    assert len(discover(root, "train")) == 3
    # the unlabelled pool (SAGAN's x_u) mixes healthy and lesioned phantoms and has no masks
    unlabelled = discover(root, "unlabelled")
    assert [d["label"] for d in unlabelled] == [-1, -1] and not any("gt_mask" in d for d in unlabelled)
    rng = dd.phantom_rng(3, "train_unlabelled", 1)
    image, lesion, _ = dd.make_phantom(rng, size=64, lesions=int(rng.integers(1, 4)))  # odd index: lesions
    assert lesion.max() > 0
    np.testing.assert_array_equal(cv2.imread(str(root / "train/unlabelled/phantom_30002.png"), cv2.IMREAD_UNCHANGED),
                                  image)


def test_deterministic_bytes_and_subsets(tmp_path):
    dd.generate_demo_dataset(tmp_path / "a", **SMALL)
    dd.generate_demo_dataset(tmp_path / "b", **SMALL)
    dd.generate_demo_dataset(tmp_path / "c", **{**SMALL, "seed": 4})
    dd.generate_demo_dataset(tmp_path / "d", **{**SMALL, "n_train": 1, "n_test_healthy": 0})
    for rel in ("train/healthy/phantom_00001.png", "test/diseased/phantom_20002.png",
                "ground_truth/diseased/phantom_20002.png"):
        a = (tmp_path / "a" / rel).read_bytes()
        assert a == (tmp_path / "b" / rel).read_bytes()  # same seed: identical bytes
        assert a == (tmp_path / "d" / rel).read_bytes()  # a subset reproduces the same phantoms
    assert ((tmp_path / "a/train/healthy/phantom_00001.png").read_bytes()
            != (tmp_path / "c/train/healthy/phantom_00001.png").read_bytes())


def test_ensure_does_not_regenerate(tmp_path):
    root = tmp_path / "demo"
    assert dd.ensure_demo_dataset(root, **SMALL) == root
    before = tree(root)
    time.sleep(0.01)
    assert dd.ensure_demo_dataset(str(root), **SMALL) == root
    assert tree(root) == before  # nothing rewritten: same files, sizes, mtimes
    summary = dd.generate_demo_dataset(root, **SMALL)
    assert summary["generated"] is False and tree(root) == before


def test_regenerates_when_incomplete_or_mismatched(tmp_path):
    root = tmp_path / "demo"
    dd.generate_demo_dataset(root, **SMALL)
    ref = (root / "train/healthy/phantom_00002.png").read_bytes()
    # interrupted run: no manifest -> generated again
    (root / "demo.json").unlink()
    (root / "train/healthy/phantom_00002.png").unlink()
    dd.ensure_demo_dataset(root, **SMALL)
    assert (root / "demo.json").is_file()
    assert (root / "train/healthy/phantom_00002.png").read_bytes() == ref
    # a missing file with a manifest is incomplete too
    (root / "test/diseased/phantom_20001.png").unlink()
    dd.ensure_demo_dataset(root, **SMALL)
    assert (root / "test/diseased/phantom_20001.png").is_file()
    # fewer images requested: stale phantoms are removed, the manifest follows
    dd.ensure_demo_dataset(root, **{**SMALL, "n_train": 1})
    assert sorted(p.name for p in (root / "train/healthy").iterdir()) == ["phantom_00001.png"]
    assert json.loads((root / "demo.json").read_text())["counts"]["train_healthy"] == 1
    # overwrite rewrites a complete set
    assert dd.generate_demo_dataset(root, **{**SMALL, "n_train": 1}, overwrite=True)["generated"]


def test_atomic_writes_leave_no_temp_files(tmp_path, monkeypatch):
    root = tmp_path / "demo"
    dd.generate_demo_dataset(root, **SMALL)
    assert not [p for p in root.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]

    # a failure while writing leaves neither a temp file nor a partial target nor a manifest
    calls = {"n": 0}
    real = os.replace

    def failing_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        dd.generate_demo_dataset(tmp_path / "broken", **SMALL)
    monkeypatch.undo()
    broken = tmp_path / "broken"
    assert not (broken / "demo.json").exists()
    assert not [p for p in broken.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def test_cli(tmp_path, capsys):
    summary = dd.main(["--out", str(tmp_path / "cli"), "--n-train", "2", "--n-test-healthy", "1",
                       "--n-test-diseased", "1", "--n-unlabelled", "0", "--size", "64", "--seed", "5"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == summary and printed["generated"] is True
    assert printed["counts"] == {"train_healthy": 2, "test_healthy": 1, "test_diseased": 1, "train_unlabelled": 0}


def test_docstring_warns_not_for_accuracy():
    assert "NOT be used to judge accuracy" in " ".join(dd.__doc__.split())


# ---------------------------------------------------------------- PBTSeg finds both lungs

def test_pbtseg_finds_both_lungs_on_phantoms():
    try:
        from custom_transforms.lung.pbtseg import pbtseg
    except Exception as exc:  # noqa: BLE001 - any import failure means the segmenter is not usable here
        pytest.skip(f"custom_transforms.lung.pbtseg cannot be imported ({type(exc).__name__}: {exc})")
    n, ok = 40, 0
    for i in range(n):
        rng = dd.phantom_rng(11, "test_diseased" if i % 4 == 0 else "train_healthy", i)
        img, _, lung = dd.make_phantom(rng, size=256, lesions=int(i % 4 == 0) * (1 + i % 3))
        lab = pbtseg(img.astype(np.float32) / 255.0)
        found = True
        for k in (1, 2):
            a, t = lab == k, lung == k
            dice = 2 * (a & t).sum() / (a.sum() + t.sum() + 1e-9)
            found &= bool(a.any()) and dice > 0.6  # found, on the right side, roughly the right field
        ok += found
    assert ok >= 0.95 * n, f"PBTSeg found both lungs on only {ok}/{n} phantoms"
