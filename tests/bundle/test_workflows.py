"""Model-zoo style workflow tests of the bundle, at tiny sizes on CPU.

One tiny bundle is trained once per module (``trained`` fixture: ``configs/train.json`` +
``tests/configs/tiny.json`` on a handful of demo phantoms in a temporary folder); evaluation, inference,
export and resume tests reuse it. Everything runs through MONAI's bundle API (``ConfigWorkflow``,
``ConfigParser``, ``ckpt_export``, ``verify_metadata``, ``verify_net_in_out``) or the command line, the
way the MONAI Model Zoo checks bundles.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import cv2
import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import REPO, error_chain

CONFIGS = REPO / "configs"
TINY = str(REPO / "tests" / "configs" / "tiny.json")
TRAIN = [str(CONFIGS / "train.json"), TINY]
EVAL = TRAIN + [str(CONFIGS / "evaluate.json")]
INFER = [str(CONFIGS / "inference.json"), TINY]
MULTI_GPU = [str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json"), TINY]
META = str(CONFIGS / "metadata.json")
SCHEMA = str(CONFIGS / "schema" / "meta_schema.json")

# expression lists that execute the workflow (never parsed by the "every ID instantiates" test)
RUN_IDS = {"initialize", "run", "training", "evaluating", "inferring", "finalize"}



# ------------------------------------------------------------------------------------------- helpers

def make_workflow(config_file, workflow_type, **override):
    from monai.bundle import ConfigWorkflow

    return ConfigWorkflow(config_file=config_file, workflow_type=workflow_type, meta_file=META,
                          logging_file=False, **override)


def make_parser(config_file, **override):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_file)
    parser.read_meta(META)
    parser.update(override)
    return parser


def run_workflow(wf, watch_trainer: bool = False):
    """initialize + check_properties + run + finalize; optionally count the trainer's epochs/iterations."""
    from ignite.engine import Events

    wf.initialize()
    missing = wf.check_properties()  # needs an initialized workflow (properties are parsed lazily)
    seen = {"epochs": [], "iterations": 0}
    trainer = None
    if watch_trainer:
        trainer = wf.parser.get_parsed_content("train#trainer")  # the same object "run" resolves
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: seen["epochs"].append(e.state.epoch))
        trainer.add_event_handler(Events.ITERATION_COMPLETED,
                                  lambda e: seen.__setitem__("iterations", seen["iterations"] + 1))
    wf.run()
    wf.finalize()
    return SimpleNamespace(wf=wf, missing=missing, trainer=trainer, seen=seen)


def assert_error(excinfo, exc_type, fragment: str):
    """An error in the chain (MONAI wraps config errors in RuntimeError) is `exc_type` naming `fragment`."""
    chain = error_chain(excinfo.value)
    hits = [e for e in chain if isinstance(e, exc_type) and fragment in str(e)]
    assert hits, f"no {exc_type.__name__} mentioning {fragment!r} in: " + " <- ".join(
        f"{type(e).__name__}: {str(e)[:200]}" for e in chain)


def search_runs(tracking_uri: str, experiment_name: str):
    """``mlflow.search_runs`` on ``tracking_uri`` without leaving it set as the process-wide tracking URI."""
    import mlflow

    try:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    except ImportError:  # private helper of mlflow 3; fall back to set-and-restore
        _use_tracking_uri = None
    if _use_tracking_uri is not None:
        with _use_tracking_uri(tracking_uri):
            return mlflow.search_runs(experiment_names=[experiment_name])
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        return mlflow.search_runs(experiment_names=[experiment_name])
    finally:
        mlflow.set_tracking_uri(previous)


def read_png(path) -> np.ndarray:
    a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert a is not None, f"{path} is not a readable PNG"
    return a


