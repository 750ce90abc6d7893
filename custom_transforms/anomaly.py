"""Post-processing of a restoration network's output into anomaly maps, masks and image scores.

Per image (never across a batch): ``A = |I - I_hat|``; score = mean squared error (the paper) or another
``scripts.metrics.image_score`` kind; binary mask by the paper's rule ``A >= max(floor, rel * max(A))``
or by a fixed (calibrated) threshold, optionally restricted to a region such as the dilated lungs.
"""

from __future__ import annotations

from typing import Hashable, Mapping

import torch
from monai.transforms import MapTransform

from scripts.metrics import SCORE_KINDS, anomaly_map, image_score, paper_mask, threshold_mask


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
        pred_key: the reconstruction ``I_hat`` (``"pred"``).
        score: image score kind (``"mse"`` as in the paper, ``"mean_abs"``, ``"topk_mean"``).
        threshold: ``None`` for the paper's per-image rule, else a fixed threshold on ``A``.
        region_key / region_dilation: restrict the mask to ``d[region_key] > 0`` dilated by this many px.
        mask_key: if set (validation on synthetic anomalies), ``d["target_mask"]`` = a copy of ``d[mask_key]``
            and ``d["is_synthetic"]`` = 1 when it has any anomaly pixel. New keys, because MONAI engines keep
            only new or output keys of post-processing in ``engine.state.output``, which metrics read.
    """

    def __init__(self, input_key: str = "image", pred_key: str = "pred", score: str = "mse",
                 floor: float = 0.03, rel: float = 0.2, threshold: float | None = None,
                 region_key: str | None = None, region_dilation: int = 0, mask_key: str | None = None,
                 allow_missing_keys: bool = False):
        super().__init__([input_key, pred_key], allow_missing_keys)
        if score not in SCORE_KINDS:
            raise ValueError(f"score kind (score_kind) must be one of {SCORE_KINDS}, got {score!r}")
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
        pred = torch.as_tensor(d[self.pred_key]).float().clamp(0.0, 1.0)
        amap = anomaly_map(img, pred)
        region = None
        if self.region_key is not None:
            region = dilate_region(torch.as_tensor(d[self.region_key]), self.region_dilation).to(amap.device)
        if self.threshold is None:
            mask = paper_mask(amap if region is None else amap * region, floor=self.floor, rel=self.rel)
        else:
            mask = threshold_mask(amap, self.threshold, region=region)
        d["amap"] = amap
        d["pred_mask"] = torch.as_tensor(mask).float()
        d["score"] = torch.as_tensor(image_score(img, pred, kind=self.score), dtype=torch.float32).reshape(-1)
        if self.mask_key is not None:
            target = torch.as_tensor(d[self.mask_key]).float()
            d["target_mask"] = target
            flat = target.reshape(target.shape[0], -1) if target.ndim == 4 else target.reshape(1, -1)
            d["is_synthetic"] = (flat.sum(1) > 0).float()  # one flag per image (item: shape (1,))
        return d
