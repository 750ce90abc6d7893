"""NSA (Natural Synthetic Anomalies) anomaly synthesis, chest X-ray preset, and its MONAI transforms.

Natural Synthetic Anomalies (Schlüter, Tan, Hou, Kainz, "Natural synthetic anomalies for self-supervised anomaly
detection and localization", ECCV 2022, arXiv:2109.15222; Sec. 3, the self-supervised task; authors' public code
hmsch/natural-synthetic-anomalies, whose chest X-ray settings give the defaults below) is a synthesis baseline of
ART-ASyn (Cao, Fan, Cai, WACV 2026: Sec. 4.3 baselines, Table 1, the synthesis ablation of Table 2 and the visual
comparison of Sec. 5.3.2 / Fig. 3a; reference in ``docs/README.md``). The data flow and the synthesis contract
are in docs/architecture.md ("Transform pattern"). ``synthesize_nsa`` blends rescaled, shifted patches of ANOTHER
training image (``source``, same size) into a healthy chest X-ray with Poisson image editing and returns the
synthetic image with NSA's soft, intensity-based label:

1. **Object masks.** ``object = pixel > 20`` (8-bit levels), median-blurred with a 7 x 7 kernel, for the source
   and for the image (NSA's background-skipping rule: patches are taken from, and put on, the body).
2. **Patches.** Up to ``n_patches`` = 3 patches, blended one after the other into the same image: the first
   always, each further one with probability ``p_extra_patch`` = 0.5.
3. **Patch size.** Per axis, half-width ``int(clip((0.05 + Gamma(shape 2, scale 0.03)) x side, round(0.03 x
   side), round(0.4 x side)))``.
4. **Source patch.** The centre is drawn per axis uniformly over the integers ``[round(0.03 x side), side -
   round(0.03 x side))``, the box ``[c - w, c + w)`` is clipped to the image, and it must be at least
   ``min_object`` = 70% object; the centre (not the size) is redrawn up to ``max_attempts`` = 200 times, then the
   patch is given up.
5. **Rescale.** ``scale = clip(N(1, 0.5), 0.7, 1.3)``; the patch (and its object mask) is resized to
   ``(scale x height, width in proportion)``, each side clipped to ``[round(0.03 x side), round(0.4 x side)]``
   (the authors' code bounds the rescaled *side* by the half-width bounds), bilinear on the 8-bit copy. It must
   still be >= 70% object, else the patch is given up.
6. **Shift.** A destination centre is drawn uniformly over the centres that keep the patch one pixel inside
   the image (``[h // 2 + 1, H - h // 2 - 1)`` per axis; box ``[c - h // 2, c + (h + 1) // 2)``); it is
   accepted when >= ``min_overlap`` = 70% of the patch's object pixels land on image object pixels, redrawn up
   to 200 times, then the patch is given up.
7. **Poisson blending with mixed gradients** (NSA Sec. 3; Pérez, Gangnet, Blake, "Poisson image editing",
   SIGGRAPH 2003, Sec. 3, "mixing gradients"): ``cv2.seamlessClone(patch, image, mask, centre,
   cv2.MIXED_CLONE)`` with the whole patch rectangle minus its one-pixel border as the mask (what the authors'
   background handling amounts to for a rectangular patch); a patch whose mask has fewer than ``min_clone_area``
   = 50 pixels (or a side under 3 px) is given up. ``clone="normal"`` (NSA's other variant) uses ``cv2.NORMAL_CLONE``.
8. **Label** (NSA Sec. 3, intensity-based logistic label): with ``delta`` the 8-bit change of the blend,
   ``changed = |delta| > change_tol`` (1 level), median-blurred with a 5 x 5 kernel to remove grain; ``d`` = the
   median of ``changed x |delta|`` over a disk of radius 5 (0..255 scale); ``mask = 1 / (1 + exp(-k (d - x0)))``
   with ``k = 1/2``, ``x0 = 4`` where ``changed``, 0 elsewhere: a soft label, float32 in [0, 1].
   ``label="binary"`` (NSA's binary variant) writes 1 where ``changed``.

NSA is not anatomy-aware: the lung map is accepted for the synthesis contract (docs/architecture.md) but unused
by default. ``restrict_to_lung=True`` (a project option, not part of the method) draws the destination centres
of step 6 from the lung pixels instead (size, source patch, overlap rule and retries as above); only then does
an empty lung map make a clean sample (``on_empty_lung``).

Conventions and implementation choices
--------------------------------------
* **8-bit blending.** The method works on 8-bit images: the image and the source are rounded to uint8
  (``round(255 x v)``) and OpenCV's ``seamlessClone`` needs 8-bit 3-channel images, so the gray patch and the
  destination box are replicated into 3 channels (``cv2.COLOR_GRAY2BGR``) and channel 0 of the result is kept.
  OpenCV solves each channel independently, so this equals the authors' zero-padded copies. Intensities of the
  parameters (``object_threshold``, ``change_tol``, ``logistic_x0``) are therefore in 8-bit levels (0..255).
* **Float output.** The 8-bit change ``delta`` of all patches is added to the float image:
  ``synthetic = clip(image + delta / 255, 0, 1)``. Pixels the blend left unchanged keep their exact float
  value (no 8-bit quantisation outside the patches), and ``synthetic == image`` wherever ``delta == 0``.
* **Blend region.** ``seamlessClone`` is called on the destination box only (mask centre ``(w // 2, h // 2)``),
  which gives the same pixels as the call on the whole image and keeps the cost per patch independent of the
  image size. The mask is built afresh for every call: OpenCV 5 writes into the mask it is given.
* **Label support.** The grain-removing median blur of step 8 can also switch on pixels whose change is
  <= ``change_tol`` (the authors' code labels those too); here the blurred support is intersected with
  ``changed``, so the label is non-zero only where the blend changed the image by more than ``change_tol``,
  as the method states, and ``mask == 0`` wherever the image is unchanged. The disk median is
  ``skimage.filters.rank.median`` on the edge-padded change (= ``scipy.ndimage.median_filter(mode="nearest")``
  as in the authors' ``skimage.filters.median``), on the bounding box of the change only.
* **Image size.** Patch sizes are fractions of each axis (as in the authors' code; on a square image, of the
  side). Pixel lengths (median kernels 7 and 5, disk radius 5, minimum clone area 50 px) are stated for 256 px
  and scaled by ``s = sqrt(H x W) / 256`` (areas by ``s ** 2``, kernels rounded to the nearest odd size), as in
  :mod:`custom_transforms.synthesis.artasyn`.
* **Bounded retries, vectorised.** The up to 200 candidate centres of steps 4 and 6 are drawn at once and the
  first acceptable one is taken (the same distribution as redrawing one by one). Object fractions come from
  an integral image (step 4) and ``cv2.matchTemplate`` (step 6), so there are no per-pixel Python loops.
  A patch given up leaves the image as it is; when every patch is given up (e.g. a source with no object) the
  sample is clean (``mask`` all zero).
* **Small patches.** OpenCV erodes the blend mask by 3 px before using the patch's gradients, so a patch of
  about 8 px a side or less changes (almost) nothing. The rescaled side can be as small as
  ``round(0.03 x side)`` (8 px at 256 px, as in the authors' code); at 64 px (the demo size) such patches
  are common and some samples come out clean.
* **Source.** The second image comes from :class:`~custom_transforms.synthesis.base.SourcePool` (the training
  split, loaded with the same load and intensity transforms as the images, see ``configs/train.json``) unless
  one is given; values are clipped to [0, 1] like the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from skimage.filters import rank

from custom_transforms.synthesis.base import SourceSynthesis, SourceSynthesisd, check_source_inputs, resolve_params
from custom_transforms.utils import Choice, check_flag, range_pair

__all__ = ["NSA_CLONES", "NSA_LABELS", "NSAParams", "synthesize_nsa", "NSA", "NSAd"]

NSA_CLONES = ("mixed", "normal")  # Poisson blending: mixed gradients (chest X-ray preset) or the patch's gradients
NSA_LABELS = ("logistic", "binary")  # intensity-based logistic label (preset) or 1 where the blend changed the image

_check_clone = Choice("nsa_clone", NSA_CLONES, "clone")
_check_label = Choice("nsa_label", NSA_LABELS, "label")
_CLONE_FLAGS = {"mixed": cv2.MIXED_CLONE, "normal": cv2.NORMAL_CLONE}
_MIN_SIDE = 16  # px


def _where(name: str) -> str:
    return f"NSAParams.{name} (nsa_{name})"


def _interval(lo: float, hi: float, lo_open: bool, hi_open: bool) -> str:
    return f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def _number(name: str, value, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
            hi_open: bool = False, integer: bool = False):
    """``value`` as an int / float in the interval, else a ``ValueError`` naming the field and its config key."""
    kind = "an integer" if integer else "a number"
    v = None
    if not isinstance(value, (bool, np.bool_)):
        if integer:
            v = int(value) if isinstance(value, (int, np.integer)) else None
        else:
            try:
                v = float(value)
            except (TypeError, ValueError):
                v = None
    ok = v is not None and math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        raise ValueError(f"{_where(name)} must be {kind} in {_interval(lo, hi, lo_open, hi_open)}, got {value!r}")
    return v


@dataclass(frozen=True)
class NSAParams:
    """NSA synthesis parameters; defaults are the published chest X-ray preset (module docstring).

    Patch sizes are fractions of each image axis; pixel lengths are stated for ``reference_size`` = 256 px;
    intensities are 8-bit levels (0..255). The config keys of ``configs/methods/nsa.json`` are the field names
    prefixed with ``nsa_`` (all but ``reference_size``).
    """

    n_patches: int = 3  # at most this many patches: the first always, each further one with p_extra_patch
    p_extra_patch: float = 0.5
    width_offset: float = 0.05  # half-width = (width_offset + Gamma(gamma_shape, gamma_scale)) x side
    gamma_shape: float = 2.0
    gamma_scale: float = 0.03
    width_bounds: tuple = (0.03, 0.4)  # x side: half-width bounds (also bound the rescaled patch side)
    object_threshold: float = 20.0  # 8-bit level: object = pixel > threshold
    object_median: int = 7  # px, median blur of the object masks
    min_object: float = 0.7  # object fraction of the source patch
    min_overlap: float = 0.7  # fraction of the patch's object pixels on image object pixels
    max_attempts: int = 200  # centre draws per patch (source and destination) before giving up
    resize_sigma: float = 0.5  # scale = clip(N(1, resize_sigma), resize_bounds)
    resize_bounds: tuple = (0.7, 1.3)
    clone: str = "mixed"  # "mixed" (cv2.MIXED_CLONE, preset) or "normal" (cv2.NORMAL_CLONE)
    min_clone_area: float = 50.0  # px, smallest blend mask
    change_tol: float = 1.0  # 8-bit levels: labelled pixels changed by more than this
    label: str = "logistic"  # "logistic" (preset soft label) or "binary"
    label_median: int = 5  # px, grain-removing median blur of the changed pixels
    label_disk_radius: float = 5.0  # px, disk of the median of the change
    logistic_k: float = 0.5
    logistic_x0: float = 4.0  # 8-bit levels
    restrict_to_lung: bool = False  # True: destination centres on lung pixels (not in the published method)
    reference_size: int = 256  # px, the size the pixel lengths are stated for (not a tunable)

    def __post_init__(self):
        ints = {"n_patches": (1, 100), "object_median": (1, 255), "max_attempts": (1, 100_000),
                "label_median": (1, 255), "reference_size": (1, 100_000)}
        for name, (lo, hi) in ints.items():
            object.__setattr__(self, name, _number(name, getattr(self, name), lo, hi, integer=True))
        floats = {"p_extra_patch": (0.0, 1.0, False, False), "width_offset": (0.0, 0.5, False, False),
                  "gamma_shape": (0.0, math.inf, True, True), "gamma_scale": (0.0, 1.0, False, False),
                  "object_threshold": (0.0, 255.0, False, False), "min_object": (0.0, 1.0, False, False),
                  "min_overlap": (0.0, 1.0, False, False), "resize_sigma": (0.0, 10.0, False, False),
                  "min_clone_area": (1.0, math.inf, False, True), "change_tol": (0.0, 255.0, False, True),
                  "label_disk_radius": (0.0, 255.0, False, False), "logistic_k": (0.0, math.inf, True, True),
                  "logistic_x0": (-255.0, 255.0, False, False)}
        for name, (lo, hi, lo_open, hi_open) in floats.items():
            object.__setattr__(self, name, _number(name, getattr(self, name), lo, hi, lo_open, hi_open))
        for name, hi in (("width_bounds", 0.5), ("resize_bounds", 10.0)):
            object.__setattr__(self, name, range_pair(_where(name), getattr(self, name), 0.0, hi, low_open=True))
        _check_clone(self.clone)
        _check_label(self.label)
        object.__setattr__(self, "restrict_to_lung", check_flag(self.restrict_to_lung, _where("restrict_to_lung")))


# ----------------------------------------------------------------------------------------------------
# helpers


def _odd(v: float) -> int:
    return max(1, 2 * int(round((v - 1) / 2.0)) + 1)


def _as_float_image(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be a numeric image, got dtype {a.dtype}")
    a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return np.clip(a, 0.0, 1.0)


def _prepare_inputs(image, lung, source) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked inputs: image and source float32 clipped to [0, 1], lung labels uint8, all ``(H, W)``."""
    image, lung, source = check_source_inputs(
        image, lung, source, _MIN_SIDE,
        "NSA takes its patches from a second training image: give source (same shape as the image)")
    return _as_float_image(image, "image"), lung.astype(np.uint8), _as_float_image(source, "source")


