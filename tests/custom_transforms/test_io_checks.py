"""Reader checks that keep damaged or unsuitable files from becoming silently wrong images.

Truncated and empty files, EXIF orientation, NIfTI affines, the pixel limit read from the header, too small
images, 1-bit and nearly constant images, DICOM found by its content and DICOM without pixel data.
"""

import struct
import time
import zlib

import cv2
import nibabel as nib
import numpy as np
import pytest
from PIL import Image, ImageOps

from custom_transforms.io import (
    MAX_PIXELS,
    MIN_LEVELS,
    MIN_RANGE,
    MIN_SIZE,
    CXRReadError,
    LoadCXRd,
    check_limits,
    exif_transpose_array,
    image_format,
    load_cxr,
    load_mask,
    read_cxr,
)
from tests.helpers import REAL_CXR, write_dicom

ZHANGLAB = REAL_CXR.parent / "zhanglab" / "chest_xray"


def picture(h=96, w=72, seed=0):
    """A textured 8-bit image with a bright block in the top-left corner: any flip or rotation shows."""
    rng = np.random.default_rng(seed)
    a = np.tile(np.linspace(40, 160, w), (h, 1)) + rng.normal(0, 12, (h, w))
    a[: h // 4, : w // 3] = 250
    return np.clip(a, 0, 255).astype(np.uint8)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png_header(path, width=20000, height=20000):
    """A well-formed PNG announcing ``width x height`` px with only one row of data (never decoded here)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
                     + png_chunk(b"IEND", b""))


def huge_jpeg_header(path, width=20000, height=20000):
    """JPEG markers up to a start-of-frame announcing ``width x height`` px (no scan data)."""
    sof = struct.pack(">BHHB", 8, height, width, 1) + bytes([1, 0x11, 0])
    path.write_bytes(b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0\1\1\0\0\1\0\1\0\0"
                     + b"\xff\xc0" + struct.pack(">H", 2 + len(sof)) + sof + b"\xff\xd9")


def raises_with(path, reason, **kw):
    with pytest.raises(CXRReadError) as e:
        read_cxr(path, **kw)
    assert path.name in str(e.value) and reason in str(e.value), str(e.value)
    return str(e.value)


# ---------------------------------------------------------------------------------------------- truncated / empty


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_png_and_jpeg_are_refused(tmp_path, suffix, keep):
    a = picture(256, 192)
    cv2.imwrite(str(tmp_path / f"full{suffix}"), a)
    data = (tmp_path / f"full{suffix}").read_bytes()
    assert read_cxr(tmp_path / f"full{suffix}").shape == a.shape
    (tmp_path / f"cut{suffix}").write_bytes(data[: int(len(data) * keep)])
    raises_with(tmp_path / f"cut{suffix}", f"truncated or corrupt {'PNG' if suffix == '.png' else 'JPEG'}")
    with pytest.raises(CXRReadError, match="truncated"):
        load_mask(tmp_path / f"cut{suffix}")


def test_truncated_jpeg_is_refused_even_if_truncated_images_are_allowed(tmp_path):
    from PIL import ImageFile

    cv2.imwrite(str(tmp_path / "a.jpg"), picture(256, 192))
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        raises_with(tmp_path / "cut.jpg", "truncated")
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the global is restored
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_complete_files_with_trailing_bytes_still_read(tmp_path):
    a = picture()
    cv2.imwrite(str(tmp_path / "a.jpg"), a, [cv2.IMWRITE_JPEG_QUALITY, 100])
    cv2.imwrite(str(tmp_path / "a.png"), a)
    ref_jpg, ref_png = read_cxr(tmp_path / "a.jpg"), read_cxr(tmp_path / "a.png")
    for name, extra in (("pad.jpg", b"\0" * 7), ("junk.jpg", b"appended data"), ("junk.png", b"appended data")):
        src = tmp_path / ("a.jpg" if name.endswith(".jpg") else "a.png")
        (tmp_path / name).write_bytes(src.read_bytes() + extra)
        np.testing.assert_array_equal(read_cxr(tmp_path / name), ref_jpg if name.endswith(".jpg") else ref_png)


@pytest.mark.parametrize("name", ["empty.jpg", "empty.dcm", "empty.nii.gz", "IM0000"])
def test_empty_files(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    raises_with(tmp_path / name, "empty (0 bytes)")
    with pytest.raises(CXRReadError, match="empty"):
        load_mask(tmp_path / name)


# ---------------------------------------------------------------------------------------------- EXIF orientation


def _exif(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_transpose_array_matches_pillow(tmp_path, orientation):
    a = picture(40, 30)
    Image.fromarray(a).save(tmp_path / "o.png", exif=_exif(orientation))
    with Image.open(tmp_path / "o.png") as im:
        expected = np.asarray(ImageOps.exif_transpose(im))
    np.testing.assert_array_equal(exif_transpose_array(a, orientation), expected)
    np.testing.assert_array_equal(read_cxr(tmp_path / "o.png", min_size=8), expected / np.float32(255))


ROTATED = {3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, -1), 8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_exif_orientation_applied(tmp_path, orientation, suffix):
    """The stored pixels turned the way a viewer shows them (3: 180 deg, 6: 90 deg clockwise, 8: anticlockwise)."""
    a = picture()
    path = tmp_path / f"o{orientation}{suffix}"
    Image.fromarray(a).save(path, exif=_exif(orientation), **({"quality": 100} if suffix == ".jpg" else {}))
    img = read_cxr(path)
    shown = ROTATED[orientation](a) / 255.0
    assert img.shape == shown.shape
    assert np.abs(img - shown).max() < (0.06 if suffix == ".jpg" else 1e-6)
    if suffix == ".jpg":
        with Image.open(path) as im:  # what a viewer shows
            np.testing.assert_allclose(img, np.asarray(ImageOps.exif_transpose(im)) / 255.0, atol=3 / 255)
    np.testing.assert_array_equal(load_mask(path, size=None), (np.asarray(img) > 0).astype(np.float32))


def test_exif_transpose_array_rejects_bad_values():
    with pytest.raises(ValueError, match="1..8"):
        exif_transpose_array(np.zeros((2, 2)), 9)


# ---------------------------------------------------------------------------------------------- NIfTI affine


def _save_nifti(path, data, affine):
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(path))
    return path


def test_nifti_flipped_or_permuted_affine_reads_like_the_plain_one(tmp_path):
    a = picture().astype(np.float32)
    ref = read_cxr(_save_nifti(tmp_path / "plain.nii.gz", a.T, np.eye(4)))
    np.testing.assert_allclose(ref, (a - a.min()) / (a.max() - a.min()), atol=1e-6)  # the project's convention
    w, h = a.shape[1], a.shape[0]
    flip_x = np.diag([-1.0, 1, 1, 1])
    flip_x[0, 3] = w - 1
    flip_y = np.diag([1.0, -1, 1, 1])
    flip_y[1, 3] = h - 1
    swap = np.array([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])  # voxel i -> world y, j -> world x
    cases = {
        "flip_x": (a.T[::-1], flip_x),  # stored mirrored, affine says so
        "flip_y": (a.T[:, ::-1], flip_y),
        "flip_xy_3d": (a.T[::-1, ::-1, None], flip_x @ flip_y),
        "permuted": (a, swap),  # stored as (row, col), affine says so
        "scaled": (a.T[::-1], np.diag([-0.14, 0.14, 1, 1])),  # pixel spacing does not matter
    }
    for name, (data, affine) in cases.items():
        np.testing.assert_array_equal(read_cxr(_save_nifti(tmp_path / f"{name}.nii.gz", data, affine)), ref,
                                      err_msg=name)
    # a mask follows the same orientation as its image
    m = (a > 200).astype(np.uint8)
    np.testing.assert_array_equal(load_mask(_save_nifti(tmp_path / "m.nii.gz", m.T[::-1], flip_x), size=None), m)


def test_nifti_not_2d(tmp_path):
    raises_with(_save_nifti(tmp_path / "vol.nii.gz", np.zeros((64, 64, 3), np.float32), np.eye(4)), "2-D")


# ---------------------------------------------------------------------------------------------- pixel limit


@pytest.mark.parametrize("maker,suffix", [(huge_png_header, ".png"), (huge_jpeg_header, ".jpg")])
def test_pixel_limit_from_the_header_before_decoding(tmp_path, maker, suffix):
    path = tmp_path / f"huge{suffix}"
    maker(path)
    assert path.stat().st_size < 100_000
    t0 = time.perf_counter()
    msg = raises_with(path, "20000 x 20000 = 400 MP exceeds the limit of 60 MP (max_pixels)")
    assert time.perf_counter() - t0 < 1.0, msg
    with pytest.raises(CXRReadError, match="400 MP"):
        load_mask(path)
    with pytest.raises(CXRReadError, match="20000 x 20000 = 400 MP is over Pillow's decompression-bomb limit"):
        read_cxr(path, max_pixels=500e6)  # within max_pixels, but Pillow refuses to open it


def test_pixel_limit_parameter_for_every_format(tmp_path):
    a = picture(96, 72)
    cv2.imwrite(str(tmp_path / "a.png"), a)
    cv2.imwrite(str(tmp_path / "a.bmp"), a)
    write_dicom(tmp_path / "IM0001", a.astype(np.uint16) * 16)
    _save_nifti(tmp_path / "a.nii.gz", a.T.astype(np.float32), np.eye(4))
    for name in ("a.png", "a.bmp", "IM0001", "a.nii.gz"):
        raises_with(tmp_path / name, "72 x 96 = 0.006912 MP exceeds the limit of 0.005 MP", max_pixels=5000)
        assert read_cxr(tmp_path / name, max_pixels=6912).shape == (96, 72)
        assert read_cxr(tmp_path / name, max_pixels=None).shape == (96, 72)
    with pytest.raises(CXRReadError, match="max_pixels"):
        LoadCXRd("image", size=64, max_pixels=5000)({"image": str(tmp_path / "a.png")})
    assert MAX_PIXELS == 60_000_000


# ---------------------------------------------------------------------------------------------- size / information


def test_too_small_images(tmp_path):
    cv2.imwrite(str(tmp_path / "tiny.png"), picture(8, 8))
    cv2.imwrite(str(tmp_path / "thumb.png"), picture(MIN_SIZE - 1, 100))
    raises_with(tmp_path / "tiny.png", "too small (8 x 8 px")
    raises_with(tmp_path / "thumb.png", f"at least {MIN_SIZE} px")
    assert read_cxr(tmp_path / "thumb.png", min_size=MIN_SIZE - 1).shape == (MIN_SIZE - 1, 100)
    assert load_cxr(tmp_path / "tiny.png", size=32, min_size=0).shape == (32, 32)
    t = LoadCXRd("image", size=32, min_size=8)
    assert t({"image": str(tmp_path / "tiny.png")})["image"].shape == (1, 32, 32)
    with pytest.raises(CXRReadError, match="too small"):
        LoadCXRd("image", size=32)({"image": str(tmp_path / "tiny.png")})


def test_one_bit_images_are_refused_but_read_as_masks(tmp_path):
    a = picture() > 150
    Image.fromarray(a).save(tmp_path / "bw.png")  # a 1-bit PNG
    Image.fromarray(a).save(tmp_path / "bw.tif")
    for name in ("bw.png", "bw.tif"):
        raises_with(tmp_path / name, f"1-bit image: at most 2 gray levels, fewer than {MIN_LEVELS} (min_levels)")
        np.testing.assert_array_equal(read_cxr(tmp_path / name, min_levels=0), a.astype(np.float32))
        np.testing.assert_array_equal(load_mask(tmp_path / name, size=None), a.astype(np.float32))
    cv2.imwrite(str(tmp_path / "empty_mask.png"), np.zeros((64, 64), np.uint8))  # masks may be all zero
    assert load_mask(tmp_path / "empty_mask.png").sum() == 0


def test_nearly_constant_images_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    flat = np.full((128, 128), 100, np.uint8) + rng.integers(0, 3, (128, 128)).astype(np.uint8)
    flat[0, :20] = 0  # a few outliers do not make it an image
    flat[-1, :20] = 255
    cv2.imwrite(str(tmp_path / "grey.png"), flat)
    raises_with(tmp_path / "grey.png", "nearly constant")
    assert read_cxr(tmp_path / "grey.png", min_range=0).shape == (128, 128)
    flat16 = (30000 + rng.integers(-50, 50, (128, 128))).astype(np.uint16)  # 16-bit: judged on its own range
    cv2.imwrite(str(tmp_path / "grey16.png"), flat16)
    raises_with(tmp_path / "grey16.png", "nearly constant")
    write_dicom(tmp_path / "grey.dcm", (2000 + rng.integers(0, 20, (128, 128))).astype(np.uint16))  # 12-bit
    raises_with(tmp_path / "grey.dcm", "nearly constant")
    _save_nifti(tmp_path / "grey.nii.gz", (1000 + rng.random((128, 128))).astype(np.float32), np.eye(4))
    raises_with(tmp_path / "grey.nii.gz", "nearly constant")
    # 10-bit data in a 16-bit PNG is an image, not a nearly constant 16-bit one
    ten_bit = (picture(128, 128).astype(np.uint16) * 4)
    cv2.imwrite(str(tmp_path / "ten.png"), ten_bit)
    assert read_cxr(tmp_path / "ten.png").shape == (128, 128)
    assert 0 < MIN_RANGE < 0.05


def test_check_parameters_are_validated():
    check_limits()
    for kw, match in (({"max_pixels": 0}, "max_pixels"), ({"min_size": -1}, "min_size"),
                      ({"min_levels": 2.5}, "min_levels"), ({"min_range": 1.0}, "min_range")):
        with pytest.raises(ValueError, match=match):
            check_limits(**kw)
        with pytest.raises(ValueError, match=match):
            LoadCXRd("image", **kw)


# ---------------------------------------------------------------------------------------------- DICOM by content


def test_dicom_found_by_its_preamble(tmp_path):
    a = picture().astype(np.uint16) * 16
    write_dicom(tmp_path / "1.2.840.113619.2.55.411", a)  # a numeric suffix, as PACS exports name files
    write_dicom(tmp_path / "IM0001", a)
    assert image_format(tmp_path / "IM0001") == "dicom"
    assert image_format(tmp_path / "1.2.840.113619.2.55.411") == "dicom"
    ref = read_cxr(tmp_path / "IM0001")
    np.testing.assert_array_equal(read_cxr(tmp_path / "1.2.840.113619.2.55.411"), ref)
    d = LoadCXRd("image", size=64)({"image": str(tmp_path / "IM0001")})
    assert d["image"].meta["format"] == "dicom" and d["image"].shape == (1, 64, 64)
    (tmp_path / "IM0002").write_bytes(b"\0" * 300)  # no preamble: not guessed
    raises_with(tmp_path / "IM0002", "unknown image format")


def test_dicom_without_pixel_data(tmp_path):
    import pydicom

    write_dicom(tmp_path / "x.dcm", picture().astype(np.uint16))
    ds = pydicom.dcmread(tmp_path / "x.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    ds.save_as(tmp_path / "SR0001")
    for name in ("nopix.dcm", "SR0001"):
        raises_with(tmp_path / name, "DICOM file has no pixel data")
        with pytest.raises(CXRReadError, match="no pixel data"):
            load_mask(tmp_path / name)


# ---------------------------------------------------------------------------------------------- real data


def _sample(folder, pattern, every):
    return sorted(folder.glob(pattern))[::every] if folder.is_dir() else []


def test_demo_phantoms_pass_every_check(tmp_path):
    from scripts.data.phantoms import generate_demo_dataset

    generate_demo_dataset(tmp_path, n_train=3, n_test_healthy=1, n_test_diseased=2, size=64, seed=2)
    paths = sorted(tmp_path.glob("t*/*/*.png"))  # train/ and test/, not ground_truth/
    assert len(paths) >= 6
    for p in paths:
        assert read_cxr(p).shape == (64, 64)


@pytest.mark.realdata
@pytest.mark.skipif(not (REAL_CXR.is_dir() or ZHANGLAB.is_dir()), reason="real data ../shared/data not present")
def test_real_radiographs_pass_every_check():
    """A sample of the real radiographs (all of them pass: checked once over the 5855 files when the defaults
    were chosen; the lowest p1-p99 span was 33% of the 8-bit range, the smallest short side 224 px)."""
    paths = (_sample(REAL_CXR / "nih", "*/*/*.png", 20) + _sample(REAL_CXR / "lung_masks" / "images", "*.png", 5)
             + _sample(ZHANGLAB, "*/*/*.jpeg", 250))
    assert paths
    for p in paths:
        img = read_cxr(p)
        assert min(img.shape) >= MIN_SIZE and img.max() > img.min()
