"""Benchmark lung segmenters (PBTSeg published-code baseline / reference / robust, AnatPaste's Otsu) on real CXRs.

For each method: images/s over the same preloaded 256 px NIH images in one process, the rate of images
with both lungs and with no lung on the 297 healthy NIH images, and the mean Dice of the binary lung mask
(labels > 0) against the 35 human masks of ``lung_masks``. The methods are timed in ONE run, interleaved
image by image (the order of the methods rotates from image to image) over ``--runs`` passes; the table
gives the median images/s over the passes (min-max) and each method's speed relative to the published-code
baseline, and the line below it the robust / published ratio of each pass (their median first). Last, the
agreement of the published-code baseline with ``mode="reference"`` (same label maps) is printed: it
shows the baseline stands in fairly for the authors' code.

    python -m scripts.benchmarks.pbtseg [--data ../shared/data/cxr] [--size 256] [--runs 5]

``published_pbtseg`` (the baseline), ``benchmark_interleaved(fns, images)``, ``evaluate_quality(fn, data)`` and
``agreement(labels_a, labels_b)`` can be imported.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy.ndimage import binary_fill_holes
from skimage.measure import label, regionprops

from custom_transforms.io import load_cxr, load_mask
from custom_transforms.lung.base import LEFT, RIGHT
from custom_transforms.lung.otsu import otsu_lung_seg
from custom_transforms.lung.pbtseg import REFERENCE_THRESHOLDS, pbtseg, to_uint8
from custom_transforms.utils import as_image2d

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cxr"


# ---------------------------------------------------------------------------------------------------
# published-code timing baseline (not used by the bundle)
# ---------------------------------------------------------------------------------------------------
def _published_border_touch(region, shape: tuple[int, int]) -> float:
    """Border-touch fraction the way the authors' code measures it: the region's convex image is put
    into a full-size mask and measured again with ``regionprops`` (its pixel coordinates on the image
    border / its perimeter)."""
    r0, c0, r1, c1 = region.bbox
    full = np.zeros(shape, bool)
    full[r0:r1, c0:c1] = region.image_convex
    hull = regionprops(full.astype(np.uint8))[0]
    rows, cols = hull.coords[:, 0], hull.coords[:, 1]
    on_border = (rows == 0) | (rows == shape[0] - 1) | (cols == 0) | (cols == shape[1] - 1)
    return float(np.sum(on_border)) / max(1.0, hull.perimeter)


def _published_candidate(region, shape: tuple[int, int], amin: float, amax: float) -> bool:
    """The published lung-candidate rules, tested in the published order (solidity, i.e. the convex
    hull, before the cheap centroid test)."""
    if not amin < region.area < amax:
        return False
    rows, cols = region.image.shape
    if rows <= cols or region.solidity <= 0.6:
        return False
    H, W = shape
    cy, cx = region.centroid
    if not (int(H / 6) < cy < H - int(H / 6) and int(W / 6) < cx < W - int(W / 6)):
        return False
    return _published_border_touch(region, shape) < 0.15


def published_pbtseg(image) -> np.ndarray:
    """PBTSeg written the way the authors' public code is written: a TIMING BASELINE, not used by the bundle.

    Re-implemented from the paper (ART-ASyn, Sec. 3.1) and the authors' public code
    (github.com/angelacao-hub/ART-ASyn, ``preprocessing/PBTSeg.py``): for each threshold 50, 55, ..., 160
    of the 8-bit image, skimage ``label`` of ``image <= t`` and ``regionprops``, then a Python loop over
    ALL components testing area, bbox shape, solidity (skimage convex hull of every component that passes
    the area and shape tests), centroid and the border touch of the convex image (a second ``regionprops``
    on a full-size mask); the two largest candidates go to a side by bbox thirds when larger than the
    stored lung (an ``if``/``elif`` as published: bbox starting in the left third first); stop when a
    threshold above 130 yields nothing; fill holes; the left lung (2) overwrites the right (1) where they
    overlap. Areas scale with ``H*W / 256**2`` (the published code assumes 256 px).

    The rules are those of ``pbtseg(image, mode="reference")``, which computes them vectorised with
    OpenCV; the two differ only in details of the published code kept here (integer centroid bounds
    ``int(H / 6)``, the ``if``/``elif`` side rule, skimage's pixel-corner hulls and perimeter). At 256 px
    they give identical label maps on all 297 healthy NIH images of this benchmark and on 34 of the 35
    ``lung_masks`` images (there a left lung whose centroid row 42.3 passes ``> int(256 / 6)`` but not
    ``> 256 / 6``). This function exists to time the published implementation faithfully; the authors'
    script itself is not importable here.
    """
    u8 = to_uint8(as_image2d(image))
    H, W = u8.shape
    scale = H * W / 256.0**2
    amin, amax = 2000 * scale, 10000 * scale
    lungs = {RIGHT: np.zeros((H, W), bool), LEFT: np.zeros((H, W), bool)}
    areas = {RIGHT: 0, LEFT: 0}
    for t in REFERENCE_THRESHOLDS:
        labels = label(u8 <= t)
        found = [r for r in regionprops(labels) if _published_candidate(r, (H, W), amin, amax)]
        found.sort(key=lambda r: r.area, reverse=True)
        for r in found[:2]:
            _, c0, _, c1 = r.bbox
            if c0 < W // 3 and r.area > areas[RIGHT]:
                lungs[RIGHT], areas[RIGHT] = labels == r.label, r.area
            elif c1 > W // 3 * 2 and r.area > areas[LEFT]:
                lungs[LEFT], areas[LEFT] = labels == r.label, r.area
        if not found and t > 130:
            break
    out = np.zeros((H, W), np.uint8)
    out[binary_fill_holes(lungs[RIGHT])] = RIGHT
    out[binary_fill_holes(lungs[LEFT])] = LEFT
    return out


PUBLISHED = "PBTSeg published"
ROBUST = "PBTSeg robust"
SEGMENTERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    PUBLISHED: published_pbtseg,
    "PBTSeg reference": functools.partial(pbtseg, mode="reference"),
    ROBUST: pbtseg,
    "OtsuLungSeg": otsu_lung_seg,
}


def load_dataset(data: Path | str = DEFAULT_DATA, size: int = 256) -> dict:
    """Preload ``nih/*/healthy`` images and the ``lung_masks`` pairs as float32 (size, size) arrays."""
    data = Path(data)
    nih = sorted(data.glob("nih/*/healthy/*.png"))
    pairs = sorted(p for p in (data / "lung_masks" / "images").glob("*.png")
                   if (data / "lung_masks" / "masks" / p.name).is_file())
    if not nih or not pairs:
        raise FileNotFoundError(f"no nih/*/healthy/*.png or lung_masks pairs under '{data}'")
    return {
        "nih": [load_cxr(p, size) for p in nih],
        "lung_images": [load_cxr(p, size) for p in pairs],
        "lung_masks": [load_mask(data / "lung_masks" / "masks" / p.name, size) > 0 for p in pairs],
    }


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks (1.0 when both are empty)."""
    pred, truth = np.asarray(pred) > 0, np.asarray(truth) > 0
    total = pred.sum() + truth.sum()
    return float(2 * (pred & truth).sum() / total) if total else 1.0


def benchmark_interleaved(fns: dict[str, Callable[[np.ndarray], np.ndarray]], images: Sequence[np.ndarray],
                          runs: int = 5, warmup: int = 1) -> dict:
    """Images/s of several segmenters measured in one run: each image goes through every method in turn
    (the order rotates from image to image), so load changes hit all methods alike.

    Returns ``{name: {"images_per_s": median over the passes, "runs": images/s of each pass, "labels": the
    outputs of the last pass}}`` (so quality is measured on the same outputs, without segmenting again).
    """
    names = list(fns)
    for x in images[:warmup]:
        for name in names:
            fns[name](x)
    rates: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, list] = {name: [None] * len(images) for name in names}
    for p in range(runs):
        spent = dict.fromkeys(names, 0.0)
        for i, x in enumerate(images):
            r = (i + p) % len(names)
            for name in names[r:] + names[:r]:
                t0 = time.perf_counter()
                outputs[name][i] = fns[name](x)
                spent[name] += time.perf_counter() - t0
        for name in names:
            rates[name].append(len(images) / spent[name])
    return {name: {"images_per_s": statistics.median(v), "runs": v, "labels": outputs[name]}
            for name, v in rates.items()}


def evaluate_quality(fn: Callable[[np.ndarray], np.ndarray], data: dict, labels: Sequence | None = None) -> dict:
    """Both-lungs / no-lung rates on ``data["nih"]`` and mean Dice on the ``lung_masks`` pairs.

    ``labels``: ``fn``'s label maps of ``data["nih"]`` when already computed.
    """
    labels = [fn(x) for x in data["nih"]] if labels is None else labels
    both = [bool((lab == RIGHT).any() and (lab == LEFT).any()) for lab in labels]
    none = [not lab.any() for lab in labels]
    dices = [dice(fn(x), m) for x, m in zip(data["lung_images"], data["lung_masks"])]
    return {"n_nih": len(labels), "both_rate": float(np.mean(both)), "none_rate": float(np.mean(none)),
            "n_masks": len(dices), "dice": float(np.mean(dices)), "dice_min": float(np.min(dices))}


def agreement(labels_a: Sequence[np.ndarray], labels_b: Sequence[np.ndarray]) -> dict:
    """How far two segmenters agree on the same images.

    ``identical``: fraction of images with equal label maps; ``same_sides``: fraction where the same
    lungs (right / left) are found; ``dice``: mean and min Dice of each lung label over the (image, side)
    pairs where either finds that lung.
    """
    identical, same_sides, dices = [], [], []
    for a, b in zip(labels_a, labels_b):
        identical.append(np.array_equal(a, b))
        found = [((a == s).any(), (b == s).any()) for s in (RIGHT, LEFT)]
        same_sides.append(all(fa == fb for fa, fb in found))
        dices += [dice(a == s, b == s) for s, f in zip((RIGHT, LEFT), found) if any(f)]
    return {"n": len(identical), "identical": float(np.mean(identical)), "same_sides": float(np.mean(same_sides)),
            "dice": float(np.mean(dices)) if dices else 1.0, "dice_min": float(np.min(dices)) if dices else 1.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with nih/ and lung_masks/")
    ap.add_argument("--size", type=int, default=256, help="image size (px)")
    ap.add_argument("--runs", type=int, default=5, help="interleaved timed passes (median reported)")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        ap.error(f"data folder '{args.data}' not found; pass --data (see docs/data.md)")
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    data = load_dataset(args.data, args.size)
    print(f"data: {args.data}  ({len(data['nih'])} healthy NIH images, {len(data['lung_masks'])} lung-mask "
          f"pairs, {args.size} px; speed = median of {args.runs} passes over the NIH images, all methods "
          "interleaved image by image in one process)")
    speed = benchmark_interleaved(SEGMENTERS, data["nih"], runs=args.runs)
    header = ("method", "images/s", "(min-max)", "x published", "both lungs", "no lung", "Dice mean", "Dice min")
    print("{:<18} {:>9} {:>15} {:>11} {:>11} {:>8} {:>10} {:>9}".format(*header))
    labels = {name: speed[name]["labels"] for name in SEGMENTERS}
    for name, fn in SEGMENTERS.items():
        q = evaluate_quality(fn, data, labels[name])
        v, base = speed[name], speed[PUBLISHED]["images_per_s"]
        span = f"({min(v['runs']):.1f}-{max(v['runs']):.1f})"
        print(f"{name:<18} {v['images_per_s']:>9.1f} {span:>15} {v['images_per_s'] / base:>11.1f} "
              f"{q['both_rate']:>11.3f} {q['none_rate']:>8.3f} {q['dice']:>10.3f} {q['dice_min']:>9.3f}")
    ratios = [r / p for r, p in zip(speed[ROBUST]["runs"], speed[PUBLISHED]["runs"])]
    print(f"robust / published speed in this run: {statistics.median(ratios):.1f}x (median over passes; per pass: "
          + ", ".join(f"{r:.1f}x" for r in ratios) + ")")
    a = agreement(labels[PUBLISHED], labels["PBTSeg reference"])
    print(f"published-code baseline vs reference mode on {a['n']} NIH images: identical label maps "
          f"{a['identical']:.3f}, same lungs found {a['same_sides']:.3f}, per-lung Dice mean {a['dice']:.4f} "
          f"(min {a['dice_min']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
