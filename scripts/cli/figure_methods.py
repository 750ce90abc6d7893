"""The same chest X-rays synthesised by every method, masks outlined (as ART-ASyn's Fig. 3a).

One row per image: the image with its lungs outlined, then per method the synthetic image with the anomaly
mask (``mask > 0``: soft labels included) outlined in yellow. Methods that paste from a second image take the
next input image. Every method uses its published defaults, the lungs the configs give it (PBTSeg; AnatPaste
its own Otsu segmentation) and the same seed. Usage (from the repository root)::

    python -m scripts.cli.figure_methods --input ../shared/data/cxr/nih/train/healthy --n 2 \\
        --out docs/figures/methods_nih.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from custom_transforms.io import load_cxr
from custom_transforms.lung.otsu import otsu_lung_seg
from custom_transforms.lung.pbtseg import pbtseg
from custom_transforms.synthesis import FPI, NSA, AnatPaste, ARTASyn, CutPaste
from scripts.data.datasets import list_images
from scripts.visualization import LEFT_LUNG_RGB, MASK_RGB, RIGHT_LUNG_RGB, draw_contours, save_grid, title_bar, to_rgb

# column title -> (array transform factory, lung segmentation)
METHODS = {
    "ART-ASyn": (ARTASyn, pbtseg),
    "CutPaste (scar)": (lambda: CutPaste(variant="scar"), pbtseg),
    "CutPaste (normal)": (lambda: CutPaste(variant="normal"), pbtseg),
    "NSA": (NSA, pbtseg),
    "AnatPaste": (AnatPaste, otsu_lung_seg),
    "FPI": (FPI, pbtseg),
}


def method_row(image: np.ndarray, source: np.ndarray, seed: int) -> list[np.ndarray]:
    """Panels of one image: image + lungs, then one synthetic image per method with its mask outlined."""
    lung = pbtseg(image)
    first = draw_contours(draw_contours(to_rgb(image), lung == 1, RIGHT_LUNG_RGB), lung == 2, LEFT_LUNG_RGB)
    panels = [first]
    for make, segment in METHODS.values():
        t = make().set_random_state(seed)
        kwargs = {"source": source[None]} if t.needs_source else {}
        syn, mask = t(image[None], segment(image)[None], **kwargs)
        panels.append(draw_contours(to_rgb(np.asarray(syn)[0]), np.asarray(mask)[0] > 0, MASK_RGB))
    return panels


def make_figure(paths, size: int = 256, seed: int = 0) -> np.ndarray:
    """The grid (title row + one row per image) as uint8 RGB."""
    images = [load_cxr(p, size) for p in paths]
    gap = 2
    rows = []
    for i, img in enumerate(images):
        panels = method_row(img, images[(i + 1) % len(images)], seed + i)
        rows.append(np.concatenate([np.pad(p, ((0, gap), (0, gap), (0, 0)), constant_values=255) for p in panels],
                                   axis=1))
    titles = ["image + lungs"] + list(METHODS)
    header = np.concatenate([title_bar(t, size + gap) for t in titles], axis=1)
    return np.concatenate([header] + rows, axis=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", required=True, help="folder of healthy chest X-rays (PNG/JPEG/DICOM/NIfTI)")
    ap.add_argument("--n", type=int, default=2, help="number of images (rows, default 2; at least 2)")
    ap.add_argument("--size", type=int, default=256, help="image size in px (default 256)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--colors", type=int, default=128, help="palette size of the PNG (0 = full colour)")
    ap.add_argument("--out", default="methods.png")
    args = ap.parse_args(argv)
    folder = Path(args.input)
    paths = list_images(folder) if folder.is_dir() else []
    if len(paths) < 2 or args.n < 2:
        print(f"error: need --n >= 2 and at least 2 images in '{folder}'", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    grid = make_figure(paths[: args.n], args.size, args.seed)
    save_grid(args.out, grid, args.colors)
    print(f"wrote {args.out} ({grid.shape[1]} x {grid.shape[0]} px, {Path(args.out).stat().st_size // 1024} KB) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
