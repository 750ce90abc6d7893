"""Evaluation metrics, all per image (never across a batch): anomaly maps, scores, masks, AUROC/AP, Dice.

Array functions accept numpy arrays or torch tensors and return the same kind. Image stacks are
``(N, ...)`` with the first axis indexing images (``(N, 1, H, W)``, ``(N, H, W)``); a 2-D array ``(H, W)`` is
one image. A channel-first single image ``(1, H, W)`` is therefore one image too.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_numpy", "as_2d", "anomaly_map", "image_score", "paper_mask", "calibrate_threshold", "threshold_mask",
           "image_auroc_ap", "roc_curve_points", "pr_curve_points", "dice_micro", "dice_per_image", "dice_score"]

SCORE_KINDS = ("mse", "mean_abs", "topk_mean")


def to_numpy(x) -> np.ndarray:
    """A tensor (any device) or array-like as a numpy array."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def as_2d(x) -> np.ndarray:
    """One image (``(H, W)``, ``(1, H, W)``, ``(1, 1, H, W)``; tensor or array) as a numpy ``(H, W)`` array."""
    a = to_numpy(x)
    return a.reshape(a.shape[-2:])


def _per_image(x):
    """View ``x`` as (N, pixels): 2-D input is one image; otherwise the first axis indexes images."""
    return x.reshape(1, -1) if x.ndim == 2 else x.reshape(x.shape[0], -1)


def _np_bool(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x) > 0.5 if np.asarray(x).dtype != bool else np.asarray(x)


def anomaly_map(image, recon):
    """``A = |I - I_hat|`` (same shape and type as the inputs)."""
    if isinstance(image, torch.Tensor):
        return (image - torch.as_tensor(recon, dtype=image.dtype, device=image.device)).abs()
    return np.abs(np.asarray(image, np.float32) - np.asarray(recon, np.float32))


def image_score(image, recon, kind: str = "mse", topk_fraction: float = 0.01):
    """Image anomaly score, per image.

    ``"mse"``: mean of ``(I - I_hat)^2`` (the paper); ``"mean_abs"``: mean of ``A``; ``"topk_mean"``: mean of
    the largest ``topk_fraction`` of ``A`` (at least one pixel). A 2-D input gives a scalar, a stack one
    score per image.
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"score kind must be one of {SCORE_KINDS}, got {kind!r}")
    if not 0.0 < topk_fraction <= 1.0:
        raise ValueError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
    err = _per_image(anomaly_map(image, recon))
    if kind == "mse":
        s = (err ** 2).mean(1)
    elif kind == "mean_abs":
        s = err.mean(1)
    else:
        k = max(1, int(round(topk_fraction * err.shape[1])))
        s = torch.topk(err, k, dim=1).values.mean(1) if isinstance(err, torch.Tensor) else \
            np.sort(err, axis=1)[:, -k:].mean(1)
    return s[0] if np.ndim(image) == 2 else s


def paper_mask(amap, floor: float = 0.03, rel: float = 0.2):
    """``A >= max(floor, rel * max(A))`` with the max taken per image.

    The published code took the max over the whole batch, so one image's mask depended on the other images
    in its batch; here each image is thresholded on its own. Returns a boolean array of ``amap``'s shape.
    """
    flat = _per_image(amap)
    if isinstance(flat, torch.Tensor):
        thr = (rel * flat.max(1).values).clamp(min=floor)
    else:
        thr = np.maximum(rel * flat.max(1), floor)
    if amap.ndim == 2:
        return amap >= thr[0]
    return amap >= thr.reshape((-1,) + (1,) * (amap.ndim - 1))


def calibrate_threshold(healthy_maps, quantile: float = 0.99, region=None) -> float:
    """Pixel threshold = ``quantile`` of the anomaly-map values of held-out healthy images.

    ``region`` (same shape as ``healthy_maps``, e.g. dilated lung masks): only pixels with ``region > 0``
    count. With ``quantile = q`` about ``1 - q`` of the healthy pixels lie at or above the threshold.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if isinstance(healthy_maps, torch.Tensor):
        healthy_maps = healthy_maps.detach().cpu().numpy()
    a = np.asarray(healthy_maps, np.float32)
    if region is not None:
        if isinstance(region, torch.Tensor):
            region = region.detach().cpu().numpy()
        region = np.asarray(region)
        if region.shape != a.shape:
            raise ValueError(f"region shape {region.shape} differs from the maps' shape {a.shape}")
        vals = a[region > 0]
    else:
        vals = a.ravel()
    if vals.size == 0:
        raise ValueError("no pixels to calibrate on (empty maps or region)")
    return float(np.quantile(vals, quantile))


