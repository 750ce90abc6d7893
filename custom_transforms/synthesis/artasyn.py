"""ART-ASyn texture-brush anomaly synthesis (fast numpy/OpenCV implementation) and its MONAI transforms.

``synthesize_artasyn`` paints a lung-opacity-like anomaly into a healthy chest X-ray and returns the
synthetic image with its binary anomaly mask, following the published method (paper Sec. 3.2.1 and
supplementary Sec. 1; full reference in ``docs/README.md``):

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
2. **T_blur.** ``A_base`` blurred with Gaussian radius 8.
3. **T_cryst.** Voronoi crystallisation of ``A_base`` with 500 uniformly random seeds (every pixel takes
   the mean colour and mean alpha of its cell); the crystallised layer blurred with radius 3.
   **Composition:** alphas are scaled (base x0.4, cryst x0.5, cryst-blurred x0.5) and ``A_base`` is
   over-composited with blurred, cryst, cryst-blurred, cryst, blurred, in that order.
4. **T_rib.** Soft lung weight = lung mask (both lungs) dilated with a 7 x 7 square, then Gaussian
   blurred with a 31 x 31 kernel (OpenCV's default sigma for that size, 5 px). ``rib_contrast = 0.5 +
   0.5 x image``. ``alpha = min(1, alpha x rib_contrast x weight x 1.5)``.
5. **Composite.** The layer is composited over the image and the pixel-wise maximum with the original
   is taken (an anomaly only ever brightens). ``mask = alpha > 80/255``.

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

Speed tricks (≈3 images/s for the reference code vs. ``python -m scripts.benchmarks.synthesis``)
------------------------------------------------------------------------------------------------
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

import hashlib
import math
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np
from monai.config import KeysCollection

from custom_transforms.synthesis.base import AnomalySynthesis, AnomalySynthesisd, check_lung_values, resolve_params
from custom_transforms.synthesis.brush import make_brush
from custom_transforms.utils import Choice

__all__ = ["ARTASynParams", "STEPS", "synthesize_artasyn", "soft_lung_weight", "ARTASyn", "ARTASynd"]

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


_BANK_CACHE: OrderedDict[tuple, _StampBank] = OrderedDict()
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
    """Step 1 (supp. Sec. 1): strokes per lung side, redrawn while every side gets 0."""
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
    """Step 1 (supp. Sec. 1), A_base alpha: every stroke = "over" of its stamps, x stroke_opacity."""
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
    """Step 3 (T_cryst): Voronoi cells of ``n_seeds`` random seed pixels; int32 labels 1..n and n+1."""
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


class _Box(NamedTuple):
    """Half-open pixel box ``[y0, y1) x [x0, x1)``: the working region handed from step to step."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def sl(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    def within(self, outer: _Box) -> tuple[slice, slice]:
        """This box's slices in the frame of ``outer`` (whose origin is ``(outer.y0, outer.x0)``)."""
        return slice(self.y0 - outer.y0, self.y1 - outer.y0), slice(self.x0 - outer.x0, self.x1 - outer.x0)


def _nonzero_box(a: np.ndarray) -> _Box | None:
    """Bounding box of the non-zero pixels of ``a``, or None if there is none."""
    rows, cols = np.nonzero(a.any(axis=1))[0], np.nonzero(a.any(axis=0))[0]
    if rows.size == 0:
        return None
    return _Box(int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)


_check_steps = Choice("synthesis_steps", STEPS, "steps")  # supplementary Table S1 ablation


def _validate(image: np.ndarray, lung: np.ndarray, steps: str):
    _check_steps(steps)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D (H, W), got shape {image.shape}")
    if lung.shape != image.shape:
        raise ValueError(f"lung label map shape {lung.shape} does not match image shape {image.shape}")
    if image.shape[0] < 8 or image.shape[1] < 8:
        raise ValueError(f"image too small for synthesis: {image.shape}")


