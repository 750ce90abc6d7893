"""DICOM objects a radiologist's system can store, made from one chest X-ray's anomaly outputs (highdicom).

Pure functions used by the MONAI Deploy application (``bundle/app``, docs/deploy.md):

- :func:`chest_xray_reasons`: why a DICOM instance is not a frontal chest radiograph (or ``[]``);
- :func:`segmentation`: a binary DICOM Segmentation of the anomaly mask, at the source image's size;
- :func:`secondary_capture`: a DICOM Secondary Capture of the heat map on the image, with the score burnt in;
- :func:`structured_report`: a Comprehensive SR with the image score, the thresholds used and the finding (a
  report of this bundle's own, titled in its private coding scheme: not a TID 1500 measurement report).

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
NON_FRONTAL_VIEWS = ("LL", "RL", "LATERAL", "LAT", "LLD", "RLD", "RLO", "LLO", "RAO", "LAO")  # ViewPosition values
CHEST_BODY_PART = re.compile(r"chest|thorax|lung|torax|thora", re.IGNORECASE)
ALGORITHM_NAME = "ART-ASyn"
CODE_SCHEME = "99ARTASYN"  # private coding scheme of this bundle (DICOM PS3.16 8.2: "99" prefix)
SC_MAX_SIDE = 1024  # the Secondary Capture is the source image scaled down to this long side at most


def chest_xray_reasons(ds) -> list[str]:
    """Why ``ds`` (a pydicom dataset) is not an image this model is for; ``[]`` when it is.

    Rules: Modality CR or DX; BodyPartExamined, when present, names the chest; ViewPosition, when present, is not
    lateral or oblique (:data:`NON_FRONTAL_VIEWS`); the instance has pixel data, one sample per pixel and one frame.
    """
    reasons = []
    modality = str(ds.get("Modality", "") or "").upper()
    if modality not in XRAY_MODALITIES:
        reasons.append(f"modality {modality or 'missing'} is not one of {'/'.join(XRAY_MODALITIES)}")
    body = str(ds.get("BodyPartExamined", "") or "")
    if body and not CHEST_BODY_PART.search(body):
        reasons.append(f"body part {body} is not the chest")
    view = str(ds.get("ViewPosition", "") or "").upper()
    if view in NON_FRONTAL_VIEWS:
        kind = "oblique" if view.endswith("O") else "lateral"
        reasons.append(f"view position {view} is {kind}; the model reads frontal (PA/AP) views")
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


# Type 2 patient/study attributes highdicom copies into every derived object (it fails when one is absent, as after
# some de-identification): an absent one is given empty, as DICOM allows for Type 2
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "AccessionNumber", "StudyID", "ReferringPhysicianName")


def with_type2(source):
    """``source``, or a copy of it (same element objects, its own dictionary) with the absent
    :data:`TYPE2_COPIED` attributes set empty; ``source`` itself is not changed.

    Raises:
        ValueError: the source lacks a Type 1 identifier (StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID,
            SOPClassUID): nothing could reference it.
    """
    from pydicom.dataset import Dataset

    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
               if not source.get(k)]
    if missing:
        raise ValueError(f"the source instance lacks {', '.join(missing)}: results could not reference it")
    absent = [k for k in TYPE2_COPIED if k not in source]
    if not absent:
        return source
    ds = Dataset()  # a new element dictionary (copy.copy of a Dataset shares it with the source)
    ds.update(source)
    if hasattr(source, "file_meta"):
        ds.file_meta = source.file_meta
    for k in absent:
        setattr(ds, k, None)
    return ds


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

    source = with_type2(source)
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


def fit_lines(lines: Sequence[str], width: int, scale: float, min_scale: float = 0.35,
              thickness: int = 1) -> tuple[list[str], float]:
    """``(lines, scale)`` such that every line is at most ``width - margins`` px wide in OpenCV's simplex font:
    the scale is lowered to ``min_scale`` first, then the lines are wrapped at spaces (a word longer than the
    width is cut into pieces)."""
    room = max(8, width - 16)

    def w(text: str, sc: float) -> int:
        return cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, sc, thickness)[0][0]

    longest = max(lines, key=lambda t: w(t, 1.0)) if lines else ""
    if longest and w(longest, scale) > room:
        scale = max(min_scale, scale * room / w(longest, scale))
    out: list[str] = []
    for line in lines:
        cur = ""
        for word in line.split(" "):
            while w(word, scale) > room and len(word) > 1:  # a word wider than the room: cut it
                cut = max(1, int(len(word) * room / w(word, scale)))
                if cur:
                    out.append(cur)
                    cur = ""
                out.append(word[:cut])
                word = word[cut:]
            trial = f"{cur} {word}" if cur else word
            if cur and w(trial, scale) > room:
                out.append(cur)
                cur = word
            else:
                cur = trial
        out.append(cur)
    return out, scale


def burn_in(rgb: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """``rgb`` with ``lines`` written on a black band at the top: white text scaled to the image width, smaller
    and wrapped when a line would not fit (:func:`fit_lines`)."""
    h, w = rgb.shape[:2]
    thickness = max(1, int(round(1.5 * max(0.4, w / 900.0))))
    lines, scale = fit_lines([line.encode("ascii", "replace").decode() for line in lines], w,
                             0.7 * max(0.4, w / 900.0), thickness=thickness)
    line_h = int(round(38 * scale)) + 2
    band = np.zeros((line_h * len(lines) + 6, w, 3), np.uint8)
    for i, text in enumerate(lines):
        cv2.putText(band, text, (8, line_h * (i + 1) - 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                    thickness, cv2.LINE_AA)
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
    from pydicom.uid import ExplicitVRLittleEndian

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"the secondary capture needs (rows, columns, 3) uint8 pixels, got {rgb.shape} {rgb.dtype}")
    source = with_type2(source)
    given = tuple(str(v) for v in (source.get("PatientOrientation") or ()))
    known = len(given) == 2 and all(given)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=np.ascontiguousarray(rgb),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB, bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT, patient_orientation=given if known else ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian, series_description="ART-ASyn anomaly heat map",
        **_common(series_number, manufacturer))
    if not known:  # highdicom needs one for PATIENT; unknown in the source: left empty (Type 2C), not guessed
        sc.PatientOrientation = None
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
    from pydicom.dataset import Dataset

    source = with_type2(source)
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
    # a report of this bundle's own (title in its private scheme), not TID 1500's "Imaging Measurement Report"
    root = hd.sr.ContainerContentItem(name=_coded("ASYN000", "ART-ASyn anomaly report"))
    root.ContentSequence = items
    sr = hd.sr.ComprehensiveSR(evidence=[source], content=root, series_description="ART-ASyn anomaly report",
                               **_common(series_number, manufacturer))
    scheme = Dataset()
    scheme.CodingSchemeDesignator, scheme.CodingSchemeName = CODE_SCHEME, "ART-ASyn bundle local codes"
    scheme.CodingSchemeResponsibleOrganization = "ART-ASyn bundle contributors"
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr
