"""AnatPaste anatomy-aware pasting (numpy/OpenCV implementation) and its MONAI transforms.

``synthesize_anatpaste`` cuts a patch out of a healthy chest X-ray and pastes it back into the lungs of
the same image through a soft, lung-restricted alpha mask, following the published method: Sato et al.,
"Anatomy-aware Self-supervised Learning for Anomaly Detection in Chest Radiographs" (AnatPaste, iScience
2023), Sec. III-B, Eq. (1) and Fig. 2, with the defaults of its published code (lengths for 256 px images):

1. **Lungs** (``X_seg``). AnatPaste's own segmentation (CLAHE, Otsu threshold, morphology; Sec. III-B,
   Algorithm 1) is :func:`custom_transforms.lung.otsu.otsu_lung_seg`, run as a cached deterministic
   transform (``OtsuLungSegd`` writing ``"lung_otsu"`` in ``configs/methods/anatpaste.json``); the bundle's
   PBTSeg labels (``"lung"``) can be used instead (hparam ``anatpaste_lung``, :func:`lung_key_for`).
   Only ``lung > 0`` matters here.
2. **Cut** (``X_crop``). A patch of area ``U(0.02, 0.15) x H x W`` with aspect ratio ``w / h``
   log-uniform in ``[0.3, 1 / 0.3]`` (``w = round(sqrt(area x aspect))``, ``h = round(sqrt(area / aspect))``,
   at most the image size) at a uniformly random position of the SAME image.
3. **Colour jitter 0.1** (torchvision ``ColorJitter(0.1, 0.1, 0.1, 0.1)`` in the published code). On a gray
   image saturation and hue do nothing, so this is a brightness factor ``b ~ U(0.9, 1.1)`` (``x b``) and a
   contrast factor ``c ~ U(0.9, 1.1)`` (``mean + c (x - mean)``, ``mean`` = the patch mean), applied in a
   random order (50/50) like ``ColorJitter``, each clipped to [0, 1].
4. **Paste** (``X_paste``). The patch is placed centred on a uniformly random lung pixel ``(cx, cy)``
   (top-left corner ``(cx - w // 2, cy - h // 2)``, clipped to the image); ``X_paste`` is 0 elsewhere.
5. **Shape** (``X_blur``). An ellipse or a rectangle (50/50) filled with ``U(150, 255) / 255`` (the paper's
   ``[0.59, 1]``), drawn in the patch box inset by a margin of 10 px on each side (the published code's
   ``margin``; the paper's criterion "the figure size should be smaller than the patch"), then
   Gaussian-blurred with radius ``U(0, 15)`` px.
6. **Anatomical mask** (``X_mask``) ``a = X_blur x (lung > 0)``, and Eq. (1):
   ``X_anomaly = X_normal (1 - a) + X_paste a``.

Returns ``(synthetic, mask)`` with ``mask = a``: a **soft label** (float32 in [0, 1], at most the fill
value), not a 0/1 mask. AnatPaste's region has no hard edge; the training loss takes soft labels as they
are and validation binarises masks at ``mask_target_threshold`` (0.5; ``AnomalyPostd``, docs/architecture.md).
The synthetic image equals the input wherever ``mask == 0``.

Conventions and implementation choices
--------------------------------------
* **"Gaussian blur radius r"** is Pillow's ``ImageFilter.GaussianBlur(radius=r)``, whose ``radius`` is the
  Gaussian's standard deviation: ``cv2.GaussianBlur`` with ``sigma = r`` (kernel truncated at 4 sigma,
  replicated border), as in :mod:`custom_transforms.synthesis.artasyn`; ``r = 0`` is no blur. Away from
  the image edge it matches Pillow's three-box approximation within 5/255 on the hard-edged shape (mean
  < 0.5/255); within ``4 r`` of the image edge Pillow's own edge handling gives somewhat larger values.
* **Image size.** Lengths (margin, blur radius) are stated for 256 px and multiplied by
  ``s = sqrt(H x W) / 256``; areas are fractions of the image and need no scaling.
* **Continuous draws.** The paper states uniform distributions on ``[0.59, 1]`` and ``[0, 15]``; the
  published code draws integers (``randint(150, 255)``, ``randint(0, 15)``: 150..254 and 0..14). We draw
  continuous values over the stated ranges.
* **Degenerate shapes.** When a patch side is at most ``2 x margin`` (thin, elongated patches) the inset
  box would be empty (Pillow refuses to draw it); the shape then keeps a 1 px extent on that axis around
  the centre. At the published sizes the other side is then long (an area of at least 2% of the image),
  so the paste never vanishes; with much smaller ``area_ratio`` a 1 px shape under a wide blur can fall
  below the 8-bit support (next item) and give an empty mask.
* **8-bit support.** The published alpha is an 8-bit image, so the far tail of the blur is 0. We keep
  float alpha but set values below half an 8-bit level (0.5 / 255) to 0, so ``mask > 0`` is where the
  paste visibly changes the image.
* **Fringe, as published.** ``X_paste`` is 0 outside the patch (Sec. III-B, Fig. 2), and with blur radii
  above a few px the blurred shape reaches past the 10 px margin and the patch edge, so Eq. (1) darkens a
  thin fringe around those pastes. This is the published method and is kept.
* **No lungs.** The published code pastes anywhere when its segmentation is empty; our Otsu segmentation
  already falls back to the whole image (``otsu_lung_seg`` step 6). An empty lung map here gives a clean
  sample (``on_empty_lung="clean"``, the synthesis base) or a ``ValueError`` from the pure function.
* Computation is float32 with continuous values (the published code rounds to uint8 after each step),
  and it runs on the box of the shape plus the blur reach only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np
from monai.config import KeysCollection

from custom_transforms.synthesis.base import AnomalySynthesis, AnomalySynthesisd, check_lung_values, resolve_params
from custom_transforms.utils import MIN_SIZE, Choice

__all__ = ["LUNG_KEYS", "AnatPasteParams", "synthesize_anatpaste", "lung_key_for", "AnatPaste", "AnatPasted"]

# hparam ``anatpaste_lung`` -> the data key of the lung labels the paste is restricted to
LUNG_KEYS = {"otsu": "lung_otsu", "pbtseg": "lung"}

_MIN_ALPHA = 0.5 / 255.0  # alpha below half an 8-bit level is 0 (the published alpha is an 8-bit image)

_check_lung = Choice("anatpaste_lung", tuple(LUNG_KEYS), "AnatPaste lung segmentation")


def lung_key_for(lung: str) -> str:
    """The data key of the lung labels for the ``anatpaste_lung`` option: ``"otsu"`` -> ``"lung_otsu"``
    (AnatPaste's own segmentation, as published), ``"pbtseg"`` -> ``"lung"`` (the bundle's PBTSeg).

    Raises:
        ValueError: ``lung`` is not one of the options; the message names the config key ``anatpaste_lung``.
    """
    return LUNG_KEYS[_check_lung(lung)]


@dataclass(frozen=True)
class AnatPasteParams:
    """AnatPaste synthesis parameters; defaults are the published values (Sec. III-B and the published code),
    lengths for 256 px images. Range fields are ``(low, high)`` of a uniform draw; lists are accepted (configs).
    The config key of a field ``f`` is ``anatpaste_f`` (``configs/methods/anatpaste.json``)."""

    area_ratio: tuple = (0.02, 0.15)  # patch area, fraction of the image area
    aspect_ratio: float = 0.3  # patch w / h log-uniform in [aspect_ratio, 1 / aspect_ratio]
    color_jitter: float = 0.1  # brightness and contrast factors U(1 - j, 1 + j)
    shape_margin: float = 10.0  # px: the shape is inset this much from each side of the patch box
    p_ellipse: float = 0.5  # probability of an ellipse (else a rectangle)
    fill_range: tuple = (150.0, 255.0)  # shape value, 8-bit levels (alpha = value / 255)
    blur_radius: tuple = (0.0, 15.0)  # px, Pillow radius = Gaussian sigma
    reference_size: int = 256  # image size the lengths are stated for

    def __post_init__(self):
        def fail(name, value, rule):
            key = "" if name == "reference_size" else f" (config key anatpaste_{name})"
            raise ValueError(f"AnatPasteParams.{name}{key} must be {rule}, got {value!r}")

        def number(name, lo, hi, rule, lo_open=False, hi_open=False):
            value = getattr(self, name)
            try:
                v = float(value)
            except (TypeError, ValueError):
                fail(name, value, rule)
            if not (math.isfinite(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)):
                fail(name, value, rule)
            object.__setattr__(self, name, v)

        def span(name, lo, hi, rule, lo_open=False):
            value = getattr(self, name)
            try:
                a, b = (float(x) for x in value)
            except (TypeError, ValueError):
                fail(name, value, rule)
            if not (math.isfinite(a) and math.isfinite(b) and (lo < a if lo_open else lo <= a) and a <= b <= hi):
                fail(name, value, rule)
            object.__setattr__(self, name, (a, b))

        span("area_ratio", 0.0, 1.0, "(low, high) with 0 < low <= high <= 1", lo_open=True)
        number("aspect_ratio", 0.0, 1.0, "in (0, 1]", lo_open=True)
        number("color_jitter", 0.0, 1.0, "in [0, 1)", hi_open=True)
        number("shape_margin", 0.0, math.inf, "a length >= 0 (px at 256 px)", hi_open=True)
        number("p_ellipse", 0.0, 1.0, "a probability in [0, 1]")
        span("fill_range", 0.0, 255.0, "(low, high) 8-bit levels with 0 < low <= high <= 255", lo_open=True)
        span("blur_radius", 0.0, math.inf, "(low, high) with 0 <= low <= high (px at 256 px)")
        if isinstance(self.reference_size, bool) or not isinstance(self.reference_size, int) \
                or self.reference_size < 1:
            fail("reference_size", self.reference_size, "a positive integer (px)")


# ----------------------------------------------------------------------------------------------------
# steps


class _Draw(NamedTuple):
    """Every random choice of one paste (step numbers of the module docstring); lengths in pixels."""

    cut_h: int  # 2. patch size
    cut_w: int
    src_y: int  # 2. patch top-left in the image
    src_x: int
    brightness: float  # 3. jitter factors and order
    contrast: float
    brightness_first: bool
    cy: int  # 4. paste centre: a lung pixel
    cx: int
    sigma: float  # 5. blur sigma (scaled to the image)
    fill: float  # 5. shape value in [0, 1]
    ellipse: bool  # 5. ellipse or rectangle


def _draw(rng: np.random.Generator, lung_idx: np.ndarray, shape: tuple, p: AnatPasteParams, s: float) -> _Draw:
    """All randomness of one paste, in the published code's order (area, aspect, position, jitter, centre,
    blur, fill, shape). ``lung_idx``: flat indices of the lung pixels."""
    H, W = shape
    area = rng.uniform(*p.area_ratio) * H * W
    aspect = math.exp(rng.uniform(math.log(p.aspect_ratio), -math.log(p.aspect_ratio)))
    cut_w = min(max(int(round(math.sqrt(area * aspect))), 1), W)
    cut_h = min(max(int(round(math.sqrt(area / aspect))), 1), H)
    src_y, src_x = int(rng.integers(0, H - cut_h + 1)), int(rng.integers(0, W - cut_w + 1))
    j = p.color_jitter
    brightness, contrast = rng.uniform(1.0 - j, 1.0 + j, size=2)
    brightness_first = bool(rng.random() < 0.5)
    cy, cx = divmod(int(lung_idx[rng.integers(lung_idx.size)]), W)
    sigma = rng.uniform(*p.blur_radius) * s
    fill = rng.uniform(*p.fill_range) / 255.0
    ellipse = bool(rng.random() < p.p_ellipse)
    return _Draw(cut_h, cut_w, src_y, src_x, float(brightness), float(contrast), brightness_first, cy, cx,
                 float(sigma), float(fill), ellipse)


def _jitter(patch: np.ndarray, d: _Draw) -> np.ndarray:
    """Step 3: gray ``ColorJitter``: brightness ``x b`` and contrast ``mean + c (x - mean)``, in the drawn order."""
    out = patch.astype(np.float32, copy=True)

    def bright(x):
        x *= d.brightness
        return np.clip(x, 0.0, 1.0, out=x)

    def contrast(x):
        m = float(x.mean())
        x -= m
        x *= d.contrast
        x += m
        return np.clip(x, 0.0, 1.0, out=x)

    return contrast(bright(out)) if d.brightness_first else bright(contrast(out))


def _shape_box(d: _Draw, margin: int) -> tuple[int, int, int, int]:
    """Step 5: the shape's inclusive box ``(y0, y1, x0, x1)``: the patch box inset by ``margin``, >= 1 px."""

    def axis(c, n):
        lo, hi = c - n // 2 + margin, c + n // 2 - margin
        return (lo, hi) if hi >= lo else (c, c)

    return (*axis(d.cy, d.cut_h), *axis(d.cx, d.cut_w))


