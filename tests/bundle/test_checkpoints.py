"""Training survives bad data and faults; checkpoints are atomic and resumable (tiny bundle on demo phantoms).

- a SIGKILL while the training checkpoint is being written: the resumed run starts from the last complete
  checkpoint (at most one epoch lost), continues the same MLflow run, and takes no partial file;
- resuming skips an empty newest checkpoint, keeps the best ``model.pt`` (a worse epoch does not replace it),
  and repairs ``model.pt`` when the run was killed between the checkpoint and the best model;
- a diverging loss stops training with a clear error, writes no NaN weights and marks the MLflow run FAILED;
- bad config values are named before anything runs; a corrupt PNG is left out, named and counted.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.bundle.test_workflows import (
    META,
    TRAIN,
    assert_error,
    make_parser,
    make_workflow,
    run_workflow,
    search_runs,
    tiny_network,
)
from tests.helpers import CONFIGS, REPO


class StallCheckpointWrite:
    """Test handler for the killed subprocess: the training checkpoint of ``epoch`` is written halfway, then the
    process writes its pid to ``flag`` and hangs until it is killed."""

    def __init__(self, epoch: int, flag: str):
        self.epoch, self.flag = int(epoch), Path(flag)

    def attach(self, engine) -> None:
        real, target = torch.save, f"train_checkpoint_epoch={self.epoch}.pt"

        def save(obj, f, *args, **kwargs):
            if target not in str(getattr(f, "name", f)):
                return real(obj, f, *args, **kwargs)
            buf = io.BytesIO()
            real(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            self.flag.write_text(str(os.getpid()))
            time.sleep(300)

        torch.save = save


@pytest.fixture(scope="module")
def trained2(tmp_path_factory, demo_dir):
    """The tiny bundle trained for 2 epochs (checkpoint of epoch 2, best model, MLflow run)."""
    root = tmp_path_factory.mktemp("bundle_ckpt")
    res = run_workflow(make_workflow(TRAIN, "train", bundle_root=str(root), dataset_dir=str(demo_dir),
                                     **{"hparams#max_epochs": 2}))
    res.root = root
    res.tracking_uri = res.wf.parser.get_parsed_content("tracking_uri")
    return res


def _copy(trained2, dest: Path) -> Path:
    for sub in ("models", "output"):
        shutil.copytree(trained2.root / sub, dest / sub)
    return dest


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _resume(root: Path, demo_dir, max_epochs: int, **override):
    return run_workflow(make_workflow(TRAIN, "train", bundle_root=str(root), dataset_dir=str(demo_dir), resume=True,
                                      **{"hparams#max_epochs": max_epochs, **override}), watch_trainer=True)


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _same_weights(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------- 1. SIGKILL

def test_sigkill_during_checkpoint_write_resumes_from_the_last_complete_one(tmp_path, demo_dir):
    root, flag, extra = tmp_path / "bundle", tmp_path / "stalled", tmp_path / "stall.json"
    extra.write_text(json.dumps({"train#handlers_family": [
        {"_target_": "tests.bundle.test_checkpoints.StallCheckpointWrite", "epoch": 2, "flag": str(flag)}]}))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", repr(TRAIN + [str(extra)]),
           "--meta_file", META, "--bundle_root", str(root), "--dataset_dir", str(demo_dir), "--hparams#max_epochs", "3"]
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not flag.exists():
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the epoch-2 checkpoint write never started"
                time.sleep(0.1)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()

    models = root / "models"
    # killed mid-write: the new checkpoint is only a hidden partial file; the previous one is complete
    assert "train_checkpoint_epoch=2.pt" not in _files(models)
    partial = list(models.glob(".train_checkpoint_epoch=2.pt.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    epoch1 = _load(models / "train_checkpoint_epoch=1.pt")
    assert epoch1["trainer"]["iteration"] == 3 and epoch1["run"]["best_epoch"] == 1
    assert _same_weights(_load(models / "model.pt"), epoch1["model"])  # the best model known to checkpoint 1
    uri = f"sqlite:///{(root / 'output' / 'mlruns.db').resolve()}"
    runs = search_runs(uri, "art-asyn")
    assert len(runs) == 1 and runs.iloc[0]["status"] == "RUNNING"  # nobody could mark a SIGKILLed run
    run_id = runs.iloc[0]["run_id"]

    res = _resume(root, demo_dir, 3)
    assert res.seen["epochs"] == [2, 3], "resumed after epoch 1: only the interrupted epoch is redone"
    # partial files removed, none taken; the record of what model.pt needs beside it
    assert _files(models) == ["model.pt", "model_config.json", "train_checkpoint_epoch=3.pt"]
    final = _load(models / "train_checkpoint_epoch=3.pt")
    assert final["trainer"]["iteration"] == 9
    net = tiny_network(_load(models / "model.pt"))  # loads strictly
    assert all(torch.isfinite(p).all() for p in net.parameters())
    runs = search_runs(uri, "art-asyn")
    assert list(runs["run_id"]) == [run_id], "the resumed training continues its MLflow run"
    row = runs.iloc[0]
    assert row["status"] == "FINISHED" and row["tags.resumed_at_epoch"] == "1"
    import mlflow

    steps = {m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, "val_dice")}
    assert steps == {1, 2, 3}


# ------------------------------------------------------------------------------------------- 2. resume

def test_resume_skips_an_empty_newest_checkpoint(tmp_path, trained2, demo_dir, caplog):
    root = _copy(trained2, tmp_path)
    (root / "models" / "train_checkpoint_epoch=3.pt").write_bytes(b"")  # killed by the old, non-atomic saver
    with caplog.at_level(logging.WARNING, logger="scripts.robust"):
        res = _resume(root, demo_dir, 3)
    assert res.seen["epochs"] == [3], "resumed from the complete epoch-2 checkpoint"
    assert any("train_checkpoint_epoch=3.pt' (0 bytes) cannot be loaded" in r.getMessage() for r in caplog.records)
    assert _files(root / "models") == ["model.pt", "model_config.json", "train_checkpoint_epoch=3.pt",
                                       "train_checkpoint_epoch=3.pt.unreadable"]
    assert _load(root / "models" / "train_checkpoint_epoch=3.pt")["trainer"]["iteration"] == 9


def test_resume_never_replaces_the_best_model_with_a_worse_epoch(tmp_path, trained2, demo_dir):
    root = _copy(trained2, tmp_path)
    ckpt_path = root / "models" / "train_checkpoint_epoch=2.pt"
    ckpt = _load(ckpt_path)
    best_epoch = ckpt["run"]["best_epoch"]
    assert best_epoch in (1, 2) and 0.0 <= ckpt["run"]["best_metric"] <= 1.0
    ckpt["run"]["best_metric"] = 2.0  # as if model.pt scored better than any epoch can (val_dice <= 1)
    torch.save(ckpt, ckpt_path)
    before = (root / "models" / "model.pt").read_bytes()

    res = _resume(root, demo_dir, 3)
    assert res.seen["epochs"] == [3]
    assert (root / "models" / "model.pt").read_bytes() == before, "a worse epoch replaced the best model.pt"
    final = _load(root / "models" / "train_checkpoint_epoch=3.pt")["run"]
    assert (final["best_metric"], final["best_epoch"]) == (2.0, best_epoch)  # carried on to the next resume
    evaluator = res.wf.parser.get_parsed_content("validate#evaluator")
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (2.0, best_epoch)


def test_resume_repairs_model_pt_killed_before_the_best_model_was_in_place(tmp_path, trained2, demo_dir):
    root = _copy(trained2, tmp_path)
    ckpt_path = root / "models" / "train_checkpoint_epoch=2.pt"
    ckpt = _load(ckpt_path)
    ckpt["run"]["best_epoch"] = 2  # checkpoint 2 says epoch 2 is the best, but model.pt was not replaced yet
    torch.save(ckpt, ckpt_path)
    stale = {k: torch.zeros_like(v) for k, v in ckpt["model"].items()}
    torch.save(stale, root / "models" / "model.pt")

    (root / "models" / "model_config.json").unlink()  # lost with the old model.pt: written again with the repair
    _resume(root, demo_dir, 2)  # nothing left to train: only the resume logic runs
    assert _same_weights(_load(root / "models" / "model.pt"), ckpt["model"])
    record = json.loads((root / "models" / "model_config.json").read_text())
    assert record["+hparams"]["network_channels"] == [8, 16, 32]


def test_interrupted_run_is_marked_and_continued_on_resume(tmp_path, demo_dir):
    from ignite.engine import Events

    wf = make_workflow(TRAIN, "train", bundle_root=str(tmp_path), dataset_dir=str(demo_dir),
                       **{"hparams#max_epochs": 2})
    wf.initialize()

    def interrupt(engine):
        if engine.state.epoch == 2:
            raise KeyboardInterrupt  # Ctrl-C in epoch 2

    wf.parser.get_parsed_content("train#trainer").add_event_handler(Events.ITERATION_COMPLETED, interrupt)
    with pytest.raises(KeyboardInterrupt):
        wf.run()
    uri = wf.parser.get_parsed_content("tracking_uri")
    runs = search_runs(uri, "art-asyn")
    assert len(runs) == 1 and runs.iloc[0]["status"] == "KILLED"
    assert runs.iloc[0]["tags.error"] == "KeyboardInterrupt: "

    res = _resume(tmp_path, demo_dir, 2)
    assert res.seen["epochs"] == [2]
    after = search_runs(uri, "art-asyn")
    assert list(after["run_id"]) == list(runs["run_id"]) and after.iloc[0]["status"] == "FINISHED"
    assert after.iloc[0]["tags.previous_error"] == "KeyboardInterrupt: "
    assert "tags.error" not in after.columns or after["tags.error"].isna().all()


def test_resume_with_other_parameters_starts_a_new_mlflow_run(tmp_path, trained2, demo_dir):
    root = _copy(trained2, tmp_path)
    old = search_runs(trained2.tracking_uri, "art-asyn")
    uri = f"sqlite:///{(root / 'output' / 'mlruns.db').resolve()}"
    res = _resume(root, demo_dir, 3, **{"hparams#learning_rate": 5e-4})
    assert res.seen["epochs"] == [3]
    runs = search_runs(uri, "art-asyn")
    assert len(runs) == 2
    new = runs[runs["run_id"] != old.iloc[0]["run_id"]].iloc[0]
    assert new["tags.resumed_from"] == old.iloc[0]["run_id"] and new["status"] == "FINISHED"
    assert float(new["params.learning_rate"]) == pytest.approx(5e-4)


# ------------------------------------------------------------------------------------------- 3. divergence

def test_nan_loss_stops_training_writes_nothing_and_fails_the_run(tmp_path, demo_dir):
    wf = make_workflow(TRAIN, "train", bundle_root=str(tmp_path), dataset_dir=str(demo_dir), run_name="diverged",
                       **{"hparams#max_epochs": 3, "hparams#learning_rate": 1e6})
    with pytest.raises(Exception) as ei:
        run_workflow(wf)
    assert_error(ei, RuntimeError, "non-finite loss at epoch")
    assert_error(ei, RuntimeError, "lower hparams#learning_rate")
    models = tmp_path / "models"
    assert not models.exists() or not any(models.glob("*.pt")), "weights written by a diverged run"
    assert not (models / "model_config.json").exists(), "a record without its model"
    uri = wf.parser.get_parsed_content("tracking_uri")
    runs = search_runs(uri, "art-asyn")
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FAILED"
    assert runs.iloc[0]["tags.error"].startswith("NonFiniteError: training diverged")

    # the same run name again, with a sane learning rate: a new run, the failed one is not taken over
    run_workflow(make_workflow(TRAIN, "train", bundle_root=str(tmp_path), dataset_dir=str(demo_dir),
                               run_name="diverged"))
    runs = search_runs(uri, "art-asyn").sort_values("start_time")
    assert list(runs["status"]) == ["FAILED", "FINISHED"]
    assert float(runs.iloc[1]["params.learning_rate"]) == pytest.approx(1e-4)


def test_best_model_saver_refuses_non_finite_weights(tmp_path):
    from ignite.engine import Engine

    from scripts.handlers import RunState, SafeCheckpointSaver
    from scripts.robust import NonFiniteError

    net = torch.nn.Linear(2, 1)
    saver = SafeCheckpointSaver(str(tmp_path), {"model": net}, run_state=RunState(), save_key_metric=True,
                                key_metric_name="val_dice", key_metric_filename="model.pt")
    engine = Engine(lambda e, b: None)
    engine.state.epoch, engine.state.metrics = 1, {"val_dice": float("nan")}
    saver.metrics_completed(engine)  # a NaN metric is not saved
    engine.state.metrics = {"val_dice": 0.5}
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="model.pt"):
        saver.metrics_completed(engine)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- 4. config values

BAD_CONFIG = [  # (override, extra config files, text of the error)
    ({"hparams#learning_rate": float("nan")}, [], "hparams#learning_rate must be a finite number > 0, got nan"),
    ({"hparams#learning_rate": "nan"}, [], "got 'nan'"),
    ({"hparams#learning_rate": float("inf")}, [], "got inf"),
    ({"hparams#learning_rate": 0}, [], "got 0"),
    ({"hparams#on_bad_image": "ignore"}, [], "'ignore'"),
]


@pytest.mark.parametrize("override,extra,fragment", BAD_CONFIG, ids=[str(c[0]) for c in BAD_CONFIG])
def test_bad_config_values_stop_the_run_at_the_start(tmp_path, demo_dir, override, extra, fragment):
    wf = make_workflow(TRAIN + extra, "train", bundle_root=str(tmp_path), dataset_dir=str(demo_dir), **override)
    with pytest.raises(Exception) as ei:
        wf.initialize()
    assert_error(ei, ValueError, fragment)
    assert not (tmp_path / "output").exists()  # before anything was created
    # without the `initialize` list (multi_gpu_train.json replaces it) the trainer requires the same checks
    with pytest.raises(Exception) as ei:
        make_parser(TRAIN + extra, bundle_root=str(tmp_path), dataset_dir=str(demo_dir),
                    **override).get_parsed_content("train#trainer")
    assert_error(ei, ValueError, fragment)


def test_image_size_the_unet_cannot_take_names_the_nearest_sizes(tmp_path):
    parser = make_parser([str(CONFIGS / "train.json")], bundle_root=str(tmp_path), **{"hparams#image_size": 250})
    with pytest.raises(Exception) as ei:
        parser.get_parsed_content("config_checks")
    assert_error(ei, ValueError, "image_size 250 is not divisible by 16 (the product of network_strides "
                                 "[2, 2, 2, 2]); nearest valid sizes: 240, 256")
    tiny = make_parser(TRAIN, bundle_root=str(tmp_path), **{"hparams#image_size": 66})  # strides [2, 2]
    with pytest.raises(Exception) as ei:
        tiny.get_parsed_content("config_checks")
    assert_error(ei, ValueError, "nearest valid sizes: 64, 68")
    # other model families have no U-Net strides: not checked here
    for method in ("anatpaste_classifier.json", "sagan.json"):
        files = [str(CONFIGS / "train.json"), str(CONFIGS / "methods" / method)]
        checked = make_parser(files, bundle_root=str(tmp_path), **{"hparams#image_size": 250,
                                                                 "hparams#sagan_channels": 4})
        assert checked.get_parsed_content("config_checks")["image_size"] == 250


# ------------------------------------------------------------------------------------------- 5. bad images

@pytest.fixture
def demo_with_corrupt_png(tmp_path, demo_dir):
    root = tmp_path / "demo"
    shutil.copytree(demo_dir, root)
    bad = sorted((root / "train" / "healthy").glob("*.png"))[3]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)  # a PNG signature, then garbage
    return root, bad


def test_corrupt_training_image_is_left_out_named_and_counted(tmp_path, demo_with_corrupt_png, caplog):
    demo, bad = demo_with_corrupt_png
    bundle = tmp_path / "bundle"
    with caplog.at_level(logging.INFO, logger="scripts.robust"):
        res = run_workflow(make_workflow(TRAIN, "train", bundle_root=str(bundle), dataset_dir=str(demo)),
                           watch_trainer=True)
    named = [r for r in caplog.records if str(bad) in r.getMessage()]
    assert len(named) == 1 and named[0].levelno == logging.WARNING
    assert "leaving out" in named[0].getMessage() and "not a readable" in named[0].getMessage()
    assert any("1 of 8 images left out" in r.getMessage() for r in caplog.records)
    train, val = res.wf.parser.get_parsed_content("data_split")
    assert len(train) + len(val) == 7 and str(bad) not in {i["image"] for i in train + val}
    params = json.loads((bundle / "output" / "params.json").read_text())
    assert params["n_bad_images"] == 1 and params["n_train_images"] + params["n_val_images"] == 7
    runs = search_runs(res.wf.parser.get_parsed_content("tracking_uri"), "art-asyn")
    assert runs.iloc[0]["params.n_bad_images"] == "1" and runs.iloc[0]["status"] == "FINISHED"
    assert res.seen["epochs"] == [1]


def test_corrupt_training_image_with_on_bad_image_error(tmp_path, demo_with_corrupt_png):
    demo, bad = demo_with_corrupt_png
    parser = make_parser(TRAIN, bundle_root=str(tmp_path / "b"), dataset_dir=str(demo),
                         **{"hparams#on_bad_image": "error"})
    with pytest.raises(Exception) as ei:
        parser.get_parsed_content("train#dataset")
    assert_error(ei, ValueError, f"image '{bad}' cannot be used: not a readable")