def tiny_network(state_dict=None):
    net = make_parser(TRAIN).get_parsed_content("network_def")
    if state_dict is not None:
        net.load_state_dict(state_dict)  # strict: every key must match
    return net.eval()


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_dir):
    """The tiny bundle trained once: 1 epoch on 6 phantoms (2 held out for validation)."""
    root = tmp_path_factory.mktemp("bundle")
    wf = make_workflow(TRAIN, "train", bundle_root=str(root), dataset_dir=str(demo_dir))
    res = run_workflow(wf, watch_trainer=True)
    res.root = root
    res.run_name = wf.parser.get_parsed_content("run_name")
    res.tracking_uri = wf.parser.get_parsed_content("tracking_uri")
    res.experiment_name = wf.parser.get_parsed_content("experiment_name")
    res.n_train = len(wf.parser.get_parsed_content("data_split")[0])
    res.batch_size = wf.parser.get_parsed_content("hparams#batch_size")
    return res


@pytest.fixture(scope="module")
def inference_inputs(tmp_path_factory):
    """The same phantom as PNG, DICOM (16-bit, rescale slope/intercept) and NIfTI: identical after loading."""
    from scripts.data.phantoms import make_phantom
    from tests.helpers import write_dicom

    folder = tmp_path_factory.mktemp("infer_in")
    img, _, _ = make_phantom(np.random.default_rng(5), size=96, lesions=1)
    img = ((img.astype(np.float32) - img.min()) / float(img.max() - img.min()) * 255 + 0.5).astype(np.uint8)
    assert img.min() == 0 and img.max() == 255  # full range: PNG /255 and DICOM/NIfTI min-max agree
    cv2.imwrite(str(folder / "cxr_png.png"), img)

    # 12-bit stored values with a rescale: the modality LUT must not change the normalised picture
    write_dicom(folder / "cxr_dcm.dcm", img.astype(np.uint16) * 16 + 7, slope=0.5, intercept=-1024)

    # NIfTI stores (x, y): the transpose of the (row, column) image
    nifti = nib.Nifti1Image(np.ascontiguousarray(img.T.astype(np.int16)), np.eye(4))
    nib.save(nifti, str(folder / "cxr_nii.nii.gz"))
    return folder


@pytest.fixture(scope="module")
def inference_run(tmp_path_factory, trained, inference_inputs):
    out = tmp_path_factory.mktemp("infer_out")
    wf = make_workflow(INFER, "infer", bundle_root=str(trained.root), dataset_dir=str(inference_inputs),
                       output_dir=str(out))
    res = run_workflow(wf)
    res.out = out
    res.inputs = sorted(inference_inputs.iterdir())
    return res


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory, trained, demo_dir):
    """The evaluate workflow with the paper's per-image mask rule."""
    eval_dir = tmp_path_factory.mktemp("eval_paper")
    wf = make_workflow(EVAL, "eval", bundle_root=str(trained.root), dataset_dir=str(demo_dir),
                       eval_dir=str(eval_dir), eval_run_name="eval_paper_test")
    res = run_workflow(wf)
    res.eval_dir = eval_dir
    res.report = json.loads((eval_dir / "metrics.json").read_text())
    return res


# ------------------------------------------------------------------------------------------- 1. training

def test_train_workflow_properties_and_outputs(trained):
    assert not trained.missing, f"missing required train properties: {trained.missing}"
    tr = trained.trainer
    expected_iters = math.ceil(trained.n_train / trained.batch_size)
    assert tr.state.epoch == 1 and tr.state.max_epochs == 1
    assert trained.seen == {"epochs": [1], "iterations": expected_iters}
    assert tr.state.iteration == expected_iters

    models = trained.root / "models"
    assert (models / "model.pt").is_file()
    assert (models / "train_checkpoint_epoch=1.pt").is_file()

    # model.pt holds the trained weights and loads strictly into the configured network
    sd = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    net = tiny_network(sd)
    trained_sd = tr.network.state_dict()
    assert set(sd) == set(trained_sd)
    for k, v in trained_sd.items():
        torch.testing.assert_close(sd[k], v.cpu(), rtol=0, atol=0, msg=f"model.pt differs in {k}")
    with torch.no_grad():
        y = net(torch.rand(1, 1, 64, 64))
    assert y.shape == (1, 1, 64, 64) and torch.isfinite(y).all()

    # the resumable checkpoint carries model, optimizer and trainer state
    ckpt = torch.load(models / "train_checkpoint_epoch=1.pt", map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "trainer"} <= set(ckpt)
    # ignite keeps iteration, epoch_length and max_epochs (no "epoch")
    assert ckpt["trainer"]["iteration"] == ckpt["trainer"]["epoch_length"] == expected_iters

    out = trained.root / "output"
    params = json.loads((out / "params.json").read_text())
    assert params["learning_rate"] == pytest.approx(1e-4) and params["image_size"] == 64
    assert params["max_epochs"] == 1 and params["n_train_images"] == trained.n_train
    grid = read_png(out / "samples.png")  # synthetic | mask | reconstruction | anomaly map
    assert grid.shape[1] == 4 * 64 and grid.shape[0] % 64 == 0 and grid.shape[0] >= 64


