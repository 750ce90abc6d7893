"""Training-sample composition around any synthesis transform.

Every synthesis transform (``ARTASynd`` and the comparison methods) shares one dictionary contract:
it reads ``"image"`` (+ ``"lung"``) and writes ``"synthetic"`` and ``"mask"``. The wrappers here turn one
healthy image into the samples a batch holds:

- :class:`CleanSampled`: ``synthetic = image`` and an empty mask (a clean sample, target = input);
- :class:`SyntheticCopiesd`: the paper's composition, each healthy image once clean plus
  ``n ~ U{n_min..n_max}`` synthetic copies, returned as a list that MONAI's ``list_data_collate`` flattens;
- :class:`SeededPerSampled`: runs a random transform with a seed fixed per file, so a validation set of
  synthetic anomalies is the same every epoch (and cacheable);
- :class:`RandPoolImaged`: adds a randomly drawn image of a :class:`~custom_transforms.synthesis.base.SourcePool`
  under its own key (SAGAN's unlabelled image ``x_u`` beside the healthy ``x_n``).
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable, Mapping
from copy import deepcopy

import numpy as np
import torch
from monai.transforms import Randomizable, Transform

from custom_transforms.utils import source_name


def _zeros_like(x):
    return torch.zeros_like(x) if isinstance(x, torch.Tensor) else np.zeros_like(x)


def _copy(x):
    return x.clone() if isinstance(x, torch.Tensor) else np.array(x, copy=True)


class CleanSampled(Transform):
    """Write a clean sample: ``d[synthetic_key] = d[image_key]`` and an all-zero ``d[mask_key]``."""

    def __init__(self, image_key: str = "image", synthetic_key: str = "synthetic", mask_key: str = "mask"):
        self.image_key, self.synthetic_key, self.mask_key = image_key, synthetic_key, mask_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if self.image_key not in d:
            raise KeyError(f"CleanSampled: key '{self.image_key}' not found; available keys: {sorted(map(str, d))}")
        d[self.synthetic_key] = _copy(d[self.image_key])
        d[self.mask_key] = _zeros_like(d[self.image_key])
        return d


class SyntheticCopiesd(Randomizable, Transform):
    """One healthy image -> [clean sample] + ``n`` synthetic copies, ``n`` uniform in ``n_synthetic``.

    Args:
        synth: a dictionary synthesis transform writing ``synthetic_key`` and ``mask_key``; ``None`` means
            no synthesis (then only the clean sample is produced).
        n_synthetic: ``(n_min, n_max)`` inclusive, or one int; the paper uses (1, 3).
        include_clean: also emit the image itself as a clean sample (target = input, empty mask).
    """

    def __init__(self, synth=None, n_synthetic=(1, 3), include_clean: bool = True, image_key: str = "image",
                 synthetic_key: str = "synthetic", mask_key: str = "mask"):
        lo, hi = (n_synthetic, n_synthetic) if np.isscalar(n_synthetic) else tuple(n_synthetic)
        if not (0 <= lo <= hi):
            raise ValueError(f"n_synthetic must be (min, max) with 0 <= min <= max, got {n_synthetic!r}")
        if hi > 0 and synth is None:
            raise ValueError("n_synthetic > 0 needs a synthesis transform (synth)")
        if hi == 0 and not include_clean:
            raise ValueError("n_synthetic = 0 with include_clean = False would produce no samples")
        self.synth, self.n_range, self.include_clean = synth, (int(lo), int(hi)), include_clean
        self.clean = CleanSampled(image_key, synthetic_key, mask_key)
        self._n = lo

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        if isinstance(self.synth, Randomizable):
            self.synth.set_random_state(seed=int(self.R.randint(2**31)))
        return self

    def randomize(self, data=None) -> None:
        self._n = int(self.R.randint(self.n_range[0], self.n_range[1] + 1))

    def __call__(self, data: Mapping[Hashable, object]) -> list[dict]:
        self.randomize()
        out = [self.clean(data)] if self.include_clean else []
        for _ in range(self._n):
            out.append(self.synth(deepcopy(dict(data))))
        return out


def file_seed(data: Mapping, key: str = "image", base: int = 0) -> int:
    """A stable seed from the file name of ``data[key]`` (its meta ``filename_or_obj``) and ``base``."""
    x = data[key]
    name = source_name(x) if hasattr(x, "meta") else (x if isinstance(x, str) else "")
    return (zlib.crc32(str(name).encode()) + 7919 * int(base)) % (2**31)


class SeededPerSampled(Transform):
    """Apply a random transform with a seed fixed per file (so its output is the same every epoch).

    Not ``Randomizable`` itself, so MONAI's ``CacheDataset`` caches its output.
    """

    def __init__(self, transform: Randomizable, seed: int = 0, key: str = "image"):
        if not isinstance(transform, Randomizable):
            raise TypeError(f"SeededPerSampled needs a Randomizable transform, got {type(transform).__name__}")
        self.transform, self.seed, self.key = transform, int(seed), key

    def __call__(self, data):
        self.transform.set_random_state(seed=file_seed(data, self.key, self.seed))
        return self.transform(data)


class RandPoolImaged(Randomizable, Transform):
    """``d[key]`` = an image drawn uniformly from ``pool`` (a :class:`~custom_transforms.synthesis.base.SourcePool`).

    SAGAN (Zhang et al., MICCAI 2024) Sec. 2.1 trains on a healthy image ``x_n`` and an unlabelled image ``x_u``
    (normal and abnormal mixed); this transform adds ``x_u``, loaded by the pool's loader so it has the size and
    intensity handling of ``d["image"]``. The draw is made in :meth:`randomize` from the transform's own
    generator (``set_random_state`` makes it reproducible).

    Raises:
        ValueError: ``pool`` is empty (raised by the pool).
    """

    def __init__(self, pool, key: str = "unlabelled"):
        if len(pool) == 0:
            raise ValueError("RandPoolImaged needs a non-empty pool")
        self.pool, self.key = pool, key
        self._index = 0

    def randomize(self, data=None) -> None:
        self._index = int(self.R.randint(len(self.pool)))

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        self.randomize()
        d = dict(data)
        d[self.key] = self.pool.load(self._index)
        return d