def _work_box(shape_box, sigma: float, shape: tuple) -> tuple[slice, slice]:
    """The region where the alpha can be non-zero: the shape box plus the blur reach, within the image."""
    y0, y1, x0, x1 = shape_box
    r = int(math.ceil(4.0 * sigma)) + 1 if sigma > 0 else 0
    H, W = shape
    return slice(max(y0 - r, 0), min(y1 + 1 + r, H)), slice(max(x0 - r, 0), min(x1 + 1 + r, W))


def _blurred_shape(d: _Draw, shape_box, box: tuple[slice, slice]) -> np.ndarray:
    """Step 5 (``X_blur``) on the work box: ellipse or rectangle of value ``fill``, Gaussian-blurred."""
    (ys, xs), (y0, y1, x0, x1) = box, shape_box
    m = np.zeros((ys.stop - ys.start, xs.stop - xs.start), np.float32)
    if d.ellipse:  # the ellipse inscribed in the inclusive pixel box
        yy = (np.arange(ys.start, ys.stop, dtype=np.float32) - d.cy) / ((y1 - y0) / 2.0 + 0.5)
        xx = (np.arange(xs.start, xs.stop, dtype=np.float32) - d.cx) / ((x1 - x0) / 2.0 + 0.5)
        m[(yy[:, None] ** 2 + xx[None, :] ** 2) <= 1.0] = d.fill
    else:
        m[max(y0 - ys.start, 0):max(y1 + 1 - ys.start, 0), max(x0 - xs.start, 0):max(x1 + 1 - xs.start, 0)] = d.fill
    if d.sigma > 0:
        m = cv2.GaussianBlur(m, (0, 0), sigmaX=d.sigma, sigmaY=d.sigma, borderType=cv2.BORDER_REPLICATE)
    return m


