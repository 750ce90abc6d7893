"""FPI (foreign patch interpolation) anomaly synthesis and its MONAI transforms.

Foreign patch interpolation (Tan, Hou, Batten, Qiu, Kainz, "Detecting outliers with foreign patch
interpolation", Machine Learning for Biomedical Imaging 1, 1-27, 2022: the self-supervised task of its method
section; authors' code jemtan/FPI) is the pseudo-anomaly of SAGAN (Zhang et al., "Spatial-aware attention
generative adversarial network for semi-supervised anomaly detection in medical image", MICCAI 2024: Sec. 2.1,
pseudo-anomaly images ``x_p`` restored under ``L_rec``, Eq. (4); Sec. 3.1, "referenced to FPI"; FPI is also a
baseline of its Table 2). The data flow and the synthesis contract are in docs/architecture.md. ``synthesize_fpi``
replaces one square of a healthy chest X-ray by an interpolation between it and the same square of ANOTHER
training image (``source``, same size) and returns the synthetic image with its soft label:

1. **Patch.** The centre is drawn per axis uniformly over the central ``core_fraction`` = 80% of the image
   (integer ``c`` in ``[floor(0.1 N), floor(0.9 N))``, 25..229 at 256 px); the half-width ``w`` uniformly
   over the integers ``round(0.05 size) <= w < round(0.2 size)`` (13..50 px at 256 px). The square is the rows / columns
   ``[c - w, c + w)``, clipped to the image (a patch near the border is cut, not moved).
2. **Interpolation factor.** ``alpha ~ U(0.05, 0.95)``.
3. **Interpolate.** Inside the square ``x' = (1 - alpha) x + alpha x_other``; outside ``x' = x``.
4. **Label.** ``mask = alpha`` on the square's pixels where ``x != x_other``, 0 elsewhere: the network
   learns to predict the interpolation factor (a soft label, float32 in [0, 1]). On 8-bit images the two
   patches share a value at a few pixels, which leaves pinholes in the labelled square.

FPI places the patch anywhere in the image, not by anatomy: the lung map is accepted for the synthesis
contract (docs/architecture.md, "Transform pattern") but unused by default. ``restrict_to_lung=True``
(a project option, not part of the method) draws the centre from the lung pixels instead (half-width and
alpha as above); only then does an empty lung map make a clean sample (``on_empty_lung``).

Conventions and implementation choices
--------------------------------------
* **Image size.** The published lengths are fractions of the image side; here ``size = sqrt(H x W)``
  (the side of a square image), i.e. the half-width range 12.8..51.2 px stated for 256 px scaled by
  ``s = sqrt(H x W) / 256`` as in :mod:`custom_transforms.synthesis.artasyn`. The centre range is the
  central ``core_fraction`` of each axis, so the square stays square on non-square images.
* **Integer draws.** Centre and half-width are integers drawn with half-open ranges, as in the
  authors' public code (jemtan/FPI); the patch is therefore ``2 w`` px wide before clipping.
* **Which image is "foreign".** The authors' code weights the foreign patch with ``1 - alpha`` and labels
  it ``1 - alpha``; since ``alpha`` is uniform on a range symmetric about 0.5 this is the same distribution
  as ``x' = (1 - alpha) x + alpha x_other`` with label ``alpha`` (the notation used here).
* **Exact where the images agree.** Where ``x == x_other`` inside the square the synthetic pixel is ``x``
  exactly (the float interpolation could move it by one rounding step), so ``synthetic == image``
  wherever ``mask == 0``; elsewhere it is ``(1 - alpha) x + alpha x_other`` in float32, clipped to [0, 1].
* **Source.** The second image comes from :class:`~custom_transforms.synthesis.base.SourcePool` (the
  training split, loaded with the same load and intensity transforms as the images, see ``configs/train.json``)
  unless one is given; values are clipped to [0, 1] like the image.
* ``label="binary"`` (a project option) writes 1 instead of ``alpha`` where the label is non-zero, e.g. to
  compare with a binary-mask method; the default ``"alpha"`` is the published soft label.
* **SAGAN's variant.** The SAGAN paper gives no FPI parameters ("referenced to FPI"), so the defaults are FPI's.
  SAGAN's public code (zzr728/SAGAN) draws the centre in the central 60%, ``alpha ~ U(0, 1)`` and trains on a
  binary mask of the square: ``core_fraction=0.6, alpha_range=(0, 1), label="binary"`` (up to the pinholes).
* No per-pixel loops: one slice per image, so synthesis costs far less than loading an image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from custom_transforms.synthesis.base import SourceSynthesis, SourceSynthesisd, check_source_inputs, resolve_params
from custom_transforms.utils import Choice, check_flag, range_pair

__all__ = ["FPI_LABELS", "FPIParams", "synthesize_fpi", "FPI", "FPId"]

FPI_LABELS = ("alpha", "binary")

_check_label = Choice("fpi_label", FPI_LABELS, "label")
_MIN_SIDE = 8  # px


def _where(name: str) -> str:
    return f"FPIParams.{name} (fpi_{name})"


@dataclass(frozen=True)
class FPIParams:
    """FPI synthesis parameters; defaults are the published values (Tan et al. 2022, MELBA; module docstring).

    Lengths are fractions of the image size (``sqrt(H x W)``). The config keys of ``configs/methods/fpi.json``
    are the field names prefixed with ``fpi_``.
    """

    core_fraction: float = 0.8  # the patch centre lies in the central fraction of each axis
    half_width_range: tuple = (0.05, 0.2)  # x size; integer half-width in [round(lo x size), round(hi x size))
    alpha_range: tuple = (0.05, 0.95)  # interpolation factor, uniform
    label: str = "alpha"  # "alpha" (published soft label) or "binary" (1 where the label is non-zero)
    restrict_to_lung: bool = False  # True: centre drawn from the lung pixels (not in the published method)

    def __post_init__(self):
        try:
            core = float(self.core_fraction)
        except (TypeError, ValueError):
            core = float("nan")
        if not 0.0 < core <= 1.0:
            raise ValueError(f"{_where('core_fraction')} must be in (0, 1], got {self.core_fraction!r}")
        object.__setattr__(self, "core_fraction", core)
        object.__setattr__(self, "half_width_range",
                           range_pair(_where("half_width_range"), self.half_width_range, 0.0, 0.5, low_open=True))
        object.__setattr__(self, "alpha_range",
                           range_pair(_where("alpha_range"), self.alpha_range, 0.0, 1.0, low_open=False))
        _check_label(self.label)
        object.__setattr__(self, "restrict_to_lung", check_flag(self.restrict_to_lung, _where("restrict_to_lung")))


# ----------------------------------------------------------------------------------------------------
# helpers


def _prepare_inputs(image, lung, source) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked inputs: image and source float32 clipped to [0, 1], lung labels, all ``(H, W)``."""
    image, lung, source = check_source_inputs(
        image, lung, source, _MIN_SIDE,
        "FPI interpolates with a second training image: give source (same shape as the image)")
    img = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
    src = np.clip(np.asarray(source, np.float32), 0.0, 1.0)
    return img, lung, src