def threshold_mask(amap, thr: float, region=None):
    """``A >= thr`` (boolean), optionally only inside ``region > 0``."""
    m = amap >= thr
    if region is None:
        return m
    if isinstance(m, torch.Tensor):
        return m & (torch.as_tensor(region, device=m.device) > 0)
    if isinstance(region, torch.Tensor):
        region = region.detach().cpu().numpy()
    return m & (np.asarray(region) > 0)


def _scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, float).ravel()
    labels = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores for {labels.size} labels")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    if not set(np.unique(labels).tolist()) <= {0, 1}:
        raise ValueError(f"labels must be 0 (healthy) or 1 (diseased), got {np.unique(labels).tolist()}")
    if len(np.unique(labels)) < 2:
        raise ValueError("AUROC/AP need both healthy (0) and diseased (1) images; only one class is present")
    return scores, labels.astype(int)


def image_auroc_ap(scores, labels) -> tuple[float, float]:
    """Image-level ``(AUROC, average precision)`` (scikit-learn), labels 1 = diseased, higher score = more anomalous."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    scores, labels = _scores_labels(scores, labels)
    return float(roc_auc_score(labels, scores)), float(average_precision_score(labels, scores))


def roc_curve_points(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` of the ROC curve, for plotting."""
    from sklearn.metrics import roc_curve

    scores, labels = _scores_labels(scores, labels)
    fpr, tpr, thr = roc_curve(labels, scores)
    return fpr, tpr, thr


def pr_curve_points(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(recall, precision, thresholds)`` of the precision-recall curve, for plotting."""
    from sklearn.metrics import precision_recall_curve

    scores, labels = _scores_labels(scores, labels)
    prec, rec, thr = precision_recall_curve(labels, scores)
    return rec, prec, thr


def dice_micro(preds, gts) -> float:
    """Pixel Dice over all pixels of the set (the paper's Eq. 10 on the whole test set):
    ``2 |P & G| / (|P| + |G|)`` summed over every image; 1.0 when both are empty everywhere."""
    p, g = _np_bool(preds), _np_bool(gts)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground-truth shape {g.shape}")
    denom = int(p.sum()) + int(g.sum())
    return 1.0 if denom == 0 else float(2.0 * (p & g).sum() / denom)


def dice_per_image(preds, gts) -> float:
    """Mean Dice over the images with a non-empty ground truth (stack ``(N, ...)`` or one ``(H, W)`` image).

    An empty prediction on such an image scores 0. Images with an empty ground truth are left out (their
    Dice is undefined: see :func:`dice_score`); ValueError when none is left.
    """
    p, g = _per_image(_np_bool(preds)), _per_image(_np_bool(gts))
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground-truth shape {g.shape}")
    keep = g.any(1)
    if not keep.any():
        raise ValueError("no image has a non-empty ground-truth mask")
    p, g = p[keep], g[keep]
    return float(np.mean(2.0 * (p & g).sum(1) / (p.sum(1) + g.sum(1))))


def dice_score(pred, gt, empty: float = 1.0) -> float:
    """Dice of one image (all pixels of ``pred`` / ``gt``); ``empty`` when both masks are empty."""
    return dice_micro(pred, gt) if (_np_bool(pred).any() or _np_bool(gt).any()) else float(empty)
