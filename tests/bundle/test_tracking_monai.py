"""MONAI's own experiment tracking (``python -m monai.bundle run ... --tracking mlflow``) on the bundle.

``--tracking mlflow`` appends MONAI's ``MLFlowHandler`` to ``train#handlers``, ``validate#handlers`` and
``handlers``; the bundle leaves it out (``scripts.tracking.bundle_handlers``) and logs with its own handlers, so a
training and an evaluation are one FINISHED run each, in the store of ``tracking_uri``, with the executed config
MONAI saves as an artifact. Checked on the runs in a temporary SQLite store, through ``ConfigWorkflow(...,
tracking="mlflow")`` (what the command line builds).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.bundle.test_workflows import EVAL, TRAIN, make_parser, make_workflow, run_workflow


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, demo_dir):
    """The tiny bundle trained, then evaluated, both with ``tracking="mlflow"``; the runs of the store."""
    import mlflow

    root = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlruns.db'}"
    common = dict(bundle_root=str(root), dataset_dir=str(demo_dir), tracking_uri=uri, progress_bar=False)
    train = run_workflow(make_workflow(TRAIN, "train", tracking="mlflow", run_name="tiny_tracked", **common))
    run_workflow(make_workflow(EVAL, "eval", tracking="mlflow", eval_run_name="eval_tracked", **common))
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiments = client.search_experiments()
    runs = {r.info.run_name: r for e in experiments for r in client.search_runs([e.experiment_id])}
    return SimpleNamespace(root=root, uri=uri, client=client, experiments=experiments, runs=runs, train=train)


def _artifacts(client, run) -> set[str]:
    return {a.path for a in client.list_artifacts(run.info.run_id)}


def test_one_finished_run_per_training_and_evaluation(tracked):
    assert [e.name for e in tracked.experiments if e.name != "Default"] == ["art-asyn"]  # no monai_experiment
    assert sorted(tracked.runs) == ["eval_tracked", "tiny_tracked"]
    assert {r.info.status for r in tracked.runs.values()} == {"FINISHED"}


def test_training_run_has_loss_terms_validation_and_best_metrics(tracked):
    run = tracked.runs["tiny_tracked"]
    assert {"loss", "dice", "local", "val_dice", "val_auroc", "best_val_dice", "best_epoch"} <= set(run.data.metrics)
    assert run.data.metrics["best_epoch"] == 1
    assert run.data.params["network_channels"] == "[8, 16, 32]"
    configs = [a for a in _artifacts(tracked.client, run) if a.startswith("config_")]
    assert len(configs) == 1 and configs[0].endswith(".json")  # MONAI's save_execute_config, logged to our run
    assert {"params.json", "model.pt"} <= _artifacts(tracked.client, run)
    assert (tracked.root / "models" / "model.pt").is_file()  # the bundle's own handlers all ran


def test_evaluation_run_is_tagged_with_the_training_run(tracked):
    run = tracked.runs["eval_tracked"]
    assert run.data.tags["train_run_id"] == tracked.runs["tiny_tracked"].info.run_id
    assert {"test_auroc", "test_ap", "test_dice_micro"} <= set(run.data.metrics)
    assert {"metrics.json"} <= _artifacts(tracked.client, run)
    assert any(a.startswith("config_") for a in _artifacts(tracked.client, run))


def test_bundle_handlers_leave_out_plain_mlflow_handlers_only(tmp_path):
    from monai.handlers import MLFlowHandler, StatsHandler

    from scripts.handlers import ResumableMLFlowHandler
    from scripts.tracking import RunArtifacts, bundle_handlers

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    ours, stats = ResumableMLFlowHandler(tracking_uri=uri), StatsHandler()
    monai_handler = MLFlowHandler(tracking_uri=uri, artifacts=str(tmp_path / "config.json"))
    assert bundle_handlers([ours, stats]) == [ours, stats]
    kept = bundle_handlers([ours, monai_handler, stats], uri, lambda: "run-id")
    assert kept[:2] == [ours, stats] and len(kept) == 3
    assert isinstance(kept[2], RunArtifacts) and kept[2].artifacts == [str(tmp_path / "config.json")]
    assert bundle_handlers([MLFlowHandler(tracking_uri=uri)], uri, lambda: None) == []  # nothing to hand over


def test_handler_lists_are_those_monai_appends_to():
    """``--tracking`` appends to the lists of ``DEFAULT_HANDLERS_ID``; were one missing, MONAI would replace the
    engine's whole handler list (validation, checkpoints and all) with its own handler."""
    from monai.bundle.utils import DEFAULT_HANDLERS_ID

    parser = make_parser(EVAL)
    for engine in DEFAULT_HANDLERS_ID.values():
        assert parser.get(engine["id"]) is not None and isinstance(parser.get(engine["handlers"]), list), engine
    assert parser.get("train#handlers") == [] and parser.get("validate#handlers") == []
