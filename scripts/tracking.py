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

from ignite.engine import Engine, Events

from custom_transforms.io import file_sha256
from custom_transforms.utils import cli_flag

logger = logging.getLogger(__name__)

__all__ = ["flatten", "run_params", "command_line", "experiment_id", "log_run", "BestMetricLogger", "train_run_id",
           "progress_bar_on"]

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


def progress_bar_on(flag=True, main_rank: bool = True) -> bool:
    """Whether to attach ignite's tqdm ``ProgressBar``: ``flag`` (a bool, or text from the command line) is on,
    this is the main rank, and ``tqdm`` is installed (without it the bar is skipped with a log line)."""
    if not (cli_flag(flag, "progress_bar") and main_rank):
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError:
        logger.info("tqdm is not installed: no progress bar")
        return False
    return True


class BestMetricLogger:
    """When training completes, log the best validation key metric and its epoch to the training's MLflow run.

    The values are those of the weights in ``model.pt``: ``run_state.best_metric`` / ``best_epoch``
    (:class:`scripts.handlers.RunState`, kept across resumes), else the validator's ``state.best_metric`` /
    ``best_metric_epoch``. Metrics ``best_<metric_name>`` and ``best_epoch`` go to ``run_state.mlflow_run_id``
    (MLflow takes metrics of a closed run too, so it may run after the MLflow handler that closes the run).
    """

    def __init__(self, tracking_uri: str, run_state=None, validator=None, metric_name: str = "val_dice"):
        self.tracking_uri, self.run_state, self.validator = tracking_uri, run_state, validator
        self.metric_name = metric_name
        self.logged: dict = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def best(self) -> tuple[float | None, int | None]:
        rs = self.run_state
        if rs is not None and rs.best_epoch is not None:
            return rs.best_metric, rs.best_epoch
        state = getattr(self.validator, "state", None)
        epoch = getattr(state, "best_metric_epoch", -1)
        if epoch is None or epoch < 0:
            return None, None
        return float(state.best_metric), int(epoch)

    def __call__(self, engine: Engine | None = None) -> None:
        import mlflow

        run_id = getattr(self.run_state, "mlflow_run_id", None)
        value, epoch = self.best()
        if not run_id or epoch is None or value is None:
            logger.info("no best %s to log to MLflow", self.metric_name)
            return
        self.logged = {f"best_{self.metric_name}": float(value), "best_epoch": int(epoch)}
        client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        for k, v in self.logged.items():
            client.log_metric(run_id, k, float(v))
        logger.info("best %s %.4g at epoch %d (MLflow run %s)", self.metric_name, value, epoch, run_id)




def train_run_id(checkpoint, ckpt_dir, prefix: str = "train") -> str | None:
    """The MLflow run id of the training that wrote the model file ``checkpoint``, or None.

    It is read from the ``"run"`` entry (:class:`scripts.handlers.RunState`) of the newest training checkpoint
    in ``ckpt_dir``, and only trusted when that entry's ``best_sha256`` is the checksum of ``checkpoint``: the
    model file is the best model of that very training (not one copied in, or from an older training).
    """
    from scripts.robust import load_newest_checkpoint

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file() or not Path(ckpt_dir).is_dir():
        return None
    path, content = load_newest_checkpoint(ckpt_dir, prefix, set_aside=False)
    run = (content or {}).get("run") or {}
    if not run.get("mlflow_run_id"):
        return None
    if run.get("best_sha256") != file_sha256(checkpoint):
        logger.warning("'%s' is not the best model of the training checkpoint '%s': no train_run_id", checkpoint,
                       path)
        return None
    return str(run["mlflow_run_id"])
