"""The trained bundle as an MLflow model: ``model.pt`` + the inference config(s) behind ``mlflow.pyfunc``.

:class:`AnomalyModel` scores chest X-rays the way ``configs/inference.json`` does (same network, preprocessing,
inferer and :class:`custom_transforms.anomaly.AnomalyPostd`) and returns, per input, the image ``score`` and
``mask_fraction`` (the fraction of pixels in the predicted anomaly mask). An input is a file path (PNG, DICOM,
NIfTI, ...) or an image array of shape (1, H, W) or (H, W) (any range: it is min-max scaled to [0, 1] and
resized to ``hparams#image_size``, as the loader does with files). Through ``mlflow.pyfunc`` (whose signature
is enforced) the input is a DataFrame with a column ``image``, one image (path, array or nested list) per row;
the Python model itself (``unwrap_python_model()``) also takes a list of items, one path, or a bare array
(1, H, W), (H, W) or (N, 1, H, W).

:func:`log_model` logs it (with a signature and an input example) to an existing run and optionally registers
it in the model registry::

    from scripts.mlflow_model import log_model
    log_model(run_id, ".", ["configs/inference.json"], register_model_name="art-asyn", tracking_uri=uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    model.predict(pd.DataFrame({"image": ["cxr.png"]}))  # columns: score, mask_fraction
"""

from __future__ import annotations

import configparser
import logging
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import torch

try:
    import mlflow.pyfunc

    PythonModel = mlflow.pyfunc.PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency; keep the module importable without it
    PythonModel = object

logger = logging.getLogger(__name__)

__all__ = ["AnomalyModel", "MLflowModelLogger", "log_model", "signature", "requirements"]

ARTIFACT_PATH = "model"
INPUT_COLUMN = "image"
OUTPUT_COLUMNS = ("score", "mask_fraction")
CODE_PACKAGES = ("scripts", "custom_transforms")
CODE_ROOT = Path(__file__).resolve().parents[1]  # the bundle's code: scripts/, custom_transforms/, setup.cfg


def _as_items(model_input) -> list:
    """The images of a model input, one item (path or array) per image."""
    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN not in model_input.columns:
            raise KeyError(f"input DataFrame needs a column '{INPUT_COLUMN}', got {list(model_input.columns)}")
        return list(model_input[INPUT_COLUMN])
    if isinstance(model_input, dict):
        items = model_input.get(INPUT_COLUMN)
        return list(items) if isinstance(items, (list, tuple)) else [items]
    if isinstance(model_input, (str, Path)):
        return [model_input]
    if isinstance(model_input, (np.ndarray, torch.Tensor)):
        arr = np.asarray(model_input)
        if arr.ndim in (2, 3):
            return [arr]
        if arr.ndim == 4:
            return list(arr)
        raise ValueError(f"expected an image array (1, H, W), (H, W) or (N, 1, H, W), got shape {arr.shape}")
    if isinstance(model_input, (list, tuple)):
        return list(model_input)
    raise TypeError(f"unsupported model input {type(model_input).__name__}")