def test_train_mlflow_run(trained):
    import mlflow

    assert trained.tracking_uri.startswith("sqlite:///")
    db = Path(trained.tracking_uri[len("sqlite:///"):])
    assert db.is_file() and db.parent == (trained.root / "output").resolve()
    runs = search_runs(trained.tracking_uri, trained.experiment_name)
    runs = runs[runs["tags.mlflow.runName"] == trained.run_name]
    assert len(runs) == 1, "one MLflow run per training run (validation metrics go into the same run)"
    row = runs.iloc[0]
    assert row["status"] == "FINISHED"
    assert float(row["params.learning_rate"]) == pytest.approx(1e-4)
    assert int(row["params.image_size"]) == 64 and row["params.method"] == "artasyn"
    assert 0.0 <= row["metrics.val_dice"] <= 1.0
    assert 0.0 <= row["metrics.val_auroc"] <= 1.0
    assert np.isfinite(row["metrics.loss"]) and row["metrics.loss"] > 0

    client = mlflow.MlflowClient(tracking_uri=trained.tracking_uri)
    artifacts = {a.path for a in client.list_artifacts(row["run_id"])}
    assert {"params.json", "samples.png", "model.pt"} <= artifacts
    # artifacts are stored next to the database, not in the current working directory
    assert Path(row["artifact_uri"].replace("file://", "")).resolve().is_relative_to(db.parent)
    history = client.get_metric_history(row["run_id"], "loss")
    assert len(history) == math.ceil(trained.n_train / trained.batch_size)  # one point per iteration


# ------------------------------------------------------------------------------------------- 2. evaluation

def test_evaluate_workflow_metrics(evaluation, demo_dir, trained):
    from sklearn.metrics import average_precision_score, roc_auc_score

    assert not evaluation.missing, f"missing required properties: {evaluation.missing}"
    m = evaluation.report["metrics"]
    assert (m["n_images"], m["n_healthy"], m["n_diseased"], m["n_with_mask"]) == (6, 3, 3, 3)
    for k in ("auroc", "ap", "dice_micro", "dice_mean", "healthy_fp_fraction"):
        assert isinstance(m[k], float) and 0.0 <= m[k] <= 1.0, (k, m[k])
    rows = evaluation.report["per_image"]
    names = sorted(p.name for sub in ("healthy", "diseased") for p in (demo_dir / "test" / sub).glob("*.png"))
    assert sorted(r["name"] for r in rows) == names
    assert all((r["label"] == 1) == r["name"].startswith("phantom_2") for r in rows)
    labels = [r["label"] for r in rows]
    scores = [r["score"] for r in rows]
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert m["ap"] == pytest.approx(average_precision_score(labels, scores))
    dice = [r["dice"] for r in rows if "dice" in r]
    assert len(dice) == 3 and m["dice_mean"] == pytest.approx(np.mean(dice))
    assert evaluation.report["params"]["mask_rule"] == "paper"

    for png in ("roc_pr.png", "cases.png"):
        assert read_png(evaluation.eval_dir / png).ndim == 3

    runs = search_runs(trained.tracking_uri, trained.experiment_name)
    runs = runs[runs["tags.mlflow.runName"] == "eval_paper_test"]
    assert len(runs) == 1 and runs.iloc[0]["tags.stage"] == "evaluate"
    assert runs.iloc[0]["metrics.test_auroc"] == pytest.approx(m["auroc"])


