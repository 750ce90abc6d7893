"""Chest X-ray loading: PNG/JPEG, DICOM and NIfTI to one gray channel in [0, 1].

Every reader returns a 2-D array in the orientation a person sees in a PNG viewer: rows run top to
bottom, and the patient's right lung is on the image left. Intensities are scaled to [0, 1]:

- 8-bit PNG/JPEG: ``value / 255`` (contrast is kept as stored);
- 16-bit PNG/TIFF: min-max over the image (12-bit data in 16-bit containers is common);
- DICOM: Modality LUT (rescale slope/intercept), then the VOI LUT or window when the file has one,
  MONOCHROME1 inverted so that air and lungs are dark, then min-max;
- NIfTI: the array is first put in the orientation of an identity affine (see :func:`nifti_to_view`), then
  read as ``(x, y)`` (the MONAI/ITK convention for a 2-D image), transposed to ``(row, column)``, then min-max.

Orientation: JPEG/TIFF/PNG files with an EXIF orientation tag are turned the way a viewer shows them
(:func:`exif_transpose_array`); NIfTI files follow their affine (:func:`nifti_to_view`).

Checks (each a small validator raising :class:`CXRReadError` naming the file and the reason), so that a
damaged or unsuitable file never becomes a silently wrong image:

- the pixel count is read from the header and checked against ``max_pixels`` *before* decoding
  (:func:`check_pixel_limit`; a 559 KB PNG can hold 20000 x 20000 px = 400 MP, 1.6 GB as float32);
- truncated PNG/JPEG files (OpenCV fills the missing part with grey) and empty files are refused
  (:func:`check_complete`, :func:`check_file`);
- the file's pixel format must hold at least ``min_levels`` gray levels (:func:`check_bit_depth`: 1-bit images
  are refused), and the decoded image must not be (nearly) constant (:func:`check_dynamic_range`);
- the short side must be at least ``min_size`` px (:func:`check_min_size`).

Then the image is resized to ``size x size`` with area interpolation (the paper trains at 256 px).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from custom_transforms.utils import as_2d, is_number

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGE_SUFFIXES = RASTER_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES

MAX_PIXELS = 60_000_000
"""Default ``max_pixels``: 60 MP, generous for CR/DX radiographs (a 43 x 43 cm detector at 100 um is 18.5 MP)."""
MIN_SIZE = 48
"""Default ``min_size`` (px on the short side). Smaller images carry no usable lung detail."""
MIN_LEVELS = 8
"""Default ``min_levels``: the file's pixel format must hold at least this many gray levels (1-bit: 2)."""
MIN_RANGE = 0.02
"""Default ``min_range``: the middle 98% of the pixel values (p1 to p99) must span at least this fraction of
the stored value range (255 for 8-bit data); below it the image is nearly constant."""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_EXIF_ORIENTATION = 0x0112
_STATS_SAMPLE = 1 << 20  # pixels the percentile statistics look at (a regular sub-grid of larger images)


class CXRReadError(ValueError):
    """A file could not be read as a chest X-ray; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot read chest X-ray '{path}': {reason}")


def has_dicom_preamble(path) -> bool:
    """Whether the file holds the DICOM magic ``DICM`` at bytes 128..132 (after the 128-byte preamble).

    Raises:
        OSError: the file cannot be opened or read.
    """
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def image_format(path) -> str:
    """Return ``"dicom"``, ``"nifti"`` or ``"raster"``: by the file name's suffix first, then by the DICOM preamble.

    DICOM files from PACS exports often have no suffix (``IM0001``) or a numeric one (``1.2.840....411``);
    any file whose suffix is not a known image suffix is read as DICOM when :func:`has_dicom_preamble`.

    Raises:
        CXRReadError: no known suffix and no DICOM preamble.
    """
    name = str(path).lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    if name.endswith(RASTER_SUFFIXES):
        return "raster"
    if has_dicom_preamble(path):
        return "dicom"
    raise CXRReadError(path, f"unknown image format (expected one of {', '.join(IMAGE_SUFFIXES)} or DICOM)")


# ------------------------------------------------------------------------------------------------ validators


def check_limits(max_pixels=MAX_PIXELS, min_size=MIN_SIZE, min_levels=MIN_LEVELS, min_range=MIN_RANGE) -> None:
    """Validate the reader parameters (see :func:`read_cxr`).

    Raises:
        ValueError: ``max_pixels`` is not ``None`` or a positive number, ``min_size``/``min_levels`` is not a
            non-negative int, or ``min_range`` is not in [0, 1).
    """
    if max_pixels is not None and not (is_number(max_pixels) and max_pixels > 0):
        raise ValueError(f"max_pixels must be a positive number of pixels or None (no limit), got {max_pixels!r}")
    for name, v in (("min_size", min_size), ("min_levels", min_levels)):
        if not (is_number(v) and float(v).is_integer() and v >= 0):
            raise ValueError(f"{name} must be an int >= 0 (0 switches the check off), got {v!r}")
    if not (is_number(min_range) and 0.0 <= min_range < 1.0):
        raise ValueError(f"min_range must be a fraction in [0, 1) (0 switches the check off), got {min_range!r}")


def check_file(path, what: str = "chest X-ray") -> Path:
    """The path as ``Path`` when it is a non-empty file.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        CXRReadError: the file is empty (0 bytes).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: '{path}'")
    if path.stat().st_size == 0:
        raise CXRReadError(path, "file is empty (0 bytes)")
    return path


