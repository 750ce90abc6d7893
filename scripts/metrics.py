"""Evaluation metrics, all per image (never across a batch): anomaly maps, scores, masks, AUROC/AP, Dice."""

from __future__ import annotations

import numpy as np
import torch


def _lib(x):
    return torch if isinstance(x, torch.Tensor) else np


def anomaly_map(image, recon):
    """``A = |I - I_hat|`` (same shape and type as the inputs)."""
    return (image - recon).abs() if isinstance(image, torch.Tensor) else np.abs(np.asarray(image) - np.asarray(recon))


def _per_image(x):
    """View ``x`` as (N, pixels): 2-D input is one image; otherwise the first axis indexes images."""
    return x.reshape(1, -1) if x.ndim == 2 else x.reshape(x.shape[0], -1)


def image_score(image, recon, kind: str = "mse"):
    """Image anomaly score per image: ``"mse"`` (paper), ``"mean_abs"`` or ``"topk_mean"`` (mean of the top 1 %)."""
    err = _per_image(anomaly_map(image, recon))
    if kind == "mse":
        s = (err ** 2).mean(1)
    elif kind == "mean_abs":
        s = err.mean(1)
    elif kind == "topk_mean":
        k = max(1, int(round(0.01 * err.shape[1])))
        s = torch.topk(err, k, dim=1).values.mean(1) if isinstance(err, torch.Tensor) else \
            np.sort(err, axis=1)[:, -k:].mean(1)
    else:
        raise ValueError(f"score kind must be 'mse', 'mean_abs' or 'topk_mean', got {kind!r}")
    return s[0] if image.ndim == 2 else s


def paper_mask(amap, floor: float = 0.03, rel: float = 0.2):
    """``A >= max(floor, rel * max(A))`` with the max taken per image (the published code took it per batch)."""
    flat = _per_image(amap)
    peak = flat.max(1).values if isinstance(flat, torch.Tensor) else flat.max(1)
    thr = rel * peak
    thr = thr.clamp(min=floor) if isinstance(thr, torch.Tensor) else np.maximum(thr, floor)
    shape = (-1,) + (1,) * (amap.ndim - 1) if amap.ndim > 2 else ()
    return amap >= (thr.reshape(shape) if amap.ndim > 2 else thr[0])


def calibrate_threshold(healthy_maps, quantile: float = 0.99, region=None) -> float:
    """Pixel threshold = ``quantile`` of anomaly-map values of held-out healthy images (inside ``region``)."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    a = np.asarray(healthy_maps, np.float32)
    vals = a[np.asarray(region, bool)] if region is not None else a.ravel()
    if vals.size == 0:
        raise ValueError("no pixels to calibrate on (empty maps or region)")
    return float(np.quantile(vals, quantile))


def threshold_mask(amap, thr: float, region=None):
    """``A >= thr``, optionally only inside ``region``."""
    m = amap >= thr
    return m if region is None else m & (region > 0)


def image_auroc_ap(scores, labels) -> tuple[float, float]:
    """Image-level AUROC and average precision (scikit-learn), labels 1 = diseased."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    scores, labels = np.asarray(scores, float).ravel(), np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores for {labels.size} labels")
    if len(np.unique(labels)) < 2:
        raise ValueError("AUROC/AP need both healthy (0) and diseased (1) images")
    return float(roc_auc_score(labels, scores)), float(average_precision_score(labels, scores))


def dice_micro(preds, gts) -> float:
    """Pixel Dice over all pixels of the set: ``2 |P & G| / (|P| + |G|)``; 1.0 when both are empty."""
    p, g = np.asarray(preds, bool), np.asarray(gts, bool)
    denom = p.sum() + g.sum()
    return 1.0 if denom == 0 else float(2.0 * (p & g).sum() / denom)


def dice_per_image(preds, gts) -> float:
    """Mean Dice over images with a non-empty ground truth (an empty prediction scores 0)."""
    p, g = _per_image(np.asarray(preds, bool)), _per_image(np.asarray(gts, bool))
    keep = g.any(1)
    if not keep.any():
        raise ValueError("no image has a non-empty ground-truth mask")
    p, g = p[keep], g[keep]
    return float(np.mean(2.0 * (p & g).sum(1) / (p.sum(1) + g.sum(1))))
