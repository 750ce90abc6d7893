"""Bases of every anomaly-synthesis method: an array transform and its dictionary wrapper.

A method is a pure function ``(image (H, W), lung (H, W), rng) -> (synthetic, mask)`` plus a few lines: a
subclass of :class:`AnomalySynthesis` that calls it in :meth:`~AnomalySynthesis.synthesize`, and a subclass
of :class:`AnomalySynthesisd` that builds one. The bases own everything else, as MONAI's
``RandGaussianNoise`` / ``RandGaussianNoised`` pair does:

- **randomness**: the array transform draws all of it in :meth:`~AnomalySynthesis.randomize` (whether to
  synthesise, and the seed of the ``numpy.random.Generator`` handed to the pure function); the
  dictionary transform draws its own ``prob`` and forwards ``set_random_state`` to the array transform, so
  the same seed gives the same output;
- **containers**: numpy in, numpy out; tensor in, tensor on the same device; ``MetaTensor`` in,
  ``MetaTensor`` carrying the image's metadata (``custom_transforms.utils``);
- **keys** (docs/architecture.md): reads ``image`` and ``lung``, writes ``synthetic`` and ``mask``,
  honours ``allow_missing_keys``;
- **clean samples**: with probability ``1 - prob``, or when the lung map is empty and
  ``on_empty_lung="clean"``, ``synthetic`` is a copy of the image and ``mask`` is all zeros.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends

from custom_transforms.utils import Choice, as_2d, like

__all__ = ["ON_EMPTY_LUNG", "AnomalySynthesis", "AnomalySynthesisd", "validate_on_empty_lung", "validate_prob"]

ON_EMPTY_LUNG = ("clean", "raise")


validate_on_empty_lung = Choice("on_empty_lung", ON_EMPTY_LUNG)


def validate_prob(prob: float, name: str = "synthesis_prob") -> float:
    """Check a probability.

    Raises:
        ValueError: ``prob`` is not a number in [0, 1]; the message names the config key ``name``.
    """
    try:
        p = float(prob)
    except (TypeError, ValueError):
        raise ValueError(f"prob ({name}) must be a number in [0, 1], got {prob!r}") from None
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"prob ({name}) must be in [0, 1], got {prob!r}")
    return p


def lung_labels(lung, image_shape: tuple, name: str = "lung") -> np.ndarray:
    """A ``(1, H, W)`` or ``(H, W)`` lung label map as ``uint8 (H, W)`` matching ``image_shape``.

    Raises:
        ValueError: the map is not one 2-D image or its shape differs from the image's.
    """
    lab = as_2d(lung, name)
    if lab.shape != tuple(image_shape):
        raise ValueError(f"'{name}' shape {lab.shape} does not match the image shape {tuple(image_shape)}")
    return np.rint(lab).astype(np.uint8) if lab.dtype.kind == "f" else lab.astype(np.uint8)


class AnomalySynthesis(RandomizableTransform):
    """Array synthesis: ``(image (1, H, W), lung (1, H, W)) -> (synthetic, mask)``, each ``(1, H, W)`` float32.

    Subclasses implement :meth:`synthesize` by calling their pure function with the generator given.

    Args:
        prob: probability of synthesising; otherwise the sample is clean.
        on_empty_lung: ``"clean"`` (an empty lung map gives a clean sample) or ``"raise"`` (the pure
            function raises ``ValueError``).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, prob: float = 1.0, on_empty_lung: str = "clean"):
        RandomizableTransform.__init__(self, validate_prob(prob))
        self.on_empty_lung = validate_on_empty_lung(on_empty_lung)
        self._seed = 0

    def randomize(self, data=None) -> None:
        """Draw whether to synthesise and the seed of this call's generator (both always drawn)."""
        super().randomize(None)
        self._seed = int(self.R.randint(2**31))

    def synthesize(self, image: np.ndarray, lung: np.ndarray, rng: np.random.Generator):
        """``(synthetic, mask)`` float32 ``(H, W)`` for a float32 image in [0, 1] and uint8 lung labels."""
        raise NotImplementedError  # pragma: no cover - abstract

    def __call__(self, img, lung, randomize: bool = True):
        if randomize:
            self.randomize()
        image = as_2d(img, "image").astype(np.float32)
        labels = lung_labels(lung, image.shape)
        synthetic = mask = None
        if self._do_transform and ((labels > 0).any() or self.on_empty_lung == "raise"):
            synthetic, mask = self.synthesize(image, labels, np.random.default_rng(self._seed))
        if synthetic is None:
            synthetic, mask = image.copy(), np.zeros(image.shape, np.float32)
        return like(synthetic, img, dtype=np.float32), like(mask, img, dtype=np.float32)


class AnomalySynthesisd(RandomizableTransform, MapTransform):
    """Dictionary synthesis: ``d[synthetic_key], d[mask_key] = synthesizer(d[key], d[lung_key])``.

    Args:
        keys: the one image key.
        synthesizer: the array transform (an :class:`AnomalySynthesis`, built with ``prob=1``).
        lung_key / synthetic_key / mask_key: the other keys of the contract.
        prob: probability of synthesising (``synthesis_prob`` in the configs); otherwise a clean sample.
        allow_missing_keys: skip (leave the dictionary unchanged) when the image or lung key is missing.
    """

    backend = AnomalySynthesis.backend

    def __init__(self, keys: KeysCollection, synthesizer: AnomalySynthesis, lung_key: str = "lung",
                 synthetic_key: str = "synthetic", mask_key: str = "mask", prob: float = 1.0,
                 allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, validate_prob(prob))
        if len(self.keys) != 1:
            raise ValueError(f"{type(self).__name__} takes exactly one image key, got {self.keys}")
        self.synthesizer = synthesizer
        self.lung_key, self.synthetic_key, self.mask_key = lung_key, synthetic_key, mask_key

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.synthesizer.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.lung_key not in d:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"{type(self).__name__}: key '{self.lung_key}' (lung labels) is missing from the "
                               f"data dictionary (keys: {list(d)})")
            self.randomize(None)
            self.synthesizer.randomize()
            self.synthesizer._do_transform = self._do_transform and self.synthesizer._do_transform
            d[self.synthetic_key], d[self.mask_key] = self.synthesizer(d[key], d[self.lung_key], randomize=False)
        return d