def _paste_layer(img: np.ndarray, d: _Draw, box: tuple[slice, slice]) -> np.ndarray:
    """Steps 2-4 (``X_paste``) on the work box: the jittered patch centred on ``(cy, cx)``, 0 elsewhere."""
    ys, xs = box
    out = np.zeros((ys.stop - ys.start, xs.stop - xs.start), np.float32)
    py0, px0 = d.cy - d.cut_h // 2, d.cx - d.cut_w // 2  # patch top-left in the image
    oy0, oy1 = max(py0, ys.start), min(py0 + d.cut_h, ys.stop)  # overlap with the work box
    ox0, ox1 = max(px0, xs.start), min(px0 + d.cut_w, xs.stop)
    if oy1 > oy0 and ox1 > ox0:
        patch = _jitter(img[d.src_y:d.src_y + d.cut_h, d.src_x:d.src_x + d.cut_w], d)
        out[oy0 - ys.start:oy1 - ys.start, ox0 - xs.start:ox1 - xs.start] = \
            patch[oy0 - py0:oy1 - py0, ox0 - px0:ox1 - px0]
    return out


# ----------------------------------------------------------------------------------------------------
# the pure function


def _prepare_inputs(image, lung) -> tuple[np.ndarray, np.ndarray]:
    """Checked inputs: float32 image clipped to [0, 1] and the flat indices of the lung pixels."""
    image, lung = np.asarray(image), np.asarray(lung)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D (H, W), got shape {image.shape}")
    if lung.shape != image.shape:
        raise ValueError(f"lung label map shape {lung.shape} does not match image shape {image.shape}")
    if min(image.shape) < MIN_SIZE:
        raise ValueError(f"image too small for AnatPaste: shape {image.shape}, need at least {MIN_SIZE} px a side")
    check_lung_values(lung)
    lung_idx = np.flatnonzero(lung)
    if lung_idx.size == 0:
        raise ValueError("lung label map has no lung pixel: cannot place an AnatPaste anomaly "
                         "(segment the lungs first, or treat the sample as clean)")
    return np.clip(np.asarray(image, np.float32), 0.0, 1.0), lung_idx


