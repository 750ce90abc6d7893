"""Plausibility gate: does a loaded image look like a frontal chest radiograph the model can score?

The anomaly model scores whatever it is given; an inverted radiograph, a lateral view, a noise image or a
near-blank image gets a score as well, and nothing in ``scores.csv`` would say that the number is
meaningless. This module gives the reasons an image is *implausible*, from cheap image statistics and the
PBTSeg lung labels (0 background, 1 right lung = image left, 2 left lung = image right):

``texture`` (:func:`texture_reasons`)
    *too uniform*: the 1st..99th percentile intensity range is below ``min_range``; *noise-like*: the
    high-frequency energy (the image minus its Gaussian blur of sigma 1 px) is more than ``max_high_freq``
    of the variance (radiographs: < 0.07; uniform noise: ~0.75); *too few grey levels*: the 8-bit
    histogram entropy is below ``min_entropy`` bits (binary / posterised images).
``lungs`` (:func:`lung_reasons`)
    *no two lungs*: PBTSeg found no right or no left lung, or one covers less than ``min_lung_fraction``
    of the image.
``inverted`` (:func:`inversion_reasons`)
    *polarity*: in a frontal radiograph the spine/mediastinum column is brighter than the lung fields
    on both sides of it and the histogram has a long dark tail (negative skewness): ``polarity`` =
    (centre band - lateral bands, rows 20 %..70 %) - 0.1 x skewness, antisymmetric under ``1 - image``;
    below ``-polarity_margin`` the image looks inverted. *lungs brighter than the mediastinum* (between
    the two lungs) by more than ``mediastinum_margin``, *or than the body around them* (the lungs' bounding
    box outside the lungs) by more than ``body_margin`` (larger: consolidated lungs are bright, and a
    child's box holds air).
``frontal`` (:func:`frontal_reasons`)
    the lungs not side by side (overlap of their row ranges / the shorter one below ``min_row_overlap``,
    or a lung centroid below ``max_lung_row`` of the height), lung areas very unequal (smaller / larger <
    ``min_lung_ratio``), no bright spine column in the centre (brightest column of the central 30 %..70 %
    minus the brighter of the lateral bands, blurred, below ``min_spine_peak``; frontal radiographs:
    > 0.03), or no left-right mirror symmetry about that column (correlation of the two blurred halves
    below ``min_symmetry``; frontal radiographs: > 0.4). Lateral views and images turned by 90 degrees
    fail the last two.

Images too small in their file are refused by the reader before this gate (``custom_transforms.io.MIN_SIZE``).

The PBTSeg-based rules are loose on purpose (PBTSeg misses or misplaces a lung on some real images,
children's in particular); the image-based ones (polarity, spine column, symmetry) carry most of the
detection. Thresholds (:class:`PlausibilityThresholds`) were set on real radiographs and the demo
phantoms at 64 and 256 px. Measured at 256 px (the bundle's input size):

- flagged healthy images: 0 / 60 NIH ChestX-ray14 ``train/healthy`` (first 60), 0 / 60 Guangzhou
  paediatric ``train/NORMAL`` (first 60), 0 / 80 demo phantoms (also at 64 px); 8 / 297 on all NIH
  healthy images, 8 / 1341 on all paediatric normals (rotated or off-centre patients, lungs PBTSeg
  misplaces), 0 / 109 NIH pneumonia, 16 / 388 paediatric pneumonia;
- detected: inverted (``1 - image``) 100 % of those 60 + 60 + 80 images, turned by 90 degrees 98-100 %,
  one half stretched to the full width ("lateral-like") 65 % NIH, 93 % paediatric, 76 % phantoms;
  uniform noise and near-constant images 100 %.

All checks are heuristics: a flag means "look at this image before trusting its score", not a diagnosis.

:func:`plausibility_reasons` runs all checks; :class:`Plausibilityd` is the MONAI dictionary transform
(``d[flags_key]`` = the reasons joined with ``"; "``, ``""`` when plausible, so batches collate).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import ensure_tuple, ensure_tuple_rep

from custom_transforms.lung.base import LEFT, RIGHT
from custom_transforms.utils import as_2d, is_number

__all__ = ["PlausibilityThresholds", "DEFAULT_THRESHOLDS", "measure", "texture_reasons", "lung_reasons",
           "inversion_reasons", "frontal_reasons", "plausibility_reasons", "Plausibilityd", "REASON_SEP"]

REASON_SEP = "; "


@dataclass(frozen=True)
class PlausibilityThresholds:
    """Limits of the plausibility checks (see the module docstring); fractions unless stated."""

    min_range: float = 0.15  # p99 - p1 of the intensities in [0, 1]
    max_high_freq: float = 0.3  # high-frequency share of the variance
    min_entropy: float = 4.0  # bits, 256-bin histogram
    min_lung_fraction: float = 0.005  # each lung, of the image area
    polarity_margin: float = 0.08  # inverted when polarity < -margin
    mediastinum_margin: float = 0.05  # inverted when the lungs are brighter than the mediastinum by more
    body_margin: float = 0.15  # inverted when the lungs are brighter than the body around them by more
    min_row_overlap: float = -0.5  # overlap of the lungs' row ranges / the shorter range (< 0: disjoint)
    max_lung_row: float = 0.8  # lung centroid row / height
    min_lung_ratio: float = 0.05  # smaller / larger lung area
    min_symmetry: float = 0.2  # mirror correlation about the spine column
    min_spine_peak: float = 0.015  # spine column minus the brighter lateral band (blurred, rows 20 %..70 %)

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not (is_number(v) and np.isfinite(v)):
                raise ValueError(f"plausibility threshold {f.name} must be a finite number, got {v!r}")


DEFAULT_THRESHOLDS = PlausibilityThresholds()


def _image(image) -> np.ndarray:
    a = as_2d(image).astype(np.float32, copy=False)
    if a.size == 0 or not np.all(np.isfinite(a)):
        raise ValueError("plausibility checks need a finite, non-empty image")
    return a


def _labels(labels, shape) -> np.ndarray:
    lab = as_2d(labels, "lung")
    if lab.shape != shape:
        raise ValueError(f"lung labels of shape {lab.shape} do not match the image shape {shape}")
    return lab


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def _skewness(a: np.ndarray) -> float:
    d = a.ravel().astype(np.float64)
    d -= d.mean()
    d2 = d * d
    m2 = d2.mean()
    return float((d2 * d).mean() / m2**1.5) if m2 > 0 else 0.0


def _band(profile: np.ndarray, lo: float, hi: float) -> float:
    n = len(profile)
    return float(profile[int(lo * n):max(int(hi * n), int(lo * n) + 1)].mean())


def measure(image, labels=None) -> dict:
    """The statistics the checks use, as a dict of floats (``nan`` where undefined).

    Args:
        image: one gray image ``(H, W)`` or ``(1, H, W)`` in [0, 1].
        labels: PBTSeg labels of the same shape (0 / 1 / 2), or None (lung statistics left out).

    Keys: ``range`` (p99 - p1), ``high_freq`` (share of the variance above the blur scale), ``entropy``
    (bits), ``polarity``, ``spine_peak``, ``symmetry``; with labels: ``right_area``, ``left_area``
    (fractions of the image), ``lung_ratio``, ``right_row``, ``left_row`` (centroid rows / height),
    ``row_overlap`` (overlap of the two lungs' row ranges / the shorter range; < 0 when disjoint),
    ``lung_mean``, ``mediastinum_mean``, ``body_mean``.
    """
    u = _image(image)
    H, W = u.shape
    m: dict[str, float] = {}
    counts = np.bincount(np.clip(np.rint(u * 255), 0, 255).astype(np.int64).ravel(), minlength=256)
    cdf = np.cumsum(counts)  # p1 / p99 by nearest rank on the 8-bit histogram (no full sort)
    lo, hi = np.searchsorted(cdf, [0.01 * cdf[-1], 0.99 * cdf[-1]])
    m["range"] = float(hi - lo) / 255.0
    var = float(u.var())
    hf = u - cv2.GaussianBlur(u, (0, 0), 1.0)  # pixel-scale detail: noise lives here, anatomy does not
    m["high_freq"] = float((hf * hf).mean() / var) if var > 0 else 0.0
    hist = counts / u.size
    p = hist[hist > 0]
    m["entropy"] = float(-(p * np.log2(p)).sum())
    # polarity: centre column vs lateral lung bands (rows 20 %..70 %), and the dark tail of the histogram
    profile = u[int(0.2 * H):max(int(0.7 * H), 1)].mean(axis=0)
    centre = _band(profile, 0.45, 0.55)
    lateral = 0.5 * (_band(profile, 0.15, 0.35) + _band(profile, 0.65, 0.85))
    m["polarity"] = float(centre - lateral - 0.1 * _skewness(u))
    # left-right mirror symmetry about the spine column (brightest column of the central band, blurred)
    b = cv2.GaussianBlur(u, (0, 0), max(H, W) / 64.0)
    prof = b[int(0.2 * H):max(int(0.7 * H), 1)].mean(axis=0)
    c0, c1 = int(0.3 * W), max(int(0.7 * W), int(0.3 * W) + 1)
    mid = c0 + int(np.argmax(prof[c0:c1]))
    m["spine_peak"] = float(prof[mid] - max(_band(prof, 0.15, 0.35), _band(prof, 0.65, 0.85)))
    half = min(mid, W - 1 - mid)
    m["symmetry"] = _corr(b[:, mid - half:mid][:, ::-1], b[:, mid + 1:mid + 1 + half]) if half >= 4 else 0.0
    if labels is None:
        return m
    lab = _labels(labels, u.shape)
    right, left = lab == RIGHT, lab == LEFT
    m["right_area"], m["left_area"] = float(right.mean()), float(left.mean())
    nan = float("nan")
    if not (right.any() and left.any()):
        m.update(lung_ratio=nan, right_row=nan, left_row=nan, row_overlap=nan, lung_mean=nan,
                 mediastinum_mean=nan, body_mean=nan)
        return m
    m["lung_ratio"] = min(m["right_area"], m["left_area"]) / max(m["right_area"], m["left_area"])
    rows_r, rows_l = np.flatnonzero(right.any(axis=1)), np.flatnonzero(left.any(axis=1))
    m["right_row"] = float(np.nonzero(right)[0].mean() / H)
    m["left_row"] = float(np.nonzero(left)[0].mean() / H)
    overlap = min(rows_r[-1], rows_l[-1]) - max(rows_r[0], rows_l[0]) + 1
    m["row_overlap"] = float(overlap / min(len(rows_r), len(rows_l)))
    lungs = right | left
    m["lung_mean"] = float(u[lungs].mean())
    # mediastinum: per row with both lungs, the central half of the gap between them
    both = np.flatnonzero(right.any(axis=1) & left.any(axis=1))
    a = W - 1 - np.argmax(right[both, ::-1], axis=1)  # last right-lung column of each row
    z = np.argmax(left[both], axis=1)  # first left-lung column
    keep = z - a > 2
    q = (z - a)[keep] // 4
    start, stop = (a[keep] + 1 + q)[:, None], (z[keep] - q)[:, None]
    cols = np.arange(W)
    gap = u[both[keep]][(cols >= start) & (cols < stop)]
    m["mediastinum_mean"] = float(gap.mean()) if gap.size else nan
    ys, xs = np.nonzero(lungs)
    pad = (xs.max() - xs.min()) // 10
    box = np.zeros_like(lungs)
    box[ys.min():ys.max() + 1, max(xs.min() - pad, 0):xs.max() + pad + 1] = True
    body = box & ~lungs
    m["body_mean"] = float(u[body].mean()) if body.any() else nan
    return m


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def texture_reasons(m: Mapping, t: PlausibilityThresholds = DEFAULT_THRESHOLDS) -> list[str]:
    """Too uniform, noise-like, too few grey levels (from :func:`measure`'s statistics)."""
    out = []
    if m["range"] < t.min_range:
        out.append(f"too uniform: intensity range {m['range']:.3f} (p1..p99) < {t.min_range:g}")
    if m["high_freq"] > t.max_high_freq:
        out.append(f"noise-like: high-frequency energy {_pct(m['high_freq'])} of the variance "
                   f"> {_pct(t.max_high_freq)}")
    if m["entropy"] < t.min_entropy:
        out.append(f"too few grey levels: histogram entropy {m['entropy']:.1f} bits < {t.min_entropy:g}")
    return out


def lung_reasons(m: Mapping, t: PlausibilityThresholds = DEFAULT_THRESHOLDS) -> list[str]:
    """No two lungs: a side missing or smaller than ``min_lung_fraction`` of the image."""
    if "right_area" not in m:
        return []
    small = [(name, m[f"{name}_area"]) for name in ("right", "left") if m[f"{name}_area"] < t.min_lung_fraction]
    if not small:
        return []
    missing = [name for name, a in small if a == 0]
    if len(missing) == 2:
        return ["no two lungs: PBTSeg found no lung"]
    parts = [f"{name} lung not found" if a == 0 else f"{name} lung {_pct(a)} of the image < "
             f"{_pct(t.min_lung_fraction)}" for name, a in small]
    return ["no two lungs: " + ", ".join(parts)]


def inversion_reasons(m: Mapping, t: PlausibilityThresholds = DEFAULT_THRESHOLDS) -> list[str]:
    """Looks inverted: centre column darker than the lung bands, or lungs brighter than their surroundings."""
    why = []
    if m["polarity"] < -t.polarity_margin:
        why.append(f"centre column darker than the lung fields (polarity {m['polarity']:.2f} < "
                   f"{-t.polarity_margin:g})")
    lung = m.get("lung_mean", float("nan"))
    for key, what, margin in (("mediastinum_mean", "the mediastinum", t.mediastinum_margin),
                              ("body_mean", "the body around them", t.body_margin)):
        ref = m.get(key, float("nan"))
        if np.isfinite(lung) and np.isfinite(ref) and lung - ref > margin:
            why.append(f"lungs brighter than {what} ({lung:.2f} vs {ref:.2f})")
    return ["looks inverted: " + ", ".join(why)] if why else []


def frontal_reasons(m: Mapping, t: PlausibilityThresholds = DEFAULT_THRESHOLDS) -> list[str]:
    """Not like a frontal chest radiograph: lung layout, lung area ratio, left-right mirror symmetry."""
    why = []
    if np.isfinite(m.get("row_overlap", float("nan"))):
        if m["row_overlap"] < t.min_row_overlap:
            why.append(f"lungs not side by side (row overlap {m['row_overlap']:.2f} < {t.min_row_overlap:g})")
        low = max(m["right_row"], m["left_row"])
        if low > t.max_lung_row:
            why.append(f"a lung centred at {_pct(low)} of the height (> {_pct(t.max_lung_row)})")
        if m["lung_ratio"] < t.min_lung_ratio:
            why.append(f"lung areas very unequal (ratio {m['lung_ratio']:.2f} < {t.min_lung_ratio:g})")
    if m["spine_peak"] < t.min_spine_peak:
        why.append(f"no bright spine column in the centre (peak {m['spine_peak']:.3f} < {t.min_spine_peak:g})")
    if m["symmetry"] < t.min_symmetry:
        why.append(f"no left-right symmetry about the spine (correlation {m['symmetry']:.2f} < {t.min_symmetry:g})")
    return ["not like a frontal chest radiograph: " + ", ".join(why)] if why else []


def plausibility_reasons(image, labels=None, thresholds: PlausibilityThresholds | None = None) -> list[str]:
    """All reasons why ``image`` (with its PBTSeg ``labels``) does not look like a frontal chest radiograph.

    Args:
        image: ``(H, W)`` or ``(1, H, W)`` in [0, 1] (numpy, tensor or MetaTensor).
        labels: PBTSeg labels of the same shape; None skips the lung checks.
        thresholds: :class:`PlausibilityThresholds` (default :data:`DEFAULT_THRESHOLDS`).

    Returns:
        A list of human-readable reasons, empty when the image looks plausible.
    """
    t = DEFAULT_THRESHOLDS if thresholds is None else thresholds
    m = measure(image, labels)
    return texture_reasons(m, t) + lung_reasons(m, t) + inversion_reasons(m, t) + frontal_reasons(m, t)


class Plausibilityd(MapTransform):
    """Write ``d[flags_key]``: the reasons ``d[key]`` looks implausible, joined with ``"; "`` (``""`` if none).

    The image and the labels are only read. A string (not a list) keeps batches collatable.

    Args:
        keys: image key(s), ``(1, H, W)`` in [0, 1].
        lung_key: PBTSeg label key(s), one per image key (``None``: no lung checks).
        flags_key: output key(s), one per image key.
        thresholds: a :class:`PlausibilityThresholds`, or a dict of its fields (from a config).
        allow_missing_keys: skip image keys absent from the dictionary.
    """

    def __init__(self, keys: KeysCollection = "image", lung_key: str | None = "lung", flags_key: str = "flags",
                 thresholds: PlausibilityThresholds | Mapping | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        n = len(ensure_tuple(self.keys))
        self.lung_keys = ensure_tuple_rep(lung_key, n)
        self.flags_keys = ensure_tuple_rep(flags_key, n)
        if thresholds is None:
            thresholds = DEFAULT_THRESHOLDS
        elif isinstance(thresholds, Mapping):
            unknown = set(thresholds) - {f.name for f in fields(PlausibilityThresholds)}
            if unknown:
                raise ValueError(f"unknown plausibility threshold(s) {sorted(unknown)}; known: "
                                 f"{sorted(asdict(DEFAULT_THRESHOLDS))}")
            thresholds = PlausibilityThresholds(**thresholds)
        elif not isinstance(thresholds, PlausibilityThresholds):
            raise ValueError(f"thresholds must be a PlausibilityThresholds or a dict, got {type(thresholds).__name__}")
        self.thresholds = thresholds

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key, lung_key, flags_key in self.key_iterator(d, self.lung_keys, self.flags_keys):
            if lung_key is not None and lung_key not in d:
                raise KeyError(f"Plausibilityd: lung key '{lung_key}' not found (run PBTSegd before it, or set "
                               f"lung_key=None); available keys: {sorted(map(str, d))}")
            labels = d[lung_key] if lung_key is not None else None
            d[flags_key] = REASON_SEP.join(plausibility_reasons(d[key], labels, self.thresholds))
        return d