def _centre_range(n: int, core_fraction: float) -> tuple[int, int]:
    """Half-open integer range ``[floor(m n), floor((m + core) n))``, ``m = (1 - core) / 2``: the central part."""
    margin = (1.0 - core_fraction) / 2.0
    lo = int(math.floor(margin * n + 1e-9))  # 1e-9: 0.1 x 100 is 9.999... in floating point
    hi = int(math.floor((margin + core_fraction) * n + 1e-9))
    return lo, max(hi, lo + 1)


def _draw_patch(shape: tuple, lung: np.ndarray, rng: np.random.Generator, p: FPIParams):
    """Steps 1-2: centre ``(cy, cx)``, integer half-width ``w`` and interpolation factor ``alpha``.

    Raises:
        ValueError: ``restrict_to_lung`` and the lung map has no lung pixel.
    """
    H, W = shape
    if p.restrict_to_lung:
        ys, xs = np.nonzero(lung)
        if ys.size == 0:
            raise ValueError("lung label map has no lung pixel: cannot place an FPI patch with "
                             "restrict_to_lung=True (segment the lungs first, or treat the sample as clean)")
        i = int(rng.integers(ys.size))
        cy, cx = int(ys[i]), int(xs[i])
    else:
        cy, cx = (int(rng.integers(*_centre_range(n, p.core_fraction))) for n in (H, W))
    size = math.sqrt(H * W)
    w_lo = max(1, int(round(p.half_width_range[0] * size)))
    w_hi = max(w_lo + 1, int(round(p.half_width_range[1] * size)))
    w = int(rng.integers(w_lo, w_hi))
    alpha = float(rng.uniform(*p.alpha_range))
    return cy, cx, w, alpha