def _to_u8(img: np.ndarray) -> np.ndarray:
    """``round(255 x img)`` as uint8 (img in [0, 1])."""
    return cv2.convertScaleAbs(img, alpha=255.0)


def _lung_centres(lung: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lung pixels ``(ys, xs)``: the destination centres with ``restrict_to_lung``."""
    ys, xs = np.nonzero(lung)
    if ys.size == 0:
        raise ValueError("lung label map has no lung pixel: cannot place an NSA patch with restrict_to_lung=True "
                         "(segment the lungs first, or treat the sample as clean)")
    return ys, xs


def _width_bounds(shape: tuple, p: NSAParams) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis half-width bounds ``round(bound x side)`` (also the bounds of the rescaled side)."""
    dims = np.asarray(shape, np.float64)
    return np.rint(p.width_bounds[0] * dims).astype(int), np.rint(p.width_bounds[1] * dims).astype(int)


# ----------------------------------------------------------------------------------------------------
# the steps of the method (numbers as in the module docstring)


def _object_mask(u8: np.ndarray, p: NSAParams, s: float) -> np.ndarray:
    """Step 1: ``pixel > object_threshold`` (8-bit levels), median-blurred; uint8 0/1."""
    obj = (u8 > p.object_threshold).astype(np.uint8)
    k = _odd(p.object_median * s)
    return cv2.medianBlur(obj, k) if k > 1 else obj


def _draw_half_widths(rng: np.random.Generator, shape: tuple, p: NSAParams) -> np.ndarray:
    """Step 3: per-axis half-widths ``int(clip((offset + Gamma(shape, scale)) x side, lo, hi))``."""
    lo, hi = _width_bounds(shape, p)
    g = rng.gamma(p.gamma_shape, p.gamma_scale, size=2) if p.gamma_scale > 0 else np.zeros(2)
    return np.clip((p.width_offset + g) * np.asarray(shape), lo, hi).astype(int)


def _find_source_box(rng: np.random.Generator, obj_integral: np.ndarray, shape: tuple, half: np.ndarray,
                     p: NSAParams) -> tuple[int, int, int, int] | None:
    """Step 4: the first of ``max_attempts`` clipped boxes ``[c - w, c + w)`` that is >= ``min_object`` object."""
    lo, _ = _width_bounds(shape, p)
    H, W = shape
    cy = rng.integers(lo[0], max(H - lo[0], lo[0] + 1), size=p.max_attempts)
    cx = rng.integers(lo[1], max(W - lo[1], lo[1] + 1), size=p.max_attempts)
    y0, y1 = np.clip(cy - half[0], 0, H), np.clip(cy + half[0], 0, H)
    x0, x1 = np.clip(cx - half[1], 0, W), np.clip(cx + half[1], 0, W)
    area = (y1 - y0) * (x1 - x0)
    S = obj_integral
    count = S[y1, x1] - S[y0, x1] - S[y1, x0] + S[y0, x0]
    ok = (area > 0) & (count >= p.min_object * area)
    if not ok.any():
        return None
    i = int(np.argmax(ok))
    return int(y0[i]), int(y1[i]), int(x0[i]), int(x1[i])


def _rescale(rng: np.random.Generator, patch: np.ndarray, obj: np.ndarray, shape: tuple, p: NSAParams):
    """Step 5: patch and object mask resized by ``clip(N(1, sigma), bounds)``, sides clipped, aspect kept."""
    lo, hi = _width_bounds(shape, p)
    h, w = patch.shape
    scale = float(np.clip(rng.normal(1.0, p.resize_sigma), *p.resize_bounds))
    new_h = float(np.clip(scale * h, lo[0], hi[0]))
    new_w = int(np.clip(int(new_h / h * w), lo[1], hi[1]))
    new_h = int(np.clip(int(new_w / w * h), lo[0], hi[0]))  # again, in case the width was clipped
    size = (max(new_w, 1), max(new_h, 1))
    return (cv2.resize(patch, size, interpolation=cv2.INTER_LINEAR),
            cv2.resize(obj, size, interpolation=cv2.INTER_LINEAR))


def _find_destination(rng: np.random.Generator, dst_obj: np.ndarray, obj: np.ndarray, centres, p: NSAParams):
    """Step 6: top-left ``(y, x)`` of the first of ``max_attempts`` destinations with >= ``min_overlap`` overlap.

    Centres are uniform over ``[h // 2 + 1, H - h // 2 - 1)`` per axis, or the lung pixels in that range
    (``centres``, with ``restrict_to_lung``). None when no candidate is acceptable.
    """
    H, W = dst_obj.shape
    h, w = obj.shape
    (cy_lo, cy_hi), (cx_lo, cx_hi) = (h // 2 + 1, H - h // 2 - 1), (w // 2 + 1, W - w // 2 - 1)
    if cy_hi <= cy_lo or cx_hi <= cx_lo:
        return None
    if centres is None:
        cy = rng.integers(cy_lo, cy_hi, size=p.max_attempts)
        cx = rng.integers(cx_lo, cx_hi, size=p.max_attempts)
    else:
        ys, xs = centres
        fits = np.nonzero((ys >= cy_lo) & (ys < cy_hi) & (xs >= cx_lo) & (xs < cx_hi))[0]
        if fits.size == 0:
            return None
        pick = fits[rng.integers(fits.size, size=p.max_attempts)]
        cy, cx = ys[pick].astype(np.int64), xs[pick].astype(np.int64)
    ty, tx = cy - h // 2, cx - w // 2
    n_obj = int(np.count_nonzero(obj))
    if n_obj == 0:
        return None
    # overlap counts at every top-left position (integers; rint removes the DFT's rounding error)
    overlap = np.rint(cv2.matchTemplate(dst_obj.astype(np.float32), obj.astype(np.float32), cv2.TM_CCORR))
    ok = overlap[ty, tx] >= p.min_overlap * n_obj
    if not ok.any():
        return None
    i = int(np.argmax(ok))
    return int(ty[i]), int(tx[i])


def _blend(canvas: np.ndarray, patch: np.ndarray, top_left: tuple, p: NSAParams, s: float) -> bool:
    """Step 7: Poisson-blend ``patch`` into ``canvas`` (uint8, in place) at ``top_left``; False if given up."""
    h, w = patch.shape
    if min(h, w) < 3 or (h - 2) * (w - 2) < p.min_clone_area * s * s:
        return False
    mask = np.zeros((h, w), np.uint8)  # built afresh for every call: OpenCV 5 writes into its mask argument
    mask[1:-1, 1:-1] = 255
    y, x = top_left
    dst = canvas[y:y + h, x:x + w]
    try:
        out = cv2.seamlessClone(cv2.cvtColor(patch, cv2.COLOR_GRAY2BGR), cv2.cvtColor(dst, cv2.COLOR_GRAY2BGR),
                                mask, (w // 2, h // 2), _CLONE_FLAGS[p.clone])
    except cv2.error:  # a degenerate patch OpenCV refuses: given up, as in the authors' code
        return False
    dst[...] = out[..., 0]
    return True


def _add_patch(canvas, src_u8, src_obj, src_integral, dst_obj, centres, rng, p: NSAParams, s: float) -> bool:
    """Steps 3-7 for one patch; the image is left as it is when the patch is given up."""
    shape = canvas.shape
    half = _draw_half_widths(rng, shape, p)
    box = _find_source_box(rng, src_integral, shape, half, p)
    if box is None:
        return False
    y0, y1, x0, x1 = box
    patch, obj = _rescale(rng, src_u8[y0:y1, x0:x1], src_obj[y0:y1, x0:x1], shape, p)
    if np.count_nonzero(obj) < p.min_object * obj.size:  # the rescaled patch must still hold the object
        return False
    top_left = _find_destination(rng, dst_obj, obj, centres, p)
    return top_left is not None and _blend(canvas, patch, top_left, p, s)


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return (yy * yy + xx * xx <= radius * radius).astype(np.uint8)


def _label(delta: np.ndarray, p: NSAParams, s: float) -> np.ndarray:
    """Step 8: soft (logistic) or binary label from the 8-bit change ``delta`` (int16), float32 (H, W)."""
    mask = np.zeros(delta.shape, np.float32)
    absd = np.minimum(np.abs(delta), 255).astype(np.uint8)
    changed = absd > p.change_tol
    rows, cols = np.nonzero(changed.any(axis=1))[0], np.nonzero(changed.any(axis=0))[0]
    if rows.size == 0:
        return mask
    k, r = _odd(p.label_median * s), max(0, int(round(p.label_disk_radius * s)))
    m = k // 2 + r + 1  # reach of the two filters: the box values equal the whole-image values
    H, W = delta.shape
    sl = slice(max(rows[0] - m, 0), min(rows[-1] + 1 + m, H)), slice(max(cols[0] - m, 0), min(cols[-1] + 1 + m, W))
    ch = changed[sl].astype(np.uint8)
    support = (cv2.medianBlur(ch, k) if k > 1 else ch) & ch  # grain removed; only where the image changed
    if p.label == "binary":
        mask[sl] = support
        return mask
    d = np.pad(support * absd[sl], r, mode="edge")  # edge padding = median_filter(mode="nearest")
    d = rank.median(d, _disk(r))[r:d.shape[0] - r, r:d.shape[1] - r].astype(np.float32)
    mask[sl] = support / (1.0 + np.exp(-p.logistic_k * (d - p.logistic_x0)))
    return mask


def synthesize_nsa(image: np.ndarray, lung: np.ndarray, rng: np.random.Generator, *, params: NSAParams | None = None,
                   source: np.ndarray, **overrides) -> tuple[np.ndarray, np.ndarray]:
    """Blend up to three rescaled, shifted patches of ``source`` into ``image`` (NSA, Schlüter et al. ECCV 2022).

    Steps and implementation choices are in the module docstring.

    Args:
        image: 2-D float array in [0, 1] (values outside are clipped), shape ``(H, W)``.
        lung: ``uint8 (H, W)`` labels: 0 background, 1 right lung (image left), 2 left lung; used only
            with ``restrict_to_lung``.
        rng: ``numpy.random.Generator``; the only source of randomness.
        params: an :class:`NSAParams`; ``overrides`` (its field names as keywords, e.g. ``clone="normal"``)
            replace single fields.
        source: the second training image the patches come from, 2-D float in [0, 1] of the same shape.

    Returns:
        ``(synthetic, mask)``, float32 ``(H, W)`` in [0, 1]: ``mask`` is NSA's logistic label (or 0/1 with
        ``label="binary"``), non-zero only where the blend changed the image by more than ``change_tol``;
        ``synthetic`` equals ``image`` wherever the blend changed nothing. Both are clean (``mask`` all zero)
        when every patch is given up.

    Raises:
        ValueError: bad shapes, values or label values, no ``source``, bad parameters, or no lung pixel with
            ``restrict_to_lung``.
        TypeError: an unknown parameter name.
    """
    p = resolve_params(NSAParams, params, overrides, "synthesize_nsa", list_fields=True)
    img, lung, src = _prepare_inputs(image, lung, source)
    s = math.sqrt(img.size) / p.reference_size
    centres = _lung_centres(lung) if p.restrict_to_lung else None
    # 1. object masks on the 8-bit copies
    img_u8, src_u8 = _to_u8(img), _to_u8(src)
    src_obj, dst_obj = _object_mask(src_u8, p, s), _object_mask(img_u8, p, s)
    src_integral = cv2.integral(src_obj, sdepth=cv2.CV_32S)
    # 2.-7. patches, blended one after the other
    canvas = img_u8.copy()
    for i in range(p.n_patches):
        if i == 0 or rng.random() < p.p_extra_patch:
            _add_patch(canvas, src_u8, src_obj, src_integral, dst_obj, centres, rng, p, s)
    # the 8-bit change, added to the float image
    delta = canvas.astype(np.int16) - img_u8.astype(np.int16)
    synthetic = img.copy()
    changed = delta != 0
    synthetic[changed] = np.clip(img[changed] + delta[changed].astype(np.float32) / np.float32(255.0), 0.0, 1.0)
    # 8. label
    return synthetic, _label(delta, p, s)


# ----------------------------------------------------------------------------------------------------
# MONAI transforms


class NSA(SourceSynthesis):
    """Array NSA: blends patches of a second image into the image (:func:`synthesize_nsa`), all ``(1, H, W)``.

    See :class:`~custom_transforms.synthesis.base.SourceSynthesis` for the arguments and the source image;
    :class:`NSAParams` fields given as keywords (``clone="normal"``) replace single parameters.
    """

    params_class = NSAParams

    def synthesize(self, image: np.ndarray, lung: np.ndarray, rng: np.random.Generator, source=None):
        return synthesize_nsa(image, lung, rng, params=self.params, source=source)


class NSAd(SourceSynthesisd):
    """Dictionary NSA: ``d["synthetic"]``, ``d["mask"]`` = NSA patches blended into ``d["image"]``.

    The mask is NSA's soft, intensity-based label in [0, 1] (0/1 with ``label="binary"``). Keys and the
    source image: :class:`~custom_transforms.synthesis.base.SourceSynthesisd`; parameters: :class:`NSA`.
    """

    synthesizer_class = NSA
