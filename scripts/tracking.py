"""MLflow tracking helpers: run parameters from the configs' ``hparams`` and one-shot runs.

Training runs are logged by MONAI's ``MLFlowHandler`` (configs/train.json); evaluation runs by
:func:`log_run`. Both take their parameters from :func:`run_params`, so the tunables are written once, in
the ``hparams`` dictionary at the top of the configs, and never copied by hand.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["flatten", "run_params", "command_line", "experiment_id", "log_run"]

MLFLOW_PARAM_LIMIT = 6000  # characters of one MLflow param value


def flatten(params: dict, prefix: str = "") -> dict:
    """Nested dicts as one level with dotted keys: ``{"loss_weights": {"dice": 1}}`` -> ``{"loss_weights.dice": 1}``."""
    out = {}
    for k, v in params.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{name}."))
        else:
            out[name] = v
    return out


def command_line(argv=None) -> str:
    """The command that started this process, as a user would type it (``python -m monai.bundle ...``)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].replace("\\", "/").endswith(("monai/bundle/__main__.py", "monai.bundle")):
        return " ".join(["python -m monai.bundle"] + argv[1:])
    return " ".join(argv)


def run_params(hparams: dict, **extra) -> dict:
    """The parameters of a run: ``hparams`` flattened, plus ``extra`` (paths, derived counts), plus the command."""
    out = flatten(dict(hparams))
    out.update(flatten(extra))
    out.setdefault("command", command_line())
    return out


def experiment_id(client, name: str, tracking_uri: str) -> str:
    """Id of MLflow experiment ``name``, created if missing.

    Like MONAI's ``MLFlowHandler``, a local SQLite store keeps its artifacts in ``<db folder>/mlruns``, not
    in the current directory.
    """
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()
    return client.create_experiment(name, artifact_location=location)


def log_run(tracking_uri: str, experiment_name: str, run_name: str | None, params: dict, metrics: dict,
            artifacts=(), tags: dict | None = None, metric_prefix: str = "") -> str:
    """Log one finished run (params, numeric metrics, artifact files) and return its id.

    The run is FINISHED when everything was logged, FAILED (and the error re-raised) otherwise.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp_id = experiment_id(client, experiment_name, tracking_uri)
    run = client.create_run(exp_id, run_name=run_name or f"run_{time.strftime('%Y%m%d-%H%M%S')}",
                            tags=dict(tags or {}))
    rid = run.info.run_id
    try:
        for k, v in params.items():
            client.log_param(rid, k, str(v)[:MLFLOW_PARAM_LIMIT])
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                client.log_metric(rid, f"{metric_prefix}{k}", float(v))
        for a in artifacts:
            client.log_artifact(rid, str(a))
        client.set_terminated(rid, "FINISHED")
    except Exception:
        client.set_terminated(rid, "FAILED")
        raise
    logger.info("MLflow run '%s' (%s) in %s", run.info.run_name, rid, tracking_uri)
    return rid