def _image_2d(item) -> np.ndarray:
    arr = np.asarray(item, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or min(arr.shape) < 2:
        raise ValueError(f"expected an image array (1, H, W) or (H, W), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("image array has NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


class AnomalyModel(PythonModel):
    """``mlflow.pyfunc`` model of the bundle: artifacts ``model`` (``model.pt``) and ``config_0``, ``config_1``,
    ... (the inference config files, merged in that order)."""

    def load_context(self, context) -> None:
        artifacts = context.artifacts
        configs = [artifacts[k] for k in sorted((k for k in artifacts if k.startswith("config_")),
                                                key=lambda k: int(k.split("_")[1]))]
        self.load(artifacts["model"], configs)

    def load(self, model_file, config_files, device: str | None = None) -> AnomalyModel:
        from monai.bundle import ConfigParser
        from monai.data import MetaTensor, decollate_batch  # noqa: F401 - imported here to fail early

        parser = ConfigParser()
        parser.read_config([str(c) for c in config_files])
        parser["checkpoint"] = str(model_file)
        if device is not None:
            parser["device"] = f"$torch.device('{device}')"
        self.device = parser.get_parsed_content("device")
        self.network = parser.get_parsed_content("network")
        from scripts.networks import model_state

        self.network.load_state_dict(model_state(torch.load(str(model_file), map_location="cpu", weights_only=True)))
        self.network.eval()
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        self.postprocessing = parser.get_parsed_content("postprocessing")
        self.image_size = parser.get_parsed_content("hparams#image_size")
        return self

    def _prepare(self, item) -> torch.Tensor:
        from monai.data import MetaTensor

        from custom_transforms.io import resize

        if isinstance(item, (str, Path)):
            data = {"image": str(item)}
        else:
            data = {"image": MetaTensor(torch.from_numpy(resize(_image_2d(item), self.image_size))[None],
                                        meta={"filename_or_obj": "array"})}
        out = self.preprocessing(data)
        return torch.as_tensor(out["image"]).float()

    def score(self, items) -> pd.DataFrame:
        """``score`` and ``mask_fraction`` of each item (a path or an image array)."""
        from monai.data import decollate_batch

        rows = []
        with torch.no_grad():
            for item in items:
                x = self._prepare(item)[None].to(self.device)
                pred = self.inferer(x, self.network)
                out = self.postprocessing(decollate_batch({"image": x, "pred": pred})[0])
                rows.append({"score": float(torch.as_tensor(out["score"]).reshape(-1)[0]),
                             "mask_fraction": float(torch.as_tensor(out["pred_mask"]).float().mean())})
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        return self.score(_as_items(model_input))


def signature():
    """Input: a column ``image`` (a file path or an image array); output: ``score``, ``mask_fraction``."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec(AnyType(), INPUT_COLUMN)]),
                          outputs=Schema([ColSpec("double", c) for c in OUTPUT_COLUMNS]))


def requirements(bundle_root=CODE_ROOT) -> list[str]:
    """The pinned ``install_requires`` of the bundle's ``setup.cfg`` (else the installed core packages), so that
    MLflow does not infer them by loading the model in a subprocess."""
    cfg = Path(bundle_root) / "setup.cfg"
    if cfg.is_file():
        parser = configparser.ConfigParser()
        parser.read(cfg)
        reqs = [r.strip() for r in parser.get("options", "install_requires", fallback="").splitlines() if r.strip()]
        if reqs:
            return reqs
    out = []
    for name in ("torch", "monai", "pytorch-ignite", "mlflow", "numpy", "pandas"):
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


@contextmanager
def _tracking(tracking_uri: str | None, registry_uri: str | None = None):
    """``tracking_uri`` (and ``registry_uri``; by default the registry follows the tracking URI) for the ``with``
    block; the process's own settings, unset ones included, are back afterwards."""
    import mlflow
    from mlflow.tracking import _model_registry

    try:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    except ImportError:  # private helper of mlflow 3
        _use_tracking_uri = None
    registry_utils = getattr(_model_registry, "utils", None)
    prev_registry = getattr(registry_utils, "_registry_uri", None)
    prev_tracking = mlflow.get_tracking_uri()
    try:
        if registry_uri:
            mlflow.set_registry_uri(registry_uri)
        if _use_tracking_uri is not None and tracking_uri:
            with _use_tracking_uri(tracking_uri):
                yield
        else:
            if tracking_uri:
                mlflow.set_tracking_uri(tracking_uri)
            yield
    finally:
        if _use_tracking_uri is None and tracking_uri:
            mlflow.set_tracking_uri(prev_tracking)
        if registry_uri:
            if registry_utils is not None and hasattr(registry_utils, "_registry_uri"):
                registry_utils._registry_uri = prev_registry
            else:
                mlflow.set_registry_uri(prev_registry)


def log_model(run_id: str, bundle_root, config_files, register_model_name: str | None = None,
              tracking_uri: str | None = None, registry_uri: str | None = None, input_example=None,
              model_file=None, artifact_path: str = ARTIFACT_PATH):
    """Log the bundle's model (``model_file``, default ``<bundle_root>/models/model.pt``, + ``config_files``) as
    an ``mlflow.pyfunc`` model named ``artifact_path`` to run ``run_id``; register it as ``register_model_name``
    when given. Returns MLflow's ``ModelInfo``.

    The input example is ``input_example`` (a path or an image array) or a mid-grey ramp image of the configured
    size, stored as an array (paths of this machine would not travel with the model). The run keeps its status.
    """
    import mlflow

    bundle_root = Path(bundle_root)
    model_file = Path(model_file) if model_file is not None else bundle_root / "models" / "model.pt"
    if not model_file.is_file():
        raise FileNotFoundError(f"no trained model '{model_file}' to log")
    config_files = [config_files] if isinstance(config_files, (str, Path)) else list(config_files)
    artifacts = {"model": str(model_file), **{f"config_{i}": str(c) for i, c in enumerate(config_files)}}
    code = [str(CODE_ROOT / p) for p in CODE_PACKAGES if (CODE_ROOT / p).is_dir()]
    if input_example is None:
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config([str(c) for c in config_files])
        size = int(parser.get_parsed_content("hparams#image_size"))
        ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
        input_example = (0.5 * (ramp[None, :] + ramp[:, None]))[None]
    example = pd.DataFrame({INPUT_COLUMN: [input_example if isinstance(input_example, str)
                                           else np.asarray(input_example, dtype=np.float32).tolist()]})
    with _tracking(tracking_uri, registry_uri):
        client = mlflow.MlflowClient()
        status = client.get_run(run_id).info.status
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(name=artifact_path, python_model=AnomalyModel(), artifacts=artifacts,
                                           code_paths=code or None, signature=signature(), input_example=example,
                                           pip_requirements=requirements(),
                                           registered_model_name=register_model_name)
        if status == "RUNNING":  # start_run/end_run marked it FINISHED: give it back to its owner as it was
            client.update_run(run_id, status="RUNNING")
        elif status != "FINISHED":
            client.set_terminated(run_id, status)
    logger.info("logged MLflow model '%s' to run %s%s", info.model_uri, run_id,
                f", registered as '{register_model_name}'" if register_model_name else "")
    return info


class MLflowModelLogger:
    """The optional last step of training (``configs/train.json``, ``log_mlflow_model: true``): when the trainer
    completes, log ``model_file`` as an MLflow model to the training's run (``run_state.mlflow_run_id``), and
    register it as ``register_model_name`` when given.

    The model's configs are ``config_files`` (default ``configs/inference.json`` of the bundle's code) followed by
    the record training wrote beside ``model_file`` (``model_config.json``, :func:`scripts.tracking.model_record`:
    the trained network sizes, model family and intensity transforms), so the model is built as trained. Attach
    after the MLflow handler that closes the run.
    """

    def __init__(self, tracking_uri: str, run_state, model_file, config_files=None,
                 register_model_name: str | None = None):
        from scripts.tracking import RECORD_NAME

        self.tracking_uri, self.run_state, self.model_file = tracking_uri, run_state, Path(model_file)
        self.config_files = [CODE_ROOT / "configs" / "inference.json"] if config_files is None else (
            [config_files] if isinstance(config_files, (str, Path)) else list(config_files))
        self.config_files.append(self.model_file.parent / RECORD_NAME)
        self.register_model_name = register_model_name or None
        self.model_info = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine=None):
        run_id = getattr(self.run_state, "mlflow_run_id", None)
        if not run_id:
            logger.warning("no MLflow training run to log the model to")
            return None
        self.model_info = log_model(run_id, self.model_file.parent, self.config_files,
                                    register_model_name=self.register_model_name, tracking_uri=self.tracking_uri,
                                    model_file=self.model_file)
        return self.model_info
