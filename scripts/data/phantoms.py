"""Embedded demo data: procedural frontal chest-radiograph phantoms, generated offline.

.. warning::
    The phantoms are procedural drawings for **smoke runs and tests only**. They are NOT chest X-rays
    and must NOT be used to judge accuracy: a model that scores well on them has learned nothing about
    real radiographs. Figures worth reporting come from real data (see ``docs/data.md``).

A phantom (:func:`make_phantom`) is drawn in an "attenuation" map (bright = more attenuation) and then
windowed to 8 bits: dark air around a bright body outline (neck, shoulders, sometimes arms), two dark
lung fields (label 1: patient's right lung, image left; label 2: patient's left lung, image right,
narrower because of the heart), vessel trees fanning out from the hila, posterior ribs crossing the
lungs, clavicles, spine and mediastinum, a heart bulging to the image right, diaphragm domes (the right
one higher), sometimes a gastric air bubble, film noise and smooth intensity variation. Sizes,
positions, a rotation of a few degrees, contrast and gamma vary from phantom to phantom. Diseased
phantoms carry 1-3 soft, bright, irregular textured opacities inside the lungs (consolidation-like),
and their lesion mask.

:func:`generate_demo_dataset` writes the folder convention read by :mod:`scripts.data.datasets`::

    <root>/train/healthy/phantom_00001.png ...      (n_train)
    <root>/train/unlabelled/phantom_30001.png ...   (n_unlabelled; odd indices with lesions, no masks: the
                                                     unlabelled pool of semi-supervised methods such as SAGAN)
    <root>/test/healthy/phantom_10001.png ...       (n_test_healthy)
    <root>/test/diseased/phantom_20001.png ...      (n_test_diseased)
    <root>/ground_truth/diseased/phantom_20001.png  (0/255 lesion masks, same name as the image)
    <root>/demo.json                                (manifest, written last: marks a complete set)

File names are unique across splits; each phantom's content depends only on ``(seed, split, index)``,
so any subset reproduces. :func:`ensure_demo_dataset` (what the configs call) generates the set only
when the manifest is missing or does not match the request.

Command line::

    python -m scripts.data.phantoms --out demo_data [--n-train 48] [--n-test-healthy 12]
        [--n-test-diseased 12] [--size 256] [--seed 0] [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import cv2
import numpy as np

from custom_transforms.io import save_png, write_json

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
MANIFEST = "demo.json"
PREFIX = "phantom_"
# split name -> (folder, code used in the per-image seed and file-name offset, diseased?)
SPLITS = {
    "train_healthy": ("train/healthy", 0, False),
    "test_healthy": ("test/healthy", 1, False),
    "test_diseased": ("test/diseased", 2, True),
    "train_unlabelled": ("train/unlabelled", 3, False),
}
UNLABELLED = "train_unlabelled"  # mixed: lesions on odd indices, no masks written
GT_FOLDER = "ground_truth/diseased"
NAME_OFFSET = 10000  # file index = code * NAME_OFFSET + i + 1, so names never collide across splits


# --------------------------------------------------------------------------------------------------
# phantom drawing helpers (canonical frame: x, y in [-1, 1], x left -> right, y top -> bottom)
# --------------------------------------------------------------------------------------------------

def _smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _blur(a: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px <= 0.3:
        return a
    return cv2.GaussianBlur(a, (0, 0), sigma_px, borderType=cv2.BORDER_REPLICATE)


def _to_px(pts: np.ndarray, size: int) -> np.ndarray:
    """Canonical (x, y) points -> pixel coordinates (float)."""
    return (np.asarray(pts, np.float64) + 1.0) * (0.5 * size) - 0.5


def _poly_mask(pts: np.ndarray, size: int) -> np.ndarray:
    """Filled polygon (canonical points), uint8 0/1, with 1/16 px sub-pixel precision."""
    m = np.zeros((size, size), np.uint8)
    p = np.round(_to_px(pts, size) * 16).astype(np.int32)
    cv2.fillPoly(m, [p], 1, lineType=cv2.LINE_8, shift=4)
    return m


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field, zero mean, ~unit std, with about ``cells`` blobs across the image."""
    g = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    big = cv2.resize(g, (size + size * 3 // cells, size + size * 3 // cells), interpolation=cv2.INTER_CUBIC)
    o = size * 3 // cells // 2
    f = big[o:o + size, o:o + size]
    return (f - f.mean()) / (f.std() + 1e-6)


def _keep_largest(m: np.ndarray) -> np.ndarray:
    """Keep only the largest 4-connected part of a uint8 0/1 mask (in place); returns the mask."""
    n, lab, st, _ = cv2.connectedComponentsWithStats(m, connectivity=4)
    if n > 2:
        m[lab != 1 + int(np.argmax(st[1:, cv2.CC_STAT_AREA]))] = 0
    return m


def _lung_outline(rng: np.random.Generator, side: int, p: dict) -> np.ndarray:
    """Closed polygon of one lung field in the canonical frame (right lung for side=-1, i.e. image left).

    Built for the image-left lung (x < 0) and mirrored for the other side: rounded apex, convex lateral
    border reaching the costophrenic angle, diaphragm dome as the base, straight-ish medial border.
    """
    n = 28
    t = np.linspace(0.0, 1.0, n)
    y_apex, y_cp, y_med = p["y_apex"], p["y_cp"], p["y_med_base"]
    x_apex, x_lat, x_med = p["x_apex"], p["x_lat"], p["x_med"]
    # lateral border from apex down to the costophrenic angle: quick widening (rounded apex)
    lat_w = (1 - (1 - t) ** 2.6) ** 0.5 * (1 - 0.04 * t)
    lat_x = x_apex + (x_lat - x_apex) * lat_w
    lat_y = y_apex + (y_cp - y_apex) * t
    # diaphragm dome from the costophrenic angle to the medial base (peak ~40 % from lateral)
    s = np.linspace(0.0, 1.0, n)[1:-1]
    base_x = x_lat + (x_med - x_lat) * s
    base_y = y_cp + (y_med - y_cp) * s - p["dome"] * np.sin(np.pi * s) ** 1.3 * (1.15 - 0.3 * s)
    # medial border from the medial base up to the apex; the upper part curves into the apex
    m = np.linspace(0.0, 1.0, n)
    med_y = y_med + (y_apex - y_med) * m
    tm = np.clip((1.0 - m) / 0.3, 0.0, 1.0)  # 0 at the apex, 1 where the border meets the mediastinum
    reach = (1.0 - (1.0 - tm) ** 2) ** 0.5  # rounded apex (vertical tangent at the top)
    med_x = x_apex + (x_med - x_apex) * reach + p["hilum_bulge"] * np.sin(np.pi * m) * tm
    xs = np.concatenate([lat_x, base_x, med_x[:-1]])
    ys = np.concatenate([lat_y, base_y, med_y[:-1]])
    # a little random wobble of the outline (smooth along the contour)
    k = np.arange(xs.size) / xs.size * 2 * np.pi
    wob = sum(rng.normal(0, 0.006) * np.cos(j * k + rng.uniform(0, 2 * np.pi)) for j in (2, 3, 5))
    xs = xs + wob * np.sign(xs - x_med + 1e-9)
    pts = np.stack([xs, ys], 1)
    if side > 0:
        pts[:, 0] = -pts[:, 0]
    return pts


def _vessel_tree(rng: np.random.Generator, size: int, hilum, direction: float) -> np.ndarray:
    """Branching vessel-like streaks from a hilum (canonical point), drawn into a float32 map.

    Branches are generated generation by generation with numpy (no per-pixel loops) and each generation is
    drawn with a single ``cv2.polylines`` call; thickness and brightness decrease with the generation.
    """
    out = np.zeros((size, size), np.uint8)
    n0 = int(rng.integers(6, 9))
    ang = direction + np.linspace(-1.25, 1.25, n0) + rng.normal(0, 0.12, n0)
    start = np.tile(np.asarray(hilum, np.float64), (n0, 1)) + rng.normal(0, 0.02, (n0, 2))
    length = rng.uniform(0.12, 0.18, n0)
    for gen in range(6):
        end = start + np.stack([np.cos(ang), np.sin(ang)], 1) * length[:, None]
        a = _to_px(start, size)
        b = _to_px(end, size)
        segs = np.round(np.stack([a, b], 1) * 16).astype(np.int32)
        thick = max(1, int(round((2.2 - 0.35 * gen) * size / 256)))
        val = int(255 * (1.0 - 0.12 * gen))
        cv2.polylines(out, list(segs), False, val, thickness=thick, lineType=cv2.LINE_AA, shift=4)
        # two children per branch, splitting at +-(15..35) deg, shorter
        k = start.shape[0]
        spread = rng.uniform(0.25, 0.6, k)
        ang = np.concatenate([ang + spread, ang - spread]) + rng.normal(0, 0.1, 2 * k)
        start = np.concatenate([end, end])
        length = np.concatenate([length, length]) * rng.uniform(0.62, 0.8, 2 * k)
        keep = rng.random(2 * k) < 0.9 - 0.08 * gen  # prune a few branches for an irregular tree
        ang, start, length = ang[keep], start[keep], length[keep]
        if not ang.size:
            break
    return out.astype(np.float32) / 255.0


def _lesion(rng: np.random.Generator, lung: np.ndarray):
    """One consolidation-like opacity inside ``lung`` (uint8 0/1, square).

    Returns ``(opacity, shape, (y0, x0))``: float32 opacity and bool shape mask of a patch whose top-left
    corner is at ``(y0, x0)`` (the patch is clipped to the image).
    """
    S = lung.shape[0]
    r0 = rng.uniform(0.045, 0.1) * S
    # prefer centres away from the lung edge so that most of the blob is inside the lung
    k = max(3, int(r0) | 1)
    inner = cv2.erode(lung, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    ys, xs = np.nonzero(inner)
    if not ys.size:
        ys, xs = np.nonzero(lung)
    j = int(rng.integers(ys.size))
    cy, cx = int(ys[j]), int(xs[j])
    h = int(np.ceil(r0 * 1.9))
    y0, y1, x0, x1 = max(0, cy - h), min(S, cy + h + 1), max(0, cx - h), min(S, cx + h + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    th = rng.uniform(0, np.pi)
    ex = rng.uniform(0.75, 1.35)
    u = (dx * np.cos(th) + dy * np.sin(th)) / ex
    v = (-dx * np.sin(th) + dy * np.cos(th)) * ex
    rad = np.sqrt(u * u + v * v)
    phi = np.arctan2(v, u)
    wob = 1.0
    for j in (2, 3, 4, 5):
        wob = wob + rng.uniform(0.04, 0.16) / (j - 1) * np.cos(j * phi + rng.uniform(0, 2 * np.pi))
    n = 2 * h + 1
    rough = _smooth_noise(rng, n, 5)[: y1 - y0, : x1 - x0]
    d = (rad + 0.15 * r0 * rough) / (r0 * wob)
    shape = 1.0 - _smoothstep(0.7, 1.15, d)
    tex = _smooth_noise(rng, n, max(5, n // 7))[: y1 - y0, : x1 - x0]
    opacity = (shape * (0.78 + 0.11 * np.clip(tex, -2, 2))).astype(np.float32)
    return opacity, d < 0.93, (y0, x0)


# --------------------------------------------------------------------------------------------------
# phantom parts (smooth anatomy on a half-resolution canonical grid, lungs and vessels at full size)
# --------------------------------------------------------------------------------------------------

def _grid(size: int):
    """Half-resolution canonical grid ``(X, Y, |X|)`` for the smooth anatomy (upsampled later)."""
    Sw = max(32, size // 2)
    c = ((np.arange(Sw, dtype=np.float32) + 0.5) * (2.0 / Sw) - 1.0).astype(np.float32)
    X, Y = np.meshgrid(c, c)
    return X, Y, np.abs(X)


def _frame(rng: np.random.Generator) -> dict:
    """Random torso landmarks (canonical y of shoulders, neck, apices, domes; widths)."""
    w_torso = rng.uniform(0.8, 0.9)
    y_sh = rng.uniform(-0.62, -0.5)  # where the shoulders reach full width
    y_neck = y_sh - rng.uniform(0.3, 0.42)
    w_neck = rng.uniform(0.16, 0.22)
    taper = rng.uniform(-0.04, 0.05)
    y_apex = y_sh - rng.uniform(0.08, 0.16)
    y_base_l = rng.uniform(0.36, 0.5)  # patient's left (image right): lower dome
    y_base_r = y_base_l - rng.uniform(0.03, 0.1)  # patient's right: higher dome (liver)
    mw = rng.uniform(0.1, 0.14)  # half-width of the mediastinum at the hila
    return dict(w_torso=w_torso, y_sh=y_sh, y_neck=y_neck, w_neck=w_neck, taper=taper, y_apex=y_apex,
                y_base_l=y_base_l, y_base_r=y_base_r, mw=mw)


def _body(rng: np.random.Generator, Y, AX, f: dict):
    """Body outline (torso, shoulders, neck, optional arms): ``(body, body_thick)``."""
    y_sh, y_neck, w_torso = f["y_sh"], f["y_neck"], f["w_torso"]
    t_sh = np.clip((Y - y_neck) / (y_sh - y_neck), 0.0, 1.0)
    half_w = f["w_neck"] + (w_torso + 0.06 - f["w_neck"]) * np.sin(0.5 * np.pi * t_sh) ** 0.7
    low = np.clip((Y - y_sh) / (1.0 - y_sh), 0.0, 1.0)
    half_w = np.where(Y > y_sh, w_torso + 0.06 - (0.06 + f["taper"]) * low, half_w)
    xr = AX / half_w
    body_thick = np.clip(1.0 - xr * xr, 0.0, 1.0) ** 0.3  # cylinder-like: flat inside, clear edge
    body = body_thick
    if rng.random() < 0.6:  # arms beside the torso, separated by a dark gap
        arm_in = w_torso + 0.06 + rng.uniform(0.03, 0.08)
        arm_y0 = y_sh + rng.uniform(0.05, 0.15)
        arm = (_smoothstep(arm_in, arm_in + 0.03, AX) * _smoothstep(arm_y0, arm_y0 + 0.15, Y)
               * (0.55 + 0.3 * _smoothstep(arm_in, arm_in + 0.2, AX)))
        body = np.maximum(body, arm)
    return body, body_thick


def _heart(rng: np.random.Generator, X, Y, f: dict):
    """Heart: soft ellipse bulging to the image right, resting on the left dome.

    Returns ``(heart, geometry)`` with ``geometry = (cx, cy, ax, ay, rotation_deg)`` for :func:`_heart_mask`.
    """
    hc_x = rng.uniform(0.06, 0.14)
    h_ax = rng.uniform(0.28, 0.35)
    h_ay = rng.uniform(0.21, 0.26)
    hc_y = f["y_base_l"] - h_ay * rng.uniform(0.45, 0.7)
    h_rot = rng.uniform(-30, -12)
    cr, sr = np.cos(np.deg2rad(h_rot)), np.sin(np.deg2rad(h_rot))
    hx, hy = X - hc_x, Y - hc_y
    hu = (hx * cr + hy * sr) / h_ax
    hv = (-hx * sr + hy * cr) / h_ay
    heart = 1.0 - _smoothstep(0.8, 1.05, hu * hu + hv * hv)
    return heart, (hc_x, hc_y, h_ax, h_ay, h_rot)


def _heart_mask(size: int, geometry) -> np.ndarray:
    """Hard (uint8 0/1) heart ellipse at full resolution, slightly smaller than the soft one."""
    hc_x, hc_y, h_ax, h_ay, h_rot = geometry
    heart_hard = np.zeros((size, size), np.uint8)
    hp = _to_px([[hc_x, hc_y]], size)[0]
    cv2.ellipse(heart_hard, (int(round(hp[0] * 16)), int(round(hp[1] * 16))),
                (int(round(h_ax * 0.95 * size / 2 * 16)), int(round(h_ay * 0.95 * size / 2 * 16))),
                h_rot, 0, 360, 1, -1, cv2.LINE_8, 4)
    return heart_hard


def _mediastinum(rng: np.random.Generator, X, Y, f: dict, heart, dome_y):
    """Dense central tissue (mediastinum, heart, abdomen) and the trachea: ``(dense, trachea)``."""
    mw = f["mw"]
    med_half = mw + 0.03 + 0.04 * _smoothstep(-0.2, 0.4, Y) + 0.03 * np.exp(-((Y + 0.33) / 0.08) ** 2)
    mediast = ((1.0 - _smoothstep(med_half - 0.04, med_half + 0.02, np.abs(X + 0.015)))
               * _smoothstep(f["y_apex"] - 0.15, f["y_apex"] + 0.1, Y))
    # trachea: a dark air column in the upper mediastinum, down to the carina
    carina = rng.uniform(-0.3, -0.18)
    trachea = ((1.0 - _smoothstep(0.02, 0.035, np.abs(X - 0.01)))
               * (1.0 - _smoothstep(carina - 0.05, carina, Y)))
    abdomen = _smoothstep(dome_y - 0.2, dome_y + 0.0, Y)
    dense = np.maximum(np.maximum(mediast, heart), 1.1 * abdomen)
    return dense, trachea


def _spine(rng: np.random.Generator, Y, AX, f: dict):
    """Vertebral column with periodic bodies and pedicles: ``(spine, pedicles, spine_half_width)``."""
    spine_w = rng.uniform(0.055, 0.075)
    vert_period = rng.uniform(0.085, 0.11)
    vert = 0.5 + 0.5 * np.cos((2 * np.pi / vert_period) * (Y - rng.uniform(0, 1)))
    spine = ((1.0 - _smoothstep(spine_w * 0.75, spine_w * 1.1, AX)) * (0.75 + 0.25 * vert * vert)
             * (0.5 + 0.5 * _smoothstep(f["y_neck"], f["y_apex"], Y)))
    ped = np.exp(-((AX - spine_w * 0.7) * (1 / 0.014)) ** 2) * (vert ** 4)
    return spine, ped, spine_w


def _clavicles(rng: np.random.Generator, Y, AX, f: dict):
    """Clavicles: S-shaped bands from the sternal end out and up to the shoulders."""
    cl_y0 = f["y_apex"] + rng.uniform(0.03, 0.1)
    cl_x0, cl_x1 = rng.uniform(0.05, 0.1), rng.uniform(0.55, 0.7)
    s = (AX - cl_x0) / (cl_x1 - cl_x0)
    cl_y = cl_y0 - rng.uniform(0.04, 0.12) * s + 0.015 * np.sin(2 * np.pi * s)
    cl_th = rng.uniform(0.028, 0.038) * (1.0 + 0.3 * np.clip(1 - s, 0, 1))
    return ((1.0 - _smoothstep(0.55, 1.0, np.abs(Y - cl_y) / cl_th)) * _smoothstep(-0.05, 0.05, s)
            * (1.0 - _smoothstep(0.9, 1.05, s)))


def _ribs(rng: np.random.Generator, Y, AX, f: dict, spine_w, dome_y):
    """Posterior ribs (curved, periodic, with a cortex) and fainter anterior bands: ``(ribs, anterior)``."""
    lat = AX / f["w_torso"]  # 0 at the spine, 1 at the chest wall
    rib_curve = rng.uniform(0.4, 0.55) * lat * lat - rng.uniform(0.12, 0.2) * lat
    rib_start = f["y_apex"] - rng.uniform(0.02, 0.08)
    spacing = rng.uniform(0.1, 0.12) * (1.0 + 0.3 * _smoothstep(-0.8, 0.6, Y))
    phase = (Y - rib_start - rib_curve) / spacing
    idx = np.clip(np.floor(phase), 0, 15).astype(np.intp)
    half = (rng.uniform(0.17, 0.24, 16) * (1.0 + 0.02 * np.arange(16))).astype(np.float32)[idx]
    shift = rng.normal(0, 0.04, 16).astype(np.float32)[idx]
    dist = np.abs(phase - np.floor(phase) - 0.25 - shift) - half  # < 0 inside a rib (~40 % of a period)
    band = 1.0 - _smoothstep(-0.06, 0.04, dist)
    cortex = np.exp(-((dist + 0.03) * (1 / 0.04)) ** 2)
    n_ribs = int(rng.integers(9, 11))
    ribs = ((0.75 * band + 0.25 * cortex) * ((phase >= 0) & (phase < n_ribs))
            * _smoothstep(spine_w * 0.9, spine_w * 1.4, AX) * (1.0 - _smoothstep(0.82, 1.0, lat))
            * (1.0 - 0.7 * _smoothstep(dome_y - 0.05, dome_y + 0.1, Y)))
    a_phase = (Y - rib_start - 0.18 + rng.uniform(0.25, 0.4) * lat) / (spacing * 1.3)
    ant = ((1.0 - _smoothstep(-0.04, 0.06, np.abs(a_phase - np.floor(a_phase) - 0.2) - 0.12))
           * ((a_phase >= 0) & (a_phase < 5)) * _smoothstep(0.25, 0.45, lat)
           * (1.0 - _smoothstep(0.8, 0.95, lat)))
    return ribs, ant


def _layers(rng: np.random.Generator, size: int, body, body_thick, dense, trachea, bone_maps, rib_maps):
    """Weight the half-resolution maps into ``(tissue, bones, ribs)`` attenuation, upsampled to ``size``."""
    spine, ped, clav = bone_maps
    ribs, ant = rib_maps
    rho = rng.uniform(0.66, 0.76)
    tissue = body * rho * (1.0 + rng.uniform(0.14, 0.2) * dense - 0.06 * trachea)
    bones = (rng.uniform(0.03, 0.05) * spine + 0.02 * ped) * body_thick + rng.uniform(0.07, 0.1) * clav
    ribs = (rng.uniform(0.07, 0.1) * ribs + 0.03 * ant) * body_thick
    up = (size, size)
    return tuple(cv2.resize(a.astype(np.float32), up, interpolation=cv2.INTER_LINEAR)
                 for a in (tissue, bones, ribs))


def _lung_params(rng: np.random.Generator, f: dict):
    """Outline parameters (see :func:`_lung_outline`) of the right and the left lung."""
    y_apex, y_base_l, y_base_r, mw = f["y_apex"], f["y_base_l"], f["y_base_r"], f["mw"]
    common = dict(x_med=-mw, hilum_bulge=rng.uniform(0.0, 0.03))
    right = dict(common, y_apex=y_apex + rng.normal(0, 0.015), x_apex=-rng.uniform(0.26, 0.33),
                 x_lat=-(f["w_torso"] - rng.uniform(0.08, 0.12)), y_cp=y_base_r + rng.uniform(0.05, 0.1),
                 y_med_base=y_base_r, dome=rng.uniform(0.1, 0.17))
    left = dict(common, y_apex=y_apex + rng.normal(0.01, 0.015), x_apex=-rng.uniform(0.26, 0.33),
                x_lat=-(f["w_torso"] - rng.uniform(0.09, 0.13)), y_cp=y_base_l + rng.uniform(0.05, 0.1),
                y_med_base=y_base_l, dome=rng.uniform(0.08, 0.14))
    left["x_med"] = -(mw + rng.uniform(0.0, 0.02))
    return right, left


def _lung_labels(rng: np.random.Generator, size: int, f: dict, heart_geometry) -> np.ndarray:
    """Lung labels (1 right = image left, 2 left), full resolution, with the heart cut out."""
    right, left = _lung_params(rng, f)
    lung_r = _poly_mask(_lung_outline(rng, -1, right), size)
    lung_l = _poly_mask(_lung_outline(rng, +1, left), size)
    heart_hard = _heart_mask(size, heart_geometry)
    lung_r[heart_hard > 0] = 0
    lung_l[heart_hard > 0] = 0
    for m in (lung_r, lung_l):  # keep the largest part (the heart may cut off a sliver)
        _keep_largest(m)
    lung_l[lung_r > 0] = 0
    return lung_r + 2 * lung_l


def _lung_softness(lung_lab: np.ndarray):
    """Soft lung mask and depth profile (the periphery is thinner, hence less dark): ``(soft, depth)``."""
    S = lung_lab.shape[0]
    lung_bin = (lung_lab > 0).astype(np.uint8)
    lung_soft = _blur(lung_bin.astype(np.float32), max(0.6, 1.2 * S / 256))
    depth = cv2.distanceTransform(lung_bin, cv2.DIST_L2, 3) * (1.0 / (0.07 * S))
    depth = 0.5 + 0.5 * _blur(np.minimum(depth, 1.0).astype(np.float32), 1.5 * S / 256)
    return lung_soft, depth


def _vessels(rng: np.random.Generator, size: int, X, Y, mw):
    """Vessel trees fanning out from both hila, and the hilar shadows: ``(vessels, hila)`` at full size."""
    hila = [(-mw - rng.uniform(0.04, 0.09), rng.uniform(-0.2, -0.05)),
            (mw + rng.uniform(0.06, 0.1), rng.uniform(-0.18, -0.03))]
    vessels = np.maximum(_vessel_tree(rng, size, hila[0], np.pi + rng.normal(0, 0.1)),
                         _vessel_tree(rng, size, hila[1], rng.normal(0, 0.1)))
    vessels = _blur(vessels, 0.9 * size / 256)
    hil = np.zeros(X.shape, np.float32)
    for hx_, hy_ in hila:
        hil += np.exp(-(((X - hx_) * (1 / 0.06)) ** 2 + ((Y - hy_) * (1 / 0.1)) ** 2))
    return vessels, cv2.resize(hil, (size, size), interpolation=cv2.INTER_LINEAR)


def _attenuation(rng: np.random.Generator, layers, vascular, lung_soft, depth):
    """Combine tissue, bones, ribs and vessels with the darkening of the aerated lungs."""
    tissue, bones, ribs = layers
    vessels, hil = vascular
    lung_dark = rng.uniform(0.6, 0.7)
    # ribs show mostly over the lungs (over dense tissue they drown in the window)
    att = tissue * (1.0 - lung_dark * lung_soft * depth) + bones + ribs * (0.3 + 0.7 * lung_soft)
    att += (rng.uniform(0.05, 0.08) * vessels + 0.05 * hil) * lung_soft
    return att


def _gastric_bubble(rng: np.random.Generator, att: np.ndarray, y_base_l) -> np.ndarray:
    """Half of the time, a gastric air bubble under the left dome (subtracted from ``att`` in place)."""
    if rng.random() < 0.5:
        S = att.shape[0]
        gx, gy = rng.uniform(0.3, 0.5), y_base_l + rng.uniform(0.1, 0.16)
        gp = _to_px([[gx, gy]], S)[0]
        bub = np.zeros((S, S), np.float32)
        cv2.ellipse(bub, (int(gp[0]), int(gp[1])), (int(rng.uniform(0.05, 0.09) * S / 2), int(0.04 * S / 2)),
                    0, 0, 360, 1.0, -1)
        att -= 0.08 * _blur(bub, 2.0 * S / 256)
    return att


def _pose(rng: np.random.Generator, att, lung_lab, lung_soft):
    """Random rotation, scale and shift of the attenuation and of the lung maps (one part per lung)."""
    S = att.shape[0]
    up = (S, S)
    M = cv2.getRotationMatrix2D((S / 2 - 0.5, S / 2 - 0.5), rng.uniform(-4.0, 4.0), rng.uniform(0.95, 1.04))
    M[:, 2] += rng.uniform(-0.03, 0.03, 2) * S
    att = cv2.warpAffine(att, M, up, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    lung_lab = cv2.warpAffine(lung_lab, M, up, flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)
    lung_soft = cv2.warpAffine(lung_soft, M, up, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    for k in (1, 2):  # nearest-neighbour resampling may detach a one-pixel sliver: one part per lung
        m = (lung_lab == k).view(np.uint8)
        lung_lab[m > _keep_largest(m.copy())] = 0
    return att, lung_lab, lung_soft


def _add_lesions(rng: np.random.Generator, att, lung_lab, lung_soft, lesions: int) -> np.ndarray:
    """Add ``lesions`` opacities to ``att`` (in place) inside the posed lungs; returns the lesion mask."""
    S = att.shape[0]
    lesion_mask = np.zeros((S, S), bool)
    sides = [k for k in (1, 2) if (lung_lab == k).any()]
    for _ in range(lesions):
        lung_k = (lung_lab == sides[int(rng.integers(len(sides)))]).astype(np.uint8)
        opac, shape, (y0, x0) = _lesion(rng, lung_k)
        ph, pw = opac.shape
        win = (slice(y0, y0 + ph), slice(x0, x0 + pw))
        att[win] += rng.uniform(0.2, 0.32) * opac * lung_soft[win]
        lesion_mask[win] |= shape & (lung_k[win] > 0)
    if lesions and not lesion_mask.any():  # pragma: no cover - a lesion centre is always in a lung
        raise RuntimeError("lesion fell outside the lungs")
    return lesion_mask


def _expose(rng: np.random.Generator, att: np.ndarray) -> np.ndarray:
    """Exposure: smooth intensity variation, film grain, percentile window, gamma -> ``uint8`` image."""
    S = att.shape[0]
    att *= 1.0 + rng.uniform(0.03, 0.07) * _smooth_noise(rng, S, 4)
    grain = _blur(rng.standard_normal((S, S), dtype=np.float32), 0.5 * S / 256)
    att += rng.uniform(0.008, 0.016) * grain
    lo, hi = np.percentile(att[:: 2, :: 2], [0.5, 99.8])
    img = np.clip((att - lo) * (1.0 / (hi - lo + 1e-6)), 0.0, 1.0) ** rng.uniform(0.8, 1.25)
    img = rng.uniform(0.0, 0.06) + rng.uniform(0.88, 0.98) * img
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# the phantom
# --------------------------------------------------------------------------------------------------

def make_phantom(rng: np.random.Generator, size: int = 256, lesions: int = 0):
    """Draw one procedural frontal chest radiograph.

    Args:
        rng: the only source of randomness (same generator state -> same phantom).
        size: image side in pixels (>= 32).
        lesions: number of consolidation-like opacities to draw inside the lungs (0 = healthy).

    Returns:
        ``(image, lesion_mask, lung)``: ``uint8 (size, size)`` image; ``uint8`` 0/255 lesion mask
        (all zeros when ``lesions == 0``); ``uint8`` lung labels (0 background, 1 right lung = image
        left, 2 left lung = image right): the aerated lung fields visible on the image (the heart is
        cut out of the left lung).
    """
    size = int(size)
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    lesions = int(lesions)
    if lesions < 0:
        raise ValueError(f"lesions must be >= 0, got {lesions}")
    # the steps draw from rng in this order: reordering them changes every phantom
    X, Y, AX = _grid(size)
    f = _frame(rng)
    dome_y = np.where(X < 0, f["y_base_r"], f["y_base_l"])
    body, body_thick = _body(rng, Y, AX, f)
    heart, heart_geometry = _heart(rng, X, Y, f)
    dense, trachea = _mediastinum(rng, X, Y, f, heart, dome_y)
    spine, ped, spine_w = _spine(rng, Y, AX, f)
    clav = _clavicles(rng, Y, AX, f)
    rib_maps = _ribs(rng, Y, AX, f, spine_w, dome_y)
    layers = _layers(rng, size, body, body_thick, dense, trachea, (spine, ped, clav), rib_maps)
    lung_lab = _lung_labels(rng, size, f, heart_geometry)
    lung_soft, depth = _lung_softness(lung_lab)
    vascular = _vessels(rng, size, X, Y, f["mw"])
    att = _gastric_bubble(rng, _attenuation(rng, layers, vascular, lung_soft, depth), f["y_base_l"])
    att, lung_lab, lung_soft = _pose(rng, att, lung_lab, lung_soft)
    lesion_mask = _add_lesions(rng, att, lung_lab, lung_soft, lesions)
    image = _expose(rng, att)
    return image, lesion_mask.astype(np.uint8) * 255, lung_lab


# --------------------------------------------------------------------------------------------------
# dataset on disk
# --------------------------------------------------------------------------------------------------

def phantom_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Generator of one phantom: depends only on ``(seed, split, index)``."""
    code = SPLITS[split][1]
    return np.random.default_rng([int(seed), code, int(index), GENERATOR_VERSION])


def phantom_name(split: str, index: int) -> str:
    return f"{PREFIX}{SPLITS[split][1] * NAME_OFFSET + index + 1:05d}.png"


def _expected_manifest(n_train: int, n_test_healthy: int, n_test_diseased: int, size: int, seed: int,
                       n_unlabelled: int = 0) -> dict:
    return {
        "generator": "scripts.data.phantoms",
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "size": int(size),
        "counts": {"train_healthy": int(n_train), "test_healthy": int(n_test_healthy),
                   "test_diseased": int(n_test_diseased), UNLABELLED: int(n_unlabelled)},
        "note": "procedural phantoms for smoke runs and tests, NOT for judging accuracy",
    }


def _read_manifest(root: Path) -> dict | None:
    try:
        with open(root / MANIFEST) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _matches(manifest: dict | None, expected: dict) -> bool:
    if not manifest:
        return False
    return all(manifest.get(k) == expected[k] for k in ("generator_version", "seed", "size", "counts"))


def _files_present(root: Path, expected: dict) -> bool:
    for split, n in expected["counts"].items():
        folder, _, diseased = SPLITS[split]
        for i in range(n):
            name = phantom_name(split, i)
            if not (root / folder / name).is_file():
                return False
            if diseased and not (root / GT_FOLDER / name).is_file():
                return False
    return True


def generate_demo_dataset(root, n_train: int = 48, n_test_healthy: int = 12, n_test_diseased: int = 12,
                          size: int = 256, seed: int = 0, overwrite: bool = False, n_unlabelled: int = 8) -> dict:
    """Write the demo phantoms in the folder convention under ``root`` (see the module docstring).

    A complete set (manifest matching the request and every file present) is left as it is unless
    ``overwrite``. Otherwise all phantoms are (re)written atomically, stale ``phantom_*.png`` files of an
    earlier request are removed, and the manifest ``demo.json`` is written last.

    Returns a summary dict: ``root``, ``counts``, ``seed``, ``size``, ``generated`` (False when an existing
    complete set was kept), ``seconds``.
    """
    root = Path(root)
    counts = dict(train_healthy=n_train, test_healthy=n_test_healthy, test_diseased=n_test_diseased,
                  train_unlabelled=n_unlabelled)
    for k, n in counts.items():
        if not 0 <= int(n) < NAME_OFFSET:
            raise ValueError(f"{k}: count must be in [0, {NAME_OFFSET}), got {n}")
    expected = _expected_manifest(n_train, n_test_healthy, n_test_diseased, size, seed, n_unlabelled)
    summary = {"root": str(root), "counts": expected["counts"], "seed": int(seed), "size": int(size)}
    if not overwrite and _matches(_read_manifest(root), expected) and _files_present(root, expected):
        logger.info("demo dataset at %s is complete (seed %d, size %d); not regenerating", root, seed, size)
        return {**summary, "generated": False, "seconds": 0.0}

    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)  # incomplete until written again at the end
    total = sum(counts.values())
    logger.info("generating %d demo phantoms (%d px, seed %d) under %s", total, size, seed, root)
    done = 0
    for split, n in counts.items():
        folder, _, diseased = SPLITS[split]
        out_dir = root / folder
        out_dir.mkdir(parents=True, exist_ok=True)
        gt_dir = root / GT_FOLDER
        if diseased:
            gt_dir.mkdir(parents=True, exist_ok=True)
        wanted = set()
        for i in range(int(n)):
            rng = phantom_rng(seed, split, i)
            n_les = int(rng.integers(1, 4)) if diseased or (split == UNLABELLED and i % 2) else 0
            image, lesion, _ = make_phantom(rng, size=size, lesions=n_les)
            name = phantom_name(split, i)
            wanted.add(name)
            save_png(out_dir / name, image)
            if diseased:
                save_png(gt_dir / name, lesion)
            done += 1
            if done % 25 == 0 or done == total:
                logger.info("  %d/%d phantoms written", done, total)
        stale_dirs = [out_dir] + ([gt_dir] if diseased else [])
        for d in stale_dirs:
            for p in d.glob(f"{PREFIX}*.png"):
                if p.name not in wanted:
                    p.unlink()
                    logger.info("  removed stale %s", p)
    elapsed = time.perf_counter() - t0
    manifest = {**expected, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(root / MANIFEST, manifest)
    logger.info("demo dataset complete: %s (%.1f s)", root, elapsed)
    return {**summary, "generated": True, "seconds": round(elapsed, 3)}


def ensure_demo_dataset(root, **kw) -> Path:
    """Return ``root`` after generating the demo phantoms there if they are missing or do not match ``kw``.

    ``kw`` are the options of :func:`generate_demo_dataset` (``overwrite`` excluded); this is what the
    bundle configs call on first use.
    """
    kw.pop("overwrite", None)
    generate_demo_dataset(root, overwrite=False, **kw)
    return Path(root)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        prog="python -m scripts.data.phantoms",
        description="Write procedural chest-radiograph phantoms in the dataset folder convention "
                    "(for smoke runs and tests, NOT for judging accuracy).")
    ap.add_argument("--out", default="demo_data", help="dataset root (default: demo_data)")
    ap.add_argument("--n-train", type=int, default=48)
    ap.add_argument("--n-test-healthy", type=int, default=12)
    ap.add_argument("--n-test-diseased", type=int, default=12)
    ap.add_argument("--n-unlabelled", type=int, default=8, help="train/unlabelled images, half with lesions")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="regenerate even if a complete set exists")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = generate_demo_dataset(args.out, n_train=args.n_train, n_test_healthy=args.n_test_healthy,
                                    n_test_diseased=args.n_test_diseased, size=args.size, seed=args.seed,
                                    overwrite=args.overwrite, n_unlabelled=args.n_unlabelled)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
