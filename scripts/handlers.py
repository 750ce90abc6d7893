"""Ignite handlers used by the configs: resumable training (atomic checkpoints, the best model and the MLflow run
carried across resumes, a NaN guard), sample grids and a params snapshot."""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.handlers import CheckpointSaver, MLFlowHandler

from custom_transforms.io import file_sha256, save_png, write_json
from custom_transforms.utils import cli_flag
from scripts.engine import AnomalyInferer, prepare_restoration_batch
from scripts.networks import unwrap
from scripts.robust import (
    AtomicDiskSaver,
    check_finite_terms,
    check_finite_weights,
    load_newest_checkpoint,
    remove_stale_temp_files,
)
from scripts.tracking import RECORD_NAME

logger = logging.getLogger(__name__)


class RunState:
    """What a resumed training run needs besides the weights; saved in the training checkpoint as ``"run"``.

    - ``mlflow_run_id``: the MLflow run of the training (so that a resumed run continues it);
    - ``best_metric``, ``best_epoch``, ``best_sha256``: the validation key metric of the weights in ``model.pt``,
      their epoch and the file's checksum (so that a resumed run only replaces ``model.pt`` with a better epoch).

    One object is shared (``train#run_state`` in ``configs/train.json``) by :class:`ResumableCheckpoint` (saves
    and restores it), :class:`SafeCheckpointSaver` (the best model) and :class:`ResumableMLFlowHandler`.
    """

    def __init__(self):
        self.mlflow_run_id: str | None = None  # the run this process logs to (or, before it starts, the saved one)
        self.active: bool = False  # True once an MLflow handler of this process opened or created the run
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.best_sha256: str | None = None
        self.defer_best: bool = False  # True: best models wait for the training checkpoint (ResumableCheckpoint)
        self.best_savers: list[SafeCheckpointSaver] = []
        self.checkpointers: list[ResumableCheckpoint] = []  # those that save this state (model_rewritten)

    def state_dict(self) -> dict:
        return {"mlflow_run_id": self.mlflow_run_id, "best_metric": self.best_metric, "best_epoch": self.best_epoch,
                "best_sha256": self.best_sha256}

    def load_state_dict(self, state: dict) -> None:
        self.mlflow_run_id = state.get("mlflow_run_id")
        self.best_metric, self.best_epoch = state.get("best_metric"), state.get("best_epoch")
        self.best_sha256 = state.get("best_sha256")
        self.active = False

    def commit_best(self) -> None:
        """Move the best models staged during validation into place (after the training checkpoint)."""
        for saver in self.best_savers:
            saver.commit()

    def model_rewritten(self, path) -> None:
        """The best model ``path`` was rewritten after training (e.g. :class:`scripts.classifier.DensityFitHandler`
        fitted a density into it): its checksum becomes ``best_sha256``, here and, through
        :meth:`ResumableCheckpoint.update_run_record`, in the newest training checkpoint. Evaluations then still
        find their training run, and a resumed run does not "repair" ``model.pt`` back to the saved weights."""
        self.best_sha256 = file_sha256(path)
        for checkpointer in self.checkpointers:
            checkpointer.update_run_record()

    def restored(self, epoch: int) -> None:
        """After a checkpoint of ``epoch`` was loaded: let the best-model savers take up the saved best metric."""
        for saver in self.best_savers:
            saver.restore(epoch)


