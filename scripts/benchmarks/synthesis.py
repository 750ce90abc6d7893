"""Benchmark every anomaly-synthesis method: images/s at 256 px (one process) on real healthy NIH images.

Usage (from the repository root)::

    python -m scripts.benchmarks.synthesis                        # data in ../shared/data/cxr
    python -m scripts.benchmarks.synthesis --data /path/to/cxr --images 32 --runs 5 --methods artasyn,nsa

Images are ``<data>/nih/train/healthy/*.png`` read as 8-bit gray, resized to 256 px (``INTER_AREA``) and divided
by 255. Lungs come from PBTSeg (AnatPaste: its own Otsu segmentation, as published), computed once before
timing; methods that paste from a second image take the next image of the list. Only the array transforms'
calls are timed (``ARTASyn``, ``CutPaste``, ``NSA``, ``AnatPaste``, ``FPI``: the same code as in training, container
conversion included). Each row reports the median over ``--runs`` runs of (images / wall time), then two
sanity figures over all outputs: the mean anomaly area (fraction of the image with ``mask >= 0.5``) and the
mean absolute intensity change inside it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import cv2
import numpy as np

from custom_transforms.lung.otsu import otsu_lung_seg
from custom_transforms.lung.pbtseg import pbtseg
from custom_transforms.synthesis import FPI, NSA, AnatPaste, ARTASyn, CutPaste

REPO = Path(__file__).resolve().parents[2]

# row name -> (array transform factory, lung segmentation it places the anomaly by)
ROWS = {
    "artasyn (base)": (lambda: ARTASyn(steps="base"), "pbtseg"),
    "artasyn (base+blur+cryst)": (lambda: ARTASyn(steps="base+blur+cryst"), "pbtseg"),
    "artasyn (full)": (lambda: ARTASyn(steps="full"), "pbtseg"),
    "cutpaste (normal)": (lambda: CutPaste(variant="normal"), "pbtseg"),
    "cutpaste (scar)": (lambda: CutPaste(variant="scar"), "pbtseg"),
    "cutpaste (union)": (lambda: CutPaste(variant="union"), "pbtseg"),
    "nsa": (lambda: NSA(), "pbtseg"),
    "anatpaste": (lambda: AnatPaste(), "otsu"),
    "fpi": (lambda: FPI(), "pbtseg"),
}
SEGMENTERS = {"pbtseg": pbtseg, "otsu": otsu_lung_seg}


def load_images(data: Path, n: int, size: int = 256) -> list[np.ndarray]:
    """``n`` healthy NIH images as float32 ``(size, size)`` in [0, 1]."""
    folder = data / "nih" / "train" / "healthy"
    if not folder.is_dir():
        raise SystemExit(f"error: data folder '{folder}' not found; pass --data pointing at the folder that holds "
                         f"nih/train/healthy (see docs/data.md)")
    paths = sorted(folder.glob("*.png"))[:n]
    if len(paths) < 2:
        raise SystemExit(f"error: need at least 2 PNG images in '{folder}'")
    out = []
    for p in paths:
        im = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        if im is None:
            raise SystemExit(f"error: cannot read '{p}'")
        out.append(cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0)
    return out


def run_row(make, images, lungs, runs: int, seed: int) -> dict:
    """Median images/s over ``runs`` runs of one array transform, with area and intensity-change figures."""
    t = make().set_random_state(seed)
    srcs = images[1:] + images[:1]
    args = [(im[None], lu[None], src[None]) for im, lu, src in zip(images, lungs, srcs)]
    call = (lambda a: t(a[0], a[1], source=a[2])) if t.needs_source else (lambda a: t(a[0], a[1]))
    call(args[0])  # warm-up (caches such as ART-ASyn's stamp banks)
    rates, areas, changes = [], [], []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        outs = [call(a) for a in args]
        rates.append(len(args) / (time.perf_counter() - t0))
        for (im, _, _), (syn, mask) in zip(args, outs):
            m = np.asarray(mask)[0] >= 0.5
            areas.append(float(m.mean()))
            if m.any():
                changes.append(float(np.abs(np.asarray(syn)[0] - im[0])[m].mean()))
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "area": float(np.mean(areas)),
            "change": float(np.mean(changes)) if changes else float("nan")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cxr",
                    help="folder holding nih/train/healthy (default: ../shared/data/cxr beside the repository)")
    ap.add_argument("--images", type=int, default=32, help="images per run (default 32)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per row; the median is reported (default 5)")
    ap.add_argument("--methods", default="", help="comma-separated method names to keep (default: all rows)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    wanted = [m for m in args.methods.split(",") if m]
    rows = {k: v for k, v in ROWS.items() if not wanted or k.split(" ")[0] in wanted}
    if not rows:
        ap.error(f"--methods {args.methods!r} matches no row; methods: {sorted({k.split(' ')[0] for k in ROWS})}")

    images = load_images(args.data, args.images)
    lungs = {name: [seg(im) for im in images] for name, seg in SEGMENTERS.items()}
    print(f"data: {args.data} ({len(images)} NIH healthy images at 256 px); median of {args.runs} runs, one process")
    print(f"{'method':<26} {'img/s (median)':>14} {'min':>7} {'max':>7} {'area':>7} {'mean |change|':>14}")
    for name, (make, seg) in rows.items():
        r = run_row(make, images, lungs[seg], args.runs, args.seed)
        print(f"{name:<26} {r['median']:>14.1f} {r['min']:>7.1f} {r['max']:>7.1f} {r['area']:>7.3f} "
              f"{r['change']:>14.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
