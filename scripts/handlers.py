"""Ignite handlers used by the configs: resuming, sample grids and a params snapshot."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver

from custom_transforms.io import save_png, write_json
from scripts.engine import AnomalyInferer, prepare_restoration_batch

logger = logging.getLogger(__name__)


def latest_checkpoint(ckpt_dir, prefix: str = "train") -> Path | None:
    """The most recently written ``<prefix>*.pt`` in ``ckpt_dir`` (or None)."""
    files = sorted(Path(ckpt_dir).glob(f"{prefix}_checkpoint*.pt"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


class ResumableCheckpoint:
    """Save the training state every epoch and resume from it: a run killed midway loses at most an epoch.

    Attached to the trainer, it saves ``save_dict`` (model, optimizer, ...) plus the trainer's own state
    (epoch, iteration) as ``<ckpt_dir>/<prefix>_epoch=N.pt`` every ``save_interval`` epochs, keeping the
    newest one (ignite writes it atomically). With ``resume`` and a checkpoint present, training starts
    from it; ``resume=False`` starts from scratch and the next save replaces the old checkpoint.
    """

    def __init__(self, ckpt_dir, save_dict: dict, resume: bool = True, prefix: str = "train",
                 save_interval: int = 1, save: bool = True):
        if isinstance(resume, str):  # command-line overrides arrive as text
            if resume.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"resume must be true or false, got {resume!r}")
            resume = resume.lower() in ("true", "1")
        self.ckpt_dir, self.save_dict, self.resume, self.prefix = ckpt_dir, dict(save_dict), resume, prefix
        self.save_interval, self.save = save_interval, save  # save=False: load only (DDP ranks > 0)

    def attach(self, engine: Engine) -> None:
        state = {**self.save_dict, "trainer": engine}
        path = latest_checkpoint(self.ckpt_dir, self.prefix) if self.resume else None
        if path is not None:
            logger.info("resuming from '%s'", path)
            CheckpointLoader(load_path=str(path), load_dict=state, map_location="cpu").attach(engine)
        elif self.resume:
            logger.info("no checkpoint in '%s': training from scratch", self.ckpt_dir)
        if self.save:
            CheckpointSaver(save_dir=str(self.ckpt_dir), save_dict=state, file_prefix=self.prefix,
                            save_interval=self.save_interval, n_saved=1, epoch_level=True).attach(engine)
            if path is not None:  # n_saved=1 only tracks this run's files: drop the one resumed from once superseded
                def drop_resumed(_engine) -> None:
                    if path.exists() and latest_checkpoint(self.ckpt_dir, self.prefix) != path:
                        path.unlink()
                        engine.remove_event_handler(drop_resumed, Events.EPOCH_COMPLETED)

                engine.add_event_handler(Events.EPOCH_COMPLETED, drop_resumed)


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
