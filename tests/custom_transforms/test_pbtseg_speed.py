"""PBTSeg speed: the published-code timing baseline of the benchmark, and the pruned robust search.

No timing asserts here (timings: ``python -m scripts.benchmarks.pbtseg``). These tests pin what the speed work
must not change: the baseline computes the published rules (it agrees with ``mode="reference"``), the robust
labels are bit-identical to those before the search was pruned, and the pruned search equals a plain loop over
every component of every threshold.
"""

import cv2
import numpy as np
import pytest

import custom_transforms.lung.pbtseg as pbt
from custom_transforms.lung.base import LEFT, RIGHT
from custom_transforms.lung.pbtseg import RELAXED, STRICT, Criteria, pbtseg
from scripts.benchmarks.pbtseg import agreement, published_pbtseg
from scripts.data.phantoms import make_phantom
from tests.helpers import REAL_CXR, sha256_arrays


def phantom(seed: int, size: int = 256):
    """``(image, lesion mask, lung labels)`` of a demo phantom."""
    return make_phantom(np.random.default_rng(seed), size)


# ---------------------------------------------------------------------------------------------------
# published-code baseline (benchmark only)
# ---------------------------------------------------------------------------------------------------
def test_published_baseline_agrees_with_reference_on_phantoms():
    found = 0
    for seed, size in ((0, 256), (1, 256), (2, 256), (3, 128), (4, 200)):
        img = phantom(seed, size)[0]
        ref = pbtseg(img, mode="reference")
        np.testing.assert_array_equal(published_pbtseg(img), ref)
        found += int((ref == RIGHT).any()) + int((ref == LEFT).any())
    assert found >= 5  # the phantoms do yield lungs, not only empty maps


def test_published_baseline_input_and_no_lung():
    img = phantom(0)[0]
    np.testing.assert_array_equal(published_pbtseg(img[None]), published_pbtseg(img))
    assert not published_pbtseg(np.full((128, 128), 0.7, np.float32)).any()
    with pytest.raises(ValueError, match="too small"):
        published_pbtseg(np.zeros((4, 4), np.float32))


def test_agreement():
    a = np.zeros((8, 8), np.uint8)
    a[:, :3], a[:, 5:] = RIGHT, LEFT
    b = a.copy()
    b[:, 5:] = 0  # left lung missing
    c = a.copy()
    c[0, 0] = 0  # right lung one pixel smaller
    q = agreement([a, a, a], [a, b, c])
    assert q["n"] == 3 and q["identical"] == pytest.approx(1 / 3) and q["same_sides"] == pytest.approx(2 / 3)
    assert q["dice_min"] == 0.0 and 0.0 < q["dice"] < 1.0
    assert agreement([a], [a]) == {"n": 1, "identical": 1.0, "same_sides": 1.0, "dice": 1.0, "dice_min": 1.0}


# ---------------------------------------------------------------------------------------------------
# robust mode: outputs pinned from before the speed work
# ---------------------------------------------------------------------------------------------------
def hide_lung(seed: int, side: int) -> np.ndarray:
    """A phantom whose ``side`` lung is painted over with soft tissue (the relaxed / mirror fallbacks run)."""
    img, _, lung = phantom(seed)
    img = img.copy()
    img[cv2.dilate((lung == side).view(np.uint8), np.ones((5, 5), np.uint8)) > 0] = 180
    return img


def robust_cases() -> list[tuple[np.ndarray, dict]]:
    cases = [(phantom(seed, size)[0], {}) for seed, size in ((0, 256), (1, 256), (2, 256), (3, 128), (4, 300),
                                                            (5, 97))]
    img = phantom(0)[0]
    cases += [(img, {"fill": "holes"}), (img, {"open_mask": False}), (img, {"work_size": 256}),
              (img[10:250, 30:], {}), (img.astype(np.float32) / 255.0, {"clahe_clip": 0}),
              (phantom(6, 512)[0], {"work_size": 512})]  # 32-bit labels
    for seed, side in ((0, LEFT), (3, RIGHT)):
        cases += [(hide_lung(seed, side), {}), (hide_lung(seed, side), {"relaxed": None})]
    return cases


# sha256 of the robust labels of robust_cases(), computed with the code before the search was pruned
ROBUST_SHA256 = "19aace1e1a26f1a19de6bd244ad9947b3f42df860985411b38658d31701277de"


def test_robust_outputs_pinned():
    labels = [pbtseg(img, **kw) for img, kw in robust_cases()]
    assert all((lab == RIGHT).any() and (lab == LEFT).any() for lab in labels)
    assert sha256_arrays(*labels) == ROBUST_SHA256


