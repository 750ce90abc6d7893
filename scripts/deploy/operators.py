"""Holoscan operators of the MONAI Deploy application ``bundle/app`` (docs/deploy.md).

The graph: the SDK's ``DICOMDataLoaderOperator`` -> :class:`ChestXraySeriesSelectorOperator` (the SDK selector
with CR/DX rules) -> :class:`ChestXrayImageOperator` (one radiograph per tick; PNG/JPEG files instead of DICOM
when the input holds no DICOM) -> the SDK's ``MonaiBundleInferenceOperator`` on ``configs/inference.json`` ->
:class:`AnomalyResultWriterOperator` (DICOM SEG, SC and SR, plus JSON and PNG copies).

The image operator reads pixels with :func:`custom_transforms.io.read_cxr_dataset` on the dataset the SDK's loader
read (the same pixel pipeline and checks as :func:`custom_transforms.read_cxr`, which ``configs/inference.json``
uses), and hands them over at the file's size; the bundle's ``LoadCXRd`` resizes them as it would a file, so the
Deploy app and ``python -m monai.bundle run inferring`` give the same map, mask and score for the same image.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, deque
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from holoscan.conditions import BooleanCondition
from monai.deploy.core import ConditionType, Image, Operator, OperatorSpec
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from monai.deploy.operators.monai_bundle_inference_operator import MonaiBundleInferenceOperator

from custom_transforms.io import (
    CXRReadError,
    atomic_write_folder,
    json_bytes,
    png_bytes,
    read_cxr,
    read_cxr_dataset,
)
from custom_transforms.utils import as_2d
from scripts.deploy import dicom_outputs as dout
from scripts.inference import output_stem

logger = logging.getLogger("art_asyn.deploy")

CHEST_XRAY_RULES = json.dumps({"selections": [
    {"name": "chest radiograph", "conditions": {"Modality": "(?i)^(CR|DX)$"}}]})
OUTPUT_PORTS = ("pred", "amap", "pred_mask", "score", "flags")  # configs/metadata.json network_data_format outputs


@contextmanager
def _quiet(level: int = logging.INFO):
    """Silence the SDK selector's per-attribute INFO lines (it logs on the root logger)."""
    previous = logging.root.manager.disable
    logging.disable(level)
    try:
        yield
    finally:
        logging.disable(previous)


def _series_label(series) -> str:
    desc = getattr(series, "SeriesDescription", None) or "no description"
    return f"series {series.SeriesInstanceUID} ({getattr(series, 'Modality', None) or '?'}, {desc})"


class ChestXraySeriesSelectorOperator(DICOMSeriesSelectorOperator):
    """The SDK's series selector with chest radiograph rules (:data:`CHEST_XRAY_RULES`), keeping every matching
    series. Each series it leaves out gets one log line with the reason (e.g. ``modality CT is not one of
    CR/DX``), and so does each file of ``dicom_files`` the SDK's loader did not load (unreadable header, no Study
    or SOP Instance UID, DICOMDIR); their instances are counted in ``counts`` as inputs and skipped.
    """

    def __init__(self, fragment, *args, rules: str = CHEST_XRAY_RULES, dicom_files=(), counts: Counter | None = None,
                 **kwargs):
        self.dicom_files = {Path(f).resolve() for f in dicom_files}
        self.counts = counts if counts is not None else Counter()
        super().__init__(fragment, *args, rules=rules, all_matched=True, **kwargs)

    def filter(self, selection_rules, dicom_study_list, all_matched=False, sort_by_sop_instance_count=False):
        with _quiet():
            selected = super().filter(selection_rules, dicom_study_list, all_matched, sort_by_sop_instance_count)
        kept = {s.series.SeriesInstanceUID for study in selected for s in study.selected_series}
        loaded = set()
        for study in dicom_study_list or []:
            for series in study.get_all_series():
                sops = series.get_sop_instances()
                loaded |= {Path(str(getattr(sop.get_native_sop_instance(), "filename", "") or "")).resolve()
                           for sop in sops}
                if series.SeriesInstanceUID in kept:
                    continue
                reasons = dout.chest_xray_reasons(sops[0].get_native_sop_instance()) if sops else ["no instances"]
                self.counts["inputs"] += len(sops)
                self.counts["skipped"] += len(sops)
                logger.warning("%s, %d instance(s): skipped: %s", _series_label(series), len(sops),
                               "; ".join(reasons) or "does not match the selection rules")
        for f in sorted(self.dicom_files - loaded):
            self.counts["inputs"] += 1
            self.counts["skipped"] += 1
            logger.warning("%s: skipped: the SDK's DICOM loader did not use it (unreadable header, no Study/Series/"
                           "SOP Instance UID, or a DICOMDIR)", f)
        return selected


