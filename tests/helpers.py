"""Helpers shared by the tests."""

import hashlib
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
REAL_CXR = REPO.parent / "shared" / "data" / "cxr"  # real data beside the clone; tests skip when absent


def write_dicom(path, pixels: np.ndarray, photometric="MONOCHROME2", slope=1.0, intercept=0.0, window=None):
    """Write ``pixels`` (stored values) as a 16-bit-allocated, 12-bit-stored digital X-ray DICOM file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def sha256_arrays(*arrays) -> str:
    """sha256 over the dtype, shape and bytes of each array: pins outputs bit for bit."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def error_chain(exc) -> list[BaseException]:
    """``exc`` and its causes/contexts, outermost first (MONAI wraps config errors in RuntimeErrors)."""
    out = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def small_png(path, value=100):
    """A 16 x 16 gray PNG of ``value`` with one black pixel, its folders created; returns the path."""
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full((16, 16), value, np.uint8)
    a[0, 0] = 0
    cv2.imwrite(str(path), a)
    return path


def random_model(root, config_files, seed: int = 0, export: bool = False) -> Path:
    """:func:`scripts.cli.export.write_random_model`: an untrained bundle model for tests."""
    from scripts.cli.export import write_random_model

    return write_random_model(root, config_files, seed=seed, export=export)