# ---------------------------------------------------------------------------------------------------
# robust mode: the pruned search equals a plain loop over all components
# ---------------------------------------------------------------------------------------------------
def plain_search(u, thresholds, mid, crit, sides, best, half=False):
    """The search without pruning: every component of every threshold, OpenCV's statistics, hull for each."""
    H, W = u.shape
    amin, amax, c = crit.min_area * H * W, crit.max_area * H * W, crit.central
    for t in thresholds[::-1]:
        b = (u <= t).view(np.uint8).copy()
        if half and sides == (RIGHT,):
            b[:, mid:] = 0
        elif half:
            b[:, :mid + 1] = 0
        n, labels, stats, cent = cv2.connectedComponentsWithStats(b, connectivity=8)
        for k in range(1, n):
            x, y, w, h, a = stats[k].tolist()
            cx, cy = cent[k]
            if not (amin < a < amax and h > crit.min_aspect * w and c * H < cy < (1 - c) * H
                    and c * W < cx < (1 - c) * W):
                continue
            side = RIGHT if cx < mid else LEFT
            if side not in sides or a <= best[side][0]:
                continue
            conv, touch, crop = pbt.hull_stats(labels, k, stats[k])
            if a / conv > crit.min_solidity and touch < crit.max_border_touch:
                best[side] = (a, pbt.paste(crop, stats[k], (H, W)), int(t))
    return best


def assert_same_best(got, want):
    for side in (RIGHT, LEFT):
        assert got[side][0] == want[side][0] and got[side][2] == want[side][2]
        if want[side][1] is None:
            assert got[side][1] is None
        else:
            np.testing.assert_array_equal(got[side][1], want[side][1])


def search_inputs():
    """Work images: phantoms as the robust mode sees them, and random smooth blobs (with border contact)."""
    rng = np.random.default_rng(0)
    for seed in range(6):
        u = cv2.resize(phantom(seed)[0], (128, 128), interpolation=cv2.INTER_AREA)
        u = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(4, 4)).apply(u)
        yield u, pbt.quantile_thresholds(u), int(rng.integers(50, 78))
    for size in (64, 97, 128):
        for _ in range(4):
            noise = cv2.GaussianBlur(rng.random((size, size)), (0, 0), float(rng.uniform(2, 6)))
            u = cv2.normalize(noise, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
            ts = np.unique(rng.integers(20, 235, int(rng.integers(3, 25))))
            yield u, ts, int(rng.integers(size // 3, 2 * size // 3))


CRITERIA = (STRICT, RELAXED, Criteria(min_area=0.005, max_area=0.5, min_solidity=0.8, max_border_touch=0.05,
                                      min_aspect=0.5, central=0.1),
            Criteria(min_area=0.005, max_border_touch=0.0, min_aspect=0.3))


@pytest.mark.parametrize("crit", CRITERIA)
def test_pruned_search_equals_plain_loop(crit):
    for u, ts, mid in search_inputs():
        for sides, half in (((RIGHT, LEFT), False), ((RIGHT,), True), ((LEFT,), True), ((LEFT,), False)):
            start = {RIGHT: (0, None, 0), LEFT: (0, None, 0)}
            want = plain_search(u, ts, mid, crit, sides, dict(start), half)
            assert_same_best(pbt._search(u, ts, mid, crit, sides, dict(start), half), want)


def test_pruned_search_keeps_label_order_on_ties():
    """Two equal candidates on one side: the first in the whole image's label order wins, also when the
    threshold below labels only a window (starting on an odd row here, were it not rounded down)."""
    u = np.full((128, 128), 230, np.uint8)
    u[25:110, 9:121] = 120  # wide region: too large and too wide, but its parts may still win
    a = np.zeros_like(u)
    cv2.ellipse(a, (30, 65), (7, 24), 0, 0, 360, 1, -1)  # top row 41
    b = np.zeros_like(u)
    cv2.ellipse(b, (50, 64), (7, 24), 0, 0, 360, 1, -1)  # same shape, one row higher: top row 40
    u[(a | b) > 0] = 50
    ts, start = np.array([60, 150]), {RIGHT: (0, None, 0), LEFT: (0, None, 0)}
    want = plain_search(u, ts, 64, STRICT, (RIGHT, LEFT), dict(start))
    assert want[RIGHT][0] == cv2.countNonZero(a) == cv2.countNonZero(b)
    assert_same_best(pbt._search(u, ts, 64, STRICT, (RIGHT, LEFT), dict(start)), want)


# ---------------------------------------------------------------------------------------------------
# real data (../shared/data/cxr)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nih_sample():
    paths = sorted(REAL_CXR.glob("nih/*/healthy/*.png"))
    if not paths:
        pytest.skip(f"real chest X-rays not found at {REAL_CXR} (see docs/data.md)")
    from custom_transforms.io import load_cxr

    return [load_cxr(p, 256) for p in paths[::3]]


@pytest.mark.realdata
def test_real_robust_finds_both_lungs(nih_sample):
    labels = [pbtseg(x) for x in nih_sample]
    both = np.mean([(lab == RIGHT).any() and (lab == LEFT).any() for lab in labels])
    assert len(labels) >= 90 and both >= 0.99


@pytest.mark.realdata
def test_real_published_baseline_agrees_with_reference(nih_sample):
    sample = nih_sample[::10]
    q = agreement([published_pbtseg(x) for x in sample], [pbtseg(x, mode="reference") for x in sample])
    assert q["identical"] >= 0.9 and q["dice"] >= 0.99, q