def _prepare_inputs(image, lung, steps: str) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Checked inputs: float32 image clipped to [0, 1], lung labels and each lung's pixels ``(x, y)``."""
    image, lung = np.asarray(image), np.asarray(lung)
    _validate(image, lung, steps)
    img = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
    if lung.dtype == bool:
        lung = lung.astype(np.uint8)
    check_lung_values(lung)
    sides = [np.argwhere(lung == lab)[:, ::-1] for lab in (1, 2)]  # (x, y) per lung side
    if all(len(sp) == 0 for sp in sides):
        raise ValueError("lung label map has no lung pixel: cannot place an ART-ASyn anomaly "
                         "(segment the lungs first, or treat the sample as clean)")
    return img, lung, sides


def _resolve_brush(brush: np.ndarray | None) -> tuple[np.ndarray, Hashable]:
    """Brush tip alpha in [0, 1] for step 1 (default :func:`make_brush`) and its stamp-bank cache key."""
    if brush is None:
        return make_brush(), ("default",)
    brush = np.asarray(brush, np.float32)
    if brush.ndim != 2 or brush.shape[0] < 2 or brush.shape[1] < 2:
        raise ValueError(f"brush must be a 2-D alpha array, got shape {brush.shape}")
    brush = np.clip(brush, 0.0, 1.0)
    return brush, _brush_key(brush)


def _cryst_cells(a0_full: np.ndarray, painted: _Box, rng: np.random.Generator, p: ARTASynParams):
    """Step 3, T_cryst (supp. Sec. 1): Voronoi cells of random seeds, mean alpha and coverage per cell."""
    labels, n_lab = _voronoi_labels(a0_full.shape, rng, p.cryst_seeds)  # cells are global
    counts = np.bincount(labels.ravel(), minlength=n_lab).astype(np.float64)
    counts[counts == 0] = 1.0
    lab_p = labels[painted.sl].ravel()  # A_base is 0 outside the painted box
    a0_p = a0_full[painted.sl]
    mean_a = np.bincount(lab_p, weights=a0_p.ravel(), minlength=n_lab) / counts
    mean_k = np.bincount(lab_p, weights=(a0_p >= _EMPTY_ALPHA).ravel(), minlength=n_lab) / counts
    return labels, mean_a, mean_k


def _work_box(painted: _Box, labels: np.ndarray, mean_a: np.ndarray, margin: int) -> _Box:
    """Steps 2-3 region: the painted box and every painted Voronoi cell, plus ``margin`` (blur reach)."""
    H, W = labels.shape
    cells = _nonzero_box((mean_a > 0)[labels])
    return _Box(max(min(painted.y0, cells.y0) - margin, 0), min(max(painted.y1, cells.y1) + margin, H),
                max(min(painted.x0, cells.x0) - margin, 0), min(max(painted.x1, cells.x1) + margin, W))


def _clip_box(box: _Box, weight: np.ndarray) -> _Box:
    """Step 4 region: ``box`` within the soft lung weight's box (T_rib zeroes everything outside)."""
    w = _nonzero_box(weight)
    return _Box(max(box.y0, w.y0), min(box.y1, w.y1), max(box.x0, w.x0), min(box.x1, w.x1))


def _t_blur(k0: np.ndarray, a0: np.ndarray, sigma: float, sl) -> tuple[np.ndarray, np.ndarray]:
    """Step 2, T_blur (Sec. 3.2.1): A_base's coverage and alpha Gaussian-blurred (one 2-channel call)."""
    blurred = _blur(np.dstack([k0, a0]), sigma)
    return blurred[..., 0][sl], blurred[..., 1][sl]


def _t_cryst(lab: np.ndarray, mean_a: np.ndarray, mean_k: np.ndarray, sl, p: ARTASynParams, s: float):
    """Step 3, T_cryst (supp. Sec. 1): crystal layer (cell means) and its blur, alphas x0.5 each."""
    ac = mean_a.astype(np.float32)[lab]
    kc = mean_k.astype(np.float32)[lab]
    # coverage and alpha blurred independently, as Pillow does on an RGBA image
    cb = _blur(np.dstack([kc, ac]), p.cryst_blur_radius * s)
    return (kc[sl], ac[sl] * p.cryst_alpha), (cb[..., 0][sl], cb[..., 1][sl] * p.cryst_blur_alpha)


