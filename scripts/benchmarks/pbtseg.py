"""Benchmark lung segmenters (PBTSeg reference / robust, AnatPaste's Otsu) on the real CXR data.

For each method: images/s (median of ``--runs`` passes over the same preloaded 256 px images, one
process), the rate of images with both lungs and with no lung on the 297 healthy NIH images, and the
mean Dice of the binary lung mask (labels > 0) against the 35 human masks of ``lung_masks``.

    python -m scripts.benchmarks.pbtseg [--data ../shared/data/cxr] [--size 256] [--runs 5]

``benchmark_segmenter(fn, images)`` and ``evaluate_quality(fn, data)`` can be imported.
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

from custom_transforms.io import load_cxr, load_mask
from custom_transforms.lung.otsu import otsu_lung_seg
from custom_transforms.lung.pbtseg import pbtseg

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cxr"
SEGMENTERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "PBTSeg reference": functools.partial(pbtseg, mode="reference"),
    "PBTSeg robust": pbtseg,
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


def benchmark_segmenter(fn: Callable[[np.ndarray], np.ndarray], images: Sequence[np.ndarray],
                        runs: int = 5, warmup: int = 1) -> dict:
    """Images/s of ``fn`` over preloaded ``images``: median (and all) of ``runs`` timed passes."""
    for x in images[:warmup]:
        fn(x)
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for x in images:
            fn(x)
        rates.append(len(images) / (time.perf_counter() - t0))
    return {"images_per_s": statistics.median(rates), "runs": rates}


def evaluate_quality(fn: Callable[[np.ndarray], np.ndarray], data: dict) -> dict:
    """Both-lungs / no-lung rates on ``data["nih"]`` and mean Dice on the ``lung_masks`` pairs."""
    labels = [fn(x) for x in data["nih"]]
    both = [bool((lab == 1).any() and (lab == 2).any()) for lab in labels]
    none = [not lab.any() for lab in labels]
    dices = [dice(fn(x), m) for x, m in zip(data["lung_images"], data["lung_masks"])]
    return {"n_nih": len(labels), "both_rate": float(np.mean(both)), "none_rate": float(np.mean(none)),
            "n_masks": len(dices), "dice": float(np.mean(dices)), "dice_min": float(np.min(dices))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with nih/ and lung_masks/")
    ap.add_argument("--size", type=int, default=256, help="image size (px)")
    ap.add_argument("--runs", type=int, default=5, help="timed passes per method (median reported)")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        ap.error(f"data folder '{args.data}' not found; pass --data (see docs/data.md)")
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    data = load_dataset(args.data, args.size)
    print(f"data: {args.data}  ({len(data['nih'])} healthy NIH images, {len(data['lung_masks'])} lung-mask "
          f"pairs, {args.size} px; speed = median of {args.runs} passes over the NIH images, one process)")
    header = ("method", "images/s", "both lungs", "no lung", "Dice mean", "Dice min")
    print("{:<18} {:>9} {:>11} {:>8} {:>10} {:>9}".format(*header))
    for name, fn in SEGMENTERS.items():
        speed = benchmark_segmenter(fn, data["nih"], runs=args.runs)
        q = evaluate_quality(fn, data)
        print(f"{name:<18} {speed['images_per_s']:>9.1f} {q['both_rate']:>11.3f} {q['none_rate']:>8.3f} "
              f"{q['dice']:>10.3f} {q['dice_min']:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
