"""Test-set evaluation as ignite handlers: image AUROC/AP, pixel Dice, plots, case grid, MLflow.

Attach to a MONAI ``SupervisedEvaluator`` whose post-processing is
:class:`custom_transforms.anomaly.AnomalyPostd` (it writes ``score``, ``amap`` and ``pred_mask`` per image).
One job per piece:

- :class:`ThresholdCalibration` (``mask_rule="calibrated"``): before the test images run, sets the pixel
  threshold to the ``quantile`` of anomaly-map values on held-out healthy images, optionally inside the
  dilated lung field;
- :class:`ResultCollector`: per-image labels, scores, masks, maps;
- :func:`compute_metrics`: ``auroc``, ``ap`` (image level; ``None`` when the test set holds one class only,
  e.g. QaTa, all diseased), ``dice_micro`` (pixel Dice over all pixels of the images that have a
  ground-truth lesion mask; ART-ASyn Eq. 10), ``dice_mean`` (mean per-image Dice over those images),
  ``healthy_fp_fraction`` (mean fraction of pixels flagged on healthy test images);
- pictures from :mod:`scripts.visualization` and the MLflow run from :func:`scripts.tracking.log_run`;
- :class:`AnomalyEvaluationHandler` ties them together and writes ``<output_dir>/metrics.json``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import decollate_batch
from monai.utils import convert_to_numpy

from custom_transforms.anomaly import calibrate_threshold, dilate_region
from custom_transforms.io import save_png, write_json
from custom_transforms.utils import Choice, as_2d
from scripts.engine import AnomalyInferer, prepare_restoration_batch
from scripts.metrics import dice_micro, dice_per_image, dice_score, image_auroc_ap
from scripts.tracking import log_run
from scripts.visualization import case_grid, roc_pr_png

logger = logging.getLogger(__name__)

MASK_RULES = ("paper", "calibrated")


validate_mask_rule = Choice("mask_rule", MASK_RULES)


def _name(item: dict) -> str:
    img = item.get("image")
    meta = getattr(img, "meta", None) or {}
    return str(item.get("name") or Path(str(meta.get("filename_or_obj", "?"))).name)


def _first(x) -> float:
    return convert_to_numpy(x).reshape(-1)[0]


class ThresholdCalibration:
    """With ``mask_rule="calibrated"``, set ``postprocessing.threshold`` when the evaluator starts.

    The threshold is the ``quantile`` of anomaly-map values of the held-out healthy images of
    ``calibration_loader`` (inside ``region_key`` dilated by ``region_dilation`` px when given). With
    ``mask_rule="paper"`` it does nothing and ``threshold`` stays ``None``.
    """

    def __init__(self, postprocessing, mask_rule: str = "paper", calibration_loader=None, network=None,
                 quantile: float = 0.99, region_key: str | None = None, region_dilation: int = 0,
                 inferer=None):
        self.mask_rule = validate_mask_rule(mask_rule)
        if mask_rule == "calibrated" and (calibration_loader is None or network is None or postprocessing is None):
            raise ValueError("mask_rule='calibrated' needs calibration_loader, network and postprocessing")
        self.post, self.loader, self.network = postprocessing, calibration_loader, network
        self.inferer = inferer if inferer is not None else AnomalyInferer()
        self.quantile, self.region_key, self.region_dilation = quantile, region_key, region_dilation
        self.threshold: float | None = None

    def attach(self, engine: Engine) -> None:
        if self.mask_rule == "calibrated":
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine | None = None) -> float:
        device = getattr(getattr(engine, "state", None), "device", None)
        self.threshold = self.calibrate(device)
        self.post.threshold = self.threshold
        logger.info("calibrated pixel threshold %.4f (quantile %.3f of held-out healthy maps)",
                    self.threshold, self.quantile)
        return self.threshold

    def calibrate(self, device=None) -> float:
        """Pixel threshold = quantile of anomaly-map values of held-out healthy images (in the region)."""
        device = device or next(self.network.parameters()).device
        prepare = prepare_restoration_batch("image", "image")
        maps, regions = [], []
        self.network.eval()
        with torch.no_grad():
            for batch in self.loader:
                x, _ = prepare(batch, device)
                amap, _ = self.post.map_and_score(x, self.inferer(x, self.network))
                maps.append(convert_to_numpy(amap))
                if self.region_key is not None:
                    region = dilate_region(torch.as_tensor(batch[self.region_key]), self.region_dilation)
                    regions.append(convert_to_numpy(region))
        if not maps:
            raise ValueError("calibration loader yielded no images")
        return float(calibrate_threshold(np.concatenate(maps), self.quantile,
                                         region=np.concatenate(regions) > 0 if regions else None))


class ResultCollector:
    """Collect per-image results of every iteration (labels and masks come from the batch)."""

    def __init__(self):
        self.results: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.results.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        out = out if isinstance(out, list) else decollate_batch(out)
        batch = engine.state.batch
        for b, o in zip(batch if isinstance(batch, list) else decollate_batch(batch), out):
            item = {**o, **b}  # the batch wins: an evaluator output "label" is the restoration target
            has_gt = bool(int(_first(item.get("has_gt_mask", 0)))) and "gt_mask" in item
            self.results.append({
                "name": _name(item),
                "label": int(_first(item["label"])),
                "score": float(_first(item["score"])),
                "pred_mask": as_2d(item["pred_mask"]) > 0.5,
                "gt_mask": as_2d(item["gt_mask"]) > 0.5 if has_gt else None,
                "image": as_2d(item["image"]).astype(np.float16),
                "amap": as_2d(item["amap"]).astype(np.float16),
            })


def _with_gt(results: list[dict]) -> list[dict]:
    return [r for r in results if r["gt_mask"] is not None and r["gt_mask"].any()]


def compute_metrics(results: list[dict]) -> dict:
    """Image AUROC/AP, pixel Dice (micro and mean) and the healthy false-positive fraction of ``results``."""
    if not results:
        raise ValueError("evaluation saw no images")
    labels = np.array([r["label"] for r in results])
    scores = np.array([r["score"] for r in results])
    m: dict = {"n_images": len(labels), "n_healthy": int((labels == 0).sum()), "n_diseased": int(labels.sum())}
    if len(np.unique(labels)) == 2:
        m["auroc"], m["ap"] = (float(v) for v in image_auroc_ap(scores, labels))
    else:
        m["auroc"] = m["ap"] = None
        logger.warning("test set holds one class only: AUROC/AP not defined")
    with_gt = _with_gt(results)
    empty = sum(r["gt_mask"] is not None and not r["gt_mask"].any() for r in results)
    if empty:
        logger.warning("%d ground-truth mask(s) are empty: left out of the Dice figures", empty)
    m["n_with_mask"] = len(with_gt)
    m["dice_micro"] = m["dice_mean"] = None
    if with_gt:
        preds = np.stack([r["pred_mask"] for r in with_gt])
        gts = np.stack([r["gt_mask"] for r in with_gt])
        m["dice_micro"], m["dice_mean"] = float(dice_micro(preds, gts)), float(dice_per_image(preds, gts))
    healthy = [r["pred_mask"].mean() for r in results if r["label"] == 0]
    m["healthy_fp_fraction"] = float(np.mean(healthy)) if healthy else None
    return m


def per_image_rows(results: list[dict]) -> list[dict]:
    """One row per image: name, label, score, flagged mask fraction, Dice when a ground truth exists."""
    rows = []
    for r in results:
        row = {"name": r["name"], "label": r["label"], "score": r["score"],
               "mask_fraction": float(r["pred_mask"].mean())}
        if r["gt_mask"] is not None:
            row["dice"] = dice_score(r["pred_mask"], r["gt_mask"])
        rows.append(row)
    return rows


def pick_cases(results: list[dict], n: int) -> list[dict]:
    """Best and worst ``n`` cases by Dice when masks exist, else the top-scored healthy / lowest diseased."""
    with_gt = _with_gt(results)
    if with_gt:
        ranked = sorted(with_gt, key=lambda r: -dice_score(r["pred_mask"], r["gt_mask"]))
        return ranked[:n] + ranked[::-1][:n]
    healthy = sorted((r for r in results if r["label"] == 0), key=lambda r: -r["score"])
    diseased = sorted((r for r in results if r["label"] == 1), key=lambda r: r["score"])
    return healthy[:n] + diseased[:n]


class AnomalyEvaluationHandler:
    """At the end of evaluation: metrics, ``metrics.json``, ``roc_pr.png``, ``cases.png`` and an MLflow run.

    Args:
        output_dir: where the files go. calibration: the :class:`ThresholdCalibration` of the same
            evaluator (its threshold is recorded in the params), or None.
        tracking_uri / experiment_name / run_name: the MLflow run (none when ``tracking_uri`` is empty).
        params: the run's parameters (:func:`scripts.tracking.run_params`). n_cases: rows of each kind in
            ``cases.png``.
        tags: extra tags of the MLflow run besides ``stage=evaluate`` (e.g. ``train_run_id``: the training
            run of the evaluated model, :func:`scripts.tracking.train_run_id`); tags whose value is None are
            left out.
    """

    def __init__(self, output_dir, calibration: ThresholdCalibration | None = None, tracking_uri: str | None = None,
                 experiment_name: str = "art-asyn", run_name: str | None = None, params: dict | None = None,
                 n_cases: int = 4, tags: dict | None = None):
        self.output_dir, self.calibration = Path(output_dir), calibration
        self.tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
        self.tracking_uri, self.experiment_name, self.run_name = tracking_uri, experiment_name, run_name
        self.params, self.n_cases = dict(params or {}), n_cases
        self.collector = ResultCollector()
        self.metrics: dict = {}
        self.run_id: str | None = None  # the MLflow run, once logged

    @property
    def results(self) -> list[dict]:
        return self.collector.results

    def attach(self, engine: Engine) -> None:
        self.collector.attach(engine)
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        self.t0 = time.perf_counter()

    def completed(self, engine: Engine) -> None:
        self.metrics = compute_metrics(self.results)
        self.metrics["seconds"] = round(time.perf_counter() - self.t0, 2)
        if self.calibration is not None and self.calibration.threshold is not None:
            self.params["calibrated_threshold"] = self.calibration.threshold
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.output_dir / "metrics.json", {"metrics": self.metrics, "params": self.params,
                                                      "per_image": per_image_rows(self.results)})
        artifacts = [self.output_dir / "metrics.json"]
        if self.metrics.get("auroc") is not None:
            artifacts.append(roc_pr_png(self.output_dir / "roc_pr.png", [r["score"] for r in self.results],
                                        [r["label"] for r in self.results], self.metrics["auroc"], self.metrics["ap"]))
        cases = pick_cases(self.results, self.n_cases)
        if cases:
            save_png(self.output_dir / "cases.png", case_grid(cases))
            artifacts.append(self.output_dir / "cases.png")
        if self.tracking_uri:
            self.run_id = log_run(self.tracking_uri, self.experiment_name, self.run_name, self.params, self.metrics,
                                  artifacts, tags={**self.tags, "stage": "evaluate"}, metric_prefix="test_")
        print("evaluation: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in self.metrics.items()))
