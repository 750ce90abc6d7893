"""Chest X-ray loading: PNG/JPEG, DICOM and NIfTI to one gray channel in [0, 1].

Every reader returns a 2-D array in the orientation a person sees in a PNG viewer: rows run top to
bottom, and the patient's right lung is on the image left. Intensities are scaled to [0, 1]:

- 8-bit PNG/JPEG: ``value / 255`` (contrast is kept as stored);
- 16-bit PNG/TIFF: min-max over the image (12-bit data in 16-bit containers is common);
- DICOM: Modality LUT (rescale slope/intercept), then the VOI LUT or window when the file has one,
  MONOCHROME1 inverted so that air and lungs are dark, then min-max;
- NIfTI: the array is read as ``(x, y)`` (the MONAI/ITK convention for a 2-D image), transposed to
  ``(row, column)``, then min-max.

Then the image is resized to ``size x size`` with area interpolation (the paper trains at 256 px).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGE_SUFFIXES = RASTER_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES


class CXRReadError(ValueError):
    """A file could not be read as a chest X-ray; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot read chest X-ray '{path}': {reason}")


def image_format(path) -> str:
    """Return ``"dicom"``, ``"nifti"`` or ``"raster"`` from the file name (DICOM also by its magic)."""
    name = str(path).lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    if name.endswith(RASTER_SUFFIXES):
        return "raster"
    with open(path, "rb") as f:  # DICOM files often have no suffix: look for the preamble tag
        head = f.read(132)
    if len(head) == 132 and head[128:132] == b"DICM":
        return "dicom"
    raise CXRReadError(path, f"unknown image format (expected one of {', '.join(IMAGE_SUFFIXES)} or DICOM)")


def _minmax(a: np.ndarray, path) -> np.ndarray:
    a = a.astype(np.float32, copy=False)
    if not np.all(np.isfinite(a)):
        raise CXRReadError(path, "image contains NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        raise CXRReadError(path, f"image is constant (all pixels = {lo:g}); nothing to see")
    return (a - lo) / (hi - lo)


def _gray(a: np.ndarray, path) -> np.ndarray:
    """Collapse RGB/RGBA (H, W, C) to luminance; keep 2-D arrays as they are."""
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        rgb = a[..., :3].astype(np.float32)
        return rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    if a.ndim == 3 and a.shape[-1] == 1:
        return a[..., 0]
    if a.ndim != 2:
        raise CXRReadError(path, f"expected a 2-D gray or RGB(A) image, got array of shape {a.shape}")
    return a


def read_raster(path) -> np.ndarray:
    """PNG/JPEG/BMP/TIFF (8- or 16-bit; L, LA, RGB, RGBA, I;16, palette) -> float32 (H, W) in [0, 1]."""
    a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if a is None:
        raise CXRReadError(path, "not a readable PNG/JPEG/BMP/TIFF image (corrupt or wrong format)")
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        a = a[..., 2::-1] if a.shape[-1] == 3 else a[..., [2, 1, 0, 3]]  # OpenCV is BGR(A)
    if a.ndim == 3 and a.shape[-1] == 2:  # gray + alpha
        a = a[..., 0]
    depth_max = {np.dtype(np.uint8): 255.0}.get(a.dtype)
    g = _gray(a, path)
    if depth_max is not None:
        if g.max() <= g.min():
            raise CXRReadError(path, f"image is constant (all pixels = {g.min():g}); nothing to see")
        return (g.astype(np.float32) / depth_max).clip(0.0, 1.0)
    if a.dtype not in (np.uint16, np.int16, np.int32, np.float32, np.float64):
        raise CXRReadError(path, f"unsupported pixel type {a.dtype}")
    return _minmax(g, path)


def read_dicom(path) -> np.ndarray:
    """DICOM -> float32 (H, W) in [0, 1]: Modality LUT, VOI LUT/window, MONOCHROME1 inverted."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array
    except InvalidDicomError as e:
        raise CXRReadError(path, f"not a DICOM file ({e})") from e
    except (AttributeError, KeyError) as e:
        raise CXRReadError(path, "DICOM file has no pixel data") from e
    except Exception as e:  # decoders raise many types; name the file and keep the cause
        raise CXRReadError(path, f"DICOM pixel data cannot be decoded ({type(e).__name__}: {e})") from e
    if arr.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        logger.warning("%s: multi-frame DICOM, using the first frame", path)
        arr = arr[0]
    a = apply_modality_lut(arr, ds)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        a = apply_voi_lut(a, ds)
    a = _gray(np.asarray(a), path)
    a = _minmax(a, path)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        a = 1.0 - a
    return a


def read_nifti(path) -> np.ndarray:
    """NIfTI -> float32 (H, W) in [0, 1]; the stored (x, y[, 1]) array is transposed to (row, col)."""
    import nibabel as nib

    try:
        a = np.asarray(nib.load(str(path)).dataobj)
    except Exception as e:  # nibabel raises ImageFileError, EOFError, zlib errors, ...
        raise CXRReadError(path, f"not a readable NIfTI file ({type(e).__name__}: {e})") from e
    a = np.squeeze(a)
    if a.ndim != 2:
        raise CXRReadError(path, f"expected a 2-D NIfTI image, got shape {a.shape}")
    return _minmax(a.T, path)


def read_cxr(path) -> np.ndarray:
    """Read any supported chest X-ray file at its native size as float32 (H, W) in [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"chest X-ray file not found: '{path}'")
    if path.stat().st_size == 0:
        raise CXRReadError(path, "file is empty (0 bytes)")
    reader = {"raster": read_raster, "dicom": read_dicom, "nifti": read_nifti}[image_format(path)]
    img = reader(path)
    if min(img.shape) < 8:
        raise CXRReadError(path, f"image is too small ({img.shape[1]} x {img.shape[0]} px)")
    return img


def resize(img: np.ndarray, size: int | Sequence[int], nearest: bool = False) -> np.ndarray:
    """Resize a 2-D array to ``size`` (int = square, or (H, W)); area interpolation unless ``nearest``."""
    h, w = (size, size) if np.isscalar(size) else tuple(size)
    if img.shape == (h, w):
        return img
    interp = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if h < img.shape[0] else cv2.INTER_LINEAR)
    return cv2.resize(img, (int(w), int(h)), interpolation=interp)