def test_evaluate_zero_shot_on_a_test_only_folder(tmp_path, trained, demo_dir):
    """Zero-shot protocol: trained on one dataset, evaluated on another that holds only a test split."""
    target = tmp_path / "target"
    for sub in ("test", "ground_truth"):
        shutil.copytree(demo_dir / sub, target / sub)
    eval_dir = tmp_path / "eval"
    wf = make_workflow(EVAL, "eval", bundle_root=str(trained.root), dataset_dir=str(tmp_path / "source_not_here"),
                       test_dir=str(target), eval_dir=str(eval_dir), eval_run_name="eval_zero_shot_test")
    res = run_workflow(wf)
    assert not res.missing
    report = json.loads((eval_dir / "metrics.json").read_text())
    assert report["metrics"]["n_images"] == 6 and report["metrics"]["n_with_mask"] == 3
    assert report["params"]["test_dir"] == str(target)
    assert report["params"]["dataset_dir"] == str(tmp_path / "source_not_here")  # the training set, as recorded


def test_evaluate_calibrated_mask_rule_in_lung(tmp_path, trained, demo_dir):
    from custom_transforms.anomaly import dilate_region
    from scripts.evaluation import AnomalyEvaluationHandler

    wf = make_workflow(EVAL, "eval", bundle_root=str(trained.root), dataset_dir=str(demo_dir),
                       eval_dir=str(tmp_path), eval_run_name="eval_calibrated_test",
                       **{"hparams#mask_rule": "calibrated", "hparams#mask_region": "lung"})
    res = run_workflow(wf)
    assert not res.missing
    report = json.loads((tmp_path / "metrics.json").read_text())
    thr = report["params"]["calibrated_threshold"]
    assert report["params"]["mask_rule"] == "calibrated" and 0.0 < thr <= 1.0
    assert wf.parser.get_parsed_content("postprocessing").threshold == pytest.approx(thr)

    handlers = wf.parser.get_parsed_content("handlers")
    handler = next(h for h in handlers if isinstance(h, AnomalyEvaluationHandler))
    dilation = wf.parser.get_parsed_content("hparams#mask_region_dilation")
    dataset = wf.parser.get_parsed_content("dataset")  # same order as the evaluation (no shuffle)
    assert len(handler.results) == len(dataset) == 6
    for r, item in zip(handler.results, dataset):
        assert r["name"] == item["name"]
        region = dilate_region(torch.as_tensor(item["lung"]), dilation).numpy()
        region = region.reshape(r["pred_mask"].shape) > 0
        assert region.any()
        assert not (r["pred_mask"] & ~region).any(), f"{r['name']}: mask outside the dilated lungs"
        amap = r["amap"].astype(np.float32)  # stored as float16: skip pixels right at the threshold
        clear = np.abs(amap - thr) > 2e-3
        np.testing.assert_array_equal(r["pred_mask"][clear], ((amap >= thr) & region)[clear])


# ------------------------------------------------------------------------------------------- 3. inference

def test_inference_config_has_deploy_ids():
    """MONAI Deploy's bundle operator instantiates these IDs of the inference config."""
    from monai.inferers import Inferer

    parser = make_parser(INFER)
    for id_ in ("network_def", "preprocessing", "inferer", "postprocessing"):
        assert id_ in parser, id_
    assert isinstance(parser.get_parsed_content("network_def"), torch.nn.Module)
    assert isinstance(parser.get_parsed_content("inferer"), Inferer)
    assert callable(parser.get_parsed_content("preprocessing"))
    assert callable(parser.get_parsed_content("postprocessing"))
    assert "network_data_format" in parser["_meta_"]


