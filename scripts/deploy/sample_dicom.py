"""Write chest X-ray DICOM studies from images, to try the MONAI Deploy app (docs/deploy.md) and to test it.

    python -m scripts.deploy.sample_dicom --images demo_data/test/diseased --out demo_dicom [--photometric MONOCHROME1]

Each image becomes one single-instance CR series (12-bit stored, PA view, body part CHEST) in one study, with
the patient, study and series attributes a PACS expects. ``write_cxr_dicom`` can also write what the app must
refuse (other modalities, lateral views, no pixel data) and a VOI LUT. ``custom_transforms.read_cxr`` reads the
file back as the source image min-max stretched to [0, 1] (DICOM is always stretched; up to 12-bit rounding),
raised to the power :data:`VOI_GAMMA` when a MONOCHROME2 file has the VOI LUT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SOP_CLASS = {"CR": CR_STORAGE, "DX": DX_STORAGE, "CT": CT_STORAGE}
MAX_STORED = 4095  # 12 bits stored
VOI_GAMMA = 0.8  # the sample VOI LUT: display = stored ** 0.8 (so a reader that ignores it is caught)


def write_cxr_dicom(path, image: np.ndarray | None, *, study_uid: str, series_uid: str | None = None,
                    modality: str = "CR", photometric: str = "MONOCHROME2", view: str | None = "PA",
                    body_part: str | None = "CHEST", voi_lut: bool = False, series_number: int = 1,
                    instance_number: int = 1, patient_id: str = "ARTASYN-DEMO", series_description: str = "") -> str:
    """Write ``image`` (2-D, [0, 1]) as a DICOM instance; returns its SOP Instance UID.

    ``photometric="MONOCHROME1"`` stores the inverted values (white = low), as many CR systems do.
    ``voi_lut=True`` adds a VOI LUT Sequence (stored 12-bit -> 16-bit display values, gamma :data:`VOI_GAMMA`).
    ``image=None`` writes an instance without pixel data (what the app must skip).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = SOP_CLASS.get(modality, CR_STORAGE)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Demo^Phantom", patient_id, "", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid or generate_uid()
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "ART0001"
    ds.ReferringPhysicianName, ds.StudyDescription = "", "Chest X-ray"
    ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = series_number, instance_number, series_description
    ds.Modality, ds.Manufacturer = modality, "ART-ASyn sample writer"
    if body_part:
        ds.BodyPartExamined = body_part
    if view:
        ds.ViewPosition = view
    ds.PatientOrientation = ["L", "F"] if view not in ("LL", "RL", "LATERAL") else ["A", "F"]
    if image is not None:
        img = np.clip(np.asarray(image, np.float64), 0.0, 1.0)
        stored = np.round(img * MAX_STORED).astype(np.uint16)
        if photometric == "MONOCHROME1":
            stored = (MAX_STORED - stored).astype(np.uint16)
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "US"
        if voi_lut:
            lut = Dataset()
            # LUT Descriptor (entries, first value, bits per entry) and a gamma 0.8 LUT with 16-bit entries
            lut.add_new(0x00283002, "US", [MAX_STORED + 1, 0, 16])
            ramp = (np.arange(MAX_STORED + 1) / MAX_STORED) ** VOI_GAMMA
            lut.add_new(0x00283006, "US", np.round(ramp * 65535).astype(int).tolist())
            lut.LUTExplanation = "linear"
            ds.VOILUTSequence = [lut]
        ds.PixelData = stored.tobytes()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(out), enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def images_to_study(images: list[Path], out: Path, photometric: str = "MONOCHROME2") -> list[Path]:
    """One CR study under ``out``: a series per image (``<stem>.dcm``); the written paths."""
    from pydicom.uid import generate_uid

    from custom_transforms.io import read_cxr

    study = generate_uid()
    written = []
    for i, src in enumerate(images, start=1):
        dst = out / f"{Path(src).stem}.dcm"
        write_cxr_dicom(dst, read_cxr(src), study_uid=study, photometric=photometric, series_number=i,
                        series_description=f"from {Path(src).name}")
        written.append(dst)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.deploy.sample_dicom", description=__doc__.split("\n")[0])
    ap.add_argument("--images", required=True, help="a folder of PNG/JPEG chest X-rays (or one file)")
    ap.add_argument("--out", required=True, help="the folder to write the DICOM study to")
    ap.add_argument("--photometric", default="MONOCHROME2", choices=("MONOCHROME1", "MONOCHROME2"))
    ap.add_argument("--limit", type=int, default=0, help="at most this many images (0: all)")
    args = ap.parse_args(argv)
    from scripts.inference import scan_inputs

    files, _ = scan_inputs(args.images)
    files = files[: args.limit] if args.limit > 0 else files
    if not files:
        print(f"error: no images in '{args.images}'", file=sys.stderr)
        return 2
    written = images_to_study([Path(f) for f in files], Path(args.out), args.photometric)
    print(f"wrote {len(written)} DICOM files (one CR study, a series each) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