class ResumableCheckpoint:
    """Save the training state every epoch and resume from it: a run killed midway loses at most an epoch.

    Attached to the trainer, it saves ``save_dict`` (model, optimizer, ...), the trainer's own state (epoch,
    iteration) and ``run_state`` (:class:`RunState`: MLflow run, best metric) as ``<ckpt_dir>/<prefix>_checkpoint_
    epoch=N.pt`` every ``save_interval`` epochs, keeping the newest one. Files are written atomically (temporary
    file + ``os.replace``, :class:`scripts.robust.AtomicDiskSaver`) and the previous checkpoint is deleted only
    once the new one is complete; weights with NaN or infinite values are never written. Best models that
    :class:`SafeCheckpointSaver` staged during this epoch's validation are put in place right after the
    checkpoint, so the checkpoint always knows the metric of the ``model.pt`` on disk (attach the validation
    handler before this one).

    With ``resume`` the newest checkpoint that loads is taken (an empty or truncated file is logged and renamed
    to ``*.unreadable``); without any, training starts from scratch. ``resume=False`` starts from scratch and
    the next save replaces the old checkpoint. ``save=False``: load only (DDP ranks > 0).
    """

    def __init__(self, ckpt_dir, save_dict: dict, resume: bool = True, prefix: str = "train",
                 save_interval: int = 1, save: bool = True, run_state: RunState | None = None):
        resume = cli_flag(resume, "resume")  # command-line overrides arrive as text
        self.ckpt_dir, self.save_dict, self.resume, self.prefix = ckpt_dir, dict(save_dict), resume, prefix
        self.save_interval, self.save = save_interval, save  # save=False: load only (DDP ranks > 0)
        self.run_state = run_state
        self._checkpoint: Checkpoint | None = None

    def _objects(self, engine: Engine) -> dict:
        state = {**self.save_dict, "trainer": engine}
        if self.run_state is not None:
            state["run"] = self.run_state
        return state

    def attach(self, engine: Engine) -> None:
        state = self._objects(engine)
        engine.add_event_handler(Events.STARTED, self._resume_or_start, state)
        if self.save:
            if self.run_state is not None:
                self.run_state.defer_best = True
                self.run_state.checkpointers.append(self)
            self._checkpoint = Checkpoint(to_save=state, save_handler=AtomicDiskSaver(self.ckpt_dir),
                                          filename_prefix=self.prefix, score_function=lambda e: e.state.epoch,
                                          score_name="epoch", n_saved=1)
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self._save)
            if self.run_state is not None:
                engine.add_event_handler(Events.EPOCH_COMPLETED, lambda _: self.run_state.commit_best())
                engine.add_event_handler(Events.COMPLETED, lambda _: self.run_state.commit_best())

    def _resume_or_start(self, engine: Engine, state: dict) -> None:
        if self.save:
            remove_stale_temp_files(self.ckpt_dir)
        if not self.resume:
            return
        path, content = load_newest_checkpoint(self.ckpt_dir, self.prefix, set_aside=self.save)
        if path is None:
            logger.info("no checkpoint in '%s' that loads: training from scratch", self.ckpt_dir)
            return
        prior_max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load={k: v for k, v in state.items() if k in content or k != "run"},
                                checkpoint=content)
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise ValueError(f"checkpoint '{path}' is at epoch {engine.state.epoch}, beyond max_epochs "
                             f"{prior_max_epochs}: raise hparams#max_epochs to train further, or set resume false")
        engine.state.max_epochs = prior_max_epochs
        logger.info("resuming from '%s' (epoch %d, iteration %d)", path, engine.state.epoch, engine.state.iteration)
        if self._checkpoint is not None:  # the file resumed from is this run's previous checkpoint: replaced next
            self._checkpoint.load_state_dict({"_saved": [(engine.state.epoch, path.name)]})
        if self.run_state is not None:
            self.run_state.restored(engine.state.epoch)

    def update_run_record(self) -> Path | None:
        """Write ``run_state.best_sha256`` into the newest training checkpoint (weights and trainer state as saved),
        atomically through this checkpoint's :class:`scripts.robust.AtomicDiskSaver`; return the file (None when
        there is none with a run record, or this process does not save)."""
        if self._checkpoint is None or self.run_state is None:
            return None
        path, content = load_newest_checkpoint(self.ckpt_dir, self.prefix, set_aside=False)
        if path is None or not isinstance(content.get("run"), dict):
            logger.warning("no training checkpoint with a run record in '%s' to update", self.ckpt_dir)
            return None
        content["run"]["best_sha256"] = self.run_state.best_sha256
        self._checkpoint.save_handler(content, path.name)
        logger.info("recorded the new model checksum in '%s'", path.name)
        return path

    def _save(self, engine: Engine) -> None:
        check_finite_weights(self.save_dict, f"the training checkpoint of epoch {engine.state.epoch}")
        self._checkpoint(engine)
        logger.info("saved checkpoint '%s'", self._checkpoint.last_checkpoint)


class SafeCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` (same arguments) that writes atomically, never writes NaN weights, and
    remembers the best key metric across resumed runs.

    - Every file goes through :class:`scripts.robust.AtomicDiskSaver` (temporary file + ``os.replace``): a kill
      leaves the previous ``model.pt`` or the new one, never a partial or missing file.
    - Weights with NaN or infinite values raise :class:`scripts.robust.NonFiniteError`; a NaN key metric is
      logged and not saved.
    - With ``run_state`` (:class:`RunState`), the best key metric and its epoch are recorded there (and so in
      the training checkpoint) and restored from it when training resumes, so a resumed run replaces
      ``model.pt`` only with a better epoch; the evaluator's ``best_metric`` is restored too. When a
      :class:`ResumableCheckpoint` saves the training state, a new best ``model.pt`` is staged and put in
      place right after that checkpoint; if the run was killed in between, the resumed run rewrites
      ``model.pt`` from the checkpoint's weights (those of the best epoch).
    - With ``record`` (:func:`scripts.tracking.model_record`), the record of what the model needs is written
      (atomically, as ``<save_dir>/<record_name>``) just before each best model is put in place.
    """

    def __init__(self, save_dir: str, save_dict: dict, run_state: RunState | None = None, record: dict | None = None,
                 record_name: str = RECORD_NAME, **kwargs):
        super().__init__(save_dir, save_dict, **kwargs)
        self.record, self.record_name = record, record_name
        self.run_state, self._sign = run_state, -1.0 if kwargs.get("key_metric_negative_sign") else 1.0
        self._key_name = kwargs.get("key_metric_name") or "key metric"
        if run_state is not None and kwargs.get("save_key_metric") and not kwargs.get("key_metric_filename"):
            raise ValueError("SafeCheckpointSaver with run_state needs a fixed key_metric_filename (e.g. model.pt)")
        for name in ("_final_checkpoint", "_key_metric_checkpoint", "_interval_checkpoint"):
            ck = getattr(self, name)
            if ck is not None:
                ck.save_handler = AtomicDiskSaver(save_dir, filename=getattr(ck.save_handler, "filename", None))
        if run_state is not None and self._key_metric_checkpoint is not None:
            run_state.best_savers.append(self)

    @property
    def _best_handler(self) -> AtomicDiskSaver:
        return self._key_metric_checkpoint.save_handler

    def _best_filename(self) -> str:
        return self._best_handler.filename or "the key-metric checkpoint"

    def _write_record(self) -> None:
        if self.record is not None:
            write_json(Path(self.save_dir) / self.record_name, self.record)

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if self.run_state is not None and self._key_metric_checkpoint is not None:
            engine.add_event_handler(Events.STARTED, self._restore_engine_best)

    def _restore_saved(self) -> None:
        rs, ck = self.run_state, self._key_metric_checkpoint
        if rs is not None and rs.best_metric is not None and not ck._saved:
            ck.load_state_dict({"_saved": [(self._sign * rs.best_metric, self._best_filename())]})

    def _restore_engine_best(self, engine: Engine) -> None:
        rs = self.run_state
        if rs.best_epoch is not None and getattr(engine.state, "best_metric_epoch", 0) == -1:
            engine.state.best_metric, engine.state.best_metric_epoch = rs.best_metric, rs.best_epoch

    def restore(self, epoch: int) -> None:
        """Take up the best metric of a loaded checkpoint of ``epoch``; put its weights in ``model.pt`` if that
        epoch is the best one and the file does not hold them (killed between checkpoint and ``model.pt``)."""
        self._restore_saved()
        rs = self.run_state
        if rs.best_metric is not None:
            logger.info("best %s so far: %.4g (epoch %s)", self._key_name, rs.best_metric, rs.best_epoch)
        if rs.best_epoch != epoch or rs.best_sha256 is None:
            return
        path = Path(self.save_dir) / self._best_filename()
        if path.is_file() and file_sha256(path) == rs.best_sha256:
            return
        logger.warning("'%s' does not hold the best weights (epoch %d): rewriting it from the checkpoint", path,
                       epoch)
        check_finite_weights(self.save_dict, str(path))
        state = {k: unwrap(v).state_dict() if isinstance(v, torch.nn.Module) else v.state_dict()
                 for k, v in self.save_dict.items()}
        handler = self._best_handler
        self._write_record()
        stage, handler.stage = handler.stage, False
        try:
            handler(state[next(iter(state))] if len(state) == 1 else state, path.name)
        finally:
            handler.stage = stage
        rs.best_sha256 = file_sha256(path)

    def metrics_completed(self, engine: Engine) -> None:
        ck, rs = self._key_metric_checkpoint, self.run_state
        self._restore_saved()
        score = ck.score_function(engine)
        if not isinstance(score, numbers.Real) or not math.isfinite(score):
            logger.warning("key metric is %r at epoch %d: not saving '%s'", score, engine.state.epoch,
                           self._best_filename())
            return
        handler = self._best_handler
        handler.stage = rs is not None and rs.defer_best
        before = [tuple(i) for i in ck._saved]
        if ck._check_lt_n_saved() or ck._compare_fn(score):  # about to save: the weights must be finite
            check_finite_weights(self.save_dict, str(Path(self.save_dir) / self._best_filename()))
            if not handler.stage:
                self._write_record()
        super().metrics_completed(engine)
        if rs is not None and [tuple(i) for i in ck._saved] != before:
            rs.best_metric, rs.best_epoch = self._sign * float(score), int(engine.state.epoch)
            rs.best_sha256 = file_sha256(handler.last_file)
            logger.info("new best key metric %.4g at epoch %d: %s '%s'", rs.best_metric, rs.best_epoch,
                        "staged" if handler.stage else "wrote", self._best_filename())

    def commit(self) -> None:
        """Put the staged best model in place (see :meth:`RunState.commit_best`)."""
        if self._key_metric_checkpoint is not None:
            if self._best_handler.staged:
                self._write_record()
            self._best_handler.commit()


class ResumableMLFlowHandler(MLFlowHandler):
    """MONAI ``MLFlowHandler`` (same arguments) whose runs follow the training run, not the run name.

    MONAI's handler logs into the newest run with the same ``run_name`` that is not FINISHED, whatever its
    parameters (a crashed or killed run included). With ``run_state`` (:class:`RunState`, saved in the
    training checkpoint) this handler instead:

    - continues the MLflow run recorded in the checkpoint when training resumes (status back to RUNNING, tag
      ``resumed_at_epoch``; an ``error`` tag of an earlier failure becomes ``previous_error``), provided its
      logged parameters agree with this run's; parameters that may change on resuming (``volatile_params``: the
      command line, ``max_epochs``) are not logged again, their new values go to tags ``resumed.<name>``. With
      other differences (e.g. a new learning rate) it starts a new run tagged ``resumed_from`` = the old run's id;
    - otherwise starts a new run named ``run_name`` (never takes over another run of that name);
    - the second handler of the same training (the validator's) logs into the trainer's run;
    - marks the run FAILED (KILLED for ``KeyboardInterrupt``) with a tag ``error`` when the engine raises, then
      re-raises. ignite passes an exception only to the first handler of ``EXCEPTION_RAISED`` that re-raises, so
      attach it before ``StatsHandler``.

    Without ``run_state`` it behaves as MONAI's handler.
    """

    def __init__(self, *args, run_state: RunState | None = None,
                 volatile_params: Sequence[str] = ("command", "max_epochs"), **kwargs):
        super().__init__(*args, **kwargs)
        self.run_state, self.volatile_params = run_state, tuple(volatile_params)

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if not engine.has_event_handler(self.exception_raised, Events.EXCEPTION_RAISED):
            engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)

    def start(self, engine: Engine) -> None:
        if self.run_state is None or self.cur_run:
            super().start(engine)
            return
        self._set_experiment()
        if not self.experiment:
            raise ValueError(f"Failed to set experiment '{self.experiment_name}' as the active experiment")
        params = dict(self.experiment_param or {})
        self.cur_run, params = self._open_run(engine, params)
        self.run_state.mlflow_run_id, self.run_state.active = self.cur_run.info.run_id, True
        full, self.experiment_param = self.experiment_param, params
        try:
            super().start(engine)
        finally:
            self.experiment_param = full

    def _open_run(self, engine: Engine, params: dict):
        """The run to log to, and the params still to log to it."""
        from mlflow.exceptions import MlflowException

        rs, client = self.run_state, self.client
        if rs.active and rs.mlflow_run_id:  # the trainer's handler opened it in this process
            return client.get_run(rs.mlflow_run_id), params
        tags = {}
        if rs.mlflow_run_id:
            try:
                old = client.get_run(rs.mlflow_run_id)
            except MlflowException:
                old = None
            if old is None or old.info.experiment_id != self.experiment.experiment_id \
                    or old.info.lifecycle_stage != "active":
                logger.info("MLflow run %s of the checkpoint is not in this store: starting a new run",
                            rs.mlflow_run_id)
            else:
                logged = old.data.params
                changed = {k for k, v in params.items() if k in logged and logged[k] != str(v)}
                conflicts = sorted(changed - set(self.volatile_params))
                if not conflicts:
                    run_id = old.info.run_id
                    client.update_run(run_id, status="RUNNING")
                    client.set_tag(run_id, "resumed_at_epoch", str(engine.state.epoch))
                    if "error" in old.data.tags:  # the error that stopped it before: kept, but not as current
                        client.set_tag(run_id, "previous_error", old.data.tags["error"])
                        client.delete_tag(run_id, "error")
                    for k in sorted(changed):
                        client.set_tag(run_id, f"resumed.{k}", str(params.pop(k))[:5000])
                    logger.info("continuing MLflow run '%s' (%s) from epoch %d", old.info.run_name, run_id,
                                engine.state.epoch)
                    return client.get_run(run_id), params
                logger.warning("not continuing MLflow run %s: its parameters differ (%s); starting a new run",
                               rs.mlflow_run_id, ", ".join(f"{k}: {logged[k]} -> {params[k]}" for k in conflicts))
                tags["resumed_from"] = rs.mlflow_run_id
        run_name = self.run_name or f"run_{time.strftime('%Y%m%d_%H%M%S')}"
        run = client.create_run(experiment_id=self.experiment.experiment_id, run_name=run_name, tags=tags)
        return run, params

    def exception_raised(self, engine: Engine, e: BaseException) -> None:
        """Mark the run FAILED (KILLED on ``KeyboardInterrupt``) with the error as tag ``error``; re-raise ``e``."""
        if self.cur_run:
            run_id = self.cur_run.info.run_id
            status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            try:
                self.client.set_tag(run_id, "error", f"{type(e).__name__}: {e}"[:5000])
                self.client.set_terminated(run_id, status)
                logger.info("MLflow run %s marked %s", run_id, status)
            except Exception:  # noqa: BLE001 - never hide the training error behind a tracking error
                logger.exception("could not mark MLflow run %s as %s", run_id, status)
            finally:
                self.cur_run = None
                self._dispose_sqlite_store()
        raise e


class FiniteLossGuard:
    """ignite handler: stop training with :class:`scripts.robust.NonFiniteError` as soon as an iteration's loss
    terms (``output_transform(engine.state.output)``, default ``output["terms"]`` or ``output["loss"]``) are NaN
    or infinite, before the epoch's checkpoint and validation. Training steps of :mod:`scripts.engine` check
    before their optimiser step already (SAGAN's too); this catches a step of one's own plugged in as
    ``train#iteration``, at the cost of one float check per term and iteration."""

    def __init__(self, output_transform=None):
        self.output_transform = output_transform or _default_terms

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        check_finite_terms(self.output_transform(engine.state.output), engine, before_step=False)


def _default_terms(output) -> dict:
    if isinstance(output, Mapping):
        if isinstance(output.get("terms"), Mapping):
            return output["terms"]
        if "loss" in output:
            return {"loss": output["loss"]}
    return {}


def _panel(x: torch.Tensor) -> np.ndarray:
    return np.clip(x.detach().float().cpu().numpy().reshape(x.shape[-2:]), 0.0, 1.0)


class SampleGridHandler:
    """After each run of the evaluator it is attached to, save a PNG grid of validation samples.

    Columns: synthetic input | anomaly mask | the network's output | anomaly map. The output is the
    reconstruction ``I_hat`` of a restoration network (its map ``|I_syn - I_hat|`` shown with x4 gain) or, for a
    network with its own maps (AnatPaste's classifier), its Grad-CAM map (shown as is in both columns).
    """

    def __init__(self, data_loader, network, output_path, device=None, n: int = 4,
                 input_key: str = "synthetic", target_key: str = "image", mask_key: str = "mask"):
        self.loader, self.network, self.path, self.device, self.n = data_loader, network, Path(output_path), device, n
        self.prepare = prepare_restoration_batch(input_key, target_key)
        self.mask_key = mask_key
        self.inferer = AnomalyInferer("softmax")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def _panels(self, syn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.inferer(syn, self.network)
        if isinstance(out, dict):
            return out["amap"], out["amap"]
        return out, 4 * (syn - out).abs()

    def __call__(self, engine: Engine | None = None) -> None:
        rows, device = [], self.device or next(self.network.parameters()).device
        self.network.eval()
        with torch.no_grad():
            for batch in self.loader:
                syn, _ = self.prepare(batch, device)
                shown, amap = self._panels(syn)
                for i in range(syn.shape[0]):
                    m = batch[self.mask_key][i]
                    if len(rows) < self.n and m.sum() > 0:  # show synthetic samples only
                        rows.append(np.concatenate([_panel(syn[i]), _panel(m), _panel(shown[i]), _panel(amap[i])],
                                                   axis=1))
                if len(rows) >= self.n:
                    break
        if rows:
            save_png(self.path, np.concatenate(rows, axis=0))


class ParamsSnapshot:
    """Write the resolved tunable parameters of a run to ``path`` (JSON) when the engine starts."""

    def __init__(self, path, params: dict):
        self.path, self.params = path, params

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: write_json(self.path, self.params))
