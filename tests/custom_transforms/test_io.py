"""Chest X-ray loading: formats, bit depths, orientation, metadata and bad inputs."""

import cv2
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from custom_transforms.io import (
    CXRReadError,
    LoadCXRd,
    dicom_to_image,
    load_cxr,
    load_mask,
    read_cxr,
    read_cxr_dataset,
    save_png,
)
from tests.helpers import write_dicom


def asymmetric(h=64, w=48):
    """A gradient image with a bright block in the top-left corner: any flip or transpose shows."""
    a = np.tile(np.linspace(40, 160, w, dtype=np.float32), (h, 1))
    a[: h // 4, : w // 3] = 250
    return a.astype(np.uint8)


def test_png_8bit_orientation_and_scale(tmp_path):
    a = asymmetric()
    cv2.imwrite(str(tmp_path / "a.png"), a)
    img = read_cxr(tmp_path / "a.png")
    assert img.dtype == np.float32 and img.shape == a.shape
    np.testing.assert_allclose(img, a / 255.0, atol=1e-6)
    assert img[0, 0] > img[-1, 0] and img[0, 0] > img[0, -1]  # bright block stays top-left


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA"])
def test_color_modes_collapse_to_gray(tmp_path, mode):
    from PIL import Image

    a = asymmetric()
    Image.fromarray(a).convert(mode).save(tmp_path / "c.png")
    np.testing.assert_allclose(read_cxr(tmp_path / "c.png"), a / 255.0, atol=1.5 / 255)


def test_png_16bit_minmax(tmp_path):
    a = asymmetric().astype(np.uint16) * 16  # 12-bit data in a 16-bit container
    cv2.imwrite(str(tmp_path / "b.png"), a)
    img = read_cxr(tmp_path / "b.png")
    assert img.min() == 0.0 and img.max() == 1.0
    np.testing.assert_allclose(img, (a - a.min()) / float(a.max() - a.min()), atol=1e-6)


def test_jpeg(tmp_path):
    a = asymmetric()
    cv2.imwrite(str(tmp_path / "j.jpg"), a, [cv2.IMWRITE_JPEG_QUALITY, 100])
    assert np.abs(read_cxr(tmp_path / "j.jpg") - a / 255.0).max() < 0.03


def test_dicom_rescale_and_orientation(tmp_path):
    a = asymmetric().astype(np.uint16) * 16
    write_dicom(tmp_path / "x.dcm", a, slope=2.0, intercept=-100)
    img = read_cxr(tmp_path / "x.dcm")
    np.testing.assert_allclose(img, (a - a.min()) / float(a.max() - a.min()), atol=1e-5)


def test_dicom_monochrome1_is_inverted(tmp_path):
    a = asymmetric().astype(np.uint16) * 16
    write_dicom(tmp_path / "m1.dcm", a, photometric="MONOCHROME1")
    img = read_cxr(tmp_path / "m1.dcm")
    np.testing.assert_allclose(img, 1 - (a - a.min()) / float(a.max() - a.min()), atol=1e-5)


def test_dicom_window_applied(tmp_path):
    a = np.tile(np.arange(0, 4000, 4000 / 64), (48, 1)).astype(np.uint16)
    write_dicom(tmp_path / "w.dcm", a, window=(1000, 400))
    img = read_cxr(tmp_path / "w.dcm")
    assert np.isclose(img[:, a[0] < 700], 0).all() and np.isclose(img[:, a[0] > 1300], 1).all()


def test_dicom_without_suffix_is_detected(tmp_path):
    write_dicom(tmp_path / "IM0001", asymmetric().astype(np.uint16))
    assert read_cxr(tmp_path / "IM0001").shape == (64, 48)


def test_nifti_matches_png_orientation(tmp_path):
    a = asymmetric()
    nib.save(nib.Nifti1Image(a.T.astype(np.float32), np.eye(4)), str(tmp_path / "n.nii.gz"))
    np.testing.assert_allclose(read_cxr(tmp_path / "n.nii.gz"), (a - a.min()) / float(a.max() - a.min()), atol=1e-6)


def test_nifti_written_by_monai_from_png(tmp_path):
    """A PNG converted to NIfTI with MONAI's own LoadImage/SaveImage reads back as a person sees the PNG."""
    from monai.transforms import LoadImage, SaveImage

    a = asymmetric()
    cv2.imwrite(str(tmp_path / "a.png"), a)
    arr = LoadImage(image_only=True, ensure_channel_first=True)(str(tmp_path / "a.png"))
    SaveImage(output_dir=str(tmp_path), output_postfix="", separate_folder=False, output_ext=".nii.gz",
              print_log=False)(arr)
    np.testing.assert_allclose(read_cxr(tmp_path / "a.nii.gz"), (a - a.min()) / float(a.max() - a.min()), atol=1e-6)


def test_load_cxr_resizes(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), asymmetric(300, 280))
    img = load_cxr(tmp_path / "a.png", size=64)
    assert img.shape == (64, 64) and 0 <= img.min() and img.max() <= 1 and img[0, 0] > 0.9
    assert load_cxr(tmp_path / "a.png", size=(32, 40)).shape == (32, 40)


