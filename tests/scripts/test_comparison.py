"""The comparison grid: planning, the table from fixed MLflow runs, skip and resume on a tiny grid."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from scripts import comparison as cmp
from scripts.tracking import log_run
from tests.helpers import REPO

TINY = REPO / "tests" / "configs" / "tiny.json"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from scripts.data.phantoms import generate_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    generate_demo_dataset(root, n_train=8, n_test_healthy=3, n_test_diseased=3, size=64, seed=0)
    return root


def test_plan_grid_validates_names():
    cells = cmp.plan_grid(["none", "artasyn"], ["global", "artasyn"])
    assert [c.name for c in cells] == ["none_global", "none_artasyn", "artasyn_global", "artasyn_artasyn"]
    assert cells[0].config_files(None)[-1].endswith("loss_global.json")
    with pytest.raises(ValueError, match="method.*'bogus'"):
        cmp.plan_grid(["bogus"], ["global"])
    with pytest.raises(ValueError, match=r"loss setting \(losses\).*'l1'"):
        cmp.plan_grid(["none"], ["l1"])
    expected = [cmp.Cell("none", "global"), cmp.Cell("artasyn", "artasyn")]
    assert cmp.parse_cells("none:global,artasyn:artasyn") == expected
    with pytest.raises(ValueError, match="needs a loss setting"):
        cmp.parse_cells("none")


def test_model_families_take_their_own_loss(tmp_path):
    cells = cmp.plan_grid(["none", "anatpaste_classifier", "sagan"], ["global", "artasyn"])
    assert [c.name for c in cells] == ["none_global", "none_artasyn", "anatpaste_classifier_ce", "sagan_wgan_gp"]
    assert cmp.parse_cells("artasyn:artasyn,sagan,anatpaste_classifier:ce") == [
        cmp.Cell("artasyn", "artasyn"), cmp.Cell("sagan", "wgan_gp"), cmp.Cell("anatpaste_classifier", "ce")]
    with pytest.raises(ValueError, match="own loss 'wgan_gp'"):
        cmp.parse_cells("sagan:global")
    files = cmp.Cell("sagan", "wgan_gp").config_files(cmp.CONFIGS / "overrides" / "cpu_grid.json")
    assert [Path(f).name for f in files] == ["train.json", "cpu_grid.json", "sagan.json", "cpu_grid.sagan.json"]
    budget = tmp_path / "b.json"
    budget.write_text("{}")
    files = cmp.Cell("sagan", "wgan_gp").config_files(budget)  # no refinement file beside this budget
    assert [Path(f).name for f in files] == ["train.json", "b.json", "sagan.json"]


def _fake_eval(uri, method, loss, auroc, budget="tiny", finished_metrics=True):
    metrics = {"auroc": auroc, "ap": auroc / 2, "dice_micro": 0.1, "dice_mean": 0.2}
    rid = log_run(uri, "exp", f"eval_{method}_{loss}", {"method": method, "loss_name": loss, "budget": budget},
                  metrics, tags={"stage": "evaluate"}, metric_prefix="test_")
    if finished_metrics:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=uri)
        client.log_metric(rid, "images_seen", 40.0)
        client.log_metric(rid, "train_seconds", 12.5)
    return rid


def test_table_from_fixed_mlflow_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    _fake_eval(uri, "none", "global", 0.55)
    best = _fake_eval(uri, "artasyn", "artasyn", 0.81)
    _fake_eval(uri, "artasyn", "artasyn", 0.99, budget="other")  # another budget: not this table
    _fake_eval(uri, "nsa", "artasyn", 0.95, finished_metrics=False)  # incomplete cell: not in the table
    cells = [cmp.Cell(m, v) for m in ("none", "artasyn", "nsa") for v in ("global", "artasyn")]
    rows = cmp.table_rows(cmp.eval_runs(uri, "exp"), cells, "tiny")
    assert [(r["method"], r["loss"]) for r in rows] == [("none", "global"), ("artasyn", "artasyn")]
    assert rows[1]["auroc"] == pytest.approx(0.81) and rows[1]["run_id"] == best
    assert rows[1]["images_seen"] == 40 and rows[1]["train_seconds"] == 12.5
    md = cmp.write_tables(tmp_path / "out", rows, "t")
    assert "| artasyn | artasyn | **0.810** | **0.405** |" in md
    with open(tmp_path / "out" / "table.csv") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == list(cmp.TABLE_COLUMNS) and float(got[0]["auroc"]) == pytest.approx(0.55)
    assert (tmp_path / "out" / "table.png").stat().st_size > 0


def test_tiny_grid_runs_skips_and_resumes(tmp_path, demo_dir, capsys, monkeypatch):
    from scripts.cli.compare import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "grid"
    args = ["--dataset_dir", str(demo_dir), "--methods", "none,artasyn", "--losses", "global", "--budget", str(TINY),
            "--out", str(out)]
    assert main(args) == 0
    uri = f"sqlite:///{out / 'mlruns.db'}"
    runs = cmp.eval_runs(uri, cmp.EXPERIMENT)
    assert len(runs) == 2
    with open(out / "table.csv") as f:
        table = {(r["method"], r["loss"]): r for r in csv.DictReader(f)}
    for _, run in runs.iterrows():  # the table holds exactly what MLflow holds
        row = table[(run["params.method"], run["params.loss_name"])]
        assert float(row["auroc"]) == pytest.approx(run["metrics.test_auroc"]) and row["run_id"] == run["run_id"]
        assert float(row["images_seen"]) > 0 and float(row["train_seconds"]) > 0
    capsys.readouterr()

    assert main(args) == 0  # everything complete: nothing re-runs
    assert capsys.readouterr().out.count("complete in MLflow, skipped") == 2
    assert len(cmp.eval_runs(uri, cmp.EXPERIMENT)) == 2

    # zero-shot columns: only the evaluations run (once); on the same test set they repeat the main metrics
    zs_args = args + ["--zero_shot_dir", str(demo_dir)]
    assert main(zs_args) == 0
    assert capsys.readouterr().out.count("zero-shot evaluation on") == 2
    with open(out / "table.csv") as f:
        zs_table = {(r["method"], r["loss"]): r for r in csv.DictReader(f)}
    for key, row in zs_table.items():
        assert float(row["zs_auroc"]) == pytest.approx(float(table[key]["auroc"]))
        assert row["zs_dice_micro"] == table[key]["dice_micro"] != ""
    assert main(zs_args) == 0
    assert "zero-shot evaluation on" not in capsys.readouterr().out
    assert len(cmp.eval_runs(uri, cmp.EXPERIMENT)) == 4

    # a cell killed after epoch 1 of 2 resumes at epoch 2 from its checkpoint
    budget2 = tmp_path / "tiny2.json"
    cfg = json.loads(TINY.read_text())
    cfg["+hparams"]["max_epochs"] = 2
    budget2.write_text(json.dumps(cfg))
    cell = cmp.Cell("none", "global")
    cell_dir = out / "cells" / cell.name
    assert (cell_dir / "models" / "train_checkpoint_epoch=1.pt").is_file()
    (cell_dir / "progress.json").write_text(json.dumps({"train_seconds": 1.0, "trained": False}))
    rid = cmp.run_cell(cell, demo_dir, demo_dir, budget2, out, uri)
    assert (cell_dir / "models" / "train_checkpoint_epoch=2.pt").is_file()
    assert not (cell_dir / "models" / "train_checkpoint_epoch=1.pt").exists()
    rows = cmp.table_rows(cmp.eval_runs(uri, cmp.EXPERIMENT), [cell], "tiny2")
    assert rows[0]["run_id"] == rid and rows[0]["train_seconds"] > 1.0
    first = table[("none", "global")]
    assert rows[0]["images_seen"] == pytest.approx(2 * float(first["images_seen"]))  # both epochs counted
