"""Evaluation handlers (scripts.evaluation): metrics by hand, report files, calibration, MLflow run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from custom_transforms.anomaly import AnomalyPostd
from scripts.evaluation import (
    AnomalyEvaluationHandler,
    ThresholdCalibration,
    compute_metrics,
    per_image_rows,
    pick_cases,
)
from scripts.visualization import case_grid


def _result(name, label, score, pred, gt=None):
    pred = np.asarray(pred, bool)
    return {"name": name, "label": label, "score": score, "pred_mask": pred,
            "gt_mask": None if gt is None else np.asarray(gt, bool),
            "image": np.full(pred.shape, 0.5, np.float16), "amap": pred.astype(np.float16)}


def hand_results():
    return [
        _result("h1", 0, 0.1, [[1, 0], [0, 0]]),  # healthy: 1 of 4 pixels flagged
        _result("h2", 0, 0.4, [[0, 0], [0, 0]]),
        _result("d1", 1, 0.35, [[1, 1], [0, 0]], gt=[[1, 1], [0, 0]]),  # Dice 1
        _result("d2", 1, 0.8, [[1, 0], [0, 0]], gt=[[1, 1], [1, 1]]),  # Dice 2 * 1 / 5 = 0.4
    ]


def test_metrics_by_hand():
    m = compute_metrics(hand_results())
    assert (m["n_images"], m["n_healthy"], m["n_diseased"], m["n_with_mask"]) == (4, 2, 2, 2)
    assert m["auroc"] == pytest.approx(0.75)  # 3 of the 4 (diseased, healthy) pairs ordered correctly
    assert m["ap"] == pytest.approx(0.5 * 1.0 + 0.5 * (2 / 3))
    assert m["dice_mean"] == pytest.approx((1.0 + 0.4) / 2)
    assert m["dice_micro"] == pytest.approx(2 * (2 + 1) / ((2 + 1) + (2 + 4)))
    assert m["healthy_fp_fraction"] == pytest.approx((0.25 + 0.0) / 2)
    rows = {r["name"]: r for r in per_image_rows(hand_results())}
    assert rows["d2"]["dice"] == pytest.approx(0.4) and rows["d1"]["dice"] == pytest.approx(1.0)
    assert "dice" not in rows["h1"] and rows["h1"]["mask_fraction"] == 0.25


def test_empty_ground_truth_mask_left_out_of_dice():
    results = hand_results() + [_result("d3", 1, 0.9, [[1, 0], [0, 0]], gt=[[0, 0], [0, 0]])]
    m = compute_metrics(results)
    assert m["n_with_mask"] == 2 and m["dice_mean"] == pytest.approx((1.0 + 0.4) / 2)
    assert {r["name"]: r for r in per_image_rows(results)}["d3"]["dice"] == 0.0  # a mask where there is no lesion
    cases = pick_cases(results, 4)
    assert "d3" not in {c["name"] for c in cases}  # the grid leaves the empty mask out instead of failing
    assert case_grid(cases).shape == (2 * len(cases), 6, 3)


def test_one_class_and_no_masks(tmp_path):
    m = compute_metrics([r for r in hand_results() if r["label"] == 1])
    assert m["auroc"] is None and m["ap"] is None and m["healthy_fp_fraction"] is None
    m = compute_metrics([r for r in hand_results() if r["label"] == 0])
    assert m["dice_micro"] is None and m["dice_mean"] is None and m["n_with_mask"] == 0
    with pytest.raises(ValueError, match="no images"):
        compute_metrics([])
    h = AnomalyEvaluationHandler(tmp_path / "eval")  # one class: no ROC/PR figure, the rest is written
    h.started(None)
    h.collector.results = [r for r in hand_results() if r["label"] == 1]
    h.completed(None)
    assert not (tmp_path / "eval" / "roc_pr.png").exists() and (tmp_path / "eval" / "metrics.json").is_file()


def test_calibration_arguments():
    with pytest.raises(ValueError, match="mask_rule"):
        ThresholdCalibration(AnomalyPostd(), mask_rule="otsu")
    with pytest.raises(ValueError, match="calibration_loader"):
        ThresholdCalibration(AnomalyPostd(), mask_rule="calibrated")


def test_handler_completed_writes_report(tmp_path):
    cal = SimpleNamespace(threshold=None)  # paper rule: no calibrated threshold to record
    h = AnomalyEvaluationHandler(tmp_path / "eval", calibration=cal, params={"method": "test"})
    h.started(None)
    h.collector.results = hand_results()
    h.completed(None)
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["metrics"]["auroc"] == pytest.approx(0.75) and report["params"] == {"method": "test"}
    assert len(report["per_image"]) == 4
    for png in ("roc_pr.png", "cases.png"):
        assert (tmp_path / "eval" / png).stat().st_size > 0


class Zero(torch.nn.Module):
    """Reconstruction 0: the anomaly map is the image itself."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.zeros_like(x) + 0.0 * self.w


