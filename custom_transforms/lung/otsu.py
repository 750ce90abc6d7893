"""AnatPaste's lung segmentation (single Otsu threshold), as a baseline to PBTSeg.

Steps (AnatPaste, Sec. 3.1, and its published code), for an image in [0, 1]:

1. CLAHE: ``skimage.exposure.equalize_adapthist(image, clip_limit=0.01)``;
2. Otsu threshold of the equalised image; the mask is the DARK side (lungs and air);
3. 3 x 3 binary opening; ``clear_border`` (drops the outside air touching the image edge);
4. 3 x 3 binary dilation;
5. components under 400 px (scaled by ``H*W / 256**2``) are removed; like the published code, the
   whole bounding box of each small component is zeroed (``small="bbox"``; ``"component"`` removes
   only its pixels);
6. if nothing is left, the whole image counts as lung.

Labels follow the project convention: each remaining 8-connected component is the right lung (1) when
its centroid lies in the image's left half, else the left lung (2); the whole-image fallback is split
into halves the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from monai.config import KeysCollection
from skimage.exposure import equalize_adapthist
from skimage.filters import threshold_otsu
from skimage.segmentation import clear_border

from custom_transforms.lung.base import LEFT, RIGHT, LungSeg, LungSegd
from custom_transforms.utils import Choice, as_image2d

SQUARE3 = np.ones((3, 3), np.uint8)


def split_sides(mask: np.ndarray) -> np.ndarray:
    """Label each 8-connected component of a binary mask 1 (centroid left of the midline) or 2."""
    n, labels, _, cent = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    side = np.where(cent[:, 0] < mask.shape[1] / 2, RIGHT, LEFT).astype(np.uint8)
    side[0] = 0
    return side[labels]


def otsu_lung_seg(image, small: str = "bbox") -> np.ndarray:
    """AnatPaste lung mask (module docstring, steps 1-6) as uint8 labels 0 / 1 / 2, shape (H, W)."""
    validate_small(small)
    x = as_image2d(image)
    H, W = x.shape
    eq = equalize_adapthist(x, clip_limit=0.01)
    dark = (eq <= threshold_otsu(eq)).astype(np.uint8) if eq.max() > eq.min() else np.ones_like(x, np.uint8)
    m = cv2.morphologyEx(dark, cv2.MORPH_OPEN, SQUARE3)
    m = clear_border(m.astype(bool)).astype(np.uint8)
    m = cv2.dilate(m, SQUARE3)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    min_area = 400 * H * W / 256.0**2
    for k in np.flatnonzero(stats[:, 4] < min_area):
        if k == 0:
            continue
        if small == "bbox":
            bx, by, bw, bh = stats[k, :4]
            m[by:by + bh, bx:bx + bw] = 0
        else:
            m[labels == k] = 0
    if not m.any():  # nothing left: the whole image counts as lung
        out = np.full((H, W), LEFT, np.uint8)
        out[:, : W // 2] = RIGHT
        return out
    return split_sides(m)


SMALL = ("bbox", "component")


validate_small = Choice("small", SMALL)  # how small components are removed (step 5)


class OtsuLungSeg(LungSeg):
    """Array AnatPaste lung segmentation: ``(1, H, W)`` image -> ``(1, H, W)`` ``uint8`` labels."""

    def __init__(self, small: str = "bbox"):
        self.small = validate_small(small)

    def segment(self, image) -> np.ndarray:
        return otsu_lung_seg(image, small=self.small)


class OtsuLungSegd(LungSegd):
    """Dictionary AnatPaste lung segmentation; same contract as :class:`~custom_transforms.lung.pbtseg.PBTSegd`.

    Note: the method never returns an empty mask (step 6), so ``on_missing`` only fires for images
    whose labels are empty for other reasons; ``partial_count`` counts one-sided masks.
    """

    def __init__(self, keys: KeysCollection = "image", lung_key: str | Sequence[str] = "lung",
                 on_missing: str = "warn", allow_missing_keys: bool = False, small: str = "bbox"):
        super().__init__(keys, OtsuLungSeg(small), lung_key, on_missing, allow_missing_keys)


__all__ = ["otsu_lung_seg", "OtsuLungSeg", "OtsuLungSegd", "split_sides"]
