"""Pictures for people: colours, heat maps, outlines, overlays, ROC/PR curves and case grids.

Used by the evaluation and inference handlers and by the command-line figure tools; everything returns
``uint8`` RGB arrays or writes PNGs atomically (:func:`custom_transforms.io.save_png`).
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np

from custom_transforms.io import atomic_write_bytes, save_png

__all__ = ["RIGHT_LUNG_RGB", "LEFT_LUNG_RGB", "MASK_RGB", "GT_RGB", "to_rgb", "heat_rgb", "draw_contours",
           "overlay", "title_bar", "save_grid", "save_figure", "roc_pr_png", "case_grid"]

RIGHT_LUNG_RGB, LEFT_LUNG_RGB, MASK_RGB, GT_RGB = (230, 40, 40), (40, 110, 255), (255, 220, 0), (0, 255, 0)


def to_rgb(img: np.ndarray) -> np.ndarray:
    """float [0, 1] (H, W) -> uint8 (H, W, 3)."""
    g = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def heat_rgb(x: np.ndarray) -> np.ndarray:
    """float [0, 1] (H, W) -> uint8 (H, W, 3) in the JET colour map (blue low, red high)."""
    u8 = (np.clip(x, 0, 1) * 255).astype(np.uint8)
    return cv2.applyColorMap(u8, cv2.COLORMAP_JET)[..., ::-1]


def draw_contours(rgb: np.ndarray, binary: np.ndarray, color, thickness: int = 1) -> np.ndarray:
    """Outline the connected regions of ``binary`` on a copy of ``rgb``."""
    out = rgb.copy()
    contours, _ = cv2.findContours(binary.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, color, thickness)
    return out


def overlay(image: np.ndarray, amap: np.ndarray, mask: np.ndarray, gain: float = 4.0) -> np.ndarray:
    """RGB overlay: heatmap of ``gain * amap`` blended where it is non-zero, mask outlined in yellow."""
    w = np.clip(gain * amap, 0, 1)[..., None] * 0.6
    out = (to_rgb(image) * (1 - w) + heat_rgb(gain * amap) * w).astype(np.uint8)
    return draw_contours(out, mask > 0.5, MASK_RGB)


def title_bar(text: str, width: int, height: int = 18) -> np.ndarray:
    """A white ``(height, width, 3)`` strip with ``text`` in black, for column titles."""
    bar = np.full((height, width, 3), 255, np.uint8)
    cv2.putText(bar, text, (4, height - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return bar


def save_grid(path, grid: np.ndarray, colors: int = 0) -> None:
    """Save an RGB grid as PNG atomically; ``colors > 0`` quantises to a palette (smaller files)."""
    if colors <= 0:
        save_png(path, grid)
        return
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(grid).quantize(min(colors, 256)).save(buf, format="PNG", optimize=True)
    atomic_write_bytes(path, buf.getvalue())


def roc_pr_png(path, scores, labels, auroc: float, ap: float) -> Path:
    """ROC and precision-recall curves of image scores (labels 1 = diseased) side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scripts.metrics import pr_curve_points, roc_curve_points

    labels = np.asarray(labels)
    fpr, tpr, _ = roc_curve_points(scores, labels)
    rec, prec, _ = pr_curve_points(scores, labels)
    fig, ax = plt.subplots(1, 2, figsize=(8, 4), dpi=80)
    ax[0].plot(fpr, tpr, label=f"AUROC {auroc:.3f}")
    ax[0].plot([0, 1], [0, 1], "k--", lw=0.8)
    ax[0].set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax[1].plot(rec, prec, label=f"AP {ap:.3f}")
    ax[1].axhline(labels.mean(), color="k", ls="--", lw=0.8)
    ax[1].set(xlabel="recall", ylabel="precision", title="Precision-recall")
    for a in ax:
        a.legend(loc="lower right")
    return save_figure(fig, path)


def save_figure(fig, path) -> Path:
    """Lay out a matplotlib figure, write it as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def case_grid(cases: list[dict]) -> np.ndarray:
    """One row per case: image | anomaly map (scaled to its own maximum) | predicted mask (yellow) and lesion.

    Each case holds ``image`` and ``amap`` (2-D float), ``pred_mask`` (2-D bool) and ``gt_mask`` (2-D bool or
    None; outlined in green).
    """
    rows = []
    for r in cases:
        img = to_rgb(r["image"].astype(np.float32))
        amap = r["amap"].astype(np.float32)
        pred = draw_contours(img, r["pred_mask"], MASK_RGB)
        if r["gt_mask"] is not None:
            pred = draw_contours(pred, r["gt_mask"], GT_RGB)
        rows.append(np.concatenate([img, heat_rgb(amap / max(float(amap.max()), 1e-6)), pred], axis=1))
    return np.concatenate(rows, axis=0)
