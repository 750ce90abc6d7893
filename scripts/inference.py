"""Inference outputs: per image an anomaly heatmap, a binary mask and an image score.

:class:`InferenceWriter` is an ignite handler for a MONAI evaluator whose post-processing is
``custom_transforms.anomaly.AnomalyPostd``. For each input ``<stem>`` it writes to ``output_dir``:

- ``<stem>_overlay.png``: the image with the heatmap blended in and the mask outlined (for people);
- ``<stem>_amap.nii.gz`` and ``<stem>_mask.nii.gz`` (``maps="nifti"``) or ``<stem>_amap.png`` and
  ``<stem>_mask.png`` (``maps="png"``): the anomaly map ``|I - I_hat|`` and the binary mask, at the model's
  input size, stored as ``(x, y)`` like MONAI/ITK 2-D NIfTI (they open in the PNG's orientation);
- ``scores.csv`` and ``scores.json`` at the end: file, output stem, score, mask fraction, flagged (score >
  threshold). Inputs that share a stem (``a.png``, ``a.dcm``) get distinct stems (``a``, ``a_dcm``).

All files are written atomically (temporary name, then rename).
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
from pathlib import Path

import numpy as np
from ignite.engine import Engine, Events
from monai.utils import convert_to_numpy

from custom_transforms.io import IMAGE_SUFFIXES, atomic_write_bytes, save_png, write_json
from custom_transforms.utils import as_2d
from scripts.visualization import overlay

logger = logging.getLogger(__name__)


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


class InferenceWriter:
    """Write heatmaps, masks, overlays and scores of every image the evaluator sees."""

    def __init__(self, output_dir, maps: str = "nifti", score_threshold: float | None = None):
        if maps not in ("nifti", "png"):
            raise ValueError(f"maps must be 'nifti' or 'png', got {maps!r}")
        self.output_dir, self.maps, self.score_threshold = Path(output_dir), maps, score_threshold
        self.rows: list[dict] = []
        self._stems: set[str] = set()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: (self.rows.clear(), self._stems.clear()))
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write_items)
        engine.add_event_handler(Events.COMPLETED, self.write_scores)

    def write_items(self, engine: Engine) -> None:
        from monai.data import decollate_batch

        out = engine.state.output
        out = out if isinstance(out, list) else decollate_batch(out)
        batch = engine.state.batch
        batch = batch if isinstance(batch, list) else decollate_batch(batch)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for b, item in zip(batch, out):
            # the output's "image" is the bare network input (prepare_batch drops the metadata):
            # the file name is on the batch's MetaTensor
            meta = getattr(b.get("image"), "meta", None) or {}
            src = str(meta.get("filename_or_obj") or f"image_{len(self.rows):05d}")
            stem = output_stem(src, self._stems)
            img, amap, mask = (as_2d(item[k]).astype(np.float32) for k in ("image", "amap", "pred_mask"))
            save_png(self.output_dir / f"{stem}_overlay.png", overlay(img, amap, mask))
            if self.maps == "nifti":
                save_nifti(self.output_dir / f"{stem}_amap.nii.gz", amap)
                save_nifti(self.output_dir / f"{stem}_mask.nii.gz", mask.astype(np.uint8))
            else:
                save_png(self.output_dir / f"{stem}_amap.png", np.clip(amap, 0, 1))
                save_png(self.output_dir / f"{stem}_mask.png", mask)
            score = float(convert_to_numpy(item["score"]).reshape(-1)[0])
            row = {"file": src, "output": stem, "score": score, "mask_fraction": float(mask.mean())}
            if self.score_threshold is not None:
                row["flagged"] = int(score > self.score_threshold)
            self.rows.append(row)

    def write_scores(self, engine: Engine | None = None) -> None:
        if not self.rows:
            logger.warning("inference saw no images; no scores written")
            return
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(self.rows[0]))
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_bytes(self.output_dir / "scores.csv", buf.getvalue().encode())
        write_json(self.output_dir / "scores.json", self.rows)
        print(f"inference: {len(self.rows)} images -> {self.output_dir} (scores.csv, *_overlay.png, "
              f"*_amap/*_mask .{'nii.gz' if self.maps == 'nifti' else 'png'})")