@pytest.mark.parametrize(
    "name,content,reason",
    [("empty.png", b"", "empty"), ("text.png", b"hello, not an image", "not a readable"),
     ("notes.txt", b"hello", "unknown image format"), ("bad.dcm", b"\0" * 200, "DICOM"),
     ("bad.nii.gz", b"garbage", "NIfTI")],
)
def test_bad_files_name_file_and_reason(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CXRReadError) as e:
        read_cxr(tmp_path / name)
    assert name in str(e.value) and reason in str(e.value)


def test_constant_and_missing_files(tmp_path):
    cv2.imwrite(str(tmp_path / "flat.png"), np.full((32, 32), 7, np.uint8))
    with pytest.raises(CXRReadError, match="constant"):
        read_cxr(tmp_path / "flat.png")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_cxr(tmp_path / "nope.png")


def test_loadcxrd_metatensor_and_masks(tmp_path):
    a = asymmetric(128, 128)
    cv2.imwrite(str(tmp_path / "a.png"), a)
    m = np.zeros_like(a)
    m[10:40, 20:50] = 255
    cv2.imwrite(str(tmp_path / "m.png"), m)
    t = LoadCXRd(keys="image", size=64, mask_keys="gt_mask", allow_missing_keys=True)
    d = t({"image": str(tmp_path / "a.png"), "gt_mask": str(tmp_path / "m.png"), "label": 1})
    assert isinstance(d["image"], MetaTensor) and d["image"].shape == (1, 64, 64)
    assert d["image"].dtype == torch.float32 and d["label"] == 1
    assert d["image"].meta["filename_or_obj"].endswith("a.png")
    assert d["image"].meta["original_spatial_shape"] == (128, 128)
    assert set(torch.unique(d["gt_mask"]).tolist()) == {0.0, 1.0} and d["has_gt_mask"] == 1
    assert d["gt_mask"][0, 5:20, 10:25].all()
    d2 = t({"image": str(tmp_path / "a.png"), "gt_mask": None})
    assert d2["gt_mask"].shape == (1, 64, 64) and d2["gt_mask"].sum() == 0 and d2["has_gt_mask"] == 0


def test_loadcxrd_missing_key_and_bad_size(tmp_path):
    with pytest.raises(KeyError):
        LoadCXRd(keys="image")({"other": 1})
    with pytest.raises(ValueError, match="size"):
        LoadCXRd(keys="image", size=2)


def test_load_mask_and_save_png_roundtrip(tmp_path):
    m = np.zeros((40, 40), np.float32)
    m[5:10, 5:30] = 1
    save_png(tmp_path / "out" / "m.png", m)
    assert not list((tmp_path / "out").glob(".*tmp*"))
    np.testing.assert_array_equal(load_mask(tmp_path / "out" / "m.png", size=None), m)


def test_load_mask_two_frame_dicom_uses_first_frame(tmp_path):
    import pydicom

    m0 = np.zeros((40, 48), np.uint16)
    m0[5:10, 5:30] = 1
    m1 = np.ones((40, 48), np.uint16)
    write_dicom(tmp_path / "m.dcm", m0)
    ds = pydicom.dcmread(str(tmp_path / "m.dcm"))
    ds.NumberOfFrames = 2
    ds.PixelData = np.stack([m0, m1]).tobytes()
    ds.save_as(str(tmp_path / "m2.dcm"))
    np.testing.assert_array_equal(load_mask(tmp_path / "m2.dcm", size=None), m0.astype(np.float32))
    out = load_mask(tmp_path / "m2.dcm", size=20)
    assert out.shape == (20, 20) and set(np.unique(out)) <= {0.0, 1.0}


def test_read_cxr_dataset_matches_file_and_checks(tmp_path):
    import pydicom

    a = asymmetric().astype(np.uint16) * 16
    write_dicom(tmp_path / "x.dcm", a, slope=2.0, intercept=-100, photometric="MONOCHROME1")
    ds = pydicom.dcmread(str(tmp_path / "x.dcm"))
    ref = read_cxr(tmp_path / "x.dcm")
    out = read_cxr_dataset(ds, "from-memory")
    assert out.dtype == ref.dtype and np.array_equal(out, ref)
    assert np.array_equal(dicom_to_image(ds, "from-memory"), ref)
    with pytest.raises(CXRReadError, match="from-memory.*too small"):
        read_cxr_dataset(ds, "from-memory", min_size=100)
    with pytest.raises(CXRReadError, match="exceeds the limit"):
        dicom_to_image(ds, "from-memory", max_pixels=100)
    del ds.PixelData
    with pytest.raises(CXRReadError, match="no pixel data"):
        dicom_to_image(ds, "from-memory")