def check_size(size) -> int | tuple[int, int]:
    """Validate an image size: an int >= 8 or a (height, width) pair of such ints."""
    def is_px(s) -> bool:
        return isinstance(s, (int, np.integer, float, np.floating)) and not isinstance(s, bool) \
            and float(s).is_integer() and s >= 8

    ok = is_px(size) or (isinstance(size, (list, tuple)) and len(size) == 2 and all(map(is_px, size)))
    if not ok:
        raise ValueError(f"image size must be an int >= 8 or a (height, width) pair, got {size!r}")
    return int(size) if is_px(size) else (int(size[0]), int(size[1]))


def load_cxr(path, size: int | Sequence[int] | None = 256) -> np.ndarray:
    """Read a chest X-ray and resize it: float32 (size, size) in [0, 1]; ``size=None`` keeps it."""
    img = read_cxr(path)
    return img if size is None else resize(img, size).clip(0.0, 1.0)


def load_mask(path, size: int | Sequence[int] | None = 256) -> np.ndarray:
    """Read a binary lesion/lung mask (any nonzero = 1), resized with nearest neighbour: float32 0/1."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: '{path}'")
    fmt = image_format(path)
    if fmt == "raster":
        a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if a is None:
            raise CXRReadError(path, "not a readable mask image")
        a = a.max(axis=-1) if a.ndim == 3 else a
    elif fmt == "nifti":
        import nibabel as nib

        a = np.squeeze(np.asarray(nib.load(str(path)).dataobj)).T
    else:
        import pydicom

        a = pydicom.dcmread(str(path)).pixel_array
    m = (np.asarray(a) > 0).astype(np.float32)
    return m if size is None else resize(m, size, nearest=True)


def _meta(path, native_shape, fmt: str) -> dict:
    return {
        "filename_or_obj": str(path),
        "original_spatial_shape": tuple(int(s) for s in native_shape),
        "spatial_shape": None,  # set by the caller
        "original_channel_dim": "no_channel",
        "format": fmt,
    }


class LoadCXRd(MapTransform):
    """Load chest X-rays (``d[key]`` is a path) into ``MetaTensor`` of shape (1, size, size) in [0, 1].

    Keys listed in ``mask_keys`` are read as binary masks (nearest-neighbour resize). A mask key that is
    missing or ``None`` becomes an all-zero mask when ``allow_missing_keys`` is set, and
    ``d[f"has_{key}"]`` records whether a real mask was read, so batches of mixed samples collate.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        size: int | Sequence[int] = 256,
        mask_keys: KeysCollection = (),
        allow_missing_keys: bool = False,
    ):
        mask_keys = (mask_keys,) if isinstance(mask_keys, str) else tuple(mask_keys)
        super().__init__(tuple(self._as_tuple(keys)) + mask_keys, allow_missing_keys)
        self.size = check_size(size)
        self.mask_keys = mask_keys

    @staticmethod
    def _as_tuple(keys):
        return (keys,) if isinstance(keys, str) else keys

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        shape = (self.size, self.size) if isinstance(self.size, int) else self.size
        for key in self.key_iterator(d):
            d.update(self._load(key, d[key], shape))
        if self.allow_missing_keys:
            for key in self.mask_keys:
                if d.get(key) is None:
                    d[key] = MetaTensor(torch.zeros((1, *shape)), meta={"filename_or_obj": ""})
                    d[f"has_{key}"] = 0
        return d

    def _load(self, key, path, shape) -> dict:
        if isinstance(path, (torch.Tensor, np.ndarray)):  # already loaded (e.g. cached): pass through
            return {key: path}
        is_mask = key in self.mask_keys
        if path is None:
            if is_mask and self.allow_missing_keys:
                return {}
            raise KeyError(f"key '{key}' is None; expected a file path")
        native = read_cxr(path) if not is_mask else load_mask(path, size=None)
        arr = resize(native, shape, nearest=is_mask)
        meta = _meta(path, native.shape, image_format(path))
        meta["spatial_shape"] = tuple(arr.shape)
        out = {key: MetaTensor(torch.from_numpy(np.ascontiguousarray(arr, np.float32))[None], meta=meta)}
        if is_mask:
            out[f"has_{key}"] = 1
        return out


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON atomically (values JSON cannot hold are written as ``str``)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def save_png(path, img: np.ndarray) -> None:
    """Save a 2-D float [0, 1] (or uint8) array, or an (H, W, 3) RGB array, as an 8-bit PNG atomically."""
    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if a.ndim == 3:
        a = a[..., ::-1]  # RGB -> BGR for OpenCV
    ok, buf = cv2.imencode(".png", a)
    if not ok:
        raise ValueError(f"cannot encode PNG for '{path}'")
    atomic_write_bytes(path, buf.tobytes())
