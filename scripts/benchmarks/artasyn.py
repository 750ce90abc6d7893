"""Benchmark ART-ASyn synthesis speed (images/s at 256 px, one process) on real healthy NIH images.

Usage (from the repository root)::

    python -m scripts.benchmarks.artasyn                      # data in ../shared/data/cxr
    python -m scripts.benchmarks.artasyn --data /path/to/cxr --images 32 --runs 5
    python -m scripts.benchmarks.artasyn --preview /tmp/artasyn_check.png

Images are ``<data>/nih/train/healthy/*.png`` read as 8-bit gray with OpenCV, resized to 256 px with
``INTER_AREA`` and divided by 255. Lungs come from ``custom_transforms.lung.pbtseg.pbtseg`` when that module
exists, else from a simple Otsu fallback (labelled as such in the output). Lung segmentation is done
once, before timing: only the synthesis is timed. For each ablation step the script reports the median
over ``--runs`` runs of (number of images / wall time), plus two sanity figures over all synthesised
images: the mean anomaly-mask area as a fraction of the image, and the mean intensity increase
(synthetic - image, 0..1 scale) inside the mask.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import cv2
import numpy as np

from custom_transforms.synthesis.artasyn import STEPS, synthesize_artasyn

REPO = Path(__file__).resolve().parents[2]



def otsu_fallback_lungs(image: np.ndarray) -> np.ndarray:
    """Crude lung labels: Otsu-dark pixels in the central box, two largest components, split by side."""
    H, W = image.shape
    u8 = cv2.GaussianBlur((image * 255).astype(np.uint8), (5, 5), 0)
    box = u8[H // 10: H * 9 // 10, W // 12: W * 11 // 12]
    thr, _ = cv2.threshold(box, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    dark = np.zeros((H, W), np.uint8)
    dark[H // 10: H * 9 // 10, W // 12: W * 11 // 12] = (box <= thr).astype(np.uint8)
    dark = cv2.morphologyEx(dark, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    n, lab, stats, cents = cv2.connectedComponentsWithStats(dark, connectivity=8)
    lung = np.zeros((H, W), np.uint8)
    areas = stats[:, cv2.CC_STAT_AREA]
    order = [i for i in np.argsort(-areas[1:]) + 1 if areas[i] > 0.01 * H * W]
    for i in order[:2]:
        side = 1 if cents[i][0] < W / 2 else 2
        comp = (lab == i).astype(np.uint8)
        contours, _ = cv2.findContours(comp, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(lung, contours, -1, int(side), thickness=-1)  # fill holes
    return lung


def lung_segmenter():
    try:
        from custom_transforms.lung.pbtseg import pbtseg  # noqa: F401
    except ImportError:
        return otsu_fallback_lungs, "Otsu fallback (custom_transforms.lung.pbtseg not available)"
    return pbtseg, "custom_transforms.lung.pbtseg.pbtseg"


def load_images(data: Path, n: int, size: int = 256) -> list[np.ndarray]:
    folder = data / "nih" / "train" / "healthy"
    if not folder.is_dir():
        raise SystemExit(f"error: data folder '{folder}' not found; pass --data pointing at the folder "
                         f"that holds nih/train/healthy (default: ../shared/data/cxr relative to the "
                         f"repository root)")
    paths = sorted(folder.glob("*.png"))[:n]
    if not paths:
        raise SystemExit(f"error: no PNG images in '{folder}'")
    out = []
    for p in paths:
        im = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        if im is None:
            raise SystemExit(f"error: cannot read '{p}'")
        out.append(cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0)
    return out


def save_preview(path: str, images, lungs, seed: int = 0, n: int = 4) -> None:
    rows = []
    rng = np.random.default_rng(seed)
    for img, lung in list(zip(images, lungs))[:n]:
        syn, mask = synthesize_artasyn(img, lung, rng)
        contour = cv2.cvtColor((img * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
        cnts, _ = cv2.findContours((lung > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(contour, cnts, -1, (0, 200, 255), 1)
        tiles = [contour] + [cv2.cvtColor((np.clip(x, 0, 1) * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
                             for x in (syn, mask, np.clip((syn - img) * 4, 0, 1))]
        rows.append(np.concatenate(tiles, axis=1))
    cv2.imwrite(path, np.concatenate(rows, axis=0))
    print(f"preview (image+lung contour | synthetic | mask | 4 x difference) written to {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cxr",
                    help="folder holding nih/train/healthy (default: ../shared/data/cxr from the repo root)")
    ap.add_argument("--images", type=int, default=32, help="images per run (default 32)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per step; the median is reported (>= 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preview", default=None, help="also write an image | synthetic | mask PNG here")
    args = ap.parse_args(argv)

    images = load_images(args.data, args.images)
    segment, seg_name = lung_segmenter()
    lungs = [segment(im) for im in images]
    keep = [(im, lu) for im, lu in zip(images, lungs) if (lu > 0).any()]
    print(f"data: {args.data} ({len(images)} NIH healthy images at 256 px)")
    print(f"lungs: {seg_name}; {len(keep)}/{len(images)} images have lung pixels (others skipped)")
    if not keep:
        raise SystemExit("error: no image with lung pixels")
    images, lungs = zip(*keep)

    rng = np.random.default_rng(args.seed)
    synthesize_artasyn(images[0], lungs[0], rng)  # warm-up: builds the cached brush and stamp banks
    print(f"{'steps':<17} {'img/s (median)':>14} {'min':>7} {'max':>7} {'mask area':>10} "
          f"{'mean +I in mask':>16}")
    for steps in STEPS:
        rates, areas, gains = [], [], []
        for _ in range(max(1, args.runs)):
            t0 = time.perf_counter()
            outs = [synthesize_artasyn(im, lu, rng, steps=steps) for im, lu in zip(images, lungs)]
            rates.append(len(images) / (time.perf_counter() - t0))
            for im, (syn, mask) in zip(images, outs):
                areas.append(float(mask.mean()))
                if mask.any():
                    gains.append(float((syn - im)[mask > 0].mean()))
        print(f"{steps:<17} {statistics.median(rates):>14.1f} {min(rates):>7.1f} {max(rates):>7.1f} "
              f"{np.mean(areas):>10.3f} {np.mean(gains) if gains else float('nan'):>16.4f}")
    if args.preview:
        save_preview(args.preview, images, lungs, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