def _megapixels(n) -> str:
    return f"{float(n) / 1e6:g} MP"


def check_pixel_limit(path, width: int, height: int, max_pixels, frames: int = 1) -> None:
    """Refuse an image whose header announces more than ``max_pixels`` pixels (``None``: no limit).

    Called with the size read from the file header, before the pixel data are decoded: a tiny compressed
    file can announce an image that needs gigabytes once decoded.

    Raises:
        CXRReadError: ``width * height * frames > max_pixels``.
    """
    n = int(width) * int(height) * int(frames)
    if max_pixels is not None and n > max_pixels:
        dims = f"{width} x {height}" + (f" x {frames} frames" if frames > 1 else "")
        raise CXRReadError(path, f"{dims} = {_megapixels(n)} exceeds the limit of {_megapixels(max_pixels)} "
                                 "(max_pixels)")


def check_bit_depth(path, bits: int | None, min_levels: int) -> None:
    """Refuse a file whose pixel format holds fewer than ``min_levels`` gray levels (``2 ** bits``).

    ``bits`` is the number of bits per sample from the header (PNG bit depth, DICOM BitsStored, NIfTI data
    type; ``None`` when unknown, e.g. floating point). A 1-bit (black-and-white) image holds 2 levels.

    Raises:
        CXRReadError: ``2 ** bits < min_levels``.
    """
    if bits is not None and 2 ** int(bits) < min_levels:
        raise CXRReadError(path, f"{bits}-bit image: at most {2 ** int(bits)} gray levels, fewer than {min_levels} "
                                 "(min_levels); a black-and-white (binarized) image is not a radiograph")


def _stored_range(raw: np.ndarray, bits: int | None, lo: float | None = None, hi: float | None = None) -> float:
    """The range of values the stored data can take: ``2 ** b - 1`` for integer data, where ``b`` is the number
    of bits the largest magnitude needs (at least 8; at most ``bits``, the declared depth, when given): 12-bit
    data in a 16-bit container has the range 4095. Floating point data without ``bits``: its largest magnitude.
    ``lo``/``hi``: ``raw``'s minimum and maximum when the caller has them (computed otherwise)."""
    if lo is None or hi is None:
        lo, hi = float(raw.min()), float(raw.max())
    peak = max(abs(lo), abs(hi))
    if raw.dtype.kind == "f" and bits is None:
        return peak
    b = max(8, int(np.ceil(peak)).bit_length())
    return float(2 ** (min(b, int(bits)) if bits is not None else b) - 1)


def _robust_span(raw: np.ndarray) -> tuple[float, float]:
    """The 1st and 99th percentiles of a 2-D image, on a regular sub-grid of at most about 2**20 pixels
    (8- and 16-bit data: nearest rank from a histogram, fast)."""
    step = max(1, int(np.ceil(np.sqrt(raw.size / _STATS_SAMPLE))))
    sample = raw[::step, ::step]
    if sample.dtype.kind == "u" and sample.dtype.itemsize <= 2:
        cdf = np.cumsum(np.bincount(sample.ravel()))
        p1, p99 = np.searchsorted(cdf, [0.01 * cdf[-1], 0.99 * cdf[-1]])
        return float(p1), float(p99)
    p1, p99 = np.percentile(sample, [1, 99])
    return float(p1), float(p99)


def check_dynamic_range(path, raw: np.ndarray, min_range: float, bits: int | None = None) -> tuple[float, float]:
    """Refuse a constant or nearly constant image (too little information to be a radiograph).

    ``raw`` is the 2-D gray image as stored (before any scaling). The check is robust to a few outliers: the
    1st to 99th percentile span (on a regular sub-grid of at most 2**20 px) must be at least ``min_range`` times
    the stored value range (see ``_stored_range``: 255 for 8-bit data, ``2 ** BitsStored - 1`` at most for
    DICOM). A constant image is always refused, even with ``min_range=0``.

    Returns:
        ``(min, max)`` of ``raw``, so that the caller need not compute them again.

    Raises:
        CXRReadError: the image is constant or its robust span is below ``min_range`` of the range.
    """
    lo, hi = float(raw.min()), float(raw.max())
    if hi <= lo:
        raise CXRReadError(path, f"image is constant (all pixels = {lo:g}); nothing to see")
    if min_range <= 0:
        return lo, hi
    p1, p99 = _robust_span(raw)
    full = _stored_range(raw, bits, lo, hi)
    if p99 - p1 < min_range * full:
        raise CXRReadError(
            path, f"image is nearly constant: 98% of its pixels lie between {p1:g} and {p99:g}, a span of "
                  f"{(p99 - p1) / full:.2%} of the stored range 0..{full:g}, below {min_range:.2%} (min_range)")
    return lo, hi


def check_min_size(path, shape, min_size: int) -> None:
    """Refuse an image whose short side is below ``min_size`` px (``shape`` is ``(rows, columns)``).

    Raises:
        CXRReadError: ``min(shape) < min_size``.
    """
    h, w = int(shape[0]), int(shape[1])
    if min(h, w) < min_size:
        raise CXRReadError(path, f"image is too small ({w} x {h} px; the short side must be at least {min_size} px, "
                                 "min_size)")


