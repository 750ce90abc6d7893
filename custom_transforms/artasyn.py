"""ART-ASyn texture-brush anomaly synthesis (fast numpy/OpenCV implementation) and its MONAI wrapper.

``synthesize_artasyn`` paints a lung-opacity-like anomaly into a healthy chest X-ray and returns the
synthetic image with its binary anomaly mask, following the published method
(docs: ``shared/notes/reference-algorithms.md`` section 2; paper section 3.2.1 and supplementary
section 1):

1. **Strokes.** Per lung, the number of strokes is drawn from {0..4, 10..14} (p(0) = 0.2, the other
   nine values 0.8/9 each), redrawn while both lungs get 0; a lung side without pixels gets none.
   A stroke joins two random lung pixels of that side along a quadratic Bezier curve (control point =
   midpoint + U(-30, 30) px per axis, 100 samples). For each brush width (80 and 50 px) the stroke
   gets ``min(100, max(1, int(L / spacing)))`` stamps, ``spacing = max(1, int(0.05 * width))``,
   ``L`` = chord length + control offset length, at curve samples drawn without replacement. Each stamp
   is the brush tip resized to width ``U(0.3, 1) x width`` (aspect kept), rotated by U(0, 360) deg and
   with alpha scaled by ``U(0.07, 0.3) x U(0.67, 1)`` (opacity x flow). Stamps are alpha-composited
   ("over") into the stroke, the stroke alpha is scaled by 0.95, and strokes are composited into
   ``A_base``. The layer colour is the image's 85th intensity percentile.
2. **T_blur / T_cryst.** ``A_base`` blurred with Gaussian radius 8; Voronoi crystallisation of
   ``A_base`` with 500 uniformly random seeds (every pixel takes the mean colour and mean alpha of its
   cell); the crystallised layer blurred with radius 3. Alphas are scaled (base x0.4, cryst x0.5,
   cryst-blurred x0.5) and ``A_base`` is over-composited with blurred, cryst, cryst-blurred, cryst,
   blurred, in that order.
3. **T_rib.** Soft lung weight = lung mask (both lungs) dilated with a 7 x 7 square, then Gaussian
   blurred with a 31 x 31 kernel (OpenCV's default sigma for that size, 5 px). ``rib_contrast = 0.5 +
   0.5 x image``. ``alpha = min(1, alpha x rib_contrast x weight x 1.5)``.
4. The layer is composited over the image and the pixel-wise maximum with the original is taken
   (an anomaly only ever brightens). ``mask = alpha > 80/255``.

``steps`` selects the supplementary Table S1 ablation: ``"base"`` (``A_base`` composited as is: no
0.4 scaling, no lung weighting, no x1.5), ``"base+blur+cryst"`` (the six-layer composite, no T_rib)
and ``"full"``.

Conventions and implementation choices
--------------------------------------
* **"Gaussian blur radius r"** is Pillow's ``ImageFilter.GaussianBlur(radius=r)`` (what the authors
  call), whose ``radius`` is the *standard deviation* of the Gaussian. We therefore use
  ``cv2.GaussianBlur`` with ``sigma = r`` (kernel truncated at 4 sigma, replicated border). On a
  painted ``A_base`` layer, Pillow's three-pass box approximation of the same Gaussian differs from it
  by at most ~2/255 (mean < 0.1/255) for r = 8 and r = 3 (checked in the tests).
* **Colour.** As in an RGBA implementation, a layer's colour channel is blurred/crystallised
  independently of its alpha (no premultiplication) and the painted layer starts transparent black:
  the brush colour covers only the pixels any stamp touched (alpha >= 1/255), so the blurred and
  crystallised layers get darker towards their fringes where they mix with the unpainted black. We
  carry this as a coverage factor ``K`` in [0, 1] (colour = ``K x c``, c = 85th percentile).
* **Brush width = the brush's long side.** The reference brush image is 168 px wide and 106 px tall
  and is resized to width 80/50 px (stamps 80 x 50 before jitter). Our default procedural brush is
  stored upright (168 tall, 106 wide); since stamps are rotated uniformly over 360 deg only the size
  matters, so a brush "width" here sets the stamp's *long* side, which reproduces the reference stamp
  sizes whatever the brush orientation.
* **Percentile** is computed exactly as the reference does on the 8-bit image,
  ``int(np.percentile(round(255 x image), 85)) / 255``, but from an 8-bit histogram (faster).
* **Image size.** All lengths are stated for 256 px and multiplied by
  ``s = sqrt(H x W) / 256`` (odd kernel sizes rounded to the nearest odd integer). The crystallisation
  seed count is kept at 500: cells then cover the same fraction of the image at every size.
* Computation is in float32 with continuous values (the reference rounds to uint8 after every step).

Speed tricks (≈3 images/s for the reference code vs. the figures of ``scripts/benchmark_artasyn.py``)
----------------------------------------------------------------------------------------------------
* **Stamp bank.** Rotated/resized brush stamps are precomputed once per (brush, base width, image
  scale) -- about 0.1 s and 4 MB per base width at 256 px -- for ``n_angles`` = 72 angles (5 deg
  steps; a stamp's angle is rounded to the nearest) and ``n_widths`` = 16 widths per base width, spaced
  geometrically over [0.3, 1] x width (a stamp's width is rounded to the nearest level, <= 4% off).
  Each stamp is cropped to its non-zero box. Stamping is then one slice + one ``cv2.scaleAdd``.
* **Over-compositing as a sum.** Stamps in a stroke all have the same colour, so their "over"
  composite is ``1 - prod(1 - o_i b_i)`` (o = opacity x flow, b = brush alpha). We accumulate
  ``sum -log(1 - o_i b_i)`` with one in-place ``cv2.scaleAdd`` per stamp on a slice, using the
  separable approximation ``-log(1 - o b) ~= kappa(o) g(b)`` with ``g(b) = -log(1 - 0.2 b) / 0.2``
  stored in the bank and ``kappa(o) = -log(1 - o) / g(1)``. It is exact at b = 0, b = 1 and o = 0.2;
  over the stamp opacity range the error of one stamp's alpha is at most 1.2/255 (mean 0.2/255) --
  below the uint8 rounding of the reference implementation.
* Strokes are accumulated on their own bounding box in a padded frame (no per-stamp clipping).
* The blurs and the composition run on the bounding box of the painted region and of the painted
  Voronoi cells plus the blur reach (4 sigma), and for "full" only inside the soft lung weight's box;
  colour and alpha are blurred together as one 2-channel image (``cv2.GaussianBlur``), and
  the Voronoi cells come from ``cv2.distanceTransformWithLabels(DIST_LABEL_PIXEL)`` on a seed image
  (5 x 5 chamfer distance: vs. the exact nearest seed (the reference's cKDTree) ~0.6% of pixels, all
  on cell borders, go to a seed at most 0.5 px farther)
  with ``np.bincount`` for the cell means.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

import cv2
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform

from custom_transforms.brush import make_brush

__all__ = ["ARTASynParams", "STEPS", "synthesize_artasyn", "soft_lung_weight", "ARTASynd"]

STEPS = ("base", "base+blur+cryst", "full")

_G_REF_OPACITY = 0.2  # o0 of the separable -log(1 - o b) approximation (see module docstring)
_EMPTY_ALPHA = 1.0 / 255.0  # a stamp alpha below one 8-bit level leaves no colour (reference: uint8)


@dataclass(frozen=True)
class ARTASynParams:
    """ART-ASyn synthesis parameters; defaults are the published values, lengths for 256 px images."""

    stroke_counts: tuple = (0, 1, 2, 3, 4, 10, 11, 12, 13, 14)  # strokes per lung
    p_zero: float = 0.2  # probability of 0 strokes (the other counts share 1 - p_zero equally)
    control_offset: float = 30.0  # Bezier control point offset, U(-v, v) px per axis
    curve_samples: int = 100
    brush_widths: tuple = (80.0, 50.0)  # px
    stamp_spacing: float = 0.05  # fraction of the brush width between stamps
    width_jitter: tuple = (0.3, 1.0)  # x base width
    angle_range: tuple = (0.0, 360.0)  # deg
    opacity_range: tuple = (0.07, 0.3)
    flow_range: tuple = (0.67, 1.0)
    stroke_opacity: float = 0.95
    colour_percentile: float = 85.0
    blur_radius: float = 8.0  # Pillow radius = Gaussian sigma, px
    cryst_seeds: int = 500
    cryst_blur_radius: float = 3.0
    base_alpha: float = 0.4
    cryst_alpha: float = 0.5
    cryst_blur_alpha: float = 0.5
    lung_dilation: int = 7  # square kernel, px
    lung_blur: int = 31  # Gaussian kernel size, px (sigma = OpenCV default for that size)
    rib_offset: float = 0.5  # rib_contrast = rib_offset + (1 - rib_offset) * image
    brightness: float = 1.5
    mask_threshold: float = 80.0 / 255.0
    reference_size: int = 256
    n_angles: int = 72  # stamp bank resolution (implementation, not a paper parameter)
    n_widths: int = 16

    def __post_init__(self):
        def check(cond, msg):
            if not cond:
                raise ValueError(f"ARTASynParams: {msg}")

        check(len(self.stroke_counts) >= 2 and 0 in self.stroke_counts and min(self.stroke_counts) >= 0,
              "stroke_counts must contain 0 and at least one positive count")
        check(0.0 <= self.p_zero < 1.0, "p_zero must be in [0, 1)")
        check(len(self.brush_widths) >= 1 and all(w > 0 for w in self.brush_widths),
              "brush_widths must be > 0")
        check(0 < self.width_jitter[0] <= self.width_jitter[1], "width_jitter must be 0 < low <= high")
        check(0 <= self.opacity_range[0] <= self.opacity_range[1] < 1, "opacity_range must lie in [0, 1)")
        check(0 <= self.flow_range[0] <= self.flow_range[1] <= 1, "flow_range must lie in [0, 1]")
        check(self.curve_samples >= 2 and self.cryst_seeds >= 1, "curve_samples >= 2 and cryst_seeds >= 1")
        check(self.n_angles >= 1 and self.n_widths >= 1, "n_angles and n_widths must be >= 1")
        check(self.stamp_spacing > 0 and self.blur_radius >= 0 and self.cryst_blur_radius >= 0,
              "stamp_spacing > 0 and blur radii >= 0")


# ----------------------------------------------------------------------------------------------------
# helpers


def _odd(v: float) -> int:
    return max(1, 2 * int(round((v - 1) / 2.0)) + 1)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return img.copy()
    return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)


def _percentile_u8(image: np.ndarray, q: float) -> float:
    """``int(np.percentile(round(255 * image), q)) / 255`` via an 8-bit histogram (fast and exact)."""
    u8 = cv2.convertScaleAbs(image, alpha=255.0)  # round + saturate to uint8
    hist = cv2.calcHist([u8], [0], None, [256], [0, 256]).ravel()
    pos = q / 100.0 * (u8.size - 1)  # numpy's default "linear" percentile: interpolate order statistics
    k = int(math.floor(pos))
    cum = np.cumsum(hist)
    lo, hi = np.searchsorted(cum, [k + 1, min(k + 2, u8.size)])
    return float(math.floor(lo + (pos - k) * (hi - lo))) / 255.0


def soft_lung_weight(lung: np.ndarray, params: ARTASynParams | None = None) -> np.ndarray:
    """T_rib's soft lung weight: ``(lung > 0)`` dilated with a square then Gaussian blurred, in [0, 1]."""
    p = params or ARTASynParams()
    H, W = lung.shape
    s = math.sqrt(H * W) / p.reference_size
    k, g = _odd(p.lung_dilation * s), _odd(p.lung_blur * s)
    out = np.zeros((H, W), np.float32)
    rows, cols = np.nonzero((lung > 0).any(axis=1))[0], np.nonzero((lung > 0).any(axis=0))[0]
    if rows.size == 0:
        return out
    # only the lung box plus the reach of the dilation and the blur can be non-zero
    r = k // 2 + g // 2 + 1
    y0, y1 = max(int(rows[0]) - 2 * r, 0), min(int(rows[-1]) + 1 + 2 * r, H)
    x0, x1 = max(int(cols[0]) - 2 * r, 0), min(int(cols[-1]) + 1 + 2 * r, W)
    m = cv2.dilate((lung[y0:y1, x0:x1] > 0).astype(np.float32), np.ones((k, k), np.uint8))
    out[y0:y1, x0:x1] = cv2.GaussianBlur(m, (g, g), 0)  # default border: the box is 0 beyond r px
    return out


