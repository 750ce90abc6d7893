"""Bases of the lung-segmentation transforms: an array transform and its dictionary wrapper.

A lung segmenter is a pure function ``image (H, W) -> uint8 labels (H, W)`` (0 background, 1 right lung
= image left, 2 left lung = image right; docs/architecture.md). :class:`LungSeg` turns one into a MONAI
array transform on ``(1, H, W)`` images; :class:`LungSegd` wraps a :class:`LungSeg` for dictionaries and
says what happens when no lung is found.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, ensure_tuple, ensure_tuple_rep

from custom_transforms.utils import Choice, as_2d, like, source_name

__all__ = ["RIGHT", "LEFT", "ON_MISSING", "LungNotFoundError", "LungNotFoundWarning", "LungSeg", "LungSegd",
           "validate_on_missing"]

RIGHT, LEFT = 1, 2  # labels: patient's right lung (image left), patient's left lung (image right)
ON_MISSING = ("raise", "warn", "ignore")


class LungNotFoundError(ValueError):
    """No lung was found in an image (raised by the dictionary transforms when ``on_missing="raise"``)."""


class LungNotFoundWarning(UserWarning):
    """No lung was found in an image (``on_missing="warn"``)."""


validate_on_missing = Choice("on_missing", ON_MISSING)  # what a lung transform does without lungs


class LungSeg(Transform):
    """Array lung segmentation: ``(1, H, W)`` image -> ``(1, H, W)`` ``uint8`` labels 0 / 1 / 2.

    Subclasses implement :meth:`segment` on a 2-D image. The labels keep the input's container: numpy
    in -> numpy out; tensor in -> tensor on the same device; ``MetaTensor`` in -> ``MetaTensor`` with a
    copy of the image's metadata. ``uint8`` collates with ``list_data_collate`` and keeps caches small.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def segment(self, image) -> np.ndarray:  # pragma: no cover - abstract
        """Labels ``uint8 (H, W)`` of one 2-D image."""
        raise NotImplementedError

    def __call__(self, img):
        shape = tuple(img.shape)
        if len(shape) != 3 or shape[0] != 1:
            raise ValueError(f"{type(self).__name__} expects an image of shape (1, H, W), got {shape}")
        labels = self.segment(as_2d(img))
        return like(labels, img, dtype=torch.uint8 if isinstance(img, torch.Tensor) else np.uint8)


class LungSegd(MapTransform):
    """Dictionary lung segmentation: ``d[lung_key] = segmenter(d[key])`` for each image key.

    Args:
        keys: image key(s), ``(1, H, W)`` each.
        segmenter: the array transform (a :class:`LungSeg`).
        lung_key: output key(s), one per image key.
        on_missing: what happens when no lung is found (labels all zero): ``"raise"``
            :class:`LungNotFoundError`, ``"warn"`` (:class:`LungNotFoundWarning`) or ``"ignore"``. In every
            case ``missing_count`` counts such images (and ``partial_count`` those with one lung only).
        allow_missing_keys: skip image keys absent from the dictionary.
    """

    backend = LungSeg.backend

    def __init__(self, keys: KeysCollection, segmenter: LungSeg, lung_key: str | Sequence[str] = "lung",
                 on_missing: str = "warn", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.segmenter = segmenter
        self.lung_keys = ensure_tuple_rep(lung_key, len(ensure_tuple(self.keys)))
        self.on_missing = validate_on_missing(on_missing)
        self.missing_count = 0
        self.partial_count = 0

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key, lung_key in self.key_iterator(d, self.lung_keys):
            labels = self.segmenter(d[key])
            self._count(labels, d[key], key)
            d[lung_key] = labels
        return d

    def _count(self, labels, img, key) -> None:
        lab = as_2d(labels, "lung")
        has = [bool((lab == side).any()) for side in (RIGHT, LEFT)]
        if all(has):
            return
        if any(has):
            self.partial_count += 1
            return
        self.missing_count += 1
        name = source_name(img)
        msg = f"{type(self).__name__}: no lung found in '{key}'" + (f" ({name})" if name else "")
        if self.on_missing == "raise":
            raise LungNotFoundError(msg)
        if self.on_missing == "warn":
            warnings.warn(msg + f"; lung mask left empty ({self.missing_count} so far)", LungNotFoundWarning,
                          stacklevel=3)