def synthesize_anatpaste(image: np.ndarray, lung: np.ndarray, rng: np.random.Generator, *,
                         params: AnatPasteParams | None = None, **overrides) -> tuple[np.ndarray, np.ndarray]:
    """Paste one AnatPaste anomaly into ``image`` (AnatPaste Sec. III-B, Eq. (1); see the module docstring).

    Args:
        image: 2-D float array in [0, 1] (values outside are clipped), shape ``(H, W)``.
        lung: ``(H, W)`` lung labels (0 background, 1 / 2 lungs; any non-zero label counts): the paste centre
            is one of its pixels and the alpha is 0 outside it.
        rng: ``numpy.random.Generator``; the only source of randomness.
        params: an :class:`AnatPasteParams`; ``overrides`` (its field names as keywords, e.g.
            ``blur_radius=(0, 5)``) replace single fields.

    Returns:
        ``(synthetic, mask)``, float32 ``(H, W)``: ``synthetic = image (1 - a) + X_paste a`` in [0, 1];
        ``mask = a``, the soft paste alpha in [0, 1] (not binary; 0 outside the lungs; ``synthetic`` equals
        ``image`` wherever it is 0).

    Raises:
        ValueError: bad shapes, label values or parameter values, or a lung map with no lung pixel.
        TypeError: an unknown parameter name.
    """
    p = resolve_params(AnatPasteParams, params, overrides, "synthesize_anatpaste")
    img, lung_idx = _prepare_inputs(image, lung)
    H, W = img.shape
    s = math.sqrt(H * W) / p.reference_size
    d = _draw(rng, lung_idx, (H, W), p, s)  # 2.-5. every random choice
    shape_box = _shape_box(d, int(round(p.shape_margin * s)))
    box = _work_box(shape_box, d.sigma, (H, W))
    # 6. anatomical mask X_mask = X_blur x (lung > 0); values under half an 8-bit level are 0
    alpha = _blurred_shape(d, shape_box, box)
    alpha *= np.asarray(lung)[box] > 0
    alpha[alpha < _MIN_ALPHA] = 0.0
    np.clip(alpha, 0.0, 1.0, out=alpha)
    # Eq. (1): X_normal (1 - a) + X_paste a, written as X_normal + a (X_paste - X_normal)
    synthetic, mask = img.copy(), np.zeros((H, W), np.float32)
    region = img[box]
    synthetic[box] = np.clip(region + alpha * (_paste_layer(img, d, box) - region), 0.0, 1.0)
    mask[box] = alpha
    return synthetic, mask


