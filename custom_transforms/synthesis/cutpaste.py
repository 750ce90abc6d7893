"""CutPaste anomaly synthesis (numpy implementation) and its MONAI transforms.

CutPaste (Li, Sohn, Yoon, Pfister, "CutPaste: Self-Supervised Learning for Anomaly Detection and
Localization", CVPR 2021, Sec. 2.1 "CutPaste" and Sec. 2.2 "CutPaste variants") makes an anomaly by cutting
a patch out of a normal image and pasting it back at another place of the *same* image. It is the
synthesis baseline of the AnatPaste paper (Sato et al., Sec. IV-C "Baseline & Evaluation", which uses
CutPaste-Scar; Fig. 1 shows its hard-edged patches on chest radiographs) and of ART-ASyn (Sec. 4.3 and
Tables 1-2, where it is retrained under the project's U-Net and losses). ``synthesize_cutpaste`` returns the
synthetic image and the binary mask of the pasted region, the key contract of ``docs/architecture.md``.

Variants (``variant``, config key ``cutpaste_variant``):

* ``"normal"`` (CutPaste):
  1. patch area ``U(0.02, 0.15) x H x W``; aspect ratio ``w / h`` log-uniform in ``[0.3, 1 / 0.3]``;
     ``w = round(sqrt(area x aspect))``, ``h = round(sqrt(area / aspect))`` (at least 1, at most the
     image side);
  2. cut at a uniformly random place (the patch lies inside the image);
  3. colour jitter 0.1 of the patch (see below);
  4. paste at an independent uniformly random place (again inside the image), hard edges: the
     pasted rectangle replaces the image, ``mask`` = that rectangle (1.0).
* ``"scar"`` (CutPaste-Scar): a thin rectangle of width ``U(2, 16)`` px and height ``U(10, 25)`` px, cut
  at a random place, colour-jittered, rotated by ``U(-45, 45)`` deg and pasted at an independent random
  place; ``mask`` = the rotated rectangle's pixels (hard edges).
* ``"union"``: per call, ``"scar"`` with probability 0.5 (``union_scar_prob``), otherwise ``"normal"``.
  (CutPaste's "3-way" model trains on both kinds as two anomaly classes; a restoration network with a
  mask target needs no class, so each synthetic image gets one of the two, half of the time each.)

Defaults are the published ones (:class:`CutPasteParams`), with lengths for 256 px images, the project's
reference size (``docs/architecture.md``, "Array conventions"). The method file
``configs/methods/cutpaste.json`` selects ``"scar"``, the variant AnatPaste's chest X-ray baseline uses.

Implementation choices
----------------------
* **Gray colour jitter.** CutPaste jitters the patch with brightness, contrast, saturation and hue 0.1
  (torchvision ``ColorJitter``). On a gray image saturation and hue change nothing, so the patch gets a
  brightness factor ``b ~ U(0.9, 1.1)`` (``x b``) and a contrast factor ``c ~ U(0.9, 1.1)``
  (``c x + (1 - c) x mean(patch)``), each clipped to [0, 1], applied in a random order as ``ColorJitter``
  does. ``jitter = 0`` pastes the patch unchanged.
* **Image size.** The scar width and height are lengths for 256 px and are multiplied by
  ``s = sqrt(H x W) / 256`` (as ART-ASyn's lengths, ``docs/architecture.md`` "Array conventions"), then
  rounded (at least 1 px); the normal patch is a fraction of the image area and needs no scaling.
* **Rotation** is counter-clockwise for positive angles (PIL's ``Image.rotate``, ``expand=True``) about the
  patch centre, nearest-neighbour: the pasted pixels are patch pixels, and the mask is the set of pixels
  of the expanded box whose centre falls inside the rotated rectangle. A box larger than the image
  (only for very elongated images) is cropped about its centre.
* **Placement.** Cut and paste positions are independent and uniform over the positions where the
  (rotated) patch fits in the image, so the paste may overlap the cut. CutPaste is not anatomy-aware:
  the lung map is not used, and an empty one does not prevent synthesis. ``restrict_to_lung=True``
  (config key ``cutpaste_restrict_to_lung``, not part of the published method) draws the paste *centre*
  from the lung pixels instead; the box is then shifted to lie inside the image.
* All randomness comes from the ``numpy.random.Generator`` given; the work is a few slices and one
  vectorised inverse rotation of the scar box (no per-pixel Python loop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from monai.config import KeysCollection

from custom_transforms.synthesis.base import AnomalySynthesis, AnomalySynthesisd, check_lung_values, resolve_params
from custom_transforms.utils import Choice, check_flag

__all__ = ["VARIANTS", "CutPasteParams", "synthesize_cutpaste", "CutPaste", "CutPasted"]

VARIANTS = ("normal", "scar", "union")

validate_variant = Choice("cutpaste_variant", VARIANTS, "CutPaste variant")

_MIN_SIDE = 8  # smallest image side (px) accepted by synthesize_cutpaste


def _fail(field: str, value, allowed: str):
    raise ValueError(f"CutPasteParams.{field} must be {allowed}, got {value!r}")


def _number(field: str, value, allowed: str) -> float:
    if isinstance(value, bool):
        _fail(field, value, allowed)
    try:
        v = float(value)
    except (TypeError, ValueError):
        _fail(field, value, allowed)
    if not math.isfinite(v):
        _fail(field, value, allowed)
    return v + 0.0  # no -0.0 (numpy's uniform(0.0, -0.0) refuses the range)


def _range(field: str, value, allowed: str) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        _fail(field, value, allowed)
    lo, hi = (_number(field, v, allowed) for v in value)
    if lo > hi:
        _fail(field, value, allowed)
    return lo, hi


@dataclass(frozen=True)
class CutPasteParams:
    """CutPaste parameters; defaults are the published values (CutPaste Sec. 2.1-2.2), lengths for 256 px.

    Range fields are ``(low, high)`` pairs (lists from a config are accepted and stored as tuples).

    Raises:
        ValueError: a field outside its allowed range; the message names the field, the value and the range.
    """

    area_ratio: tuple = (0.02, 0.15)  # normal: patch area as a fraction of the image area, uniform
    aspect_ratio: float = 0.3  # normal: w / h log-uniform in [aspect_ratio, 1 / aspect_ratio]
    jitter: float = 0.1  # brightness and contrast factors U(1 - jitter, 1 + jitter) on the patch
    scar_width: tuple = (2.0, 16.0)  # scar: px at reference_size, uniform
    scar_height: tuple = (10.0, 25.0)  # scar: px at reference_size, uniform
    scar_rotation: tuple = (-45.0, 45.0)  # scar: deg, uniform, counter-clockwise positive
    union_scar_prob: float = 0.5  # union: probability of a scar (otherwise a normal patch)
    reference_size: int = 256  # image side the lengths are stated for

    def __post_init__(self):
        area = _range("area_ratio", self.area_ratio, "(low, high) with 0 < low <= high <= 1")
        if not 0.0 < area[0] <= area[1] <= 1.0:
            _fail("area_ratio", self.area_ratio, "(low, high) with 0 < low <= high <= 1")
        aspect = _number("aspect_ratio", self.aspect_ratio, "a number in (0, 1]")
        if not 0.0 < aspect <= 1.0:
            _fail("aspect_ratio", self.aspect_ratio, "a number in (0, 1] (the range is [a, 1/a])")
        jitter = _number("jitter", self.jitter, "a number in [0, 1)")
        if not 0.0 <= jitter < 1.0:
            _fail("jitter", self.jitter, "a number in [0, 1)")
        sizes = {}
        for name in ("scar_width", "scar_height"):
            sizes[name] = _range(name, getattr(self, name), "(low, high) px with 0 < low <= high")
            if not sizes[name][0] > 0.0:
                _fail(name, getattr(self, name), "(low, high) px with 0 < low <= high")
        rot = _range("scar_rotation", self.scar_rotation, "(low, high) deg with -180 <= low <= high <= 180")
        if not -180.0 <= rot[0] <= rot[1] <= 180.0:
            _fail("scar_rotation", self.scar_rotation, "(low, high) deg with -180 <= low <= high <= 180")
        p_scar = _number("union_scar_prob", self.union_scar_prob, "a probability in [0, 1]")
        if not 0.0 <= p_scar <= 1.0:
            _fail("union_scar_prob", self.union_scar_prob, "a probability in [0, 1]")
        ref = _number("reference_size", self.reference_size, "a positive integer (px)")
        if ref <= 0 or ref != int(ref):
            _fail("reference_size", self.reference_size, "a positive integer (px)")
        for name, value in (("area_ratio", area), ("aspect_ratio", aspect), ("jitter", jitter),
                            ("scar_rotation", rot), ("union_scar_prob", p_scar), ("reference_size", int(ref)),
                            *sizes.items()):
            object.__setattr__(self, name, value)


def _check_restrict(restrict_to_lung) -> bool:
    return check_flag(restrict_to_lung, "restrict_to_lung (cutpaste_restrict_to_lung)")


# ----------------------------------------------------------------------------------------------------
# steps


def _prepare_inputs(image, lung, restrict_to_lung: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Checked float32 image in [0, 1] and, for ``restrict_to_lung``, the flat indices of the lung pixels."""
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D (H, W), got shape {img.shape}")
    if min(img.shape) < _MIN_SIDE:
        raise ValueError(f"image too small for CutPaste: {img.shape}, need at least {_MIN_SIDE} px a side")
    img = np.asarray(img, np.float32)
    if not np.isfinite(img).all():
        raise ValueError("image contains NaN or infinite values")
    img = np.clip(img, 0.0, 1.0)
    if lung is None:
        if restrict_to_lung:
            raise ValueError("restrict_to_lung needs a lung label map, got None")
        return img, None
    lung = np.asarray(lung)
    if lung.shape != img.shape:
        raise ValueError(f"lung label map shape {lung.shape} does not match image shape {img.shape}")
    check_lung_values(lung)
    if not restrict_to_lung:
        return img, None  # CutPaste does not look at the lungs
    centres = np.flatnonzero(lung.ravel() > 0)
    if centres.size == 0:
        raise ValueError("lung label map has no lung pixel: cannot place a CutPaste patch with "
                         "restrict_to_lung=True (segment the lungs first, or treat the sample as clean)")
    return img, centres