class ChestXrayImageOperator(Operator):
    """One chest radiograph per tick for the bundle operator.

    DICOM mode (``files=None``): receives the selected series once, then emits their instances one by one;
    instances that fail :func:`~scripts.deploy.dicom_outputs.chest_xray_reasons` or cannot be read get one log
    line and no output. File mode: emits the given PNG/JPEG/... files one by one.

    Outputs: ``image``: an SDK ``Image`` of shape (1, H, W), float32 in [0, 1] at the file's size, with
    ``filename_or_obj`` and ``original_spatial_shape`` metadata; ``source``: a dict for the writer (``kind``,
    ``path``, ``name``, ``dataset`` (DICOM) and ``pixels``). The operator's ``BooleanCondition`` (a positional
    argument) is switched off when nothing is left, which ends the application.
    """

    def __init__(self, fragment, *args, files=None, counts: Counter | None = None, **kwargs):
        self._tick = next((a for a in args if isinstance(a, BooleanCondition)), None)
        if self._tick is None:
            raise ValueError("ChestXrayImageOperator needs a BooleanCondition among its positional arguments")
        self._file_mode = files is not None
        self._queue: deque = deque(("file", Path(f), None) for f in (files or []))
        self._received = self._file_mode
        self.counts = counts if counts is not None else Counter()
        self._names: set[str] = set()  # output folder names given so far (a.png and a.jpg: a, a_jpg)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        if not self._file_mode:
            spec.input("study_selected_series_list").condition(ConditionType.NONE)
        spec.output("image")
        spec.output("source")

    def _enqueue_series(self, studies) -> None:
        for study in studies or []:
            for selected in study.selected_series:
                for sop in selected.series.get_sop_instances():
                    ds = sop.get_native_sop_instance()
                    self._queue.append(("dicom", Path(str(getattr(ds, "filename", "") or "")), ds))

    def _read(self, kind: str, path: Path, ds):
        """``(pixels, source)`` or ``None`` (logged and counted as skipped)."""
        name = f"SOP {ds.SOPInstanceUID} ({path.name})" if kind == "dicom" else str(path)
        self.counts["inputs"] += 1
        reasons = dout.chest_xray_reasons(ds) if kind == "dicom" else []
        pixels = None
        if not reasons:
            try:
                # DICOM: the dataset the SDK's loader read (no second read of the file), the checks of read_cxr
                pixels = read_cxr_dataset(ds, path) if kind == "dicom" else read_cxr(path)
            except (CXRReadError, OSError) as e:
                reasons = [str(getattr(e, "reason", None) or e)]
        if reasons:
            self.counts["skipped"] += 1
            logger.warning("%s: skipped: %s", name, "; ".join(reasons))
            return None
        stem = output_stem(str(ds.SOPInstanceUID) if kind == "dicom" else str(path), self._names)
        return pixels, {"kind": kind, "path": str(path), "name": stem, "dataset": ds, "pixels": pixels}

    def compute(self, op_input, op_output, context):
        if not self._received:
            studies = op_input.receive("study_selected_series_list")
            if studies is None:  # the loader and selector have not run yet
                return
            self._received = True
            self._enqueue_series(studies)
        while self._queue:
            loaded = self._read(*self._queue.popleft())
            if loaded is not None:
                pixels, source = loaded
                meta = {"filename_or_obj": source["path"], "original_spatial_shape": tuple(pixels.shape),
                        "original_channel_dim": "no_channel"}
                op_output.emit(Image(pixels[None].astype(np.float32), metadata=meta), "image")
                op_output.emit(source, "source")
                break
        if not self._queue:
            self._tick.disable_tick()


class IsolatingBundleInferenceOperator(MonaiBundleInferenceOperator):
    """The SDK's ``MonaiBundleInferenceOperator`` (its own config and model loading), but an exception on one
    radiograph is logged and ``None`` is sent on every output port: the writer counts that radiograph as
    failed and the next one goes on. A failure before the bundle config could be parsed still stops the app.
    """

    def compute(self, op_input, op_output, context):
        try:
            super().compute(op_input, op_output, context)
        except Exception as e:  # noqa: BLE001 - any model/transform error of one image; logged and counted
            if not self._init_completed:
                raise
            logger.error("inference failed on this radiograph: %s: %s", type(e).__name__, e)
            for port in OUTPUT_PORTS:
                op_output.emit(None, port)


def _scalar(x) -> float:
    return float(np.asarray(x, dtype=np.float64).reshape(-1)[0])


def _text(x) -> str:
    v = np.asarray(x).reshape(-1)
    return "" if v.size == 0 else "; ".join(str(s) for s in v if str(s))


