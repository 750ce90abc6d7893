"""Engine glue for MONAI's ignite workflows: training steps, batch preparation and the anomaly inferer.

``SupervisedTrainer(iteration_update=ARTASynTrainStep(...))`` trains the U-Net to restore the healthy
image ``I_norm`` from the synthetic one ``I_syn`` with the paper's loss terms; ``ClassifierTrainStep`` trains
a normal-vs-synthetic classifier (AnatPaste's one-class classifier); ``prepare_restoration_batch`` lets MONAI's
``SupervisedEvaluator`` feed ``"synthetic"`` (or ``"image"``) and target ``"image"``; :class:`AnomalyInferer`
is the one inferer of every model family (restoration networks, classifiers with an anomaly map).
"""

from __future__ import annotations

import torch
from monai.engines.utils import CommonKeys as Keys
from monai.inferers import Inferer
from monai.utils import convert_to_tensor

from custom_transforms.utils import Choice
from scripts.networks import forward_with_features, unwrap
from scripts.robust import check_finite_terms


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

    Raises:
        scripts.robust.NonFiniteError: a loss term is NaN or infinite (checked before the optimiser step, so the
            weights keep their last finite values); the message names the epoch, iteration and terms.
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
        values = {k: float(v.detach()) for k, v in terms.items()}
        check_finite_terms(values, engine)  # a NaN/inf loss stops training before it reaches the weights
        terms["loss"].backward()
        engine.optimizer.step()
        return {
            Keys.IMAGE: syn, Keys.LABEL: img, Keys.PRED: recon.detach(), Keys.LOSS: terms["loss"].detach(),
            "terms": values,
        }


def synthetic_labels(mask: torch.Tensor) -> torch.Tensor:
    """Class index per sample: 1 where the synthetic-anomaly mask has any pixel > 0, else 0 (a clean copy)."""
    return (mask.reshape(mask.shape[0], -1) > 0).any(1).long()


class ClassifierTrainStep:
    """One iteration of the normal-vs-synthetic classifier (AnatPaste Sec. 2.3): logits of ``I_syn``, cross
    entropy against :func:`synthetic_labels` of the anomaly mask, one optimiser step.

    ``engine.loss_function`` is a classification loss such as ``torch.nn.CrossEntropyLoss``. Returns the
    output dict MONAI handlers expect, with ``"terms"`` (``loss``, ``accuracy``) as floats for logging.

    Raises:
        scripts.robust.NonFiniteError: the loss is NaN or infinite (before the optimiser step).
    """

    def __init__(self, input_key: str = "synthetic", mask_key: str = "mask"):
        self.input_key, self.mask_key = input_key, mask_key

    def __call__(self, engine, batchdata: dict) -> dict:
        device, nb = engine.state.device, engine.non_blocking
        x = _to(batchdata, self.input_key, device, nb)
        y = synthetic_labels(_to(batchdata, self.mask_key, device, nb))
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        logits = engine.network(x)
        loss = engine.loss_function(logits, y)
        loss_value = float(loss.detach())
        check_finite_terms({"loss": loss_value}, engine)
        loss.backward()
        engine.optimizer.step()
        accuracy = (logits.detach().argmax(1) == y).float().mean()
        return {Keys.IMAGE: x, Keys.LABEL: y, Keys.PRED: logits.detach(), Keys.LOSS: loss.detach(),
                "terms": {"loss": loss_value, "accuracy": float(accuracy)}}


CLASSIFIER_SCORES = ("density", "softmax")
validate_classifier_score = Choice("classifier_score", CLASSIFIER_SCORES, "classifier score")


class AnomalyInferer(Inferer):
    """The anomaly outputs of any model family, for MONAI evaluators (``inferer`` in the configs).

    - a restoration network (U-Net, SAGAN generator): ``network(x)``, the restored image ``I_hat``, from which
      :class:`custom_transforms.anomaly.AnomalyPostd` computes ``|I - I_hat|`` and the score;
    - a network with ``anomaly_outputs(x, score=...)`` (AnatPaste's classifier): its dict ``{"amap", "score"}``,
      which ``AnomalyPostd`` takes as is. ``classifier_score``: ``"density"`` (negative log density of the
      features: evaluation and inference; needs the fitted density) or ``"softmax"`` (probability of the
      synthetic class: validation during training, before the density exists).

    Raises:
        ValueError: ``classifier_score`` not in :data:`CLASSIFIER_SCORES`.
    """

    def __init__(self, classifier_score: str = "density"):
        super().__init__()
        self.classifier_score = validate_classifier_score(classifier_score)

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        inner = unwrap(network)
        if hasattr(inner, "anomaly_outputs"):
            return inner.anomaly_outputs(inputs, score=self.classifier_score)
        return network(inputs, *args, **kwargs)