def _uniform_place(rng: np.random.Generator, shape: tuple, box: tuple) -> tuple[int, int]:
    """Top-left corner of a ``box`` = (h, w) drawn uniformly over the places where it fits in ``shape``."""
    return int(rng.integers(shape[0] - box[0] + 1)), int(rng.integers(shape[1] - box[1] + 1))


def _normal_size(rng: np.random.Generator, shape: tuple, p: CutPasteParams) -> tuple[int, int]:
    """Step 1 (normal): patch (h, w) from an area fraction U(area_ratio) and a log-uniform aspect w / h."""
    H, W = shape
    area = rng.uniform(*p.area_ratio) * H * W
    log_a = abs(math.log(p.aspect_ratio))
    aspect = math.exp(rng.uniform(-log_a, log_a))
    h = min(max(int(round(math.sqrt(area / aspect))), 1), H)
    w = min(max(int(round(math.sqrt(area * aspect))), 1), W)
    return h, w


def _scar_size(rng: np.random.Generator, shape: tuple, p: CutPasteParams, s: float) -> tuple[int, int]:
    """Step 1 (scar): (h, w) = (U(scar_height), U(scar_width)) x s px, rounded, within the image."""
    w = rng.uniform(*p.scar_width) * s
    h = rng.uniform(*p.scar_height) * s
    return min(max(int(round(h)), 1), shape[0]), min(max(int(round(w)), 1), shape[1])


