"""DICOM objects a radiologist's system can store, made from one chest X-ray's anomaly outputs (highdicom).

Pure functions used by the MONAI Deploy application (``bundle/app``, docs/deploy.md):

- :func:`chest_xray_reasons`: why a DICOM instance is not a frontal chest radiograph (or ``[]``);
- :func:`segmentation`: a binary DICOM Segmentation of the anomaly mask, at the source image's size;
- :func:`secondary_capture`: a DICOM Secondary Capture of the heat map on the image, with the score burnt in;
- :func:`structured_report`: a Comprehensive SR with the image score, the thresholds used and the finding.

Each object references the source instance (SEG: Referenced Series Sequence; SC: Source Image Sequence; SR:
evidence and an IMAGE content item) and belongs to the source's study. The anomaly map, mask and score are those
of ``configs/inference.json``'s postprocessing (the paper's ``A = |I - I_hat|``, its per-image mask rule, the MSE
score; ART-ASyn Sec. 3.4).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import cv2
import numpy as np

XRAY_MODALITIES = ("CR", "DX")  # computed and digital radiography
LATERAL_VIEWS = ("LL", "RL", "LATERAL", "LAT", "LLD", "RLD")  # ViewPosition values that are not frontal
CHEST_BODY_PART = re.compile(r"chest|thorax|lung|torax|thora", re.IGNORECASE)
ALGORITHM_NAME = "ART-ASyn"
CODE_SCHEME = "99ARTASYN"  # private coding scheme of this bundle (DICOM PS3.16 8.2: "99" prefix)
SC_MAX_SIDE = 1024  # the Secondary Capture is the source image scaled down to this long side at most


def chest_xray_reasons(ds) -> list[str]:
    """Why ``ds`` (a pydicom dataset) is not an image this model is for; ``[]`` when it is.

    Rules: Modality CR or DX; BodyPartExamined, when present, names the chest; ViewPosition, when present, is not
    lateral (:data:`LATERAL_VIEWS`); the instance has pixel data, one sample per pixel and one frame.
    """
    reasons = []
    modality = str(ds.get("Modality", "") or "").upper()
    if modality not in XRAY_MODALITIES:
        reasons.append(f"modality {modality or 'missing'} is not one of {'/'.join(XRAY_MODALITIES)}")
    body = str(ds.get("BodyPartExamined", "") or "")
    if body and not CHEST_BODY_PART.search(body):
        reasons.append(f"body part {body} is not the chest")
    view = str(ds.get("ViewPosition", "") or "").upper()
    if view in LATERAL_VIEWS:
        reasons.append(f"view position {view} is lateral; the model reads frontal (PA/AP) views")
    if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        reasons.append("no pixel data")
    elif int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        reasons.append(f"{ds.SamplesPerPixel} samples per pixel (colour); chest X-rays are grayscale")
    elif int(ds.get("NumberOfFrames", 1) or 1) > 1:
        reasons.append(f"{ds.NumberOfFrames} frames; one radiograph per instance is expected")
    return reasons


def to_native(arr2d: np.ndarray, shape: Sequence[int], nearest: bool) -> np.ndarray:
    """A model-size map resized to the source image's ``(rows, columns)`` (nearest for masks)."""
    from custom_transforms.io import resize

    return resize(np.asarray(arr2d, np.float32), tuple(int(s) for s in shape), nearest=nearest)


def _coded(value: str, meaning: str, scheme: str = CODE_SCHEME):
    from highdicom.sr import CodedConcept

    return CodedConcept(value, scheme, meaning)


def _common(series_number: int, manufacturer: str) -> dict:
    """New series and instance UIDs in the source's study (highdicom copies the patient and study)."""
    from pydicom.uid import generate_uid

    return dict(series_instance_uid=generate_uid(), series_number=series_number, sop_instance_uid=generate_uid(),
                instance_number=1, manufacturer=manufacturer)


def segmentation(source, mask: np.ndarray, *, software_version: str, manufacturer: str = "ART-ASyn bundle",
                 series_number: int = 9001):
    """Binary DICOM Segmentation of ``mask`` (the source image's rows x columns, values 0/1) on ``source``.

    One segment, "anomaly" (SCT 49755003 Morphologically altered structure), algorithm type AUTOMATIC.

    Raises:
        ValueError: ``mask`` is not the source image's size.
    """
    import highdicom as hd

    mask = np.asarray(mask)
    if mask.shape != (int(source.Rows), int(source.Columns)):
        raise ValueError(f"mask shape {mask.shape} differs from the source image's {(source.Rows, source.Columns)}")
    altered = hd.sr.CodedConcept("49755003", "SCT", "Morphologically Altered Structure")
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="anomaly", segmented_property_category=altered,
        segmented_property_type=altered, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=ALGORITHM_NAME, version=software_version,
            family=hd.sr.CodedConcept("123110", "DCM", "Artificial Intelligence")))
    return hd.seg.Segmentation(
        source_images=[source], pixel_array=(mask > 0.5).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[desc],
        manufacturer_model_name=ALGORITHM_NAME, software_versions=software_version, device_serial_number="0",
        series_description="ART-ASyn anomaly mask", **_common(series_number, manufacturer))