class AnomalyResultWriterOperator(Operator):
    """Writes one folder per radiograph under ``output_folder/<SOP Instance UID or file stem>/``.

    DICOM inputs: ``seg.dcm`` (DICOM Segmentation of the mask at the source's size), ``sc.dcm`` (Secondary
    Capture of the heat map with the score burnt in) and ``sr.dcm`` (Comprehensive SR with the score and the
    thresholds), each referencing the source instance. Every input: ``result.json`` (score, decision, mask
    rule, mask fraction, input checks, files), ``overlay.png`` (the Secondary Capture's picture) and
    ``mask.png`` (source size). The folder is put in place whole (:meth:`write`); an error on one
    image, or ``None`` model outputs (:class:`IsolatingBundleInferenceOperator`), is logged and counted
    (``failed``), and the application goes on.

    Args:
        output_folder: where the folders go.
        score_threshold: the image-score threshold of the report (``None``: score only, no decision).
        mask_rule: the description of the mask rule written to the report.
        software_version: the bundle version (``configs/metadata.json``), written to the DICOM objects.
    """

    def __init__(self, fragment, *args, output_folder, score_threshold: float | None = None,
                 mask_rule: str = "", software_version: str = "", counts: Counter | None = None, **kwargs):
        self.output_folder = Path(output_folder)
        self.score_threshold = None if score_threshold is None else float(score_threshold)
        self.mask_rule = mask_rule
        self.software_version = software_version or "unknown"
        self.counts = counts if counts is not None else Counter()
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("source")
        for port in OUTPUT_PORTS:
            spec.input(port)

    def compute(self, op_input, op_output, context):
        source = op_input.receive("source")
        self.handle(source, {port: op_input.receive(port) for port in OUTPUT_PORTS})

    def handle(self, source: dict, outputs: dict) -> Path | None:
        """Write one radiograph's results, or log and count it as failed; its folder or ``None``."""
        if any(outputs.get(port) is None for port in OUTPUT_PORTS):
            self.counts["failed"] += 1
            logger.error("%s: failed: no model outputs (inference error above)", source.get("path"))
            return None
        try:
            folder = self.write(source, outputs)
        except Exception as e:  # noqa: BLE001 - one image's write error must not lose the others: log, count
            self.counts["failed"] += 1
            logger.error("%s: writing the results failed: %s: %s", source.get("path"), type(e).__name__, e)
            return None
        self.counts["written"] += 1
        logger.info("%s -> %s", source["path"], folder)
        return folder

    def write(self, source: dict, outputs: dict) -> Path:
        """Make every result file of one radiograph in memory, then put its folder in place at once
        (:func:`custom_transforms.io.atomic_write_folder`: never old and new files side by side)."""
        pixels = source["pixels"]
        amap = as_2d(outputs["amap"], "amap").astype(np.float32)
        mask = as_2d(outputs["pred_mask"].asnumpy() if isinstance(outputs["pred_mask"], Image)
                     else outputs["pred_mask"], "pred_mask").astype(np.float32)
        mask = (mask > 0.5).astype(np.float32)
        score, flags = _scalar(outputs["score"]), _text(outputs["flags"])
        lines = dout.summary_lines(score, self.score_threshold, flags)
        native_mask = dout.to_native(mask, pixels.shape, nearest=True)
        picture = dout.overlay_picture(pixels, amap, mask, lines)
        files = {"overlay.png": png_bytes(picture), "mask.png": png_bytes(native_mask)}
        result = {"source": source["path"], "kind": source["kind"], "score": score,
                  "score_threshold": self.score_threshold,
                  "above_threshold": None if self.score_threshold is None else bool(score > self.score_threshold),
                  "mask_rule": self.mask_rule, "mask_fraction": float(native_mask.mean()), "flags": flags,
                  "software_version": self.software_version, "files": ["overlay.png", "mask.png"]}
        ds = source.get("dataset")
        if ds is not None:
            made = {
                "seg.dcm": dout.segmentation(ds, native_mask, software_version=self.software_version),
                "sc.dcm": dout.secondary_capture(ds, picture, software_version=self.software_version),
                "sr.dcm": dout.structured_report(ds, score, score_threshold=self.score_threshold,
                                                 mask_rule=self.mask_rule, mask_fraction=result["mask_fraction"],
                                                 flags=flags, software_version=self.software_version),
            }
            files.update({name: _dicom_bytes(obj) for name, obj in made.items()})
            result["files"] += list(made)
            result["source_sop_instance_uid"] = str(ds.SOPInstanceUID)
            result["sop_instance_uids"] = {k: str(v.SOPInstanceUID) for k, v in made.items()}
        files["result.json"] = json_bytes(result)
        folder = self.output_folder / source["name"]
        atomic_write_folder(folder, files)
        return folder


def _dicom_bytes(ds) -> bytes:
    """A DICOM object as the bytes of a file (preamble, file meta)."""
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
