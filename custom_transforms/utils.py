"""Container helpers shared by the transforms: one image as a 2-D numpy array, and back.

The pure functions of this package work on 2-D numpy arrays ``(H, W)``; MONAI transforms receive
channel-first ``(1, H, W)`` numpy arrays, tensors or ``MetaTensor`` s. :func:`as_2d` goes one way with
``monai.utils.convert_to_numpy``, :func:`like` the other with ``monai.utils.convert_to_dst_type``
(numpy in, numpy out; tensor in, tensor on the same device; ``MetaTensor`` in, ``MetaTensor`` carrying a
copy of the reference's metadata), so every transform keeps the container it was given. It also holds the
validators of config values shared by the transforms (:class:`Choice`, :func:`check_flag`, :func:`range_pair`).
"""

from __future__ import annotations

import math

import numpy as np
from monai.utils import convert_to_dst_type, convert_to_numpy

__all__ = ["MIN_SIZE", "Choice", "as_2d", "as_image2d", "check_flag", "cli_flag", "is_number", "like", "per_image",
           "range_pair", "source_name"]

MIN_SIZE = 16  # smallest accepted image side (px) for segmentation and synthesis


def is_number(v) -> bool:
    """Whether ``v`` is a real number (Python or numpy int/float) and not a bool."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def as_2d(x, name: str = "image") -> np.ndarray:
    """One image (``(H, W)``, ``(1, H, W)``, ``(1, 1, H, W)``; numpy, tensor or MetaTensor) as numpy ``(H, W)``.

    Raises:
        ValueError: ``x`` has fewer than two dimensions or holds more than one image; the message names
            ``name``.
    """
    a = convert_to_numpy(x)
    if a.ndim < 2 or int(np.prod(a.shape[:-2], dtype=np.int64)) != 1:
        raise ValueError(f"'{name}' must be one 2-D image of shape (H, W) or (1, H, W), got shape {a.shape}")
    return a.reshape(a.shape[-2:])


def like(arr2d: np.ndarray, ref, dtype=None):
    """``arr2d`` ``(H, W)`` as ``(1, H, W)`` in the container of ``ref`` (and its metadata and device).

    ``dtype`` (numpy or torch) sets the output type; by default the type of ``ref``.
    """
    out, *_ = convert_to_dst_type(np.ascontiguousarray(np.asarray(arr2d)[None]), ref, dtype=dtype)
    return out


def per_image(x):
    """View ``x`` as ``(N, pixels)``: a 2-D input is one image, otherwise the first axis indexes images."""
    return x.reshape(1, -1) if x.ndim == 2 else x.reshape(x.shape[0], -1)


def source_name(x) -> str:
    """The file a ``MetaTensor`` was loaded from (its ``filename_or_obj``), or ``""``."""
    meta = getattr(x, "meta", None) or {}
    return str(meta.get("filename_or_obj", "") or "")


def as_image2d(image) -> np.ndarray:
    """Validate a gray image and return it as float32 ``(H, W)`` in [0, 1].

    Accepts float in [0, 1] (values up to 0.05 outside are clipped), uint8 / integers in 0..255, bool, a
    leading channel dimension of 1, numpy arrays and CPU/GPU tensors.

    Raises:
        ValueError: wrong shape, fewer than :data:`MIN_SIZE` px a side, unsupported dtype, NaN/inf, or
            values outside the ranges above.
    """
    a = convert_to_numpy(image)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"expected a gray image of shape (H, W) or (1, H, W), got shape {a.shape}")
    if a.size == 0 or min(a.shape) < MIN_SIZE:
        raise ValueError(f"image is empty or too small: shape {a.shape}, need at least {MIN_SIZE} px a side")
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if np.issubdtype(a.dtype, np.integer):
        if a.dtype != np.uint8 and (a.min() < 0 or a.max() > 255):
            raise ValueError(
                f"integer images must hold 8-bit values 0..255, got range [{a.min()}, {a.max()}]")
        return a.astype(np.float32) / 255.0
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"unsupported image dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if not np.all(np.isfinite(a)):
        raise ValueError("image contains NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if lo < -0.05 or hi > 1.05:
        raise ValueError(f"float images must be scaled to [0, 1], got range [{lo:g}, {hi:g}]")
    return np.clip(a, 0.0, 1.0)


class Choice:
    """Validator of one config rule: the value must be one of ``allowed`` (one instance per rule).

    ``Choice("pbtseg_mode", ("robust", "reference"), "PBTSeg mode")(value)`` returns ``value`` when allowed.

    Raises:
        ValueError: the value is not in ``allowed``; the message names the value, the allowed set and the
            config key.
    """

    def __init__(self, key: str, allowed: tuple, what: str | None = None):
        self.key, self.allowed, self.what = key, tuple(allowed), what

    def __call__(self, value):
        if value not in self.allowed:
            name = f"{self.what} ({self.key})" if self.what else self.key
            raise ValueError(f"{name} must be one of {self.allowed}, got {value!r}")
        return value


def cli_flag(value, key: str) -> bool:
    """A runtime switch as ``bool``: a bool, 0/1, or the text a command line gives (``--resume false``:
    "true"/"false"/"1"/"0"/"yes"/"no", any case).

    Raises:
        ValueError: anything else; the message names ``key`` and the value.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ValueError(f"{key} must be true or false, got {value!r}")


def check_flag(value, where: str) -> bool:
    """``value`` as a ``bool``.

    Raises:
        ValueError: ``value`` is not a Python or numpy bool; the message starts with ``where`` (the field and
            its config key).
    """
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{where} must be true or false, got {value!r}")
    return bool(value)


def range_pair(where: str, value, low: float, high: float, low_open: bool) -> tuple[float, float]:
    """``value`` as a ``(lo, hi)`` tuple of finite floats with ``low (<|<=) lo <= hi <= high``.

    Raises:
        ValueError: not a pair of numbers, or out of range; the message starts with ``where``.
    """
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a pair (low, high) of numbers, got {value!r}") from None
    ok_low = lo > low if low_open else lo >= low
    if not (ok_low and lo <= hi <= high and math.isfinite(lo) and math.isfinite(hi)):
        bracket = "(" if low_open else "["
        raise ValueError(f"{where} must satisfy low <= high within {bracket}{low:g}, {high:g}], got {value!r}")
    return lo, hi