def _compose_six(base, blurred, cryst, cryst_blurred, p: ARTASynParams) -> tuple[np.ndarray, np.ndarray]:
    """Six-layer composition (supp. Sec. 1): A_base x0.4 <- blur <- cryst <- cryst-blur <- cryst <- blur."""
    k0, a0 = base
    (kb, ab), (kc, ac), (kcb, acb) = blurred, cryst, cryst_blurred
    lay_b, lay_c, lay_cb = (kb * ab, ab), (kc * ac, ac), (kcb * acb, acb)  # (premultiplied K, alpha)
    a_acc = a0 * p.base_alpha
    pa_acc = k0 * a_acc
    for lp, la in (lay_b, lay_c, lay_cb, lay_c, lay_b):
        _over(pa_acc, a_acc, lp, la)
    return pa_acc, a_acc


def _t_rib(pa: np.ndarray, a: np.ndarray, img_r: np.ndarray, wgt_r: np.ndarray, p: ARTASynParams):
    """Step 4, T_rib (Sec. 3.2.1): alpha x rib contrast x soft lung weight x brightness, at most 1."""
    rib = p.rib_offset + (1.0 - p.rib_offset) * img_r
    new_a = np.minimum(a * rib * wgt_r * p.brightness, 1.0)
    # the colour is unchanged: the premultiplied colour scales with the alpha
    scale = np.divide(new_a, a, out=np.zeros_like(new_a), where=a > 0)
    return pa * scale, new_a


def _textured_layer(a0_full, painted: _Box, img, lung, rng, p: ARTASynParams, s: float, full: bool):
    """Steps 2-4 on the work box: T_blur, T_cryst, the six-layer composite and (``full``) T_rib."""
    labels, mean_a, mean_k = _cryst_cells(a0_full, painted, rng, p)
    reach = int(math.ceil(4 * max(p.blur_radius, p.cryst_blur_radius) * s)) + 1  # blurs: 4 sigma
    box = _work_box(painted, labels, mean_a, reach)
    wgt = soft_lung_weight(lung, p) if full else None
    out = _clip_box(box, wgt) if full else box  # nothing survives outside the soft lung weight
    sl = out.within(box)
    a0 = a0_full[box.sl]
    k0 = (a0 >= _EMPTY_ALPHA).astype(np.float32)
    blurred = _t_blur(k0, a0, p.blur_radius * s, sl)
    cryst, cryst_blurred = _t_cryst(labels[box.sl], mean_a, mean_k, sl, p, s)
    pa, a = _compose_six((k0[sl], a0[sl]), blurred, cryst, cryst_blurred, p)
    if full:
        pa, a = _t_rib(pa, a, img[out.sl], wgt[out.sl], p)
    return out, pa, a