def _png_truncation(f, size: int) -> str | None:
    f.seek(max(8, size - len(_PNG_IEND)))
    if f.read() == _PNG_IEND:
        return None
    pos = 8
    while pos + 8 <= size:  # walk the chunks: each is length (4), type (4), data (length), CRC (4)
        f.seek(pos)
        length, ctype = struct.unpack(">I4s", f.read(8))
        end = pos + 12 + length
        if end > size:
            return f"chunk '{ctype.decode('latin-1')}' needs {end} bytes but the file ends after {size}"
        if ctype == b"IEND":
            return None  # complete; data after IEND is ignored by every reader
        pos = end
    return f"the file ends after {size} bytes without the closing IEND chunk"


def _pillow_decode_error(path) -> str | None:
    """Decode the whole file with Pillow, truncated data refused; the error as text, ``None`` when it decodes."""
    from PIL import Image, ImageFile

    allow = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        if allow:  # someone allowed truncated images process-wide: refuse them for this one decode
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
    except Exception as e:  # OSError "image file is truncated", SyntaxError, zlib errors, ...
        return f"{type(e).__name__}: {e}"
    finally:
        if allow:
            ImageFile.LOAD_TRUNCATED_IMAGES = allow
    return None


def check_complete(path) -> None:
    """Refuse a truncated PNG or JPEG file (recognised by its signature, whatever its suffix).

    OpenCV decodes a truncated JPEG without an error, filling the missing rows with grey. A PNG must end with
    its IEND chunk with every chunk complete; a JPEG must end with its end-of-image marker (trailing zero
    padding allowed). A JPEG without one (a cut file, or data appended after a complete image) is decoded
    with Pillow with truncated images refused, and accepted only if that succeeds. Other formats pass.

    Raises:
        CXRReadError: "truncated or corrupt PNG/JPEG ..." with the reason.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if head == PNG_SIGNATURE:
            kind, reason = "PNG", _png_truncation(f, size)
        elif head.startswith(JPEG_SIGNATURE):
            f.seek(max(0, size - 512))
            tail = f.read().rstrip(b"\x00")
            kind, reason = "JPEG", None
            if not tail.endswith(b"\xff\xd9"):
                err = _pillow_decode_error(path)
                reason = None if err is None else f"no end-of-image marker and the image data stop early ({err})"
        else:
            return
    if reason is not None:
        raise CXRReadError(path, f"truncated or corrupt {kind} file: {reason}")


# ------------------------------------------------------------------------------------------------ raster


class RasterHeader(NamedTuple):
    """What the header of a PNG/JPEG/BMP/TIFF file says, read without decoding the pixels."""

    width: int
    height: int
    bits: int  # bits per sample (PNG bit depth, JPEG precision; 1 for Pillow mode "1")
    orientation: int  # EXIF orientation 1..8 (1: as stored)
    format: str  # Pillow's format name: PNG, JPEG, BMP, TIFF, ...


def _jpeg_frame(f) -> tuple[int, int, int] | None:
    """(width, height, precision) from the first start-of-frame segment of a JPEG, ``None`` when not found."""
    f.seek(2)
    while True:
        b = f.read(1)
        if b != b"\xff":
            return None
        m = f.read(1)
        while m == b"\xff":  # fill bytes
            m = f.read(1)
        if not m or m[0] in (0xD9, 0xDA):  # end of file / image or start of scan before any frame header
            return None
        if m[0] == 0x01 or 0xD0 <= m[0] <= 0xD8:  # markers without a length
            continue
        seg = f.read(2)
        if len(seg) < 2 or struct.unpack(">H", seg)[0] < 2:  # cut short, or a length that would loop
            return None
        if m[0] in _JPEG_SOF:
            data = f.read(5)
            if len(data) < 5:
                return None
            precision, height, width = struct.unpack(">BHH", data)
            return width, height, precision
        f.seek(struct.unpack(">H", seg)[0] - 2, 1)


def _pillow_bits(mode: str) -> int:
    if mode == "1":
        return 1
    if mode.startswith("I;16"):
        return 16
    return 32 if mode in ("I", "F") else 8


def raster_header(path, max_pixels=None) -> RasterHeader:
    """Size, bit depth, EXIF orientation and format of a PNG/JPEG/BMP/TIFF file, without decoding its pixels.

    PNG and JPEG sizes are parsed from the file itself and checked against ``max_pixels`` before Pillow opens
    it (Pillow refuses images over 2 x ``PIL.Image.MAX_IMAGE_PIXELS`` with its own, less precise error); other
    formats are checked from Pillow's lazily read header.

    Raises:
        CXRReadError: not a readable raster image, or more pixels than ``max_pixels``.
    """
    from PIL import Image

    own = None
    with open(path, "rb") as f:
        head = f.read(32)
        if head.startswith(PNG_SIGNATURE) and len(head) >= 26 and head[12:16] == b"IHDR":
            width, height = struct.unpack(">II", head[16:24])
            own = (width, height, head[24])
        elif head.startswith(JPEG_SIGNATURE):
            own = _jpeg_frame(f)
    if own is not None:
        check_pixel_limit(path, own[0], own[1], max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                size, mode, fmt = im.size, im.mode, im.format
                try:  # Pillow's PNG getexif() decodes the whole image to look for EXIF after the pixel data
                    exif = im.getexif() if fmt != "PNG" or "exif" in im.info else {}
                    orientation = int(exif.get(_EXIF_ORIENTATION, 1))
                except Exception:  # a damaged EXIF block: read the pixels as stored
                    orientation = 1
    except Image.DecompressionBombError as e:  # only when max_pixels is above Pillow's own limit
        dims = f"{own[0]} x {own[1]} = {_megapixels(own[0] * own[1])}" if own is not None else "the image"
        raise CXRReadError(path, f"{dims} is over Pillow's decompression-bomb limit ({e}); raise "
                                 "PIL.Image.MAX_IMAGE_PIXELS to read it") from e
    except Exception as e:  # UnidentifiedImageError, SyntaxError, struct errors, ...
        raise CXRReadError(path, f"not a readable PNG/JPEG/BMP/TIFF image (corrupt or wrong format: "
                                 f"{type(e).__name__}: {e})") from e
    if orientation not in range(1, 9):
        logger.warning("%s: invalid EXIF orientation %s ignored (read as stored)", path, orientation)
        orientation = 1
    width, height, bits = own if own is not None else (*size, _pillow_bits(mode))
    check_pixel_limit(path, width, height, max_pixels)
    return RasterHeader(int(width), int(height), int(bits), orientation, str(fmt))


def exif_transpose_array(a: np.ndarray, orientation: int) -> np.ndarray:
    """Turn an ``(H, W[, C])`` array stored with EXIF ``orientation`` (1..8) the way a viewer shows it.

    The same transforms as ``PIL.ImageOps.exif_transpose``: 2 mirror, 3 rotate 180, 4 flip, 5 transpose,
    6 rotate 90 clockwise, 7 transverse, 8 rotate 90 counter-clockwise.

    Raises:
        ValueError: ``orientation`` is not in 1..8.
    """
    ops = {
        1: lambda x: x,
        2: lambda x: x[:, ::-1],
        3: lambda x: x[::-1, ::-1],
        4: lambda x: x[::-1],
        5: lambda x: x.swapaxes(0, 1),
        6: lambda x: np.rot90(x, -1),
        7: lambda x: x[::-1, ::-1].swapaxes(0, 1),
        8: lambda x: np.rot90(x, 1),
    }
    if orientation not in ops:
        raise ValueError(f"EXIF orientation must be 1..8, got {orientation!r}")
    return np.ascontiguousarray(ops[orientation](a))


def _read_tiff_as_stored(path) -> np.ndarray:
    """A TIFF's first page as stored: OpenCV (and Pillow for 5..8) apply a TIFF orientation tag themselves,
    inconsistently, so oriented TIFFs are read with tifffile (a scikit-image dependency)."""
    try:
        import tifffile
    except ImportError as e:  # pragma: no cover - tifffile comes with scikit-image
        raise CXRReadError(path, "a TIFF with an orientation tag needs the 'tifffile' package") from e
    try:
        a = np.asarray(tifffile.imread(str(path), key=0))
    except Exception as e:
        raise CXRReadError(path, f"TIFF pixel data cannot be decoded ({type(e).__name__}: {e})") from e
    if a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[-1] not in (3, 4):  # planar RGB(A)
        a = np.moveaxis(a, 0, -1)
    return a


def _decode_raster(path, header: RasterHeader) -> np.ndarray:
    """Decode a PNG/JPEG/BMP/TIFF as stored (RGB order) and turn it by its EXIF orientation."""
    if header.format == "TIFF" and header.orientation != 1:
        a = _read_tiff_as_stored(path)
    else:
        a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # UNCHANGED: EXIF orientation not applied (JPEG/PNG)
        if a is None:
            raise CXRReadError(path, "not a readable PNG/JPEG/BMP/TIFF image (corrupt or wrong format)")
        if a.ndim == 3 and a.shape[-1] in (3, 4):
            a = a[..., 2::-1] if a.shape[-1] == 3 else a[..., [2, 1, 0, 3]]  # OpenCV is BGR(A)
    return exif_transpose_array(a, header.orientation) if header.orientation != 1 else a


def _minmax(a: np.ndarray, path, lo_hi: tuple[float, float] | None = None) -> np.ndarray:
    """Scale to [0, 1] by min-max. ``lo_hi``: the minimum and maximum of ``a`` as given (before the float32
    cast; float32 rounding is monotonic, so they round to the float32 array's own), when the caller has them."""
    a = a.astype(np.float32, copy=False)
    if not np.all(np.isfinite(a)):
        raise CXRReadError(path, "image contains NaN or infinite values")
    lo, hi = (float(a.min()), float(a.max())) if lo_hi is None else (float(np.float32(lo_hi[0])),
                                                                      float(np.float32(lo_hi[1])))
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


def _raster_raw(path, max_pixels, min_levels: int = 0) -> np.ndarray:
    """The raster pixels as stored (EXIF-turned): header, ``max_pixels``, bit depth (``min_levels``; 0: no
    check) and truncation checked before decoding."""
    header = raster_header(path, max_pixels)
    check_bit_depth(path, header.bits, min_levels)
    check_complete(path)
    return _decode_raster(path, header)


def read_raster(path, *, max_pixels=MAX_PIXELS, min_levels: int = MIN_LEVELS,
                min_range: float = MIN_RANGE) -> np.ndarray:
    """PNG/JPEG/BMP/TIFF (8- or 16-bit; L, LA, RGB, RGBA, I;16, palette) -> float32 (H, W) in [0, 1].

    The header is checked first (:func:`raster_header`, :func:`check_bit_depth`, :func:`check_complete`), then
    the pixels are decoded, turned by the EXIF orientation and checked by :func:`check_dynamic_range`.

    Raises:
        CXRReadError: unreadable, truncated, too many pixels, too few gray levels, (nearly) constant, or an
            unsupported pixel type.
    """
    a = _raster_raw(path, max_pixels, min_levels)
    if a.ndim == 3 and a.shape[-1] == 2:  # gray + alpha
        a = a[..., 0]
    g = _gray(a, path)
    if a.dtype == np.uint8:
        check_dynamic_range(path, g, min_range, bits=8)
        return (g.astype(np.float32) / 255.0).clip(0.0, 1.0)
    if a.dtype not in (np.uint16, np.int16, np.int32, np.float32, np.float64):
        raise CXRReadError(path, f"unsupported pixel type {a.dtype}")
    lo_hi = check_dynamic_range(path, g, min_range, bits=None if a.dtype.kind == "f" else 8 * a.dtype.itemsize)
    return _minmax(g, path, lo_hi)


# ------------------------------------------------------------------------------------------------ DICOM

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _dicom_dataset(path):
    """Read a DICOM file as a pydicom dataset (pixel data read as bytes, not decoded); no checks."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path))
    except InvalidDicomError as e:
        raise CXRReadError(path, f"not a DICOM file ({e})") from e
    except Exception as e:  # truncated headers, bad value lengths, ...
        raise CXRReadError(path, f"not a readable DICOM file ({type(e).__name__}: {e})") from e


def _check_dicom_header(ds, path, max_pixels) -> None:
    """Refuse a dataset without pixel data, or whose Rows x Columns (x frames) exceed ``max_pixels``."""
    if not any(tag in ds for tag in _PIXEL_TAGS):
        sop = getattr(ds.get("SOPClassUID"), "name", None) or ds.get("SOPClassUID", "unknown SOP class")
        raise CXRReadError(path, f"DICOM file has no pixel data ({sop}): not an image")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise CXRReadError(path, "DICOM file has pixel data but no Rows/Columns")
    check_pixel_limit(path, int(cols), int(rows), max_pixels, frames=int(ds.get("NumberOfFrames", 1) or 1))


def _dicom_bits(ds) -> int | None:
    bits = ds.get("BitsStored") or ds.get("BitsAllocated")
    return int(bits) if bits else None


def _dicom_raw(ds, path, max_pixels, min_levels: int = 0) -> np.ndarray:
    """The stored pixels of the first frame of a dataset: header, ``max_pixels`` and bit depth (``min_levels``;
    0: no check) checked before decoding."""
    _check_dicom_header(ds, path, max_pixels)
    check_bit_depth(path, _dicom_bits(ds), min_levels)
    try:
        arr = ds.pixel_array
    except Exception as e:  # decoders raise many types; name the file and keep the cause
        raise CXRReadError(path, f"DICOM pixel data cannot be decoded ({type(e).__name__}: {e})") from e
    if arr.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        logger.warning("%s: multi-frame DICOM, using the first frame", path)
        arr = arr[0]
    elif arr.ndim == 4:  # multi-frame colour: (frames, H, W, samples)
        logger.warning("%s: multi-frame DICOM, using the first frame", path)
        arr = arr[0]
    return np.asarray(arr)


def dicom_to_image(ds, path="<DICOM dataset>", *, max_pixels=MAX_PIXELS, min_levels: int = MIN_LEVELS,
                   min_range: float = MIN_RANGE) -> np.ndarray:
    """An already read pydicom ``Dataset`` -> float32 (H, W) in [0, 1]: Modality LUT, VOI LUT/window, MONOCHROME1
    inverted, min-max (what :func:`read_dicom` does after reading the file).

    The dataset must hold pixel data; Rows x Columns (x frames) are checked against ``max_pixels`` and
    BitsStored against ``min_levels`` before the pixel data are decoded; of a multi-frame dataset the first
    frame is used; the stored values are checked by :func:`check_dynamic_range`. ``path`` only names the
    source in messages. The short side is not checked: see :func:`read_cxr_dataset`.

    Raises:
        CXRReadError: no pixel data, too many pixels, too few gray levels, undecodable pixel data, or a (nearly)
            constant image.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    arr = _dicom_raw(ds, path, max_pixels, min_levels)
    bits = _dicom_bits(ds)
    check_dynamic_range(path, _gray(arr, path), min_range, bits=bits if bits and arr.dtype.kind in "iu" else None)
    a = apply_modality_lut(arr, ds)
    if "VOILUTSequence" in ds:  # a LUT maps integer inputs: index it with the rounded Modality LUT output
        a = apply_voi_lut(np.rint(a).astype(np.int64), ds)
    elif "WindowCenter" in ds:
        a = apply_voi_lut(a, ds)
    a = _gray(np.asarray(a), path)
    a = _minmax(a, path)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        a = 1.0 - a
    return a


def read_dicom(path, *, max_pixels=MAX_PIXELS, min_levels: int = MIN_LEVELS,
               min_range: float = MIN_RANGE) -> np.ndarray:
    """DICOM file -> float32 (H, W) in [0, 1]: Modality LUT, VOI LUT/window, MONOCHROME1 inverted.

    Reads the file and hands the dataset to :func:`dicom_to_image` (checks: ``max_pixels``, ``min_levels``,
    ``min_range``).

    Raises:
        CXRReadError: not DICOM, no pixel data, too many pixels, too few gray levels, undecodable pixel data, or
            a (nearly) constant image.
    """
    return dicom_to_image(_dicom_dataset(path), path, max_pixels=max_pixels, min_levels=min_levels,
                          min_range=min_range)


# ------------------------------------------------------------------------------------------------ NIfTI


def nifti_to_view(data: np.ndarray, affine: np.ndarray, path) -> np.ndarray:
    """A 2-D NIfTI voxel array and its affine -> ``(row, column)`` array as a viewer of the project shows it.

    Convention: the image is first reoriented to the closest canonical (RAS+) voxel order of its affine,
    i.e. to what the same picture saved with an identity affine stores (``nibabel.orientations.io_orientation``
    and ``apply_orientation``: axis flips and permutations only, no resampling), then read as ``(x, y)``:
    the first voxel axis runs along the columns (left to right), the second along the rows (top to bottom).
    This is how MONAI (``LoadImage``/``SaveImage``) and this project write 2-D images (``np.eye(4)`` affine,
    data = the transposed ``(row, column)`` picture), so such files read unchanged, and a file saved with a
    flipped or permuted affine reads the same as the plain one. Singleton axes (``(x, y, 1)``) are dropped.

    Raises:
        CXRReadError: the data are not one 2-D image.
    """
    from nibabel.orientations import apply_orientation, io_orientation

    a = np.asarray(data)
    if a.ndim > 3 and all(n == 1 for n in a.shape[3:]):
        a = a.reshape(a.shape[:3])
    if a.ndim > 3 or sum(n > 1 for n in a.shape) != 2:
        raise CXRReadError(path, f"expected a 2-D NIfTI image, got shape {np.shape(data)}")
    a = a.reshape(a.shape + (1,) * (3 - a.ndim))
    ornt = io_orientation(np.asarray(affine, dtype=np.float64))
    if np.isnan(ornt).any():  # a degenerate affine: nothing to go by
        logger.warning("%s: NIfTI affine gives no orientation; reading the array as stored", path)
    else:
        a = apply_orientation(a, ornt)
    return np.squeeze(a).T


def _nifti_image(path, max_pixels):
    """The lazily loaded NIfTI image (header only), checked to be 2-D and within ``max_pixels``."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(n) for n in img.shape)
    except Exception as e:  # nibabel raises ImageFileError, EOFError, zlib errors, ...
        raise CXRReadError(path, f"not a readable NIfTI file ({type(e).__name__}: {e})") from e
    dims = [n for n in shape if n > 1]
    if len(dims) != 2:
        raise CXRReadError(path, f"expected a 2-D NIfTI image, got shape {shape}")
    check_pixel_limit(path, dims[0], dims[1], max_pixels)
    return img


def _nifti_data(img, path) -> np.ndarray:
    try:
        return np.asarray(img.dataobj)
    except Exception as e:
        raise CXRReadError(path, f"not a readable NIfTI file ({type(e).__name__}: {e})") from e


def _nifti_raw(path, max_pixels, min_levels: int = 0) -> np.ndarray:
    """The NIfTI data in view orientation (:func:`nifti_to_view`): 2-D shape, ``max_pixels`` and bit depth
    (``min_levels``; 0: no check) checked before the data are read."""
    img = _nifti_image(path, max_pixels)
    dtype = np.dtype(img.get_data_dtype())
    check_bit_depth(path, 1 if dtype.kind == "b" else (8 * dtype.itemsize if dtype.kind in "iu" else None),
                    min_levels)
    return nifti_to_view(_nifti_data(img, path), img.affine, path)


def read_nifti(path, *, max_pixels=MAX_PIXELS, min_levels: int = MIN_LEVELS,
               min_range: float = MIN_RANGE) -> np.ndarray:
    """NIfTI -> float32 (H, W) in [0, 1], oriented by its affine and transposed to (row, col): :func:`nifti_to_view`.

    The header shape is checked against ``max_pixels`` and the data type against ``min_levels`` before the
    data are read; the values are checked by :func:`check_dynamic_range`.

    Raises:
        CXRReadError: not NIfTI, not 2-D, too many pixels, too few gray levels, or a (nearly) constant image.
    """
    a = _nifti_raw(path, max_pixels, min_levels)
    if a.dtype.kind == "b":
        a = a.astype(np.uint8)
    lo_hi = check_dynamic_range(path, a, min_range, bits=8 * a.dtype.itemsize if a.dtype.kind in "iu" else None)
    return _minmax(a, path, lo_hi)


# ------------------------------------------------------------------------------------------------ public API


def read_cxr(path, *, max_pixels=MAX_PIXELS, min_size: int = MIN_SIZE, min_levels: int = MIN_LEVELS,
             min_range: float = MIN_RANGE) -> np.ndarray:
    """Read any supported chest X-ray file at its native size as float32 (H, W) in [0, 1].

    Args:
        path: PNG/JPEG/BMP/TIFF, DICOM (by suffix or by its ``DICM`` preamble) or 2-D NIfTI file.
        max_pixels: most pixels the header may announce (default :data:`MAX_PIXELS`, 60 MP); ``None``: no limit.
        min_size: least length of the short side in px (default :data:`MIN_SIZE`); 0: no check.
        min_levels: least number of gray levels the file's pixel format holds (default :data:`MIN_LEVELS`, so
            1-bit images are refused); 0: no check.
        min_range: least p1-p99 span as a fraction of the stored range (default :data:`MIN_RANGE`); 0: only
            constant images are refused.

    Raises:
        FileNotFoundError: no file at ``path``.
        CXRReadError: the file cannot be read or fails a check (the message names the file and the reason).
        ValueError: a parameter is out of range.
    """
    check_limits(max_pixels, min_size, min_levels, min_range)
    path = check_file(path)
    reader = {"raster": read_raster, "dicom": read_dicom, "nifti": read_nifti}[image_format(path)]
    img = reader(path, max_pixels=max_pixels, min_levels=min_levels, min_range=min_range)
    check_min_size(path, img.shape, min_size)
    return img


def read_cxr_dataset(ds, path="<DICOM dataset>", *, max_pixels=MAX_PIXELS, min_size: int = MIN_SIZE,
                     min_levels: int = MIN_LEVELS, min_range: float = MIN_RANGE) -> np.ndarray:
    """:func:`read_cxr` for an already read pydicom ``Dataset``: :func:`dicom_to_image` and the same checks
    (parameters as :func:`read_cxr`, ``min_size`` included); ``path`` only names the source in messages.

    Raises:
        CXRReadError: the dataset fails a check (the message names ``path`` and the reason).
        ValueError: a parameter is out of range.
    """
    check_limits(max_pixels, min_size, min_levels, min_range)
    img = dicom_to_image(ds, path, max_pixels=max_pixels, min_levels=min_levels, min_range=min_range)
    check_min_size(path, img.shape, min_size)
    return img


def read_raw(path, fmt: str | None = None, *, max_pixels=MAX_PIXELS) -> np.ndarray:
    """The pixels of an image file as stored (no scaling, no gray-level or contrast checks): raster files
    EXIF-turned, NIfTI in view orientation, DICOM its first frame. ``fmt``: :func:`image_format` (found when
    None). The header checks (``max_pixels``, truncation, pixel data) apply.

    Raises:
        CXRReadError: the file cannot be read, is truncated or has more than ``max_pixels`` pixels.
    """
    fmt = image_format(path) if fmt is None else fmt
    if fmt == "raster":
        return _raster_raw(path, max_pixels)
    if fmt == "nifti":
        return _nifti_raw(path, max_pixels)
    return _dicom_raw(_dicom_dataset(path), path, max_pixels)


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
        return is_number(s) and float(s).is_integer() and s >= 8

    ok = is_px(size) or (isinstance(size, (list, tuple)) and len(size) == 2 and all(map(is_px, size)))
    if not ok:
        raise ValueError(f"image size must be an int >= 8 or a (height, width) pair, got {size!r}")
    return int(size) if is_px(size) else (int(size[0]), int(size[1]))


def load_cxr(path, size: int | Sequence[int] | None = 256, *, max_pixels=MAX_PIXELS, min_size: int = MIN_SIZE,
             min_levels: int = MIN_LEVELS, min_range: float = MIN_RANGE) -> np.ndarray:
    """Read a chest X-ray and resize it: float32 (size, size) in [0, 1]; ``size=None`` keeps it.

    The checks and their parameters are those of :func:`read_cxr`.

    Raises:
        FileNotFoundError: no file at ``path``.
        CXRReadError: the file cannot be read or fails a check.
    """
    img = read_cxr(path, max_pixels=max_pixels, min_size=min_size, min_levels=min_levels, min_range=min_range)
    return img if size is None else resize(img, size).clip(0.0, 1.0)


def load_mask(path, size: int | Sequence[int] | None = 256, *, max_pixels=MAX_PIXELS) -> np.ndarray:
    """Read a binary lesion/lung mask (any nonzero = 1), resized with nearest neighbour: float32 0/1.

    Masks are oriented like images (EXIF orientation, NIfTI affine) and checked for ``max_pixels``, emptiness
    and truncation, but not for gray levels, contrast or size (masks are binary and may be empty).

    Raises:
        FileNotFoundError: no file at ``path``.
        CXRReadError: the file cannot be read, is truncated or has more than ``max_pixels`` pixels.
    """
    check_limits(max_pixels)
    path = check_file(path, "mask")
    a = read_raw(path, max_pixels=max_pixels)
    a = a.max(axis=-1) if a.ndim == 3 else a  # colour / gray + alpha: any nonzero channel
    if a.ndim != 2:
        raise CXRReadError(path, f"expected a 2-D mask, got array of shape {a.shape}")
    m = (a > 0).astype(np.float32)
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

    ``max_pixels``, ``min_size``, ``min_levels`` and ``min_range`` are the checks of :func:`read_cxr` (masks get
    ``max_pixels`` only).

    Raises:
        ValueError: ``size`` or a check parameter is invalid (at construction).
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        size: int | Sequence[int] = 256,
        mask_keys: KeysCollection = (),
        allow_missing_keys: bool = False,
        max_pixels: int | float | None = MAX_PIXELS,
        min_size: int = MIN_SIZE,
        min_levels: int = MIN_LEVELS,
        min_range: float = MIN_RANGE,
    ):
        mask_keys = (mask_keys,) if isinstance(mask_keys, str) else tuple(mask_keys)
        super().__init__(tuple(self._as_tuple(keys)) + mask_keys, allow_missing_keys)
        self.size = check_size(size)
        self.mask_keys = mask_keys
        check_limits(max_pixels, min_size, min_levels, min_range)
        self.checks = {"max_pixels": max_pixels, "min_size": min_size, "min_levels": min_levels,
                       "min_range": min_range}

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
        if isinstance(path, (torch.Tensor, np.ndarray)):  # already in memory (cache, MONAI Deploy): conform
            return {key: self._conform(key, path, shape)}
        is_mask = key in self.mask_keys
        if path is None:
            if is_mask and self.allow_missing_keys:
                return {}
            raise KeyError(f"key '{key}' is None; expected a file path")
        if is_mask:
            native = load_mask(path, size=None, max_pixels=self.checks["max_pixels"])
        else:
            native = read_cxr(path, **self.checks)
        arr = resize(native, shape, nearest=is_mask)
        meta = _meta(path, native.shape, image_format(path))
        meta["spatial_shape"] = tuple(arr.shape)
        out = {key: MetaTensor(torch.from_numpy(np.ascontiguousarray(arr, np.float32))[None], meta=meta)}
        if is_mask:
            out[f"has_{key}"] = 1
        return out

    def _conform(self, key, arr, shape):
        """An in-memory image: ``(H, W)`` or ``(1, H, W)``, values as read (:func:`read_cxr`'s [0, 1]); returned
        as is when it already has ``shape``, else resized exactly as a file would be (area/linear, or nearest for
        masks), so a MONAI Deploy operator that hands over the pixels of a file gets the same network input."""
        spatial = tuple(int(s) for s in arr.shape[-2:])
        if spatial == tuple(shape) and arr.ndim == 3 and arr.shape[0] == 1:
            return arr
        native = as_2d(arr, f"LoadCXRd in-memory '{key}'").astype(np.float32)
        lo, hi = float(native.min()), float(native.max())
        if key not in self.mask_keys and (lo < -1e-6 or hi > 1.0 + 1e-6):
            raise ValueError(f"LoadCXRd: in-memory '{key}' must hold values in [0, 1] (as read_cxr returns), got "
                             f"[{lo:g}, {hi:g}]; scale it first")
        out = resize(native, shape, nearest=key in self.mask_keys)
        meta = dict(getattr(arr, "meta", None) or {})
        meta.setdefault("original_spatial_shape", spatial)
        meta.setdefault("original_channel_dim", "no_channel")
        meta["spatial_shape"] = tuple(out.shape)
        return MetaTensor(torch.from_numpy(np.ascontiguousarray(out, np.float32))[None], meta=meta)


def file_sha256(path) -> str:
    """sha256 hex digest of the file at ``path``, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


TEMP_SUFFIX = ".tmp"


def temp_path(path) -> Path:
    """The temporary file of an atomic write of ``path``: ``.<name>.<pid>.tmp`` in the same folder (the pid lets
    ``scripts.robust.remove_stale_temp_files`` tell a killed writer's leftover from a live one)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")


def fsync_dir(folder) -> None:
    """Flush a folder's entries (a rename in it) to disk, where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_synced(tmp, path) -> None:
    """``os.replace(tmp, path)``, then flush the folder so that the rename survives a power loss."""
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def atomic_write_bytes(path, data: bytes, sync: bool = False) -> None:
    """Write ``data`` to ``path`` through :func:`temp_path` and ``os.replace``: readers see the old file or the new
    one, never a part. ``sync``: also ``fsync`` the file and the folder (checkpoints; outputs skip the cost)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        replace_synced(tmp, path) if sync else os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def json_bytes(obj) -> bytes:
    """``obj`` as indented JSON text (values JSON cannot hold are written as ``str``)."""
    return (json.dumps(obj, indent=2, default=str) + "\n").encode()


def write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON atomically (:func:`json_bytes`)."""
    atomic_write_bytes(path, json_bytes(obj))


def png_bytes(img: np.ndarray) -> bytes:
    """A 2-D float [0, 1] (or uint8) array, or an (H, W, 3) RGB array, encoded as an 8-bit PNG."""
    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if a.ndim == 3:
        a = a[..., ::-1]  # RGB -> BGR for OpenCV
    ok, buf = cv2.imencode(".png", a)
    if not ok:
        raise ValueError(f"cannot encode a PNG of shape {a.shape}")
    return buf.tobytes()


def save_png(path, img: np.ndarray) -> None:
    """Save a 2-D float [0, 1] (or uint8) array, or an (H, W, 3) RGB array, as an 8-bit PNG atomically."""
    try:
        data = png_bytes(img)
    except ValueError as e:
        raise ValueError(f"cannot encode PNG for '{path}': {e}") from e
    atomic_write_bytes(path, data)


def atomic_write_folder(folder, files: Mapping[str, bytes]) -> None:
    """Make ``folder`` hold exactly ``files`` (name -> bytes), never a mix of old and new files.

    The files are written to a temporary sibling folder, which then replaces ``folder`` (the old one is moved
    aside first and removed after), so a reader sees the old set, then the new one.
    """
    import shutil

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (folder.with_name(f".{folder.name}.{tag}{os.getpid()}") for tag in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
