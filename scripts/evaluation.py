"""Test-set evaluation as an ignite handler: image AUROC/AP, pixel Dice, plots, case grid, MLflow.

Attach :class:`AnomalyEvaluationHandler` to a MONAI ``SupervisedEvaluator`` whose post-processing is
``custom_transforms.anomaly.AnomalyPostd`` (it writes ``score``, ``amap`` and ``pred_mask`` per image).

Metrics (written to ``<output_dir>/metrics.json`` and to MLflow):

- ``auroc``, ``ap``: image level, score vs label (healthy 0 / diseased 1); ``None`` with a reason when
  the test set holds one class only (e.g. QaTa, all diseased);
- ``dice_micro``: pixel Dice over all pixels of the images that have a ground-truth lesion mask;
- ``dice_mean``: mean of the per-image Dice over those images;
- ``healthy_fp_fraction``: mean fraction of pixels flagged anomalous on healthy test images.

With ``mask_rule="calibrated"`` the pixel threshold is the ``quantile`` of anomaly-map values on held-out
healthy images (``calibration_loader``), optionally inside the dilated lung field, set on the
post-processing transform before the test images run.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

from custom_transforms.anomaly import dilate_region
from scripts.engine import prepare_restoration_batch
from custom_transforms.io import atomic_write_bytes, save_png, write_json
from scripts.metrics import (anomaly_map, as_2d, calibrate_threshold, dice_micro, dice_per_image, dice_score,
                             image_auroc_ap, pr_curve_points, roc_curve_points, to_numpy)
from scripts.preview import GT_RGB, MASK_RGB, draw_contours, heat_rgb, to_rgb

logger = logging.getLogger(__name__)


def _name(item: dict) -> str:
    img = item.get("image")
    meta = getattr(img, "meta", None) or {}
    return str(item.get("name") or Path(str(meta.get("filename_or_obj", "?"))).name)


class AnomalyEvaluationHandler:
    """Collect per-image results during evaluation; compute, save and log the metrics at the end."""

    def __init__(self, output_dir, postprocessing=None, mask_rule: str = "paper", calibration_loader=None,
                 network=None, quantile: float = 0.99, region_key: str | None = None, region_dilation: int = 0,
                 tracking_uri: str | None = None, experiment_name: str = "art-asyn", run_name: str | None = None,
                 params: dict | None = None, n_cases: int = 4):
        if mask_rule not in ("paper", "calibrated"):
            raise ValueError(f"mask_rule must be 'paper' or 'calibrated', got {mask_rule!r}")
        if mask_rule == "calibrated" and (calibration_loader is None or network is None or postprocessing is None):
            raise ValueError("mask_rule='calibrated' needs calibration_loader, network and postprocessing")
        self.output_dir = Path(output_dir)
        self.post, self.mask_rule, self.cal_loader, self.network = postprocessing, mask_rule, calibration_loader, network
        self.quantile, self.region_key, self.region_dilation = quantile, region_key, region_dilation
        self.tracking_uri, self.experiment_name, self.run_name = tracking_uri, experiment_name, run_name
        self.params, self.n_cases = dict(params or {}), n_cases
        self.results: list[dict] = []
        self.metrics: dict = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    # -- events -------------------------------------------------------------------------------------
    def started(self, engine: Engine) -> None:
        self.results = []
        self.t0 = time.perf_counter()
        if self.mask_rule == "calibrated":
            thr = self.calibrate(engine.state.device if hasattr(engine.state, "device") else None)
            self.post.threshold = thr
            self.params["calibrated_threshold"] = thr
            logger.info("calibrated pixel threshold %.4f (quantile %.3f of held-out healthy maps)", thr, self.quantile)

    def calibrate(self, device=None) -> float:
        """Pixel threshold = quantile of anomaly-map values of held-out healthy images (in the region)."""
        device = device or next(self.network.parameters()).device
        prepare = prepare_restoration_batch("image", "image")
        maps, regions = [], []
        self.network.eval()
        with torch.no_grad():
            for batch in self.cal_loader:
                x, _ = prepare(batch, device)
                maps.append(to_numpy(anomaly_map(x, self.network(x).clamp(0, 1))))
                if self.region_key is not None:
                    regions.append(to_numpy(dilate_region(torch.as_tensor(batch[self.region_key]), self.region_dilation)))
        if not maps:
            raise ValueError("calibration loader yielded no images")
        return float(calibrate_threshold(np.concatenate(maps), self.quantile,
                                         region=np.concatenate(regions) > 0 if regions else None))

    def collect(self, engine: Engine) -> None:
        """Per-image results; labels and masks come from the batch (engines keep only outputs in ``output``)."""
        from monai.data import decollate_batch

        out = engine.state.output
        out = out if isinstance(out, list) else decollate_batch(out)
        batch = engine.state.batch
        for b, o in zip(batch if isinstance(batch, list) else decollate_batch(batch), out):
            item = {**o, **b}  # the batch wins: an evaluator output "label" is the restoration target
            has_gt = bool(int(to_numpy(item.get("has_gt_mask", 0)).reshape(-1)[0])) and "gt_mask" in item
            self.results.append({
                "name": _name(item),
                "label": int(to_numpy(item["label"]).reshape(-1)[0]),
                "score": float(to_numpy(item["score"]).reshape(-1)[0]),
                "pred_mask": as_2d(item["pred_mask"]) > 0.5,
                "gt_mask": as_2d(item["gt_mask"]) > 0.5 if has_gt else None,
                "image": as_2d(item["image"]).astype(np.float16),
                "amap": as_2d(item["amap"]).astype(np.float16),
            })

    def completed(self, engine: Engine) -> None:
        self.metrics = self.compute()
        self.metrics["seconds"] = round(time.perf_counter() - self.t0, 2)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.output_dir / "metrics.json", {"metrics": self.metrics, "params": self.params,
                                                      "per_image": self.per_image_rows()})
        artifacts = [self.output_dir / "metrics.json"]
        artifacts += self.plot_curves()
        artifacts += self.case_grid()
        self.log_mlflow(artifacts)
        print("evaluation: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in self.metrics.items()))

    # -- computations -------------------------------------------------------------------------------
    def compute(self) -> dict:
        if not self.results:
            raise ValueError("evaluation saw no images")
        labels = np.array([r["label"] for r in self.results])
        scores = np.array([r["score"] for r in self.results])
        m: dict = {"n_images": len(labels), "n_healthy": int((labels == 0).sum()), "n_diseased": int(labels.sum())}
        if len(np.unique(labels)) == 2:
            m["auroc"], m["ap"] = (float(v) for v in image_auroc_ap(scores, labels))
        else:
            m["auroc"] = m["ap"] = None
            logger.warning("test set holds one class only: AUROC/AP not defined")
        with_gt = [r for r in self.results if r["gt_mask"] is not None and r["gt_mask"].any()]
        empty = sum(r["gt_mask"] is not None and not r["gt_mask"].any() for r in self.results)
        if empty:
            logger.warning("%d ground-truth mask(s) are empty: left out of the Dice figures", empty)
        m["n_with_mask"] = len(with_gt)
        if with_gt:
            preds = np.stack([r["pred_mask"] for r in with_gt])
            gts = np.stack([r["gt_mask"] for r in with_gt])
            m["dice_micro"] = float(dice_micro(preds, gts))
            m["dice_mean"] = float(dice_per_image(preds, gts))
        else:
            m["dice_micro"] = m["dice_mean"] = None
        healthy = [r["pred_mask"].mean() for r in self.results if r["label"] == 0]
        m["healthy_fp_fraction"] = float(np.mean(healthy)) if healthy else None
        return m

    def per_image_rows(self) -> list[dict]:
        rows = []
        for r in self.results:
            row = {"name": r["name"], "label": r["label"], "score": r["score"],
                   "mask_fraction": float(r["pred_mask"].mean())}
            if r["gt_mask"] is not None:
                row["dice"] = dice_score(r["pred_mask"], r["gt_mask"])
            rows.append(row)
        return rows

    def plot_curves(self) -> list[Path]:
        if self.metrics.get("auroc") is None:
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = np.array([r["label"] for r in self.results])
        scores = np.array([r["score"] for r in self.results])
        fpr, tpr, _ = roc_curve_points(scores, labels)
        rec, prec, _ = pr_curve_points(scores, labels)
        fig, ax = plt.subplots(1, 2, figsize=(8, 4), dpi=80)
        ax[0].plot(fpr, tpr, label=f"AUROC {self.metrics['auroc']:.3f}")
        ax[0].plot([0, 1], [0, 1], "k--", lw=0.8)
        ax[0].set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
        ax[1].plot(rec, prec, label=f"AP {self.metrics['ap']:.3f}")
        ax[1].axhline(labels.mean(), color="k", ls="--", lw=0.8)
        ax[1].set(xlabel="recall", ylabel="precision", title="Precision-recall")
        for a in ax:
            a.legend(loc="lower right")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        path = self.output_dir / "roc_pr.png"
        atomic_write_bytes(path, buf.getvalue())
        return [path]

    def case_grid(self) -> list[Path]:
        """Best and worst cases: by Dice when masks exist, else the top-scored healthy / lowest diseased.

        Columns: image | anomaly map (scaled to its own maximum) | predicted mask (yellow) and lesion (green).
        """
        with_gt = [r for r in self.results if r["gt_mask"] is not None and r["gt_mask"].any()]
        if with_gt:
            ranked = sorted(with_gt, key=lambda r: -dice_score(r["pred_mask"], r["gt_mask"]))
            picks = ranked[: self.n_cases] + ranked[::-1][: self.n_cases]
        else:
            healthy = sorted((r for r in self.results if r["label"] == 0), key=lambda r: -r["score"])
            diseased = sorted((r for r in self.results if r["label"] == 1), key=lambda r: r["score"])
            picks = healthy[: self.n_cases] + diseased[: self.n_cases]
        if not picks:
            return []
        rows = []
        for r in picks:
            img = to_rgb(r["image"].astype(np.float32))
            amap = r["amap"].astype(np.float32)
            pred = draw_contours(img, r["pred_mask"], MASK_RGB)
            if r["gt_mask"] is not None:
                pred = draw_contours(pred, r["gt_mask"], GT_RGB)
            rows.append(np.concatenate([img, heat_rgb(amap / max(float(amap.max()), 1e-6)), pred], axis=1))
        path = self.output_dir / "cases.png"
        save_png(path, np.concatenate(rows, axis=0))
        return [path]

    def log_mlflow(self, artifacts) -> None:
        if not self.tracking_uri:
            return
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        exp = client.get_experiment_by_name(self.experiment_name)
        if exp is not None:
            exp_id = exp.experiment_id
        else:  # like MONAI's MLFlowHandler: a local SQLite store keeps artifacts in <db folder>/mlruns, not in cwd
            location = None
            if self.tracking_uri.startswith("sqlite:///"):
                location = (Path(self.tracking_uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()
            exp_id = client.create_experiment(self.experiment_name, artifact_location=location)
        run = client.create_run(exp_id, run_name=self.run_name or f"eval_{time.strftime('%Y%m%d-%H%M%S')}",
                                tags={"stage": "evaluate"})
        rid = run.info.run_id
        try:
            for k, v in self.params.items():
                client.log_param(rid, k, str(v)[:6000])
            for k, v in self.metrics.items():
                if isinstance(v, (int, float)):
                    client.log_metric(rid, f"test_{k}", float(v))
            for a in artifacts:
                client.log_artifact(rid, str(a))
            client.set_terminated(rid, "FINISHED")
        except Exception:
            client.set_terminated(rid, "FAILED")
            raise
        logger.info("MLflow run '%s' (%s) in %s", run.info.run_name, rid, self.tracking_uri)