def test_inference_png_dicom_nifti(inference_run):
    assert not inference_run.missing, f"missing required properties: {inference_run.missing}"
    out = inference_run.out
    rows = list(csv.DictReader(open(out / "scores.csv")))
    js = json.loads((out / "scores.json").read_text())
    assert len(rows) == len(js) == 3, "one score row per input file"
    scores = [float(r["score"]) for r in rows]
    assert all(np.isfinite(s) and s >= 0 for s in scores)
    assert [r["score"] for r in js] == pytest.approx(scores)
    # the three files hold the same picture: loading (DICOM rescale, NIfTI transpose) must agree
    assert max(scores) - min(scores) <= 1e-4 * max(scores)
    for r in rows:
        assert 0.0 <= float(r["mask_fraction"]) <= 1.0
    overlays = sorted(out.glob("*_overlay.png"))
    amaps = sorted(out.glob("*_amap.nii.gz"))
    masks = sorted(out.glob("*_mask.nii.gz"))
    assert len(overlays) == len(amaps) == len(masks) == 3
    for p in overlays:
        assert read_png(p).shape == (64, 64, 3)
    for a, m in zip(amaps, masks):
        amap, mask = np.asarray(nib.load(str(a)).dataobj), np.asarray(nib.load(str(m)).dataobj)
        assert amap.shape == mask.shape == (64, 64)
        assert amap.min() >= 0 and amap.max() <= 1
        assert set(np.unique(mask).tolist()) <= {0, 1}


def test_inference_outputs_named_after_inputs(inference_run):
    out = inference_run.out
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert sorted(r["file"] for r in rows) == sorted(str(p) for p in inference_run.inputs)
    for stem in ("cxr_png", "cxr_dcm", "cxr_nii"):
        for suffix in ("_overlay.png", "_amap.nii.gz", "_mask.nii.gz"):
            assert (out / f"{stem}{suffix}").is_file(), f"{stem}{suffix}"


def test_inputs_sharing_a_stem_do_not_overwrite_each_other():
    from scripts.inference import output_stem

    taken: set[str] = set()
    stems = [output_stem(p, taken) for p in ["/a/cxr.png", "/b/cxr.dcm", "/c/cxr.png", "x.nii.gz", "/d/x.nii.gz"]]
    assert stems == ["cxr", "cxr_dcm", "cxr_png", "x", "x_nii_gz"]
    assert len(set(stems)) == len(stems) and taken == set(stems)


def test_inference_rows_name_their_outputs(inference_run):
    rows = list(csv.DictReader(open(inference_run.out / "scores.csv")))
    for r in rows:
        assert (inference_run.out / f"{r['output']}_overlay.png").is_file()


# ------------------------------------------------------------------------------------------- 4. resume

def _copy_models(trained, root: Path) -> Path:
    shutil.copytree(trained.root / "models", root / "models")
    return root


def test_resume_continues_at_epoch_2(tmp_path, trained, demo_dir):
    root = _copy_models(trained, tmp_path)
    res = run_workflow(make_workflow(TRAIN, "train", bundle_root=str(root), dataset_dir=str(demo_dir),
                                     **{"hparams#max_epochs": 2}, resume=True), watch_trainer=True)
    per_epoch = math.ceil(trained.n_train / trained.batch_size)
    assert res.seen == {"epochs": [2], "iterations": per_epoch}, "only epoch 2 runs after resuming"
    assert res.trainer.state.epoch == 2 and res.trainer.state.iteration == 2 * per_epoch
    # the optimizer state was restored too: AdamW counted the steps of both runs
    steps = {int(s["step"]) for s in res.trainer.optimizer.state.values()}
    assert steps == {2 * per_epoch}
    assert (root / "models" / "train_checkpoint_epoch=2.pt").is_file()
    ckpt = torch.load(root / "models" / "train_checkpoint_epoch=2.pt", map_location="cpu", weights_only=False)
    assert ckpt["trainer"]["iteration"] == 2 * per_epoch and ckpt["trainer"]["max_epochs"] == 2


def test_no_resume_starts_over(tmp_path, trained, demo_dir):
    root = _copy_models(trained, tmp_path)
    res = run_workflow(make_workflow(TRAIN, "train", bundle_root=str(root), dataset_dir=str(demo_dir),
                                     **{"hparams#max_epochs": 2}, resume=False), watch_trainer=True)
    per_epoch = math.ceil(trained.n_train / trained.batch_size)
    assert res.seen == {"epochs": [1, 2], "iterations": 2 * per_epoch}
    steps = {int(s["step"]) for s in res.trainer.optimizer.state.values()}
    assert steps == {2 * per_epoch}  # a fresh optimizer, not 3 epochs' worth of steps
    ckpt = torch.load(root / "models" / "train_checkpoint_epoch=2.pt", map_location="cpu", weights_only=False)
    assert ckpt["trainer"]["iteration"] == 2 * per_epoch


# ----------------------------------------------------------------------------------- 5. every ID parses

@pytest.mark.parametrize("which", ["train", "evaluate", "inference"])
def test_every_config_id_instantiates(which, tmp_path, demo_dir, trained, inference_inputs):
    from monai.engines import SupervisedEvaluator, SupervisedTrainer

    files, override, expect = {
        "train": (TRAIN, dict(dataset_dir=str(demo_dir)), {"train#trainer": SupervisedTrainer}),
        "evaluate": (EVAL, dict(dataset_dir=str(demo_dir),
                                checkpoint=str(trained.root / "models" / "model.pt")),
                     {"evaluator": SupervisedEvaluator}),
        "inference": (INFER, dict(dataset_dir=str(inference_inputs),
                                  checkpoint=str(trained.root / "models" / "model.pt")),
                      {"evaluator": SupervisedEvaluator}),
    }[which]
    parser = make_parser(files, bundle_root=str(tmp_path), **override)
    ids = [k for k in parser.get() if k not in RUN_IDS and not k.startswith("_")]
    assert len(ids) > 20
    failed = {}
    for id_ in ids:
        try:
            parser.get_parsed_content(id_, lazy=True)
        except Exception as e:  # collect them all for one readable failure
            failed[id_] = " <- ".join(f"{type(x).__name__}: {str(x)[:150]}" for x in error_chain(e))
    assert not failed, failed
    for id_, cls in expect.items():
        assert isinstance(parser.get_parsed_content(id_), cls)
    assert isinstance(parser.get_parsed_content("network_def"), torch.nn.Module)


# ------------------------------------------------------------------------------------------- 6. bad values

def _parse(files, id_, **override):
    return make_parser(files, **override).get_parsed_content(id_)


BAD_VALUES = [  # (config, ID to parse, override, exception type, text the message must contain)
    (TRAIN, "optimizer", {"hparams#learning_rate": -0.001}, ValueError, "-0.001"),
    (TRAIN, "optimizer", {"hparams#weight_decay": -1}, ValueError, "-1"),
    (TRAIN, "train#preprocessing", {"hparams#image_size": 4}, ValueError, "got 4"),
    (TRAIN, "train#preprocessing", {"hparams#synthesis_steps": "bogus"}, ValueError, "'bogus'"),
    (TRAIN, "train#preprocessing", {"hparams#pbtseg_mode": "bogus"}, ValueError, "'bogus'"),
    (TRAIN, "train#preprocessing", {"hparams#n_synthetic": [3, 1]}, ValueError, "[3, 1]"),
    (TRAIN, "data_split", {"hparams#val_fraction": 1.5}, ValueError, "1.5"),
    (TRAIN, "train#dataloader", {"hparams#batch_size": 0}, ValueError, "batch_size=0"),
    (TRAIN, "loss", {"hparams#tau": 2.0}, ValueError, "2.0"),
    (TRAIN, "train#checkpoint", {"resume": "maybe"}, ValueError, "'maybe'"),
    (TRAIN, "validate#postprocessing", {"hparams#mask_floor": -1}, ValueError, "floor=-1"),
    (EVAL, "handlers", {"hparams#mask_rule": "bogus"}, ValueError, "'bogus'"),
    (INFER, "handlers", {"maps_format": "tiff"}, ValueError, "'tiff'"),
    (TRAIN, "train#preprocessing", {"hparams#synthesis_prob": 1.5}, ValueError, "1.5"),
    (TRAIN, "train#preprocessing", {"hparams#image_size": "big"}, ValueError, "image size"),
    (EVAL, "postprocessing", {"hparams#score_kind": "bogus"}, ValueError, "'bogus'"),
    (EVAL, "handlers", {"hparams#mask_region": "heart"}, ValueError, "'heart'"),
]


@pytest.mark.parametrize("files,id_,override,exc,fragment", BAD_VALUES,
                         ids=[next(iter(case[2])) for case in BAD_VALUES])