# ----------------------------------------------------------------------------------------------------
# MONAI transforms


class AnatPaste(AnomalySynthesis):
    """Array AnatPaste: ``(image, lung)`` ``(1, H, W)`` -> ``(synthetic, mask)`` ``(1, H, W)`` float32.

    ``mask`` is the soft paste alpha in [0, 1] (:func:`synthesize_anatpaste`).

    Args:
        params: an :class:`AnatPasteParams`; keyword ``**kwargs`` (its field names) replace single fields.
        prob / on_empty_lung: see :class:`~custom_transforms.synthesis.base.AnomalySynthesis`.
    """

    params_class = AnatPasteParams

    def __init__(self, params: AnatPasteParams | None = None, prob: float = 1.0, on_empty_lung: str = "clean",
                 **kwargs):
        super().__init__(prob, on_empty_lung)
        self._set_params(params, kwargs)

    def synthesize(self, image: np.ndarray, lung: np.ndarray, rng: np.random.Generator, source=None):
        return synthesize_anatpaste(image, lung, rng, params=self.params)


class AnatPasted(AnomalySynthesisd):
    """Dictionary AnatPaste: ``d["synthetic"]``, ``d["mask"]`` = an AnatPaste anomaly of ``d["image"]``.

    Reads ``d[key]`` (``(1, H, W)`` image in [0, 1]) and ``d[lung_key]`` (``(1, H, W)`` lung labels: the
    configs pass ``lung_key_for(anatpaste_lung)``, ``"lung_otsu"`` for AnatPaste's Otsu segmentation as
    published or ``"lung"`` for PBTSeg); writes ``d[synthetic_key]`` and ``d[mask_key]`` (``(1, H, W)``
    float32; the mask is the soft paste alpha in [0, 1]) in the image's container. With probability
    ``1 - prob``, or an empty lung map and ``on_empty_lung="clean"``, the sample is clean.
    ``set_random_state(seed)`` reproduces results exactly (forwarded to the :class:`AnatPaste` it holds).
    Other arguments as :class:`AnatPaste`.
    """

    def __init__(self, keys: KeysCollection = ("image",), lung_key: str = "lung", synthetic_key: str = "synthetic",
                 mask_key: str = "mask", prob: float = 1.0, on_empty_lung: str = "clean",
                 allow_missing_keys: bool = False, params: AnatPasteParams | None = None, **kwargs):
        synth = self.make_synthesizer(AnatPaste, params, kwargs, on_empty_lung=on_empty_lung)
        super().__init__(keys, synth, lung_key, synthetic_key, mask_key, prob, allow_missing_keys)
