"""Anomaly maps, image scores and masks of a network's output, and their MONAI transform.

The rules, all per image (never across a batch): ``A = |I - I_hat|`` (ART-ASyn Sec. 3.3); the image score
is the mean squared error (the paper) or another :data:`SCORE_KINDS` kind; the binary mask follows the
paper's rule ``A >= max(floor, rel * max(A))`` or a fixed (calibrated) threshold, optionally restricted to
a region such as the dilated lungs. :class:`AnomalyPostd` applies them in the evaluation and inference
configs. A model family that makes its own map and score (AnatPaste's classifier: a Grad-CAM map and a
negative log density) hands them over as ``{"amap": ..., "score": ...}`` and gets the same mask rules.

Array functions accept numpy arrays or torch tensors and return the same kind. Image stacks are
``(N, ...)`` with the first axis indexing images; a 2-D array ``(H, W)`` is one image.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.transforms import MapTransform
from monai.utils import convert_to_numpy

from custom_transforms.utils import Choice, per_image

__all__ = ["SCORE_KINDS", "MASK_REGIONS", "anomaly_map", "image_score", "paper_mask", "calibrate_threshold",
           "threshold_mask", "dilate_region", "region_key", "validate_score_kind", "AnomalyPostd"]

SCORE_KINDS = ("mse", "mean_abs", "topk_mean")


validate_score_kind = Choice("score_kind", SCORE_KINDS, "score kind")


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
    validate_score_kind(kind)
    if not 0.0 < topk_fraction <= 1.0:
        raise ValueError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
    err = per_image(anomaly_map(image, recon))
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
    flat = per_image(amap)
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
    a = convert_to_numpy(healthy_maps, dtype=np.float32)
    if region is not None:
        region = convert_to_numpy(region)
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
    return m & (convert_to_numpy(region) > 0)


def dilate_region(lung: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of ``lung > 0`` (any leading dims, last two spatial) by a square of ``radius`` px."""
    r = (lung > 0).float()
    if radius <= 0:
        return r
    shape = r.shape
    r = r.reshape(-1, 1, *shape[-2:])
    r = torch.nn.functional.max_pool2d(r, 2 * radius + 1, stride=1, padding=radius)
    return r.reshape(shape)


MASK_REGIONS = (None, "lung")


def region_key(mask_region: str | None) -> str | None:
    """The data key of a mask region name (``mask_region`` in the configs): None (whole image) or ``"lung"``."""
    if mask_region not in MASK_REGIONS:
        raise ValueError(f"mask_region must be one of {MASK_REGIONS}, got {mask_region!r}")
    return mask_region


class AnomalyPostd(MapTransform):
    """Write ``amap``, ``score``, ``pred_mask`` (and ``is_synthetic`` when a mask key is given) per item.

    Args:
        input_key: the network input (``I``; in MONAI evaluator outputs this is ``"image"``).
        pred_key: the reconstruction ``I_hat`` (``"pred"``), or a mapping ``{"amap": (1, H, W), "score": ...}``
            from a model that makes its own anomaly map and score (then ``score`` below is not used).
        score: image score kind (``"mse"`` as in the paper, ``"mean_abs"``, ``"topk_mean"``).
        threshold: ``None`` for the paper's per-image rule, else a fixed threshold on ``A``.
        region_key / region_dilation: restrict the mask to ``d[region_key] > 0`` dilated by this many px.
        mask_key: if set (validation on synthetic anomalies), ``d["target_mask"]`` = ``d[mask_key] >= target_threshold``
            (0/1) and ``d["is_synthetic"]`` = 1 when it has any anomaly pixel. New keys, because MONAI engines keep
            only new or output keys of post-processing in ``engine.state.output``, which metrics read.
        target_threshold: binarisation of soft synthetic labels (NSA's logistic label, FPI's and AnatPaste's
            blend factor); binary masks (ART-ASyn, CutPaste) are unchanged by any value in (0, 1].
    """

    def __init__(self, input_key: str = "image", pred_key: str = "pred", score: str = "mse",
                 floor: float = 0.03, rel: float = 0.2, threshold: float | None = None,
                 region_key: str | None = None, region_dilation: int = 0, mask_key: str | None = None,
                 target_threshold: float = 0.5, allow_missing_keys: bool = False):
        super().__init__([input_key, pred_key], allow_missing_keys)
        validate_score_kind(score)
        if not 0.0 < float(target_threshold) <= 1.0:
            raise ValueError(f"target_threshold (mask_target_threshold) must be in (0, 1], got {target_threshold!r}")
        self.target_threshold = float(target_threshold)
        if not (0.0 <= floor and 0.0 <= rel <= 1.0):
            raise ValueError(f"need floor >= 0 and 0 <= rel <= 1, got floor={floor}, rel={rel}")
        self.input_key, self.pred_key, self.score = input_key, pred_key, score
        self.floor, self.rel, self.threshold = floor, rel, threshold
        self.region_key, self.region_dilation, self.mask_key = region_key, region_dilation, mask_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for k in (self.input_key, self.pred_key):
            if k not in d:
                raise KeyError(f"AnomalyPostd: key '{k}' not found; available keys: {sorted(map(str, d))}")
        img = torch.as_tensor(d[self.input_key]).float()
        amap, score = self.map_and_score(img, d[self.pred_key])
        region = None
        if self.region_key is not None:
            region = dilate_region(torch.as_tensor(d[self.region_key]), self.region_dilation).to(amap.device)
        if self.threshold is None:
            mask = paper_mask(amap if region is None else amap * region, floor=self.floor, rel=self.rel)
        else:
            mask = threshold_mask(amap, self.threshold, region=region)
        d["amap"] = amap
        d["pred_mask"] = torch.as_tensor(mask).float()
        d["score"] = score
        if self.mask_key is not None:
            target = (torch.as_tensor(d[self.mask_key]).float() >= self.target_threshold).float()
            d["target_mask"] = target
            flat = target.reshape(target.shape[0], -1) if target.ndim == 4 else target.reshape(1, -1)
            d["is_synthetic"] = (flat.sum(1) > 0).float()  # one flag per image (item: shape (1,))
        return d

    def map_and_score(self, img: torch.Tensor, pred) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, score)``: from a restoration (``|I - clamp(I_hat)|``, :func:`image_score`) or a map output."""
        if isinstance(pred, Mapping):
            missing = {"amap", "score"} - set(pred)
            if missing:
                raise KeyError(f"AnomalyPostd: the map output under '{self.pred_key}' lacks {sorted(missing)}; "
                               f"it has {sorted(map(str, pred))}")
            amap = torch.as_tensor(pred["amap"]).float().to(img.device)
            if amap.shape != img.shape:
                raise ValueError(f"AnomalyPostd: anomaly map shape {tuple(amap.shape)} differs from the image "
                                 f"shape {tuple(img.shape)}")
            return amap, torch.as_tensor(pred["score"], dtype=torch.float32).reshape(-1)
        recon = torch.as_tensor(pred).float().clamp(0.0, 1.0)
        score = torch.as_tensor(image_score(img, recon, kind=self.score), dtype=torch.float32).reshape(-1)
        return anomaly_map(img, recon), score