def _jitter(patch: np.ndarray, rng: np.random.Generator, p: CutPasteParams) -> np.ndarray:
    """Step 3: gray ColorJitter(0.1): brightness and contrast factors U(1 - j, 1 + j), random order."""
    b, c = (np.float32(f) for f in rng.uniform(1.0 - p.jitter, 1.0 + p.jitter, size=2))
    brightness = lambda x: np.clip(x * b, 0.0, 1.0)
    contrast = lambda x: np.clip(c * x + (1 - c) * np.float32(x.mean()), 0.0, 1.0)
    first, second = (brightness, contrast) if rng.random() < 0.5 else (contrast, brightness)
    out = second(first(patch))
    return out.astype(np.float32, copy=False)


def _rotate(patch: np.ndarray, angle: float, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Step 4 (scar): patch rotated ``angle`` deg counter-clockwise, expanded box; (values, support) 2-D.

    Nearest neighbour by inverse mapping of the box's pixel centres; support = centres inside the rotated
    rectangle. A box larger than the image ``shape`` is cropped about its centre.
    """
    h, w = patch.shape
    t = math.radians(angle)
    cos, sin = math.cos(t), math.sin(t)
    bh = min(max(int(math.ceil(abs(w * sin) + abs(h * cos) - 1e-6)), 1), shape[0])
    bw = min(max(int(math.ceil(abs(w * cos) + abs(h * sin) - 1e-6)), 1), shape[1])
    y = np.arange(bh, dtype=np.float64)[:, None] - (bh - 1) / 2.0
    x = np.arange(bw, dtype=np.float64)[None, :] - (bw - 1) / 2.0
    # screen (y down): a counter-clockwise rotation maps (u, v) to (u cos + v sin, -u sin + v cos)
    u = np.floor(x * cos - y * sin + w / 2.0).astype(np.int64)
    v = np.floor(x * sin + y * cos + h / 2.0).astype(np.int64)
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    values = patch[np.clip(v, 0, h - 1), np.clip(u, 0, w - 1)]
    return np.where(inside, values, 0.0).astype(np.float32), inside


def _paste_place(rng, shape: tuple, box: tuple, centres: np.ndarray | None) -> tuple[int, int]:
    """Step 4 placement: uniform, or (``restrict_to_lung``) centred on a random lung pixel, kept inside."""
    if centres is None:
        return _uniform_place(rng, shape, box)
    cy, cx = divmod(int(centres[rng.integers(centres.size)]), shape[1])
    y0 = min(max(cy - box[0] // 2, 0), shape[0] - box[0])
    x0 = min(max(cx - box[1] // 2, 0), shape[1] - box[1])
    return y0, x0


def synthesize_cutpaste(
    image: np.ndarray,
    lung: np.ndarray | None,
    rng: np.random.Generator,
    *,
    params: CutPasteParams | None = None,
    variant: str = "normal",
    restrict_to_lung: bool = False,
    **overrides,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut one patch of ``image`` and paste it elsewhere in the same image (CutPaste; see the module docstring).

    Args:
        image: 2-D float array in [0, 1] (values outside are clipped), shape ``(H, W)``.
        lung: ``uint8 (H, W)`` labels 0/1/2; checked but not used unless ``restrict_to_lung`` (may be None then).
        rng: ``numpy.random.Generator``; the only source of randomness.
        params: a :class:`CutPasteParams`; ``overrides`` (its field names as keywords, e.g.
            ``area_ratio=(0.05, 0.1)``) replace single fields.
        variant: ``"normal"``, ``"scar"`` or ``"union"`` (config key ``cutpaste_variant``).
        restrict_to_lung: draw the paste centre from the lung pixels (not in the published method).

    Returns:
        ``(synthetic, mask)``, float32 ``(H, W)``: ``synthetic`` in [0, 1] equals ``image`` outside the mask;
        ``mask`` is 1 on the pasted region (the rectangle, or the rotated scar) and 0 elsewhere.

    Raises:
        ValueError: bad ``variant`` or ``restrict_to_lung``, shapes, label values, NaN/inf pixels, an image
            smaller than 8 px a side, bad parameter values, or no lung pixel with ``restrict_to_lung``.
        TypeError: an unknown parameter name.
    """
    p = resolve_params(CutPasteParams, params, overrides, "synthesize_cutpaste")
    validate_variant(variant)
    img, centres = _prepare_inputs(image, lung, _check_restrict(restrict_to_lung))
    shape = img.shape
    if variant == "union":
        variant = "scar" if rng.random() < p.union_scar_prob else "normal"
    # 1. patch size
    if variant == "normal":
        h, w = _normal_size(rng, shape, p)
    else:
        h, w = _scar_size(rng, shape, p, math.sqrt(shape[0] * shape[1]) / p.reference_size)
    # 2. cut, 3. colour jitter
    y0, x0 = _uniform_place(rng, shape, (h, w))
    patch = _jitter(img[y0:y0 + h, x0:x0 + w], rng, p)
    # 4. (scar) rotate; paste with hard edges at an independent place
    if variant == "scar":
        patch, support = _rotate(patch, rng.uniform(*p.scar_rotation), shape)
    else:
        support = np.ones(patch.shape, bool)
    py, px = _paste_place(rng, shape, patch.shape, centres)
    synthetic = img.copy()
    mask = np.zeros(shape, np.float32)
    box = (slice(py, py + patch.shape[0]), slice(px, px + patch.shape[1]))
    synthetic[box] = np.where(support, patch, synthetic[box])
    mask[box] = support
    return synthetic, mask


# ----------------------------------------------------------------------------------------------------
# MONAI transforms


class CutPaste(AnomalySynthesis):
    """Array CutPaste: ``(image, lung)`` ``(1, H, W)`` -> ``(synthetic, mask)`` ``(1, H, W)`` float32.

    Args:
        variant: ``"normal"``, ``"scar"`` or ``"union"`` (config key ``cutpaste_variant``).
        restrict_to_lung: paste centred on a lung pixel (config key ``cutpaste_restrict_to_lung``); when False
            (the published method) the lungs are not used and an empty lung map still gets a patch
            (``needs_lung`` is False).
        params: a :class:`CutPasteParams`; keyword ``**kwargs`` (its field names) replace single fields.
        prob / on_empty_lung: see :class:`~custom_transforms.synthesis.base.AnomalySynthesis`.
    """

    params_class = CutPasteParams

    def __init__(self, variant: str = "normal", restrict_to_lung: bool = False, params: CutPasteParams | None = None,
                 prob: float = 1.0, on_empty_lung: str = "clean", **kwargs):
        super().__init__(prob, on_empty_lung)
        self._set_params(params, kwargs)
        self.variant = validate_variant(variant)
        self.restrict_to_lung = _check_restrict(restrict_to_lung)
        self.needs_lung = self.restrict_to_lung

    def synthesize(self, image: np.ndarray, lung: np.ndarray, rng: np.random.Generator, source=None):
        return synthesize_cutpaste(image, lung, rng, params=self.params, variant=self.variant,
                                   restrict_to_lung=self.restrict_to_lung)


class CutPasted(AnomalySynthesisd):
    """Dictionary CutPaste: ``d["synthetic"]``, ``d["mask"]`` = a CutPaste anomaly of ``d["image"]``.

    Reads ``d[key]`` (``(1, H, W)`` image in [0, 1]) and ``d[lung_key]`` (``(1, H, W)`` lung labels, part of
    the contract even though only ``restrict_to_lung`` uses them); writes ``d[synthetic_key]`` and
    ``d[mask_key]`` (``(1, H, W)`` float32, mask 0/1) in the image's container. With probability
    ``1 - prob`` the sample is clean. ``set_random_state(seed)`` reproduces results exactly (forwarded to
    the :class:`CutPaste` it holds). Other arguments as :class:`CutPaste`.
    """

    def __init__(self, keys: KeysCollection = ("image",), lung_key: str = "lung", synthetic_key: str = "synthetic",
                 mask_key: str = "mask", prob: float = 1.0, variant: str = "normal", restrict_to_lung: bool = False,
                 on_empty_lung: str = "clean", allow_missing_keys: bool = False,
                 params: CutPasteParams | None = None, **kwargs):
        synth = self.make_synthesizer(CutPaste, params, kwargs, variant=variant, restrict_to_lung=restrict_to_lung,
                                      on_empty_lung=on_empty_lung)
        super().__init__(keys, synth, lung_key, synthetic_key, mask_key, prob, allow_missing_keys)
