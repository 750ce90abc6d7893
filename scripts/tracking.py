"""MLflow tracking helpers: run parameters from the configs' ``hparams``, one-shot runs, and the record of what a
trained model needs.

Training runs are logged by MONAI's ``MLFlowHandler`` (configs/train.json); evaluation runs by
:func:`log_run`. Both take their parameters from :func:`run_params`, so the tunables are written once, in
the ``hparams`` dictionary at the top of the configs, and never copied by hand. :func:`bundle_handlers` keeps
MONAI's ``--tracking mlflow`` from adding a second MLflow handler. :func:`model_record` is the override of
``configs/inference.json`` that training writes beside ``model.pt`` (``model_config.json``).
"""

from __future__ import annotations

import inspect
import json
import logging
import pydoc
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ignite.engine import Engine, Events

from custom_transforms.io import file_sha256
from custom_transforms.utils import cli_flag

logger = logging.getLogger(__name__)

__all__ = ["flatten", "run_params", "command_line", "experiment_id", "log_run", "BestMetricLogger", "train_run_id",
           "progress_bar_on", "bundle_handlers", "RunArtifacts", "model_record", "RECORD_NAME"]

MLFLOW_PARAM_LIMIT = 6000  # characters of one MLflow param value
RECORD_NAME = "model_config.json"  # written beside model.pt: what configs/inference.json needs to rebuild the model
CODE_ROOT = Path(__file__).resolve().parents[1]  # the bundle's code and configs/


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
        client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        for k, v in {f"best_{self.metric_name}": float(value), "best_epoch": int(epoch)}.items():
            client.log_metric(run_id, k, float(v))
        logger.info("best %s %.4g at epoch %d (MLflow run %s)", self.metric_name, value, epoch, run_id)


def bundle_handlers(handlers, tracking_uri: str | None = None, run_of: Callable[[], str | None] | None = None) -> list:
    """An engine's ``handlers`` without MONAI's plain ``MLFlowHandler``: the bundle logs its MLflow runs itself.

    ``python -m monai.bundle run ... --tracking mlflow`` appends MONAI's ``MLFlowHandler`` to ``train#handlers``,
    ``validate#handlers`` and ``handlers`` (``monai.bundle.utils.DEFAULT_MLFLOW_SETTINGS``). Attached, it would log
    ``from_engine(['loss'], first=True)`` (a tuple here: the trainer's output holds the loss terms) and open a
    second run beside the bundle's own (:class:`scripts.handlers.ResumableMLFlowHandler`,
    :class:`scripts.evaluation.AnomalyEvaluationHandler`). So each handler whose type is exactly
    ``MLFlowHandler`` is left out (subclasses stay), and the files it was to log (the executed config that
    ``--tracking`` saves) go to the bundle's run ``run_of()`` when the engine completes (:class:`RunArtifacts`).
    """
    from monai.handlers import MLFlowHandler

    kept = [h for h in handlers if type(h) is not MLFlowHandler]
    dropped = [h for h in handlers if type(h) is MLFlowHandler]
    if not dropped:
        return kept
    artifacts = list(dict.fromkeys(str(a) for h in dropped for a in (h.artifacts or ()) if a))
    logger.info("--tracking: MONAI's MLFlowHandler left out, the bundle logs this run to %s itself%s", tracking_uri,
                f" (with {', '.join(artifacts)})" if artifacts else "")
    if artifacts and tracking_uri and run_of is not None:
        kept.append(RunArtifacts(tracking_uri, run_of, artifacts))
    return kept


class RunArtifacts:
    """When the engine completes, log the files ``artifacts`` to the MLflow run ``run_of()`` (a callable: the run is
    known once the bundle's own handler has logged it); a missing run or file is logged, not raised."""

    def __init__(self, tracking_uri: str, run_of: Callable[[], str | None], artifacts):
        self.tracking_uri, self.run_of, self.artifacts = tracking_uri, run_of, [str(a) for a in artifacts]

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        import mlflow

        run_id = self.run_of()
        if not run_id:
            logger.info("no MLflow run to log %s to", ", ".join(self.artifacts))
            return
        client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        for a in self.artifacts:
            if Path(a).is_file():
                client.log_artifact(run_id, a)
            else:
                logger.warning("'%s' does not exist: not logged to MLflow run %s", a, run_id)


# ------------------------------------------------------------------------------------------- model record

def _target_builds(config, cls: type) -> bool:
    """Whether the raw component ``config`` (a dict with ``_target_``) builds an instance of ``cls``."""
    target = config.get("_target_") if isinstance(config, dict) else None
    return isinstance(target, str) and pydoc.locate(target) is cls


