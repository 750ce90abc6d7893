"""Inference outputs: per image an anomaly heatmap, a binary mask and an image score; one bad file costs nothing else.

``configs/inference.json`` wires these pieces into a MONAI ``SupervisedEvaluator``:

- :class:`InferenceInputs` lists ``dataset_dir`` once, at parse time (:func:`scan_inputs`): the image files, the
  files that are no images (unsupported type, sub-folder when not ``recursive``, broken link), and, unless
  ``overwrite``, the rows of an earlier run's ``scores.csv`` whose outputs exist (those images are not run
  again). It also fixes every image's output stem up front (:func:`output_stem`), so re-runs keep the names.
- :class:`SkippingDataset` runs the preprocessing of one item inside ``try``: a file that cannot be read or
  preprocessed becomes a small *skipped record* (file, reason) instead of an exception;
  :func:`collate_with_skipped` batches the good items as usual and carries the skipped records beside them;
  :class:`SkippingEvaluator` takes the records off the batch before the network runs (a batch of only
  skipped files does not run the network).
- :class:`InferenceWriter` (an ignite handler) writes, per image, to ``output_dir``:

  - ``<stem>_overlay.png``: the image with the heatmap blended in and the mask outlined (for people);
  - ``<stem>_amap.nii.gz`` and ``<stem>_mask.nii.gz`` (``maps="nifti"``) or ``<stem>_amap.png`` and
    ``<stem>_mask.png`` (``maps="png"``): the anomaly map ``|I - I_hat|`` and the binary mask, at the model's
    input size, stored as ``(x, y)`` like MONAI/ITK 2-D NIfTI (they open in the PNG's orientation);

  and one row per file found in ``scores.csv`` / ``scores.json``: ``file``, ``output`` (stem; empty when
  skipped), ``score``, ``mask_fraction``, ``status`` (``ok``, ``flagged``: scored but implausible, see
  :mod:`custom_transforms.plausibility`; ``skipped``: not scored), ``reason`` (empty for ``ok``) and
  ``above_threshold`` (score > ``score_threshold``, when one is set). Rows are appended to ``scores.csv``
  (flushed and fsynced) after every batch, so a killed run keeps what it finished; at the end both files are
  rewritten atomically in listing order and one summary line is printed::

      inference: N images: K ok, F flagged, S skipped -> <output_dir>

  When no file at all could be read the run fails with :class:`NoReadableImageError` (after writing the rows).

Image files are written atomically (temporary name, then rename).

Config keys of ``configs/inference.json`` (top level, with their defaults): ``dataset_dir``, ``output_dir``,
``recursive: false`` (read sub-folders too), ``overwrite: false`` (``--overwrite true`` runs images that an
earlier run in ``output_dir`` scored again), ``score_threshold: null``, ``maps_format: "nifti"``,
``plausibility_thresholds: {}`` (fields of ``custom_transforms.plausibility.PlausibilityThresholds`` to
change), ``plausibility_transforms`` (PBTSeg with ``on_missing="ignore"``, then ``Plausibilityd``; ``[]``
turns the gate off). Hidden and temporary files get ``skipped`` rows too, logged at DEBUG level only.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from ignite.engine import Engine, Events
from monai.data import Dataset, list_data_collate
from monai.engines import SupervisedEvaluator
from monai.utils import convert_to_numpy

from custom_transforms.io import IMAGE_SUFFIXES, atomic_write_bytes, save_png, write_json
from custom_transforms.utils import as_2d, cli_flag
from scripts.data.datasets import _QUIET_REASONS as QUIET_REASONS  # rows, but logged at DEBUG only
from scripts.data.datasets import scan_folder
from scripts.robust import failure_reason as describe_error
from scripts.visualization import overlay

logger = logging.getLogger(__name__)

STATUSES = ("ok", "flagged", "skipped")
COLUMNS = ("file", "output", "score", "mask_fraction", "status", "reason")
SKIPPED_KEY = "_skipped"  # batch key of the records of items whose preprocessing failed


class NoReadableImageError(RuntimeError):
    """Inference found files but could read none of them (the rows in ``scores.csv`` say why)."""


def save_nifti(path, arr2d: np.ndarray) -> None:
    """Save a 2-D (row, col) array as gzipped NIfTI in the (x, y) convention, atomically."""
    import nibabel as nib

    data = nib.Nifti1Image(np.ascontiguousarray(arr2d.T), np.eye(4)).to_bytes()
    atomic_write_bytes(path, gzip.compress(data))


def output_stem(src: str, taken: set[str]) -> str:
    """The output name of input ``src``: its file name without the image suffix, unique within ``taken``.

    ``a.png`` -> ``a``; a second ``a.dcm`` in the same run -> ``a_dcm`` (then ``a_dcm_2``, ...), so inputs
    that share a stem never overwrite each other's outputs. The chosen stem is added to ``taken``.
    """
    name = Path(src).name
    ext = next((x for x in IMAGE_SUFFIXES if name.lower().endswith(x)), "")
    stem = name[: len(name) - len(ext)] if ext else name
    candidate = stem
    if candidate in taken:
        candidate = f"{stem}_{ext.lstrip('.').replace('.', '_')}" if ext else f"{stem}_2"
        n = 2
        while candidate in taken:
            n += 1
            candidate = f"{stem}_{ext.lstrip('.').replace('.', '_')}_{n}" if ext else f"{stem}_{n}"
    taken.add(candidate)
    return candidate


MAP_SUFFIXES = {"nifti": ".nii.gz", "png": ".png"}


def _own_suffixes(maps: str) -> tuple[str, ...]:
    ext = MAP_SUFFIXES[maps]
    return ("_overlay.png", f"_amap{ext}", f"_mask{ext}")


# every name ending of the files InferenceWriter writes per image (either maps format)
OWN_OUTPUTS = tuple(dict.fromkeys(s for m in MAP_SUFFIXES for s in _own_suffixes(m)))


def output_files(output_dir, stem: str, maps: str = "nifti") -> list[Path]:
    """The files :class:`InferenceWriter` writes for one image."""
    out = Path(output_dir)
    return [out / f"{stem}{suffix}" for suffix in _own_suffixes(maps)]


# ------------------------------------------------------------------------------------------------ listing

def _inside(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        return path.resolve() == folder or folder in path.resolve().parents
    except (OSError, RuntimeError):  # RuntimeError: a symbolic link loop (Python < 3.13)
        return False


def scan_inputs(dataset_dir, recursive: bool = False, exclude=None) -> tuple[list[str], list[tuple[str, str]]]:
    """``(image files, [(other file, reason), ...])`` under ``dataset_dir`` as strings, sorted by path.

    The listing is :func:`scripts.data.datasets.scan_folder` (images by suffix or DICOM preamble; every other
    entry with its reason, hidden and temporary files included). A ``dataset_dir`` that is not a folder is
    one input file (a missing one is then skipped by the reader with its message). ``exclude``: the output
    folder; its files are never inputs (when it is ``dataset_dir`` itself, the files this module writes are
    left out by name).
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        return [str(root)], []
    images, others = scan_folder(root, recursive=recursive)
    out = Path(exclude).resolve() if exclude is not None else None
    if out is not None and out == root.resolve():
        def keep(p: Path) -> bool:
            ours = (p.name in ("scores.csv", "scores.json") or p.name.endswith(OWN_OUTPUTS)
                    or (p.name.startswith(".") and ".tmp" in p.name))  # atomic_write_bytes' temporary files
            return not (ours and p.parent.resolve() == out)
    else:
        def keep(p: Path) -> bool:
            return not _inside(p, out)
    return [str(p) for p in images if keep(Path(p))], [(str(p), str(r)) for p, r in others if keep(Path(p))]