def burn_in(rgb: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """``rgb`` with ``lines`` written on a black band at the top (white text, scaled to the image width)."""
    h, w = rgb.shape[:2]
    scale = max(0.4, w / 900.0)
    line_h = int(round(26 * scale))
    band = np.zeros((line_h * len(lines) + int(8 * scale), w, 3), np.uint8)
    for i, text in enumerate(lines):
        cv2.putText(band, text, (int(8 * scale), line_h * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, 0.7 * scale,
                    (255, 255, 255), max(1, int(round(1.5 * scale))), cv2.LINE_AA)
    return np.concatenate([band, rgb], axis=0)


def summary_lines(score: float, score_threshold: float | None, flags: str = "") -> list[str]:
    """The text burnt into the Secondary Capture and written in the report."""
    decision = "no score threshold set" if score_threshold is None else (
        f"threshold {score_threshold:.4g}: {'ABOVE (anomalous)' if score > score_threshold else 'below'}")
    lines = [f"ART-ASyn anomaly score {score:.4g} ({decision})",
             "Research use only: not for diagnostic use"]
    if flags:
        lines.insert(1, f"check: {flags}")
    return lines


def overlay_picture(image: np.ndarray, amap: np.ndarray, mask: np.ndarray, lines: Sequence[str],
                    max_side: int = SC_MAX_SIDE) -> np.ndarray:
    """The Secondary Capture's pixels (RGB uint8): the heat map on the image, the mask outlined, ``lines`` on top.

    ``image`` is the source at its own size (``read_cxr``); ``amap`` and ``mask`` are the model-size outputs. All
    three are brought to the source's aspect, its long side at most ``max_side`` px.
    """
    from scripts.visualization import overlay

    h, w = image.shape
    f = min(1.0, max_side / max(h, w))
    shape = (max(1, round(h * f)), max(1, round(w * f)))
    pic = overlay(to_native(image, shape, False), to_native(amap, shape, False), to_native(mask, shape, True))
    return burn_in(pic, lines)


def secondary_capture(source, rgb: np.ndarray, *, software_version: str, manufacturer: str = "ART-ASyn bundle",
                      series_number: int = 9002):
    """DICOM Secondary Capture of the RGB picture ``rgb`` in the source's study, referencing the source instance.

    Raises:
        ValueError: ``rgb`` is not ``(rows, columns, 3)`` uint8.
    """
    import highdicom as hd
    from pydicom.dataset import Dataset

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"the secondary capture needs (rows, columns, 3) uint8 pixels, got {rgb.shape} {rgb.dtype}")
    orientation = tuple(str(v) for v in (source.get("PatientOrientation") or ("L", "F")))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=np.ascontiguousarray(rgb),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB, bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT, patient_orientation=orientation[:2],
        series_description="ART-ASyn anomaly heat map", **_common(series_number, manufacturer))
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    sc.DerivationDescription = "ART-ASyn anomaly map |I - I_hat| on the image; score burnt in"
    sc.BurnedInAnnotation = "YES"
    sc.SoftwareVersions = software_version
    return sc


def structured_report(source, score: float, *, score_threshold: float | None, mask_rule: str,
                      mask_fraction: float, flags: str = "", software_version: str,
                      manufacturer: str = "ART-ASyn bundle", series_number: int = 9003):
    """Comprehensive SR: image score, score threshold (when set), mask rule and area, finding, source image."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    contains = hd.sr.RelationshipTypeValues.CONTAINS
    unitless = hd.sr.CodedConcept("1", "UCUM", "no units")
    items = [
        hd.sr.NumContentItem(name=_coded("ASYN001", "Anomaly score"), value=float(score), unit=unitless,
                             relationship_type=contains),
    ]
    if score_threshold is not None:
        items.append(hd.sr.NumContentItem(name=_coded("ASYN002", "Anomaly score threshold"),
                                          value=float(score_threshold), unit=unitless, relationship_type=contains))
        finding = ("anomalous (score above threshold)" if score > score_threshold
                   else "within normal limits of the model")
    else:
        finding = "not assessed: no score threshold configured (score only)"
    items += [
        hd.sr.NumContentItem(name=_coded("ASYN003", "Anomalous area fraction"), value=float(mask_fraction),
                             unit=unitless, relationship_type=contains),
        hd.sr.TextContentItem(name=_coded("ASYN004", "Anomaly mask rule"), value=mask_rule, relationship_type=contains),
        hd.sr.TextContentItem(name=hd.sr.CodedConcept("121071", "DCM", "Finding"), value=finding,
                              relationship_type=contains),
        hd.sr.ImageContentItem(name=hd.sr.CodedConcept("121112", "DCM", "Source of Measurement"),
                               referenced_sop_class_uid=source.SOPClassUID,
                               referenced_sop_instance_uid=source.SOPInstanceUID, relationship_type=contains),
    ]
    if flags:
        items.append(hd.sr.TextContentItem(name=_coded("ASYN005", "Input check"), value=flags[:1024],
                                           relationship_type=contains))
    root = hd.sr.ContainerContentItem(name=codes.DCM.ImagingMeasurementReport)
    root.ContentSequence = items
    return hd.sr.ComprehensiveSR(evidence=[source], content=root, series_description="ART-ASyn anomaly report",
                                 **_common(series_number, manufacturer))
