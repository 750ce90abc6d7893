"""Engine glue for MONAI's ignite workflows: the ART-ASyn training step and batch preparation.

``SupervisedTrainer(iteration_update=ARTASynTrainStep(...))`` trains the U-Net to restore the healthy
image ``I_norm`` from the synthetic one ``I_syn`` with the paper's loss terms; ``prepare_restoration_batch``
lets MONAI's ``SupervisedEvaluator`` feed ``"synthetic"`` (or ``"image"``) and target ``"image"``.
"""

from __future__ import annotations

import torch
from monai.engines.utils import CommonKeys as Keys
from monai.utils import convert_to_tensor

from scripts.networks import forward_with_features


def _to(batch: dict, key: str, device, non_blocking: bool) -> torch.Tensor:
    if key not in batch:
        raise KeyError(f"batch has no key '{key}' (keys: {sorted(map(str, batch))}); check the transforms")
    return convert_to_tensor(batch[key], track_meta=False).to(device=device, non_blocking=non_blocking)


def prepare_restoration_batch(input_key: str = "synthetic", target_key: str = "image"):
    """A MONAI ``prepare_batch`` callable returning ``(batch[input_key], batch[target_key])``."""

    def prepare(batchdata, device=None, non_blocking: bool = False, **kwargs):
        return _to(batchdata, input_key, device, non_blocking), _to(batchdata, target_key, device, non_blocking)

    return prepare


class ARTASynTrainStep:
    """One training iteration: ``I_hat, f_syn = G(I_syn)``; ``f_norm = G_enc(I_norm)``; loss; step.

    ``engine.loss_function`` must be :class:`scripts.losses.ARTASynLoss` (returns a dict of terms).
    The clean features ``f_norm`` are computed without gradient (they are the alignment target) and
    only when the feature term is enabled. Returns the output dict MONAI handlers expect, with the
    loss terms as floats under ``"terms"`` for logging.
    """

    def __init__(self, input_key: str = "synthetic", target_key: str = "image", mask_key: str = "mask"):
        self.input_key, self.target_key, self.mask_key = input_key, target_key, mask_key

    def __call__(self, engine, batchdata: dict) -> dict:
        device, nb = engine.state.device, engine.non_blocking
        syn = _to(batchdata, self.input_key, device, nb)
        img = _to(batchdata, self.target_key, device, nb)
        mask = _to(batchdata, self.mask_key, device, nb)
        loss_fn = engine.loss_function
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        recon, f_syn = forward_with_features(engine.network, syn)
        f_norm = None
        if getattr(loss_fn, "w_feat", 0) > 0:
            with torch.no_grad():
                _, f_norm = forward_with_features(engine.network, img)
        terms = loss_fn(recon, img, syn, mask, f_syn, f_norm)
        terms["loss"].backward()
        engine.optimizer.step()
        return {
            Keys.IMAGE: syn, Keys.LABEL: img, Keys.PRED: recon.detach(), Keys.LOSS: terms["loss"].detach(),
            "terms": {k: float(v.detach()) for k, v in terms.items()},
        }