def _describe(obj, depth: int = 0):
    """A comparable description of a built object: its class and (recursively) its attributes' values."""
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [_describe(o, depth + 1) for o in obj]
    if isinstance(obj, dict):
        return {str(k): _describe(v, depth + 1) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if isinstance(obj, type) or inspect.isroutine(obj):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', name)}"
    if hasattr(obj, "tolist") and hasattr(obj, "shape"):  # numpy arrays and scalars, tensors
        return [name, obj.tolist()]
    if not hasattr(obj, "__dict__"):  # e.g. a dtype: its text, unless that is only an address
        text = str(obj)
        return name if " at 0x" in text else text
    if depth > 6:
        return name
    return {"__class__": name, **{k: _describe(v, depth + 1) for k, v in sorted(vars(obj).items())}}


def _intensity_config(transforms, hparams: dict, configs_dir: Path) -> tuple[object, str | None]:
    """The raw ``intensity_transforms`` of a file of ``configs_dir`` that builds the same transforms as
    ``transforms`` (``inference.json``'s first), and that file (relative to the bundle), or ``(None, None)``."""
    from monai.bundle import ConfigParser

    actual = _describe(list(transforms))
    files = [configs_dir / "inference.json"] + sorted(p for p in configs_dir.rglob("*.json")
                                                       if p.name != "inference.json" and "schema" not in p.parts)
    seen = set()
    for f in files:
        try:
            raw = json.loads(f.read_text()).get("intensity_transforms", None) if f.is_file() else None
        except (OSError, ValueError, AttributeError):
            continue
        key = json.dumps(raw, sort_keys=True)
        if raw is None or key in seen:
            continue
        seen.add(key)
        try:
            built = ConfigParser({"hparams": dict(hparams), "intensity_transforms": raw}).get_parsed_content(
                "intensity_transforms")
        except Exception as e:  # noqa: BLE001 - a candidate that does not build here is just not this one
            logger.debug("intensity_transforms of '%s' do not build on their own: %s", f, e)
            continue
        if _describe(list(built) if isinstance(built, (list, tuple)) else [built]) == actual:
            return raw, f.relative_to(configs_dir.parent).as_posix()
    return None, None


def model_record(hparams: dict, network, intensity_transforms, configs_dir=None) -> dict:
    """The override of ``configs/inference.json`` that rebuilds a trained model: ``models/model_config.json``.

    Written beside ``model.pt`` by :class:`scripts.handlers.SafeCheckpointSaver` (``record``) and read by
    ``python -m scripts.cli.export`` and ``pack_bundle``; also usable as the last file of an inference
    ``--config_file`` list. It holds, as trained:

    - ``+hparams``: the training's values of the ``hparams`` that inference reads (the keys of ``inference.json``'s
      ``hparams``, of a model family's inference override, and those the recorded configs reference);
    - ``network_def`` and ``+imports`` of the model family's inference override (the file of
      ``configs/methods/inference/`` whose ``network_def`` builds the class of ``network``), when the class is not
      ``inference.json``'s;
    - ``intensity_transforms``: the raw config, taken from the bundle's config files, that builds transforms equal
      to ``intensity_transforms`` (``inference.json``'s, or e.g. ``configs/overrides/minmax.json``'s ``[]``);
      left out when no file does (a pipeline of another file: the export then asks for that file);
    - ``trained_with``: what the training used (network class, intensity transform classes, the config files the
      network and intensity configs were taken from), for messages.
    """
    from scripts.networks import unwrap

    configs_dir = Path(configs_dir) if configs_dir is not None else CODE_ROOT / "configs"
    inference = json.loads((configs_dir / "inference.json").read_text())
    cls = type(unwrap(network))
    transforms = list(intensity_transforms) if isinstance(intensity_transforms, (list, tuple)) else \
        [intensity_transforms]
    out: dict = {}
    network_from = None
    family: dict = {}
    if _target_builds(inference.get("network_def"), cls):
        network_from = "configs/inference.json"
    else:
        for f in sorted((configs_dir / "methods" / "inference").glob("*.json")):
            config = json.loads(f.read_text())
            if _target_builds(config.get("network_def"), cls):
                family, network_from = config, f.relative_to(configs_dir.parent).as_posix()
                break
    if family:
        out["+imports"] = list(family.get("+imports", []))
        out["network_def"] = family["network_def"]
    intensity, intensity_from = _intensity_config(transforms, hparams, configs_dir)
    if intensity_from is not None:
        out["intensity_transforms"] = intensity
    keys = list(inference.get("hparams", {})) + list(family.get("+hparams", {}))
    keys += re.findall(r"@hparams#(\w+)", json.dumps([out.get("network_def"), intensity]))
    out["+hparams"] = {k: hparams[k] for k in dict.fromkeys(keys) if k in hparams}
    out["trained_with"] = {
        "network": f"{cls.__module__}.{cls.__qualname__}", "network_from": network_from,
        "intensity_transforms": [type(t).__name__ for t in transforms], "intensity_from": intensity_from}
    if network_from is None:
        logger.warning("no config of %s builds the trained network %s: %s will not rebuild it", configs_dir,
                       out["trained_with"]["network"], RECORD_NAME)
    if intensity_from is None:
        logger.warning("no config file of %s gives the training's intensity_transforms %s: %s leaves them out",
                       configs_dir, out["trained_with"]["intensity_transforms"], RECORD_NAME)
    order = ("+imports", "+hparams", "network_def", "intensity_transforms", "trained_with")
    return {k: out[k] for k in order if k in out}


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
