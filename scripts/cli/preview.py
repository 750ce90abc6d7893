"""Preview what the transforms do: a PNG grid of image, lung contour, synthetic image and anomaly mask.

One row per image, four columns:

1. the loaded image (gray, [0, 1], resized);
2. the lung segmentation as contours (red: right lung = image left, blue: left lung);
3. the synthetic image written by the synthesis transform (ART-ASyn by default);
4. the synthetic image with the anomaly mask outlined in yellow.

Example::

    python -m scripts.cli.preview --input ../shared/data/cxr/nih/train/healthy --n 6 --out docs/figures/preview.png
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from custom_transforms.io import load_cxr
from scripts.data.datasets import list_images
from scripts.visualization import LEFT_LUNG_RGB, MASK_RGB, RIGHT_LUNG_RGB, draw_contours, save_grid, to_rgb

logger = logging.getLogger(__name__)

def preview_row(image: np.ndarray, lung: np.ndarray, synthetic: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The four panels of one image side by side, separated by a 2-px gap."""
    base = to_rgb(image)
    lungs = draw_contours(draw_contours(base, lung == 1, RIGHT_LUNG_RGB), lung == 2, LEFT_LUNG_RGB)
    syn = to_rgb(synthetic)
    masked = draw_contours(syn, mask > 0.5, MASK_RGB)
    gap = np.full((image.shape[0], 2, 3), 255, np.uint8)
    return np.concatenate([base, gap, lungs, gap, syn, gap, masked], axis=1)


def make_preview(paths, size: int = 256, seed: int = 0, segmenter: str = "pbtseg", steps: str = "full"):
    """Rows of the preview grid for ``paths``; returns (grid RGB uint8, per-image stats)."""
    from custom_transforms.lung.otsu import otsu_lung_seg
    from custom_transforms.lung.pbtseg import pbtseg
    from custom_transforms.synthesis.artasyn import synthesize_artasyn

    segment = {"pbtseg": pbtseg, "otsu": otsu_lung_seg}[segmenter]
    rng = np.random.default_rng(seed)
    rows, stats = [], []
    for p in paths:
        img = load_cxr(p, size)
        lung = segment(img)
        if not (lung > 0).any():
            logger.warning("%s: no lungs found, skipped", p)
            stats.append({"image": str(p), "lungs": 0})
            continue
        syn, mask = synthesize_artasyn(img, lung, rng, steps=steps)
        rows.append(preview_row(img, lung, syn, mask))
        stats.append({"image": str(p), "lungs": len(np.unique(lung)) - 1, "mask_fraction": float(mask.mean())})
    if not rows:
        raise ValueError("no image could be previewed (no lungs found in any of them)")
    gap = np.full((2, rows[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate([r for row in rows for r in (row, gap)][:-1], axis=0)
    return grid, stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="PNG grid: image | lung contour | synthetic image | anomaly mask")
    ap.add_argument("--input", required=True, help="folder of chest X-rays (PNG/JPEG/DICOM/NIfTI)")
    ap.add_argument("--out", default="preview.png", help="output PNG (default: preview.png)")
    ap.add_argument("--n", type=int, default=8, help="number of images (default 8)")
    ap.add_argument("--size", type=int, default=256, help="image size in px (default 256)")
    ap.add_argument("--seed", type=int, default=0, help="random seed for image choice and synthesis")
    ap.add_argument("--segmenter", default="pbtseg", choices=("pbtseg", "otsu"))
    ap.add_argument("--steps", default="full", choices=("base", "base+blur+cryst", "full"),
                    help="ART-ASyn ablation step (supplementary Table S1)")
    ap.add_argument("--scale", type=float, default=1.0, help="scale the saved grid (e.g. 0.5 for smaller files)")
    ap.add_argument("--colors", type=int, default=0,
                    help="save with a palette of this many colours (e.g. 128: ~5x smaller files for docs)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    folder = Path(args.input)
    if not folder.is_dir():
        print(f"error: input folder not found: '{folder}'", file=sys.stderr)
        return 2
    paths = list_images(folder)
    if not paths:
        print(f"error: no images in '{folder}'", file=sys.stderr)
        return 2
    if args.n < 1:
        print("error: --n must be >= 1", file=sys.stderr)
        return 2
    pick = np.random.default_rng(args.seed).choice(len(paths), size=min(args.n, len(paths)), replace=False)
    t0 = time.perf_counter()
    grid, stats = make_preview([paths[i] for i in sorted(pick)], args.size, args.seed, args.segmenter, args.steps)
    if args.scale != 1.0:
        grid = cv2.resize(grid, None, fx=args.scale, fy=args.scale, interpolation=cv2.INTER_AREA)
    save_grid(args.out, grid, args.colors)
    skipped = sum(s["lungs"] == 0 for s in stats)
    print(f"wrote {args.out} ({grid.shape[1]} x {grid.shape[0]} px, {len(stats) - skipped} images, "
          f"{skipped} skipped without lungs) in {time.perf_counter() - t0:.1f} s")
    print("columns: image | lungs (red = right, blue = left) | synthetic | synthetic + anomaly mask (yellow)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