@pytest.mark.parametrize("with_region", [False, True])
def test_calibrated_threshold_is_quantile_of_healthy_maps(with_region):
    rng = np.random.default_rng(0)
    imgs = rng.uniform(0, 1, (5, 1, 8, 8)).astype(np.float32)
    lung = np.zeros((5, 1, 8, 8), np.uint8)
    lung[:, :, 2:6, 1:4] = 1
    loader = [{"image": torch.as_tensor(imgs[:3]), "lung": torch.as_tensor(lung[:3])},
              {"image": torch.as_tensor(imgs[3:]), "lung": torch.as_tensor(lung[3:])}]
    post = AnomalyPostd()
    cal = ThresholdCalibration(post, mask_rule="calibrated", calibration_loader=loader, network=Zero(), quantile=0.9,
                               region_key="lung" if with_region else None)
    cal(SimpleNamespace(state=SimpleNamespace()))
    values = imgs[lung > 0] if with_region else imgs.ravel()
    assert post.threshold == pytest.approx(float(np.quantile(values, 0.9)), rel=1e-6)
    assert cal.threshold == post.threshold
    # about 10 % of the calibration pixels (in the region) lie at or above it
    assert (values >= post.threshold).mean() == pytest.approx(0.1, abs=0.03)


def _log_fresh(tmp_path, monkeypatch):
    """Log an evaluation to a new MLflow database from another working directory; return (client, run)."""
    import mlflow

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    uri = f"sqlite:///{tmp_path / 'db' / 'mlruns.db'}"
    (tmp_path / "db").mkdir()
    h = AnomalyEvaluationHandler(tmp_path / "eval", tracking_uri=uri, experiment_name="eval-test",
                                 run_name="eval_unit", params={"mask_rule": "paper"})
    h.started(None)
    h.collector.results = hand_results()
    h.completed(None)
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("eval-test").experiment_id])
    assert len(runs) == 1
    return client, runs[0], cwd


def test_handler_logs_to_mlflow(tmp_path, monkeypatch):
    client, run, _ = _log_fresh(tmp_path, monkeypatch)
    assert run.info.status == "FINISHED" and run.info.run_name == "eval_unit"
    assert run.data.tags["stage"] == "evaluate" and run.data.params["mask_rule"] == "paper"
    assert run.data.metrics["test_auroc"] == pytest.approx(0.75)
    assert run.data.metrics["test_dice_mean"] == pytest.approx(0.7)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"metrics.json", "roc_pr.png", "cases.png"}


def test_handler_artifacts_next_to_database(tmp_path, monkeypatch):
    _, run, cwd = _log_fresh(tmp_path, monkeypatch)
    assert not (cwd / "mlruns").exists()
    assert Path(run.info.artifact_uri.replace("file://", "")).is_relative_to(tmp_path / "db")