class _StampBank:
    """Brush stamps for one brush, one base width and one image scale, all angles and width levels.

    ``stamps[w * n_angles + a]`` is ``g(b)`` (float32, C-contiguous) of the brush resized to width level
    ``w`` and rotated by angle ``a``, cropped to its non-zero box; ``oy/ox`` are the offsets of the
    stamp centre inside that crop and ``hh/ww`` its size.
    """

    def __init__(self, brush: np.ndarray, base_width: float, jitter: tuple, n_widths: int, n_angles: int):
        self.n_widths, self.n_angles = n_widths, n_angles
        self.log_lo, self.log_hi = math.log(jitter[0]), math.log(jitter[1])
        bh, bw = brush.shape
        if n_widths > 1:
            rel = np.exp(np.linspace(self.log_lo, self.log_hi, n_widths))
        else:
            rel = np.array([jitter[1]])
        o0 = _G_REF_OPACITY
        self.stamps, oy, ox, hh, ww = [], [], [], [], []
        for r in rel:
            long_side = max(1, int(round(base_width * r)))  # the "width" is the brush's long side
            if bw >= bh:
                w, h = long_side, max(1, int(round(long_side * bh / bw)))
            else:
                h, w = long_side, max(1, int(round(long_side * bw / bh)))
            interp = cv2.INTER_AREA if w < bw else cv2.INTER_LINEAR
            small = cv2.resize(np.asarray(brush, np.float32), (w, h), interpolation=interp)
            for a in range(n_angles):
                ang = 360.0 * a / n_angles
                c, s_ = abs(math.cos(math.radians(ang))), abs(math.sin(math.radians(ang)))
                W2, H2 = int(math.ceil(w * c + h * s_)) + 2, int(math.ceil(w * s_ + h * c)) + 2
                M = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), ang, 1.0)
                M[0, 2] += (W2 - w) / 2.0
                M[1, 2] += (H2 - h) / 2.0
                rot = cv2.warpAffine(small, M, (W2, H2), flags=cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)
                rot = np.clip(rot, 0.0, 1.0)
                nz_r, nz_c = np.nonzero(rot > 1e-4)
                if nz_r.size == 0:
                    y0, y1, x0, x1 = H2 // 2, H2 // 2 + 1, W2 // 2, W2 // 2 + 1
                else:
                    y0, y1, x0, x1 = nz_r.min(), nz_r.max() + 1, nz_c.min(), nz_c.max() + 1
                g = (-np.log1p(-o0 * rot[y0:y1, x0:x1]) / o0).astype(np.float32)
                self.stamps.append(np.ascontiguousarray(g))
                oy.append(H2 // 2 - y0)
                ox.append(W2 // 2 - x0)
                hh.append(y1 - y0)
                ww.append(x1 - x0)
        self.oy, self.ox = np.array(oy, np.int64), np.array(ox, np.int64)
        self.hh, self.ww = np.array(hh, np.int64), np.array(ww, np.int64)
        self.pad = 1 + int(max(self.oy.max(), self.ox.max(),
                               (self.hh - self.oy).max(), (self.ww - self.ox).max()))
        self.g1 = -math.log1p(-o0) / o0  # g(1)

    def codes(self, rel_width: np.ndarray, angle_deg: np.ndarray) -> np.ndarray:
        if self.n_widths > 1:
            t = (np.log(rel_width) - self.log_lo) / (self.log_hi - self.log_lo) * (self.n_widths - 1)
            wi = np.clip(np.rint(t), 0, self.n_widths - 1).astype(np.int64)
        else:
            wi = np.zeros(rel_width.shape, np.int64)
        ai = np.rint(np.mod(angle_deg, 360.0) / 360.0 * self.n_angles).astype(np.int64) % self.n_angles
        return wi * self.n_angles + ai


_BANK_CACHE: "OrderedDict[tuple, _StampBank]" = OrderedDict()
_BANK_CACHE_SIZE = 6


def _get_bank(brush: np.ndarray, brush_key, base_width: float, p: ARTASynParams) -> _StampBank:
    key = (brush_key, round(base_width, 3), tuple(p.width_jitter), p.n_widths, p.n_angles)
    bank = _BANK_CACHE.get(key)
    if bank is None:
        bank = _StampBank(brush, base_width, tuple(p.width_jitter), p.n_widths, p.n_angles)
        _BANK_CACHE[key] = bank
        while len(_BANK_CACHE) > _BANK_CACHE_SIZE:
            _BANK_CACHE.popitem(last=False)
    else:
        _BANK_CACHE.move_to_end(key)
    return bank


def _brush_key(brush: np.ndarray):
    data = np.ascontiguousarray(brush, np.float32).tobytes()
    return (brush.shape, hashlib.blake2b(data, digest_size=16).hexdigest())


# ----------------------------------------------------------------------------------------------------
# the pieces of the pipeline


def _draw_stroke_counts(rng: np.random.Generator, has_side: Sequence[bool], p: ARTASynParams) -> list[int]:
    counts = np.asarray(p.stroke_counts)
    n_other = int(np.count_nonzero(counts != 0))
    probs = np.where(counts == 0, p.p_zero / max(1, int(np.count_nonzero(counts == 0))),
                     (1.0 - p.p_zero) / max(1, n_other))
    probs = probs / probs.sum()
    while True:
        ns = [int(rng.choice(counts, p=probs)) if ok else 0 for ok in has_side]
        if sum(ns) > 0:
            return ns


def _paint_base(shape, side_points: Sequence[np.ndarray], counts: Sequence[int], brush: np.ndarray, brush_key,
                rng: np.random.Generator, p: ARTASynParams, s: float) -> np.ndarray:
    """A_base alpha: all strokes of all lungs, each stroke = "over" of its stamps, x stroke_opacity."""
    H, W = shape
    banks = [_get_bank(brush, brush_key, bw * s, p) for bw in p.brush_widths]
    P = max(b.pad for b in banks)
    trans = np.ones((H, W), np.float32)  # transparency of A_base = prod over strokes (1 - alpha_stroke)
    t = np.linspace(0.0, 1.0, p.curve_samples)[:, None]
    n_samp = p.curve_samples
    for pts, n_strokes in zip(side_points, counts):
        if n_strokes == 0:
            continue
        ends = pts[rng.integers(0, len(pts), size=2 * n_strokes)].astype(np.float64).reshape(n_strokes, 2, 2)
        for p0, p1 in ends:  # (x, y) each
            offset = rng.uniform(-p.control_offset, p.control_offset, size=2) * s
            mid = (p0 + p1) / 2.0 + offset
            curve = np.rint((1 - t) ** 2 * p0 + 2 * (1 - t) * t * mid + t ** 2 * p1).astype(np.int64)
            approx_len = float(np.hypot(*(p1 - p0)) + np.hypot(*offset))
            ys_l, xs_l, codes_l, kap_l, bank_l = [], [], [], [], []
            for bank, bw in zip(banks, p.brush_widths):
                spacing = max(1, int(bw * s * p.stamp_spacing))
                n = min(n_samp, max(1, int(approx_len / spacing)))
                idx = rng.choice(n_samp, size=n, replace=False)
                rel = rng.uniform(p.width_jitter[0], p.width_jitter[1], size=n)
                ang = rng.uniform(p.angle_range[0], p.angle_range[1], size=n)
                op = rng.uniform(*p.opacity_range, size=n) * rng.uniform(*p.flow_range, size=n)
                codes = bank.codes(rel, ang)
                kap = -np.log1p(-op) / bank.g1
                ys_l.append(curve[idx, 1] + P - bank.oy[codes])  # top-left corners in the padded frame
                xs_l.append(curve[idx, 0] + P - bank.ox[codes])
                codes_l.append(codes)
                kap_l.append(kap)
                bank_l.append(bank)
            # stroke bounding box (padded frame)
            y0 = min(int(y.min()) for y in ys_l)
            x0 = min(int(x.min()) for x in xs_l)
            y1 = max(int((y + b.hh[c]).max()) for y, b, c in zip(ys_l, bank_l, codes_l))
            x1 = max(int((x + b.ww[c]).max()) for x, b, c in zip(xs_l, bank_l, codes_l))
            acc = np.zeros((y1 - y0, x1 - x0), np.float32)  # sum of -log(1 - o b)
            for ys, xs, codes, kap, bank in zip(ys_l, xs_l, codes_l, kap_l, bank_l):
                ys, xs, stamps = ys - y0, xs - x0, bank.stamps
                ye, xe = (ys + bank.hh[codes]).tolist(), (xs + bank.ww[codes]).tolist()
                for y, ya, x, xa, c, k in zip(ys.tolist(), ye, xs.tolist(), xe, codes.tolist(), kap.tolist()):
                    v = acc[y:ya, x:xa]
                    cv2.scaleAdd(stamps[c], k, v, dst=v)
            # crop the stroke to the image and composite it ("over", same colour: transparencies multiply)
            iy0, ix0 = max(y0 - P, 0), max(x0 - P, 0)
            iy1, ix1 = min(y1 - P, H), min(x1 - P, W)
            if iy1 <= iy0 or ix1 <= ix0:
                continue
            a = acc[iy0 + P - y0:iy1 + P - y0, ix0 + P - x0:ix1 + P - x0]
            # 1 - stroke_opacity * (1 - exp(-a))
            np.exp(-a, out=a)
            a *= p.stroke_opacity
            a += 1.0 - p.stroke_opacity
            trans[iy0:iy1, ix0:ix1] *= a
    return 1.0 - trans


def _voronoi_labels(shape, rng: np.random.Generator, n_seeds: int) -> tuple[np.ndarray, int]:
    """Voronoi cells of ``n_seeds`` uniformly random seed pixels: int32 label map (labels 1..n) and n+1."""
    H, W = shape
    src = np.ones((H, W), np.uint8)
    src[rng.integers(0, H, size=n_seeds), rng.integers(0, W, size=n_seeds)] = 0
    _, labels = cv2.distanceTransformWithLabels(src, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    return labels, n_seeds + 1


def _over(dst_pa, dst_a, src_pa, src_a):
    """In-place "over": premultiplied colour ``pa`` and alpha ``a`` of ``src`` over ``dst``."""
    inv = 1.0 - src_a
    dst_pa *= inv
    dst_pa += src_pa
    dst_a *= inv
    dst_a += src_a


def _validate(image: np.ndarray, lung: np.ndarray, steps: str):
    if steps not in STEPS:
        raise ValueError(f"steps must be one of {STEPS}, got {steps!r}")
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D (H, W), got shape {image.shape}")
    if lung.shape != image.shape:
        raise ValueError(f"lung label map shape {lung.shape} does not match image shape {image.shape}")
    if image.shape[0] < 8 or image.shape[1] < 8:
        raise ValueError(f"image too small for synthesis: {image.shape}")


def synthesize_artasyn(
    image: np.ndarray,
    lung: np.ndarray,
    rng: np.random.Generator,
    *,
    steps: str = "full",
    brush: np.ndarray | None = None,
    params: ARTASynParams | None = None,
    return_alpha: bool = False,
    **overrides,
):
    """Paint one ART-ASyn anomaly into ``image`` (see the module docstring for the method).

    Args:
        image: 2-D float array in [0, 1] (values outside are clipped), shape ``(H, W)``.
        lung: ``uint8 (H, W)`` labels: 0 background, 1 right lung (image left), 2 left lung.
        rng: ``numpy.random.Generator``; the only source of randomness.
        steps: ``"base"``, ``"base+blur+cryst"`` or ``"full"`` (supplementary Table S1).
        brush: brush tip alpha ``(h, w)`` in [0, 1]; default :func:`make_brush` ``()``.
        params: an :class:`ARTASynParams`; ``overrides`` (its field names as keywords, e.g.
            ``blur_radius=6``) replace single fields.
        return_alpha: also return the final layer alpha (float32 (H, W) in [0, 1]); the synthetic image
            equals ``image`` wherever it is 0.

    Returns:
        ``(synthetic, mask)`` or ``(synthetic, mask, alpha)``: ``synthetic`` float32 (H, W) in [0, 1]
        and ``>= image``; ``mask`` float32 of 0/1, ``alpha > mask_threshold``.

    Raises:
        ValueError: bad ``steps``, shapes, label values, or a lung map with no lung pixel.
        TypeError: an unknown parameter name.
    """
    p = params or ARTASynParams()
    if overrides:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ARTASynParams)})
        if unknown:
            raise TypeError(f"synthesize_artasyn got unknown parameter(s) {unknown}; "
                            f"valid names are the fields of ARTASynParams")
        p = dataclasses.replace(p, **overrides)
    image = np.asarray(image)
    lung = np.asarray(lung)
    _validate(image, lung, steps)
    img = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
    if lung.dtype == bool:
        lung = lung.astype(np.uint8)
    if lung.size and (lung.min() < 0 or lung.max() > 2):
        raise ValueError(f"lung labels must be 0 (background), 1 (right lung) or 2 (left lung); "
                         f"got values in [{lung.min()}, {lung.max()}]")
    sides = [np.argwhere(lung == lab)[:, ::-1] for lab in (1, 2)]  # (x, y) per lung side
    if all(len(sp) == 0 for sp in sides):
        raise ValueError("lung label map has no lung pixel: cannot place an ART-ASyn anomaly "
                         "(segment the lungs first, or treat the sample as clean)")
    if brush is None:
        brush, brush_key = make_brush(), ("default",)
    else:
        brush = np.asarray(brush, np.float32)
        if brush.ndim != 2 or brush.shape[0] < 2 or brush.shape[1] < 2:
            raise ValueError(f"brush must be a 2-D alpha array, got shape {brush.shape}")
        brush = np.clip(brush, 0.0, 1.0)
        brush_key = _brush_key(brush)

    H, W = img.shape
    s = math.sqrt(H * W) / p.reference_size
    colour = _percentile_u8(img, p.colour_percentile)

    # 1. A_base
    counts = _draw_stroke_counts(rng, [len(sp) > 0 for sp in sides], p)
    a0_full = _paint_base((H, W), sides, counts, brush, brush_key, rng, p, s)

    alpha = np.zeros((H, W), np.float32)  # final layer alpha
    rows, cols = np.nonzero(a0_full.any(axis=1))[0], np.nonzero(a0_full.any(axis=0))[0]
    if rows.size == 0:  # nothing painted (e.g. an all-zero custom brush)
        y0 = y1 = x0 = x1 = 0
    elif steps == "base":  # A_base composited as painted
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        a_acc = a0_full[y0:y1, x0:x1]
        pa_acc = (a_acc >= _EMPTY_ALPHA) * a_acc
    else:
        # T_cryst on the whole image (cells are global), statistics from the painted box only
        py0, py1, px0, px1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        labels, n_lab = _voronoi_labels((H, W), rng, p.cryst_seeds)
        counts = np.bincount(labels.ravel(), minlength=n_lab).astype(np.float64)
        counts[counts == 0] = 1.0
        lab_p = labels[py0:py1, px0:px1].ravel()
        a0_p = a0_full[py0:py1, px0:px1]
        mean_a = np.bincount(lab_p, weights=a0_p.ravel(), minlength=n_lab) / counts
        mean_k = np.bincount(lab_p, weights=(a0_p >= _EMPTY_ALPHA).ravel(), minlength=n_lab) / counts
        # work region: painted box and every painted cell, plus the reach of the blurs (4 sigma)
        on = (mean_a > 0)[labels]
        r2, c2 = np.nonzero(on.any(axis=1))[0], np.nonzero(on.any(axis=0))[0]
        m = int(math.ceil(4 * max(p.blur_radius, p.cryst_blur_radius) * s)) + 1
        y0, y1 = max(min(py0, int(r2[0])) - m, 0), min(max(py1, int(r2[-1]) + 1) + m, H)
        x0, x1 = max(min(px0, int(c2[0])) - m, 0), min(max(px1, int(c2[-1]) + 1) + m, W)
        if steps == "full":  # nothing survives outside the soft lung weight
            wgt = soft_lung_weight(lung, p)
            wr, wc = np.nonzero(wgt.any(axis=1))[0], np.nonzero(wgt.any(axis=0))[0]
            oy0, oy1 = max(y0, int(wr[0])), min(y1, int(wr[-1]) + 1)
            ox0, ox1 = max(x0, int(wc[0])), min(x1, int(wc[-1]) + 1)
        else:
            oy0, oy1, ox0, ox1 = y0, y1, x0, x1
        a0 = a0_full[y0:y1, x0:x1]
        k0 = (a0 >= _EMPTY_ALPHA).astype(np.float32)
        lab = labels[y0:y1, x0:x1]
        ac = mean_a.astype(np.float32)[lab]
        kc = mean_k.astype(np.float32)[lab]
        # T_blur and the blurred crystals (colour coverage and alpha blurred independently, like Pillow
        # does on an RGBA image); cv2 blurs both channels in one call
        blurred = _blur(np.dstack([k0, a0]), p.blur_radius * s)
        cb = _blur(np.dstack([kc, ac]), p.cryst_blur_radius * s)
        sl = (slice(oy0 - y0, oy1 - y0), slice(ox0 - x0, ox1 - x0))
        kb, ab = blurred[..., 0][sl], blurred[..., 1][sl]
        kcb, acb = cb[..., 0][sl], cb[..., 1][sl] * p.cryst_blur_alpha
        a0, k0, kc = a0[sl], k0[sl], kc[sl]
        ac = ac[sl] * p.cryst_alpha
        y0, y1, x0, x1 = oy0, oy1, ox0, ox1
        # composition: base (x0.4) <- blurred <- cryst (x0.5) <- cryst_blurred (x0.5) <- cryst <- blurred
        lay_b, lay_c, lay_cb = (kb * ab, ab), (kc * ac, ac), (kcb * acb, acb)
        a_acc = a0 * p.base_alpha
        pa_acc = k0 * a_acc
        for lp, la in (lay_b, lay_c, lay_cb, lay_c, lay_b):
            _over(pa_acc, a_acc, lp, la)
        if steps == "full":  # T_rib: alpha x rib contrast x soft lung weight x brightness, clipped
            rib = p.rib_offset + (1.0 - p.rib_offset) * img[y0:y1, x0:x1]
            new_a = np.minimum(a_acc * rib * wgt[y0:y1, x0:x1] * p.brightness, 1.0)
            # the colour is unchanged: the premultiplied colour scales with the alpha
            scale = np.divide(new_a, a_acc, out=np.zeros_like(new_a), where=a_acc > 0)
            pa_acc = pa_acc * scale
            a_acc = new_a

    # 4. composite over the image (colour = c * pa / alpha), then lighten-only
    synthetic = img.copy()
    if y1 > y0 and x1 > x0:
        alpha[y0:y1, x0:x1] = a_acc
        i_r = img[y0:y1, x0:x1]
        comp = i_r * (1.0 - a_acc) + colour * pa_acc
        synthetic[y0:y1, x0:x1] = np.where(a_acc > 0, np.clip(np.maximum(comp, i_r), 0.0, 1.0), i_r)
    mask = (alpha > p.mask_threshold).astype(np.float32)
    if return_alpha:
        return synthetic, mask, alpha
    return synthetic, mask


