"""MLflow integration of the bundle: the best epoch of a training run, the evaluation run linked to its training
run, the trained model as an ``mlflow.pyfunc`` model (logged, registered, loaded and scored), and a real
``mlflow server`` read back through its REST API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.bundle.test_workflows import EVAL, TRAIN, make_workflow, run_workflow, search_runs

MODEL_NAME = "art-asyn-tiny"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_dir):
    """The tiny training with the model logged to its run and registered (``log_mlflow_model``)."""
    root = tmp_path_factory.mktemp("bundle")
    wf = make_workflow(TRAIN, "train", bundle_root=str(root), dataset_dir=str(demo_dir), log_mlflow_model=True,
                       register_model_name=MODEL_NAME, progress_bar=False)
    res = run_workflow(wf)
    res.root, res.demo = root, demo_dir
    res.tracking_uri = wf.parser.get_parsed_content("tracking_uri")
    res.experiment_name = wf.parser.get_parsed_content("experiment_name")
    runs = search_runs(res.tracking_uri, res.experiment_name)
    res.run = runs[runs["tags.mlflow.runName"] == wf.parser.get_parsed_content("run_name")].iloc[0]
    res.model_logger = next(h for h in wf.parser.get_parsed_content("train#handlers_reporting")
                            if type(h).__name__ == "MLflowModelLogger")
    return res


def _png(demo) -> Path:
    return sorted((demo / "test" / "diseased").glob("*.png"))[0]


def test_training_run_logs_best_epoch(trained):
    ckpt = torch.load(trained.root / "models" / "train_checkpoint_epoch=1.pt", map_location="cpu",
                      weights_only=True)
    run = ckpt["run"]
    assert run["mlflow_run_id"] == trained.run["run_id"] and run["best_epoch"] == 1
    assert trained.run["status"] == "FINISHED"
    assert trained.run["metrics.best_epoch"] == 1
    assert trained.run["metrics.best_val_dice"] == pytest.approx(run["best_metric"])
    assert trained.run["metrics.best_val_dice"] == pytest.approx(trained.run["metrics.val_dice"])


def test_trained_model_logged_registered_and_scores_a_png(trained):
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from custom_transforms.io import read_cxr

    info = trained.model_logger.model_info
    assert info is not None and info.signature is not None
    assert info.signature.outputs.input_names() == ["score", "mask_fraction"]
    client = mlflow.MlflowClient(tracking_uri=trained.tracking_uri, registry_uri=trained.tracking_uri)
    versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    assert len(versions) == 1 and versions[0].run_id == trained.run["run_id"]

    with _use_tracking_uri(trained.tracking_uri):
        model = mlflow.pyfunc.load_model(info.model_uri)
    png = _png(trained.demo)
    by_path = model.predict(pd.DataFrame({"image": [str(png)]}))
    assert list(by_path.columns) == ["score", "mask_fraction"] and len(by_path) == 1
    assert np.isfinite(by_path["score"][0]) and 0.0 <= by_path["mask_fraction"][0] <= 1.0

    # the same image as a (1, H, W) array scores the same as the file (both min-max scaled, resized)
    arr = read_cxr(png)[None]
    by_array = model.predict(pd.DataFrame({"image": [arr]}))  # pyfunc enforces the column schema: one row per image
    assert by_array["score"][0] == pytest.approx(by_path["score"][0], rel=1e-4, abs=1e-6)
    assert by_array["mask_fraction"][0] == pytest.approx(by_path["mask_fraction"][0], abs=1e-3)
    both = model.predict(pd.DataFrame({"image": [str(png), arr.tolist()]}))
    assert len(both) == 2 and both["score"][0] == pytest.approx(by_path["score"][0])
    assert both["score"][1] == pytest.approx(by_array["score"][0])
    # the Python model itself also takes a bare (1, H, W) array
    bare = model.unwrap_python_model().predict(None, arr)
    assert bare["score"][0] == pytest.approx(by_array["score"][0])


def test_evaluation_run_linked_to_training_run(trained, tmp_path):
    wf = make_workflow(EVAL, "eval", bundle_root=str(trained.root), dataset_dir=str(trained.demo),
                       eval_dir=str(tmp_path / "eval"), eval_run_name="eval_linked", progress_bar=False)
    run_workflow(wf)
    runs = search_runs(trained.tracking_uri, trained.experiment_name)
    row = runs[runs["tags.mlflow.runName"] == "eval_linked"].iloc[0]
    assert row["tags.train_run_id"] == trained.run["run_id"]
    assert row["params.network"] == "FeatureUNet"
    assert row["params.intensity_transforms"] == "['HistogramNormalized']"
    assert row["params.network_channels"] == "[8, 16, 32]" and row["params.image_size"] == "64"


def test_evaluation_of_a_foreign_model_has_no_train_run_id(trained, tmp_path):
    from scripts.tracking import train_run_id

    models = trained.root / "models"
    assert train_run_id(models / "model.pt", models) == trained.run["run_id"]
    other = tmp_path / "model.pt"
    other.write_bytes((models / "model.pt").read_bytes() + b"\0")
    assert train_run_id(other, models) is None
    assert train_run_id(models / "model.pt", tmp_path / "no_checkpoints") is None


# ------------------------------------------------------------------------------------------- mlflow server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, path: str, **query) -> dict:
    with urllib.request.urlopen(f"{base}{path}?{urllib.parse.urlencode(query)}", timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on a SQLite store and a free local port; killed at the end."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'm.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail("mlflow server did not start: " + (tmp_path / "server.log").read_text()[-2000:])
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_model_registered_on_an_mlflow_server(trained, mlflow_server):
    import mlflow

    from scripts.mlflow_model import log_model
    from scripts.tracking import log_run

    run_id = log_run(mlflow_server, "art-asyn-server", "served_run", {"image_size": 64}, {"val_dice": 0.5})
    info = log_model(run_id, trained.root, [str(Path(TRAIN[0]).parent / "inference.json"),
                                            str(trained.root / "models" / "model_config.json")],
                     register_model_name="art-asyn-served", tracking_uri=mlflow_server)

    run = _get(mlflow_server, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "served_run"
    assert {"key": "image_size", "value": "64"} in run["data"]["params"]
    model = _get(mlflow_server, "/api/2.0/mlflow/registered-models/get", name="art-asyn-served")["registered_model"]
    assert model["name"] == "art-asyn-served"
    assert [v["run_id"] for v in model["latest_versions"]] == [run_id]

    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(mlflow_server):
        loaded = mlflow.pyfunc.load_model("models:/art-asyn-served/1")
    out = loaded.predict(pd.DataFrame({"image": [str(_png(trained.demo))]}))
    assert np.isfinite(out["score"][0])
    assert str(info.registered_model_version) == "1"