# ------------------------------------------------------------------------------------------------ plan

def _float_or_none(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def read_scores(path) -> list[dict]:
    """Rows of an earlier ``scores.csv`` (a torn last line from a killed run is dropped); [] if unreadable."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"file", "output", "status"} <= set(reader.fieldnames):
                logger.warning("%s: no file/output/status columns (an older or foreign scores file); all images "
                               "are run again", path)
                return []
            rows = [r for r in reader if None not in r.values() and None not in r]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        logger.warning("%s: cannot read (%s); all images are run again", path, e)
        return []
    return rows


class InferenceInputs:
    """What one inference run works on (computed once, when the config is parsed; reads, never writes).

    Attributes:
        files: every file found (images and others), sorted: one row each in ``scores.csv``.
        images: the image files; ``todo``: those to run (all unless an earlier run scored them).
        not_images: ``{file: reason}`` for the files that are no images.
        previous: ``{file: row}`` reused from ``output_dir/scores.csv`` (status ok/flagged, outputs present).
        stems: ``{image: output stem}``, fixed for all images (earlier stems kept).

    Args:
        dataset_dir: a folder of images (or one image file).
        output_dir: where :class:`InferenceWriter` writes (left out of the listing).
        recursive: also read sub-folders (``false``: sub-folders are listed as skipped).
        overwrite: run every image again even when an earlier run in ``output_dir`` scored it.
        maps: ``"nifti"`` or ``"png"`` (which output files must exist for a row to be reused).
    """

    def __init__(self, dataset_dir, output_dir, recursive=False, overwrite=False, maps: str = "nifti"):
        self.dataset_dir, self.output_dir = str(dataset_dir), Path(output_dir)
        self.recursive, self.overwrite = cli_flag(recursive, "recursive"), cli_flag(overwrite, "overwrite")
        if maps not in MAP_SUFFIXES:
            raise ValueError(f"maps must be 'nifti' or 'png', got {maps!r}")
        self.maps = maps
        self.images, others = scan_inputs(dataset_dir, self.recursive, exclude=self.output_dir)
        self.not_images = dict(others)
        self.files = sorted(set(self.images) | set(self.not_images))
        self.previous: dict[str, dict] = {}
        if not self.overwrite:
            wanted = set(self.images)
            for r in read_scores(self.output_dir / "scores.csv"):
                if (r["file"] in wanted and r["status"] in ("ok", "flagged") and r["output"]
                        and all(p.is_file() for p in output_files(self.output_dir, r["output"], maps))):
                    self.previous[r["file"]] = r
        taken: set[str] = {r["output"] for r in self.previous.values()}
        self.stems = {f: self.previous[f]["output"] for f in self.previous}
        for f in self.images:
            if f not in self.stems:
                self.stems[f] = output_stem(f, taken)
        self.todo = [f for f in self.images if f not in self.previous]
        if self.previous:
            logger.info("inference: %d of %d images already scored in %s (reused; overwrite=true runs them "
                        "again)", len(self.previous), len(self.images), self.output_dir / "scores.csv")


# ------------------------------------------------------------------------------------------------ fault isolation

class SkippingDataset(Dataset):
    """A MONAI ``Dataset`` whose items never raise: a failing item becomes a skipped record.

    The record is ``{SKIPPED_KEY: True, "file": path, "reason": one line}`` (``path``: ``d[image_key]``);
    :func:`collate_with_skipped` keeps such records out of the collated batch.
    ``Exception`` only: ``KeyboardInterrupt`` still stops the run.
    """

    def __init__(self, data: Sequence, transform=None, image_key: str = "image"):
        super().__init__(data=data, transform=transform)
        self.image_key = image_key

    def _transform(self, index: int):
        try:
            return super()._transform(index)
        except Exception as e:
            item = self.data[index]
            src = item.get(self.image_key) if isinstance(item, Mapping) else item
            return {SKIPPED_KEY: True, "file": str(src), "reason": describe_error(e)}


def is_skipped(item) -> bool:
    return isinstance(item, Mapping) and bool(item.get(SKIPPED_KEY))


def collate_with_skipped(items: list) -> dict:
    """``list_data_collate`` of the good items, plus ``batch[SKIPPED_KEY]``: the skipped records (a list).

    A batch of only skipped records is ``{SKIPPED_KEY: [...]}``.
    """
    good = [i for i in items if not is_skipped(i)]
    batch = list_data_collate(good) if good else {}
    if not isinstance(batch, dict):
        raise TypeError(f"collate_with_skipped needs dictionary items, got {type(batch).__name__}")
    batch[SKIPPED_KEY] = [dict(i) for i in items if is_skipped(i)]
    return batch


class SkippingEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` for batches from :func:`collate_with_skipped`.

    Each iteration moves the skipped records from the batch to ``engine.state.skipped`` (for
    :class:`InferenceWriter`); a batch without a good item does not run the network (output ``{}``).
    """

    def _iteration(self, engine, batchdata):
        skipped = batchdata.pop(SKIPPED_KEY, []) if isinstance(batchdata, dict) else []
        engine.state.skipped = skipped
        if isinstance(batchdata, dict) and not batchdata:
            return {}
        return super()._iteration(engine, batchdata)


# ------------------------------------------------------------------------------------------------ writer

def _csv_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


class InferenceWriter:
    """Write heatmaps, masks, overlays and one ``scores.csv`` row per file (see the module docstring).

    The config's ``run`` drives it: :meth:`start`, the evaluator (which does not run when every image was
    scored before), :meth:`finish`; :meth:`attach` adds only the per-batch writing and the error handling.

    Args:
        inputs: the run's :class:`InferenceInputs`: the output folder and maps format, the rows of non-image
            files and of earlier runs, and every image's output stem.
        score_threshold: adds ``above_threshold`` (score > threshold, 0/1) to the rows when set.
        flags_key: the batch key of the plausibility reasons (``custom_transforms.plausibility``).
    """

    def __init__(self, inputs: InferenceInputs, score_threshold: float | None = None, flags_key: str = "flags"):
        if score_threshold is not None and _float_or_none(score_threshold) is None:
            raise ValueError(f"score_threshold must be a finite number or null, got {score_threshold!r}")
        self.inputs, self.flags_key = inputs, flags_key
        self.output_dir, self.maps = inputs.output_dir, inputs.maps
        self.score_threshold = None if score_threshold is None else float(score_threshold)
        self.columns = list(COLUMNS) + (["above_threshold"] if self.score_threshold is not None else [])
        self._rows: dict[str, dict] = {}
        self._order: dict[str, int] = {}

    # -- rows
    @property
    def rows(self) -> list[dict]:
        """The rows so far, in listing order (files the listing did not know come last, in arrival order)."""
        n = len(self._order)
        return sorted(self._rows.values(), key=lambda r: self._order.get(r["file"], n))

    def _row(self, file: str, output: str = "", score=None, mask_fraction=None, status: str = "ok",
             reason: str = "") -> dict:
        row = {"file": file, "output": output, "score": score, "mask_fraction": mask_fraction, "status": status,
               "reason": reason}
        if self.score_threshold is not None:
            row["above_threshold"] = None if score is None else int(score > self.score_threshold)
        return row

    # -- engine events
    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write_items)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._on_exception)

    def start(self) -> None:
        """Reset; take the rows known before running (files that are no images, earlier runs); write them."""
        self._rows.clear()
        self._order = {f: i for i, f in enumerate(self.inputs.files)}
        for f, reason in self.inputs.not_images.items():
            self._rows[f] = self._row(f, status="skipped", reason=reason)
            level = logging.DEBUG if reason in QUIET_REASONS else logging.WARNING
            logger.log(level, "inference: skipped '%s': %s", f, reason)
        for f, r in self.inputs.previous.items():
            score = _float_or_none(r.get("score"))
            self._rows[f] = self._row(f, r["output"], score, _float_or_none(r.get("mask_fraction")),
                                      r["status"], r.get("reason") or "")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._write_csv()

    def write_items(self, engine: Engine) -> None:
        """Write the outputs of one batch and append its rows (skipped files included) to ``scores.csv``."""
        from monai.data import decollate_batch

        new = []
        for rec in getattr(engine.state, "skipped", None) or []:
            new.append(self._row(rec["file"], status="skipped", reason=rec["reason"]))
            logger.warning("inference: skipped '%s': %s", rec["file"], rec["reason"])
        out, batch = engine.state.output, engine.state.batch
        if out:  # {} when every file of the batch was skipped
            out = out if isinstance(out, list) else decollate_batch(out)
            batch = batch if isinstance(batch, list) else decollate_batch(batch)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for b, item in zip(batch, out):
                new.append(self._write_one(b, item))
        for r in new:
            self._rows[r["file"]] = r
        self._append_csv(new)

    def _write_one(self, b: Mapping, item: Mapping) -> dict:
        # the output's "image" is the bare network input (prepare_batch drops the metadata):
        # the file name is on the batch item's MetaTensor (set by LoadCXRd)
        src = str(b["image"].meta["filename_or_obj"])
        stem = self.inputs.stems[src]
        img, amap, mask = (as_2d(item[k]).astype(np.float32) for k in ("image", "amap", "pred_mask"))
        overlay_path, amap_path, mask_path = output_files(self.output_dir, stem, self.maps)
        save_png(overlay_path, overlay(img, amap, mask))
        if self.maps == "nifti":
            save_nifti(amap_path, amap)
            save_nifti(mask_path, mask.astype(np.uint8))
        else:
            save_png(amap_path, np.clip(amap, 0, 1))
            save_png(mask_path, mask)
        score = float(convert_to_numpy(item["score"]).reshape(-1)[0])
        flags = b.get(self.flags_key) or ""  # a string (Plausibilityd); absent when the gate is off
        return self._row(src, stem, score, float(mask.mean()), "flagged" if flags else "ok", flags)

    # -- files
    def _csv_bytes(self, rows: Iterable[dict], header: bool) -> bytes:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        if header:
            w.writeheader()
        w.writerows({k: _csv_value(v) for k, v in r.items()} for r in rows)
        return buf.getvalue().encode()

    def _write_csv(self) -> None:
        atomic_write_bytes(self.output_dir / "scores.csv", self._csv_bytes(self.rows, header=True))

    def _append_csv(self, rows: list[dict]) -> None:
        if not rows:
            return
        path = self.output_dir / "scores.csv"
        if not path.is_file():
            self._write_csv()
            return
        with open(path, "ab") as f:
            f.write(self._csv_bytes(rows, header=False))
            f.flush()
            os.fsync(f.fileno())

    def write_scores(self) -> None:
        """Rewrite ``scores.csv`` and ``scores.json`` atomically, in listing order."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._write_csv()
        write_json(self.output_dir / "scores.json", self.rows)

    def summary(self) -> dict:
        rows = self.rows
        counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
        return {"n": len(rows), **counts}

    def finish(self) -> None:
        """Final files and the summary line; raises when files were found but none could be read."""
        self.write_scores()
        s = self.summary()
        print(f"inference: {s['n']} images: {s['ok']} ok, {s['flagged']} flagged, {s['skipped']} skipped "
              f"-> {self.output_dir}", flush=True)
        where = self.inputs.dataset_dir
        if s["n"] == 0:
            raise NoReadableImageError(f"inference: no files found in '{where}'")
        if s["ok"] + s["flagged"] == 0:
            first = "; ".join(f"{Path(r['file']).name}: {r['reason']}" for r in self.rows[:3])
            raise NoReadableImageError(
                f"inference: none of the {s['n']} file(s) in '{where}' could be read ({first}"
                f"{'; ...' if s['n'] > 3 else ''}); see {self.output_dir / 'scores.csv'}")

    def _on_exception(self, engine: Engine, e: BaseException) -> None:
        """Keep the finished rows in order (best effort), then let the error through."""
        try:
            self.write_scores()
        except Exception:  # the original error matters more
            logger.exception("inference: could not rewrite the scores after an error")
        raise e
