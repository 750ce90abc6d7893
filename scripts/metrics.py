"""Evaluation metrics: image AUROC/AP and pixel Dice (ART-ASyn Sec. 4, Eq. 10), all per image.

The anomaly-map, score and mask rules are in :mod:`custom_transforms.anomaly`. Array functions accept
numpy arrays or torch tensors. Mask stacks are ``(N, ...)`` with the first axis indexing images; a 2-D
array ``(H, W)`` is one image.
"""

from __future__ import annotations

import numpy as np
from monai.utils import convert_to_numpy

from custom_transforms.utils import per_image

__all__ = ["image_auroc_ap", "roc_curve_points", "pr_curve_points", "dice_micro", "dice_per_image", "dice_score"]


def _np_bool(x) -> np.ndarray:
    a = np.asarray(convert_to_numpy(x))
    return a if a.dtype == bool else a > 0.5


def _scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(convert_to_numpy(scores), dtype=np.float64).ravel()
    labels = np.asarray(convert_to_numpy(labels)).ravel()
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
    p, g = per_image(_np_bool(preds)), per_image(_np_bool(gts))
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