def test_bad_config_value_named_in_error(tmp_path, demo_dir, files, id_, override, exc, fragment):
    kw = dict(bundle_root=str(tmp_path), dataset_dir=str(demo_dir))
    if files is INFER:
        kw["dataset_dir"] = str(demo_dir / "test" / "diseased")
    with pytest.raises(Exception) as ei:
        _parse(files, id_, **{**kw, **override})
    assert_error(ei, exc, fragment)


def test_missing_dataset_dir_named_in_error(tmp_path):
    missing = tmp_path / "no_such_dataset"
    wf = make_workflow(TRAIN, "train", bundle_root=str(tmp_path / "b"), dataset_dir=str(missing))
    wf.initialize()
    with pytest.raises(Exception) as ei:
        wf.run()
    assert_error(ei, FileNotFoundError, str(missing))
    assert not missing.exists()  # not silently created or filled with demo data


def test_bad_max_epochs_rejected_at_run(tmp_path, demo_dir):
    trainer = _parse(TRAIN, "train#trainer", bundle_root=str(tmp_path), dataset_dir=str(demo_dir),
                     **{"hparams#max_epochs": 0})
    with pytest.raises(ValueError, match="max_epochs"):
        trainer.run()


# ------------------------------------------------------------------------------------------- 7. export