def _patch_slices(shape: tuple, cy: int, cx: int, w: int) -> tuple[slice, slice]:
    """Rows and columns ``[c - w, c + w)`` clipped to the image (step 1)."""
    H, W = shape
    return slice(max(cy - w, 0), min(cy + w, H)), slice(max(cx - w, 0), min(cx + w, W))


def synthesize_fpi(image: np.ndarray, lung: np.ndarray, rng: np.random.Generator, *, params: FPIParams | None = None,
                   source: np.ndarray, **overrides) -> tuple[np.ndarray, np.ndarray]:
    """Interpolate one foreign square patch into ``image`` (Tan et al. 2022, MELBA; see the module docstring).

    Args:
        image: 2-D float array in [0, 1] (values outside are clipped), shape ``(H, W)``.
        lung: ``uint8 (H, W)`` labels: 0 background, 1 right lung (image left), 2 left lung; used only
            with ``restrict_to_lung``.
        rng: ``numpy.random.Generator``; the only source of randomness.
        params: an :class:`FPIParams`; ``overrides`` (its field names as keywords, e.g. ``alpha_range=(0, 1)``)
            replace single fields.
        source: the second ("foreign") training image, 2-D float in [0, 1] of the same shape.

    Returns:
        ``(synthetic, mask)``, float32 ``(H, W)`` in [0, 1]: ``mask`` is ``alpha`` (or 1 with
        ``label="binary"``) on the patch pixels where ``image != source`` and 0 elsewhere; ``synthetic``
        equals ``image`` wherever ``mask`` is 0.

    Raises:
        ValueError: bad shapes or label values, no ``source``, bad parameters, or no lung pixel with
            ``restrict_to_lung``.
        TypeError: an unknown parameter name.
    """
    p = resolve_params(FPIParams, params, overrides, "synthesize_fpi", list_fields=True)
    img, lung, src = _prepare_inputs(image, lung, source)
    # 1.-2. patch and interpolation factor
    cy, cx, w, alpha = _draw_patch(img.shape, lung, rng, p)
    rows, cols = _patch_slices(img.shape, cy, cx, w)
    a = np.float32(alpha)
    x, x_other = img[rows, cols], src[rows, cols]
    differs = x != x_other
    # 3. interpolate inside the patch (exactly x where the two images agree)
    synthetic = img.copy()
    mixed = np.clip((np.float32(1.0) - a) * x + a * x_other, 0.0, 1.0)
    synthetic[rows, cols] = np.where(differs, mixed, x)
    # 4. soft label: alpha where the foreign patch differs from the image
    mask = np.zeros(img.shape, np.float32)
    mask[rows, cols] = differs * (a if p.label == "alpha" else np.float32(1.0))
    return synthetic, mask


# ----------------------------------------------------------------------------------------------------
# MONAI transforms


class FPI(SourceSynthesis):
    """Array FPI, :func:`synthesize_fpi` on ``(1, H, W)`` inputs: the image, its lungs and a foreign image.

    Keywords that name :class:`FPIParams` fields (e.g. ``alpha_range=(0, 1)``) replace single parameters;
    where the foreign image comes from, ``prob``, ``on_empty_lung`` and when the lungs matter
    (``restrict_to_lung``): :class:`~custom_transforms.synthesis.base.SourceSynthesis`.
    """

    params_class = FPIParams

    def synthesize(self, image: np.ndarray, lung: np.ndarray, rng: np.random.Generator, source=None):
        return synthesize_fpi(image, lung, rng, params=self.params, source=source)


class FPId(SourceSynthesisd):
    """Dictionary FPI: ``d["synthetic"]``, ``d["mask"]`` = an FPI pseudo-anomaly of ``d["image"]``; the mask is
    the interpolation factor ``alpha`` (1 with ``label="binary"``). The arguments are :class:`FPI`'s and the keys
    of :class:`~custom_transforms.synthesis.base.SourceSynthesisd`."""

    synthesizer_class = FPI