# ----------------------------------------------------------------------------------------------------
# MONAI wrapper


class ARTASynd(MapTransform, RandomizableTransform):
    """Dictionary transform: ``d["synthetic"]``, ``d["mask"]`` = ART-ASyn anomaly of ``d["image"]``.

    Reads ``d[key]`` (``(1, H, W)`` image in [0, 1]) and ``d[lung_key]`` (``(1, H, W)`` PBTSeg labels)
    and writes ``d[synthetic_key]`` (``(1, H, W)`` float32) and ``d[mask_key]`` (``(1, H, W)`` float32
    0/1), keeping the container type: a ``MetaTensor`` image gives ``MetaTensor`` outputs carrying a copy
    of the image's metadata, numpy gives numpy (a plain tensor gives tensors).

    With probability ``1 - prob`` -- or when the lung map is empty and ``on_empty_lung="clean"`` -- the
    sample is clean: ``synthetic`` is a copy of the image and ``mask`` is all zeros. With
    ``on_empty_lung="raise"`` an empty lung map raises ``ValueError``.

    Randomness: every call draws one integer from ``self.R`` and seeds a ``numpy.random.Generator``
    with it, so ``set_random_state(seed)`` reproduces results exactly. ``params`` (an
    :class:`ARTASynParams`) and keyword ``**params`` set the synthesis parameters; ``brush`` an
    optional custom brush tip.
    """

    backend = [MetaTensor.__name__]

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        lung_key: str = "lung",
        synthetic_key: str = "synthetic",
        mask_key: str = "mask",
        prob: float = 1.0,
        steps: str = "full",
        on_empty_lung: str = "clean",
        brush: np.ndarray | None = None,
        allow_missing_keys: bool = False,
        params: ARTASynParams | None = None,
        **kwargs,
    ):
        if not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"ARTASynd prob (synthesis_prob) must be in [0, 1], got {prob!r}")
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if len(self.keys) != 1:
            raise ValueError(f"ARTASynd takes exactly one image key, got {self.keys}")
        if steps not in STEPS:
            raise ValueError(f"steps must be one of {STEPS}, got {steps!r}")
        if on_empty_lung not in ("clean", "raise"):
            raise ValueError(f"on_empty_lung must be 'clean' or 'raise', got {on_empty_lung!r}")
        unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(ARTASynParams)})
        if unknown:
            raise TypeError(f"ARTASynd got unknown parameter(s) {unknown}; valid names are the fields of "
                            f"ARTASynParams")
        self.params = dataclasses.replace(params or ARTASynParams(), **kwargs)
        self.lung_key, self.synthetic_key, self.mask_key = lung_key, synthetic_key, mask_key
        self.steps, self.on_empty_lung = steps, on_empty_lung
        self.brush = None if brush is None else np.asarray(brush, np.float32)

    @staticmethod
    def _to_2d(x, name: str) -> np.ndarray:
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 2:
            raise ValueError(f"ARTASynd expects '{name}' of shape (1, H, W) or (H, W), "
                             f"got {tuple(arr.shape)}")
        return arr

    @staticmethod
    def _like(arr: np.ndarray, ref):
        arr = np.ascontiguousarray(arr[None], dtype=np.float32)
        if isinstance(ref, MetaTensor):
            out = MetaTensor(torch.from_numpy(arr), meta=dict(ref.meta))
            return out.to(ref.device)
        if isinstance(ref, torch.Tensor):
            return torch.from_numpy(arr).to(ref.device)
        return arr

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.lung_key not in d:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"ARTASynd: key '{self.lung_key}' (lung labels) is missing from the data "
                               f"dictionary (keys: {list(d)})")
            ref = d[key]
            img = self._to_2d(ref, key)
            lung = self._to_2d(d[self.lung_key], self.lung_key)
            if lung.shape != img.shape:
                raise ValueError(f"ARTASynd: '{self.lung_key}' shape {lung.shape} does not match "
                                 f"'{key}' shape {img.shape}")
            self.randomize(None)
            seed = int(self.R.randint(2**31))  # always drawn: the random stream does not depend on data
            synthetic, mask = None, None
            if self._do_transform:
                lung_u8 = np.rint(lung).astype(np.uint8) if lung.dtype.kind == "f" else lung.astype(np.uint8)
                if (lung_u8 > 0).any() or self.on_empty_lung == "raise":
                    synthetic, mask = synthesize_artasyn(
                        img.astype(np.float32), lung_u8, np.random.default_rng(seed),
                        steps=self.steps, brush=self.brush, params=self.params)
            if synthetic is None:
                synthetic = np.asarray(img, np.float32).copy()
                mask = np.zeros(img.shape, np.float32)
            d[self.synthetic_key] = self._like(synthetic, ref)
            d[self.mask_key] = self._like(mask, ref)
        return d
