"""Procedural texture brush for ART-ASyn.

ART-ASyn paints its synthetic opacities with a small grayscale "texture brush" whose intensity is the
alpha of the brush tip (the authors ship a ~168 x 106 px JPEG that looks like a patch of streaky lung
markings). This module generates a comparable brush tip procedurally, so the project ships no image
asset and the brush is seedable.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

__all__ = ["make_brush"]

_SUPERSAMPLE = 4  # curves are drawn at 4x resolution and area-downsampled: cheap anti-aliasing


def _draw_branching_curves(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Thin branching random-walk curves (vessel/airway-like), anti-aliased, values in [0, 1]."""
    ss = _SUPERSAMPLE
    canvas = np.zeros((height * ss, width * ss), np.float32)
    unit = min(height, width) / 106.0  # lengths below are for the default 168 x 106 brush
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0

    # Work list of (x, y, heading, length, thickness, intensity, depth); headings are mostly along the
    # long (vertical) axis, like vessels fanning out from the hilum, with a random tilt.
    todo = []
    main = math.pi / 2 + rng.normal(0, 0.2)  # shared main direction: the streaks run roughly parallel
    for _ in range(int(rng.integers(4, 7))):
        r, t = math.sqrt(rng.uniform(0, 1)) * 0.8, rng.uniform(0, 2 * math.pi)
        x, y = cx + r * cx * math.cos(t), cy + r * cy * math.sin(t)
        heading = main + rng.normal(0, 0.25) + (math.pi if rng.uniform() < 0.5 else 0.0)
        todo.append((x, y, heading, rng.uniform(40, 100) * unit, rng.uniform(2.0, 4.0) * unit,
                     rng.uniform(0.3, 1.0) ** 0.7, 0))
    while todo:
        x, y, heading, length, thick, inten, depth = todo.pop()
        step = 1.5 * unit
        turn = rng.normal(0, 0.02)  # slowly varying curvature
        travelled = 0.0
        while travelled < length:
            turn = 0.85 * turn + rng.normal(0, 0.015)
            heading += turn
            nx, ny = x + step * math.cos(heading), y + step * math.sin(heading)
            frac = travelled / length
            th = max(1, int(round(thick * (1.0 - 0.5 * frac) * ss)))  # taper towards the tip
            val = float(inten * (1.0 - 0.3 * frac))
            cv2.line(canvas, (int(x * ss), int(y * ss)), (int(nx * ss), int(ny * ss)), val, th)
            x, y, travelled = nx, ny, travelled + step
            if not (-5 < x < width + 5 and -5 < y < height + 5):
                break
            if depth < 2 and rng.uniform() < 0.035:  # branch off at a shallow angle, thinner and fainter
                side = 1.0 if rng.uniform() < 0.5 else -1.0
                todo.append((x, y, heading + side * rng.uniform(0.3, 0.8),
                             (length - travelled) * rng.uniform(0.5, 0.9), thick * 0.65, inten * 0.85,
                             depth + 1))
    return cv2.resize(canvas, (width, height), interpolation=cv2.INTER_AREA)


def _oriented_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Streaky haze: white noise blurred much more along the long axis than across it, in [0, 1]."""
    unit = min(height, width) / 106.0
    noise = rng.standard_normal((height, width)).astype(np.float32)
    streaks = cv2.GaussianBlur(noise, (0, 0), sigmaX=1.2 * unit, sigmaY=6.0 * unit,
                               borderType=cv2.BORDER_REFLECT)
    streaks /= max(float(streaks.std()), 1e-6)
    blobs = cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), 8.0 * unit)
    blobs /= max(float(blobs.std()), 1e-6)
    # faint, patchy: zero over about half of the tip, up to ~0.3 in the densest patches
    return np.clip(0.04 + 0.05 * streaks + 0.09 * blobs, 0.0, 1.0)


def _elliptic_falloff(height: int, width: int, power: float = 1.6) -> np.ndarray:
    """``(1 - r^2)^power`` with ``r`` the normalised elliptical radius: 1 at the centre, 0 at the edge."""
    ys = (np.arange(height, dtype=np.float32) - (height - 1) / 2.0) / ((height - 1) / 2.0)
    xs = (np.arange(width, dtype=np.float32) - (width - 1) / 2.0) / ((width - 1) / 2.0)
    r2 = ys[:, None] ** 2 + xs[None, :] ** 2
    return np.clip(1.0 - r2, 0.0, 1.0) ** power


@functools.lru_cache(maxsize=16)
def _make_brush_cached(seed: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    curves = _draw_branching_curves(rng, height, width)
    haze = _oriented_noise(rng, height, width)
    tex = np.clip(curves + (1.0 - curves) * haze, 0.0, 1.0)
    tex = cv2.GaussianBlur(tex, (0, 0), 0.6 * min(height, width) / 106.0)
    alpha = tex * _elliptic_falloff(height, width)
    alpha /= max(float(alpha.max()), 1e-6)
    alpha = np.ascontiguousarray(alpha, dtype=np.float32)
    alpha.setflags(write=False)
    return alpha


def make_brush(seed: int = 0, height: int = 168, width: int = 106) -> np.ndarray:
    """Return a procedural ART-ASyn brush tip: ``float32 (height, width)`` alpha in ``[0, 1]``.

    Construction (all steps driven by ``numpy.random.default_rng(seed)``, so a seed gives the same
    brush on every machine):

    1. *Branching curves*: 4-6 "trunks" start at random points inside the central ellipse and run
       roughly parallel: each heading is a shared main direction (the long axis +- ~11 deg) +- ~14 deg,
       in either sense. They follow a random walk whose curvature changes slowly (an AR(1) process on the
       turn rate), are 40-100 px long and 2-4 px thick with a random brightness, taper and fade towards
       their tip, and spawn branches (probability 3.5% per 1.5 px step, up to two levels deep) that
       leave at 17-46 deg, thinner (x0.65) and fainter (x0.85). Curves are drawn at 4x resolution and
       area-downsampled (anti-aliasing).
    2. *Oriented haze*: white noise blurred anisotropically (sigma 1.2 px across, 6 px along the long
       axis) gives fine streaks; a second, isotropically blurred noise (sigma 8 px) makes the density
       patchy. The haze is faint (``0.04 + 0.05 streaks + 0.09 patches``, clipped to [0, 1]: zero over
       roughly half of the tip).
    3. ``texture = curves + (1 - curves) * haze`` (curves over haze), blurred with sigma 0.6 px (soft
       edges, no aliasing when the brush is later shrunk and rotated).
    4. Multiplied by a soft elliptical falloff ``(1 - r^2)^1.6`` (``r`` = normalised elliptical radius)
       so the tip fades smoothly to exactly 0 at its border pixels (stamps leave no rectangular edges),
       then scaled so that its maximum is 1.

    The result is sparse, like the authors' texture image (a few bright streaks on a faint haze; mean
    alpha ~0.06 there, ~0.03-0.07 here depending on the seed) -- the density matters: ART-ASyn stamps
    hundreds of tips per image, and a denser tip turns every anomaly into a uniform white-out.

    All lengths are stated for the default 168 x 106 size and scale with ``min(height, width) / 106``.
    Results are cached (``functools.lru_cache``); the returned array is shared and **read-only**, so
    call ``.copy()`` before modifying it.
    """
    seed, height, width = int(seed), int(height), int(width)
    if height < 4 or width < 4:
        raise ValueError(f"brush size must be at least 4 x 4 px, got {height} x {width}")
    return _make_brush_cached(seed, height, width)