@pytest.mark.parametrize("use_trace", [False, True])
def test_ckpt_export_torchscript_matches_checkpoint(tmp_path, trained, use_trace):
    from monai.bundle import ckpt_export

    ts_path = tmp_path / "model.ts"
    ckpt = trained.root / "models" / "model.pt"
    ckpt_export(net_id="network_def", filepath=str(ts_path), ckpt_file=str(ckpt), meta_file=META,
                config_file=TRAIN, bundle_root=str(trained.root), use_trace=use_trace)
    extra = {"metadata.json": "", "train.json": "", "tiny.json": ""}
    ts = torch.jit.load(str(ts_path), map_location="cpu", _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == json.loads(Path(META).read_text())["version"]
    assert json.loads(extra["tiny.json"])["+hparams"]["image_size"] == 64

    net = tiny_network(torch.load(ckpt, map_location="cpu", weights_only=True))
    torch.manual_seed(0)
    for shape in ((2, 1, 64, 64), (1, 1, 96, 96)):
        x = torch.rand(shape)
        with torch.no_grad():
            torch.testing.assert_close(ts(x), net(x), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- 8. verification

@pytest.fixture
def no_download(monkeypatch):
    """Fail on any attempt to fetch the schema from the internet."""
    import urllib.request

    import monai.apps.utils

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setattr(monai.apps.utils, "_download_with_progress", refuse)
    monkeypatch.setattr(urllib.request, "urlretrieve", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_verify_metadata_offline(no_download, tmp_path):
    from monai.bundle import verify_metadata

    before = Path(SCHEMA).read_bytes()
    verify_metadata(meta_file=META, filepath=SCHEMA)
    assert Path(SCHEMA).read_bytes() == before  # used as is, neither downloaded nor rewritten
    # the schema is really applied: a metadata file without a required field fails
    broken = json.loads(Path(META).read_text())
    del broken["network_data_format"]
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=SCHEMA)


@pytest.mark.parametrize("files", [TRAIN, INFER], ids=["train", "inference"])
def test_verify_net_in_out(files):
    from monai.bundle import verify_net_in_out

    verify_net_in_out(net_id="network_def", meta_file=META, config_file=files, device="cpu")
    # and the shape itself (verify_net_in_out checks channels and dtype only)
    net = make_parser(files).get_parsed_content("network_def").eval()
    shape = json.loads(Path(META).read_text())["network_data_format"]["inputs"]["image"]["spatial_shape"]
    with torch.no_grad():
        assert net(torch.rand(1, 1, *shape)).shape == (1, 1, *shape)


# ----------------------------------------------------------------------------------- 9. multi-GPU config

SAVE_SPY = textwrap.dedent("""
    # torchrun entry point: log every checkpoint file ignite writes (rank, name), then run monai.bundle's CLI
    import os, runpy, sys
    import ignite.handlers.checkpoint as ck

    _save = ck.DiskSaver._save_func

    def _spy(self, checkpoint, path, func):
        with open(os.environ["SAVE_LOG"], "a") as f:
            f.write(f"{os.environ.get('RANK', '?')} {os.path.basename(str(path))}\\n")
        return _save(self, checkpoint, path, func)

    ck.DiskSaver._save_func = _spy
    sys.argv[0] = "monai.bundle"
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
""")


def test_multi_gpu_config_on_cpu_with_gloo(tmp_path, demo_dir):
    """torchrun, 2 processes, gloo: training succeeds and each checkpoint is written once, by rank 0.

    Validation runs on every rank (MONAI's metrics all-gather across ranks); only rank 0 writes.
    """
    root, log = tmp_path / "bundle", tmp_path / "saves.log"
    spy = tmp_path / "spy_bundle_run.py"
    spy.write_text(SAVE_SPY)
    env = {**os.environ, "SAVE_LOG": str(log), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", "2",
           str(spy), "run", "training", "--config_file", repr(MULTI_GPU), "--meta_file", META,
           "--bundle_root", str(root), "--dataset_dir", str(demo_dir)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    key_lines = [ln for ln in output.splitlines() if any(w in ln for w in ("Error", "terminate", "exitcode"))]
    assert proc.returncode == 0, "\n".join(key_lines[:40]) + "\n...\n" + output[-3000:]

    saves = log.read_text().split() if log.exists() else []
    pairs = list(zip(saves[::2], saves[1::2]))
    # each checkpoint written once, by rank 0
    assert sorted(pairs) == [("0", "model.pt"), ("0", "train_checkpoint_epoch=1.pt")], pairs
    sd = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in sd)  # saved unwrapped from DistributedDataParallel
    tiny_network(sd)
    runs = search_runs(f"sqlite:///{(root / 'output' / 'mlruns.db').resolve()}", "art-asyn")
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"  # main rank logs


# ------------------------------------------------------------------------------------------- 10. preview CLI

def test_preview_cli_writes_png(tmp_path, demo_dir, capsys):
    out = tmp_path / "preview.png"
    cmd = [sys.executable, "-m", "scripts.cli.preview", "--input", str(demo_dir / "train" / "healthy"),
           "--n", "2",
           "--size", "64", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grid = read_png(out)
    assert grid.shape[2] == 3 and grid.shape[1] == 4 * 64 + 3 * 2  # 4 panels, 2-px gaps
    assert grid.shape[0] in (64, 2 * 64 + 2)

    from scripts.cli.preview import main  # the error path in-process (a second interpreter costs ~8 s of imports)

    assert main(["--input", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    assert "not found" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_figure_anomaly_maps_compares_models(trained, demo_dir, tmp_path):
    """The results figure: one header row, one row per boxed diseased image, image + one panel per model."""
    from scripts.cli import figure_anomaly_maps as fig

    out = tmp_path / "maps.png"
    assert fig.main(["--dataset_dir", str(demo_dir), "--config", TRAIN[0], "--config", TINY,
                     "--model", f"A={trained.root}", "--model", f"B={trained.root}", "--n", "2",
                     "--out", str(out)]) == 0
    grid = read_png(out)
    assert grid.shape == (18 + 2 * 64, 3 * 64, 3)
    # both columns come from the same model: identical panels
    body = grid[18:]
    np.testing.assert_array_equal(body[:, 64:128], body[:, 128:192])
    with pytest.raises(FileNotFoundError, match="no trained model"):
        fig.main(["--dataset_dir", str(demo_dir), "--config", TRAIN[0], "--config", TINY,
                  "--model", f"A={tmp_path / 'nothing'}", "--out", str(tmp_path / "x.png")])


def test_same_seed_same_initial_weights(tmp_path, demo_dir):
    """``initialize`` seeds before anything builds the network (the config checks instantiate it): two workflows
    with the same seed start from the same weights, so a run is reproducible."""
    states = []
    for i in range(2):
        wf = make_workflow(TRAIN, "train", bundle_root=str(tmp_path / str(i)), dataset_dir=str(demo_dir))
        wf.initialize()
        states.append({k: v.clone() for k, v in wf.parser.get_parsed_content("network").state_dict().items()})
    for k, v in states[0].items():
        torch.testing.assert_close(states[1][k], v, rtol=0, atol=0, msg=f"initial weights differ in {k}")