def _composite(img: np.ndarray, box: _Box | None, pa, a, colour: float, p: ARTASynParams):
    """Step 5 (Sec. 3.2.1): layer over the image, lighten-only; returns synthetic, mask, alpha."""
    synthetic = img.copy()
    alpha = np.zeros(img.shape, np.float32)
    if box is not None and box.y1 > box.y0 and box.x1 > box.x0:
        alpha[box.sl] = a
        i_r = img[box.sl]
        comp = i_r * (1.0 - a) + colour * pa  # layer colour = colour x pa / a
        synthetic[box.sl] = np.where(a > 0, np.clip(np.maximum(comp, i_r), 0.0, 1.0), i_r)
    mask = (alpha > p.mask_threshold).astype(np.float32)
    return synthetic, mask, alpha


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
    """Paint one ART-ASyn anomaly into ``image`` (paper Sec. 3.2.1, supp. Sec. 1; see the module docstring).

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
    p = resolve_params(ARTASynParams, params, overrides, "synthesize_artasyn")
    img, lung, sides = _prepare_inputs(image, lung, steps)
    brush, brush_key = _resolve_brush(brush)
    H, W = img.shape
    s = math.sqrt(H * W) / p.reference_size
    colour = _percentile_u8(img, p.colour_percentile)
    # 1. strokes -> A_base
    counts = _draw_stroke_counts(rng, [len(sp) > 0 for sp in sides], p)
    a0_full = _paint_base((H, W), sides, counts, brush, brush_key, rng, p, s)
    painted = _nonzero_box(a0_full)
    if painted is None:  # nothing painted (e.g. an all-zero custom brush)
        box = pa = a = None
    elif steps == "base":  # A_base composited as painted
        box, a = painted, a0_full[painted.sl]
        pa = (a >= _EMPTY_ALPHA) * a
    else:  # 2.-4. T_blur, T_cryst, six-layer composite, T_rib
        box, pa, a = _textured_layer(a0_full, painted, img, lung, rng, p, s, full=steps == "full")
    # 5. composite, lighten-only, mask
    synthetic, mask, alpha = _composite(img, box, pa, a, colour, p)
    return (synthetic, mask, alpha) if return_alpha else (synthetic, mask)


# ----------------------------------------------------------------------------------------------------
# MONAI transforms


class ARTASyn(AnomalySynthesis):
    """Array ART-ASyn: ``(image, lung)`` ``(1, H, W)`` -> ``(synthetic, mask)`` ``(1, H, W)`` float32.

    Args:
        steps: ``"base"``, ``"base+blur+cryst"`` or ``"full"`` (supplementary Table S1).
        brush: optional custom brush tip alpha ``(h, w)`` in [0, 1].
        params: an :class:`ARTASynParams`; keyword ``**kwargs`` (its field names) replace single fields.
        prob / on_empty_lung: see :class:`~custom_transforms.synthesis.base.AnomalySynthesis`.
    """

    params_class = ARTASynParams

    def __init__(self, steps: str = "full", brush: np.ndarray | None = None, params: ARTASynParams | None = None,
                 prob: float = 1.0, on_empty_lung: str = "clean", **kwargs):
        super().__init__(prob, on_empty_lung)
        self._set_params(params, kwargs)
        self.steps = _check_steps(steps)
        self.brush = None if brush is None else np.asarray(brush, np.float32)

    def synthesize(self, image: np.ndarray, lung: np.ndarray, rng: np.random.Generator, source=None):
        return synthesize_artasyn(image, lung, rng, steps=self.steps, brush=self.brush, params=self.params)


class ARTASynd(AnomalySynthesisd):
    """Dictionary ART-ASyn: ``d["synthetic"]``, ``d["mask"]`` = an ART-ASyn anomaly of ``d["image"]``.

    Reads ``d[key]`` (``(1, H, W)`` image in [0, 1]) and ``d[lung_key]`` (``(1, H, W)`` PBTSeg labels);
    writes ``d[synthetic_key]`` and ``d[mask_key]`` (``(1, H, W)`` float32, mask 0/1) in the image's
    container. With probability ``1 - prob``, or an empty lung map and ``on_empty_lung="clean"``, the sample
    is clean. ``set_random_state(seed)`` reproduces results exactly (forwarded to the :class:`ARTASyn` it
    holds). Other arguments as :class:`ARTASyn`.
    """

    def __init__(self, keys: KeysCollection = ("image",), lung_key: str = "lung", synthetic_key: str = "synthetic",
                 mask_key: str = "mask", prob: float = 1.0, steps: str = "full", on_empty_lung: str = "clean",
                 brush: np.ndarray | None = None, allow_missing_keys: bool = False,
                 params: ARTASynParams | None = None, **kwargs):
        synth = self.make_synthesizer(ARTASyn, params, kwargs, steps=steps, brush=brush, on_empty_lung=on_empty_lung)
        super().__init__(keys, synth, lung_key, synthetic_key, mask_key, prob, allow_missing_keys)
