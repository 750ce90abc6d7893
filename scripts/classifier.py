"""AnatPaste's one-class classifier: ResNet18 + projection head, a feature density and Grad-CAM maps.

AnatPaste (Sato et al., iScience 2023) Sec. IV.B trains a ResNet18 with a projection head of three fully
connected layers to tell normal radiographs from AnatPaste-synthetic ones (2-class cross entropy). The
trained backbone is then a feature extractor (Sec. III.A): a Gaussian kernel density estimate of the
L2-normalised features of the training normals gives the anomaly score (Sec. III.C, KDE with bandwidth 1,
as in CutPaste); a single Gaussian (Mahalanobis distance, CutPaste's alternative) is also offered. The
anomaly map is Grad-CAM on the last convolutional layer (Sec. V.C).

- :class:`FeatureDensity`: the density model; its fit lives in buffers, so it travels in ``state_dict``
  (and in TorchScript exports) with the weights.
- :class:`AnatPasteClassifier`: ``forward`` -> logits (training), ``embed`` -> unit features, ``score`` ->
  ``-log density``; ``anomaly_outputs`` -> Grad-CAM map + score (eager only).
- :func:`extract_features` and :class:`DensityFitHandler`: fit the density after training and write it
  into the best checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.networks.nets import ResNet
from monai.networks.utils import eval_mode
from monai.utils import convert_to_tensor
from monai.visualize import GradCAM
from monai.visualize.class_activation_maps import ModelWithHooks

from custom_transforms.utils import Choice
from scripts.engine import validate_classifier_score
from scripts.networks import model_state, unwrap
from scripts.robust import atomic_torch_save

__all__ = ["FEATURE_DIM", "AnatPasteClassifier", "DensityFitHandler", "FeatureDensity", "extract_features",
           "ledoit_wolf_shrinkage"]

logger = logging.getLogger(__name__)

FEATURE_DIM = 512  # ResNet18's pooled feature size
CAM_LAYER = "backbone.layer4"  # last convolutional stage (AnatPaste Sec. V.C)
ANOMALOUS = 1  # class index of AnatPaste-synthetic images
_KIND = Choice("hparams#density", ("kde", "gaussian"), "density model")


def ledoit_wolf_shrinkage(centered: torch.Tensor) -> float:
    """Ledoit-Wolf's optimal shrinkage ``s`` of ``(1 - s) S + s tr(S)/D I`` for centred ``(N, D)`` samples.

    ``S = X^T X / N``; computed through the ``N x N`` Gram matrix, cheap when ``N`` is small.
    """
    n, d = centered.shape
    gram = centered @ centered.T
    s_fro2 = gram.pow(2).sum() / n**2  # ||S||_F^2
    mu = gram.diagonal().sum() / (n * d)  # tr(S) / D
    delta = (s_fro2 - d * mu**2) / d  # ||S - mu I||_F^2 / D
    beta = (gram.diagonal().pow(2).sum() - n * s_fro2) / (n**2 * d)  # sum_k ||x_k x_k^T - S||_F^2 / (N^2 D)
    if float(delta) <= 0:  # S is already a multiple of the identity
        return 0.0
    return float(beta.clamp(0.0, float(delta)) / delta)


class FeatureDensity(torch.nn.Module):
    """Density of L2-normalised features; buffers hold the fit so it travels in the network's state_dict.

    - ``kind="kde"``: Gaussian kernel density estimate over the bank of training features with bandwidth
      ``h`` (AnatPaste (Sato et al., iScience 2023) Sec. III.C, ``h = 1``), buffer ``bank`` ``(N, D)``:
      ``log p(f) = logsumexp_i(-||f - b_i||^2 / (2 h^2)) - log N - D/2 log(2 pi h^2)``.
    - ``kind="gaussian"``: one Gaussian (CutPaste's Mahalanobis score), buffers ``mean`` ``(D,)`` and
      ``precision`` ``(D, D)``; the covariance is shrunk towards ``tr(S)/D I`` by ``shrinkage`` (``None``:
      Ledoit-Wolf's estimate) so that it is invertible with fewer samples than dimensions, and ``log_norm``
      ``(1,)``, its log normaliser ``-(D log(2 pi) - log det precision) / 2``, computed once by :meth:`fit`.

    All four buffers exist for both kinds (empty until fitted), so every checkpoint has the same keys;
    loading resizes them to the incoming shapes (a state without ``log_norm``, saved before it existed, gets it
    computed from its ``precision``).
    """

    __jit_unused_properties__ = ["fitted"]

    def __init__(self, kind: str = "kde", bandwidth: float = 1.0, shrinkage: float | None = 0.01):
        super().__init__()
        self.kind: str = _KIND(kind)
        if not (isinstance(bandwidth, (int, float)) and math.isfinite(bandwidth) and bandwidth > 0):
            raise ValueError(f"KDE bandwidth must be a positive number, got {bandwidth!r}")
        if shrinkage is not None and not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"covariance shrinkage must be in [0, 1] or None (Ledoit-Wolf), got {shrinkage!r}")
        self.bandwidth: float = float(bandwidth)
        self.shrinkage = shrinkage
        self.register_buffer("bank", torch.zeros(0, 0))
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("precision", torch.zeros(0, 0))
        self.register_buffer("log_norm", torch.zeros(0))

    @property
    def fitted(self) -> bool:
        return (self.bank if self.kind == "kde" else self.mean).numel() > 0

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> FeatureDensity:
        """Fit on ``(N, D)`` features (L2-normalised by the caller) of the training normals; returns ``self``.

        Raises:
            ValueError: not 2-D, fewer than 2 samples, non-finite values, or (gaussian) a singular covariance.
        """
        f = torch.as_tensor(features).detach()
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"need at least 2 feature vectors of shape (N, D) to fit a density, got {tuple(f.shape)}")
        if not torch.isfinite(f).all():
            raise ValueError("features contain NaN or infinite values")
        dev, dtype = self.bank.device, self.bank.dtype
        if self.kind == "kde":
            self.bank = f.to(dev, dtype).clone()
            return self
        mean, precision = self._fit_gaussian(f.double())
        self.mean, self.precision = mean.to(dev, dtype), precision.to(dev, dtype)
        self.log_norm = _gaussian_log_norm(precision).to(dev, dtype)
        return self

    def _fit_gaussian(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, d = f.shape
        mean = f.mean(0)
        xc = f - mean
        cov = xc.T @ xc / n
        mu = float(cov.diagonal().mean())
        if mu <= 0:
            raise ValueError("all feature vectors are identical: cannot fit a Gaussian")
        s = ledoit_wolf_shrinkage(xc) if self.shrinkage is None else float(self.shrinkage)
        cov = (1 - s) * cov + s * mu * torch.eye(d, dtype=f.dtype, device=f.device)
        chol, info = torch.linalg.cholesky_ex(cov)
        if int(info) != 0:
            raise ValueError(f"covariance of {n} samples in {d} dimensions is singular with shrinkage {s:g}: "
                             "use a shrinkage > 0 (or None for Ledoit-Wolf)")
        logger.debug("Gaussian density: %d samples, shrinkage %.4g", n, s)
        return mean, torch.cholesky_inverse(chol)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(N,)`` log density of ``(N, D)`` features. Raises RuntimeError if not fitted."""
        if self.kind == "kde":
            return self._kde(features)
        return self._gaussian(features)

    @torch.jit.unused
    def require_fitted(self) -> None:
        """Raise the RuntimeError of an unfitted density now (before expensive work)."""
        if not self.fitted:
            self._check(torch.zeros(0), torch.zeros(0))

    def _check(self, reference: torch.Tensor, features: torch.Tensor) -> None:
        if reference.shape[0] == 0:
            raise RuntimeError("density not fitted: fit it on the training normals (FeatureDensity.fit, "
                               "DensityFitHandler at the end of training) or load a checkpoint that has one")
        d = reference.shape[-1]
        if features.ndim != 2 or features.shape[1] != d:
            raise ValueError("features must have shape (N, " + str(d) + "), got " + str(features.shape))

    def _kde(self, features: torch.Tensor) -> torch.Tensor:
        bank = self.bank
        self._check(bank, features)
        f = features.to(bank.dtype)
        d2 = (f * f).sum(1, keepdim=True) - 2.0 * (f @ bank.T) + (bank * bank).sum(1).unsqueeze(0)
        h2 = self.bandwidth * self.bandwidth
        n, d = bank.shape[0], bank.shape[1]
        log_norm = math.log(n) + 0.5 * d * math.log(2.0 * math.pi * h2)
        return torch.logsumexp(-d2.clamp_min(0.0) / (2.0 * h2), dim=1) - log_norm

    def _gaussian(self, features: torch.Tensor) -> torch.Tensor:
        mean, precision = self.mean, self.precision
        self._check(mean, features)
        delta = features.to(mean.dtype) - mean
        m2 = ((delta @ precision) * delta).sum(1)
        return -0.5 * m2 + self.log_norm.to(mean.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        precision = state_dict.get(prefix + "precision")
        if prefix + "log_norm" not in state_dict and isinstance(precision, torch.Tensor):  # saved before log_norm
            state_dict[prefix + "log_norm"] = (_gaussian_log_norm(precision) if precision.numel() > 0
                                               else torch.zeros(0, dtype=precision.dtype))
        for name, buf in self._buffers.items():  # fitted <-> unfitted: take the incoming shapes
            incoming = state_dict.get(prefix + name)
            if buf is not None and isinstance(incoming, torch.Tensor) and incoming.shape != buf.shape:
                self._buffers[name] = torch.empty(incoming.shape, dtype=buf.dtype, device=buf.device)
        fitted = [kind for kind, key in (("kde", "bank"), ("gaussian", "mean"))
                  if isinstance(state_dict.get(prefix + key), torch.Tensor) and state_dict[prefix + key].numel() > 0]
        if fitted and self.kind not in fitted:
            logger.warning("the loaded state holds a fitted %s density but hparams#density is %r: refit it",
                           fitted[0], self.kind)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, bandwidth={self.bandwidth:g}, shrinkage={self.shrinkage!r}"


def _gaussian_log_norm(precision: torch.Tensor) -> torch.Tensor:
    """``(1,)`` log normaliser of a Gaussian with ``(D, D)`` ``precision``: ``-(D log(2 pi) - log det P) / 2``."""
    logdet = torch.linalg.slogdet(precision.double())[1]
    return (-0.5 * (precision.shape[0] * math.log(2.0 * math.pi) - logdet)).reshape(1).to(precision.dtype)


def projection_head(head_dims: Sequence[int], num_classes: int) -> torch.nn.Sequential:
    """``Linear-BN-ReLU`` from each size of ``head_dims`` to the next, then ``Linear(head_dims[-1], num_classes)``.

    ``head_dims[0]`` is the backbone's feature size: ``(512, 512, 128)`` gives the three fully connected
    layers of AnatPaste (Sato et al., iScience 2023) Sec. IV.B (512-512-128-``num_classes``).
    """
    dims = [int(d) for d in head_dims]
    if not dims or dims[0] != FEATURE_DIM or min(dims) < 1:
        raise ValueError(f"head_dims must start with the backbone feature size {FEATURE_DIM} and be positive, "
                         f"got {tuple(head_dims)!r}")
    layers: list[torch.nn.Module] = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers += [torch.nn.Linear(d_in, d_out), torch.nn.BatchNorm1d(d_out), torch.nn.ReLU(inplace=True)]
    return torch.nn.Sequential(*layers, torch.nn.Linear(dims[-1], num_classes))


def resnet18_backbone(in_channels: int) -> ResNet:
    """MONAI's 2-D ResNet18 laid out like torchvision's (7x7 stride-2 stem, max pool, no downsample bias)
    without its classifier: ``(B, in_channels, H, W) -> (B, 512)`` pooled features."""
    return ResNet("basic", [2, 2, 2, 2], [64, 128, 256, 512], spatial_dims=2, n_input_channels=in_channels,
                  conv1_t_size=7, conv1_t_stride=2, bias_downsample=False, feed_forward=False)


def backbone_state(path) -> dict[str, torch.Tensor]:
    """The backbone weights in ``path``: a backbone ``state_dict``, or a full classifier ``state_dict``
    (``backbone.*`` keys) optionally wrapped as ``{"model": state_dict}``. ``fc.*`` keys (a classifier
    layer the backbone does not have) and a ``module.`` (DDP) prefix are dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained backbone weights not found: '{path}'")
    state = model_state(torch.load(path, map_location="cpu", weights_only=True))
    if not isinstance(state, dict):
        raise ValueError(f"'{path}' does not hold a state_dict (got {type(state).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


class AnatPasteClassifier(torch.nn.Module):
    """ResNet18 + projection head, trained to tell normal from AnatPaste-synthetic images, with the density
    of its features (AnatPaste (Sato et al., iScience 2023) Sec. III.A, III.C, IV.B).

    - ``forward(x)``: ``(B, num_classes)`` logits (class 1 = synthetic/anomalous); TorchScript-able.
    - ``embed(x)``: ``(B, 512)`` L2-normalised backbone features; ``score(x)``: ``(B,)`` negative log
      density of ``embed(x)`` (higher = more anomalous). Both are exported to TorchScript.
    - ``anomaly_outputs(x)``: Grad-CAM map + image score (eager only).

    Args:
        in_channels: image channels.
        num_classes: classifier outputs (2: normal vs synthetic).
        head_dims: sizes of the projection head, starting with the backbone's 512.
        density: ``"kde"`` (published) or ``"gaussian"``; see :class:`FeatureDensity`.
        bandwidth: KDE bandwidth.
        pretrained_path: optional local file with backbone weights (see :func:`backbone_state`), loaded
            strictly; None trains from scratch.
        shrinkage: covariance shrinkage of the Gaussian density (None: Ledoit-Wolf).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, head_dims: Sequence[int] = (512, 512, 128),
                 density: str = "kde", bandwidth: float = 1.0, pretrained_path: str | None = None,
                 shrinkage: float | None = 0.01):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (normal, anomalous), got {num_classes!r}")
        self.backbone = resnet18_backbone(in_channels)
        self.head = projection_head(head_dims, num_classes)
        self.density = FeatureDensity(density, bandwidth, shrinkage)
        if pretrained_path:
            self.load_backbone(pretrained_path)

    @torch.jit.unused
    def load_backbone(self, path) -> None:
        """Load backbone weights from ``path`` strictly. Raises ValueError naming the file on a mismatch."""
        try:
            self.backbone.load_state_dict(backbone_state(path), strict=True)
        except RuntimeError as e:
            raise ValueError(f"backbone weights in '{path}' do not fit the ResNet18 backbone: {e}") from e
        logger.info("loaded backbone weights from '%s'", path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @torch.jit.export
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 512)`` L2-normalised backbone features."""
        return F.normalize(self.backbone(x), dim=1)

    @torch.jit.export
    def score(self, x: torch.Tensor) -> torch.Tensor:
        """``(B,)`` image anomaly score: negative log density of :meth:`embed` (requires a fitted density)."""
        return -self.density(self.embed(x))

    @torch.jit.unused
    def anomaly_outputs(self, x: torch.Tensor, score: str = "density") -> dict[str, torch.Tensor]:
        """Grad-CAM map of the anomalous class and the image score (AnatPaste (Sato et al., iScience 2023) Sec. V.C).

        Returns ``{"amap": (B, 1, H, W) in [0, 1], "score": (B,)}``. The map is Grad-CAM on ``layer4`` for
        logit 1, upsampled to the input size and min-max normalised per image (a constant map gives 0).
        ``score="density"``: ``-log density`` (needs a fitted density); ``"softmax"``: probability of class 1
        (usable during training, before the density exists). Both come from one eval-mode forward pass.

        Works under ``torch.no_grad()``/``inference_mode``; leaves ``.grad``, ``requires_grad`` and the
        train/eval mode of every module as it found them.
        """
        validate_classifier_score(score)
        if score == "density":
            self.density.require_fitted()
        x = convert_to_tensor(x, track_meta=False)
        modes = [(m, m.training) for m in self.modules()]
        params = [(p, p.grad, p.requires_grad) for p in self.parameters()]
        store: dict[str, torch.Tensor] = {}
        with torch.inference_mode(False), torch.enable_grad():
            hooks, handles = self._cam_hooks(store)
            try:
                for p, _, _ in params:  # the gradient is needed for layer4's output only, not for the weights
                    p.requires_grad_(False)
                amap = GradCAM(hooks, CAM_LAYER, postprocessing=minmax_per_image)(
                    x.clone().requires_grad_(True), class_idx=ANOMALOUS)
            finally:
                for h in handles:
                    h.remove()
                for p, grad, flag in params:
                    p.requires_grad_(flag)
                    p.grad = grad
                for m, mode in modes:
                    m.train(mode)
        with torch.no_grad():
            if score == "density":
                s = -self.density(F.normalize(store["features"], dim=1))
            else:
                s = store["logits"].softmax(1)[:, ANOMALOUS]
        return {"amap": amap.detach().float(), "score": s.detach()}

    @torch.jit.unused
    def _cam_hooks(self, store: dict) -> tuple[ModelWithHooks, list]:
        """MONAI's ``ModelWithHooks`` on ``layer4`` with removable hooks (MONAI's own never come off), plus
        hooks that keep the pooled features and the logits of the same pass in ``store``."""
        hooks = ModelWithHooks(self, CAM_LAYER, register_forward=False, register_backward=False)
        hooks.register_forward = hooks.register_backward = True
        layer = hooks.get_layer(CAM_LAYER)
        keep = lambda key: lambda _m, _i, out: store.__setitem__(key, out.detach())
        handles = [layer.register_forward_hook(hooks.forward_hook(CAM_LAYER)),
                   layer.register_full_backward_hook(hooks.backward_hook(CAM_LAYER)),
                   self.backbone.register_forward_hook(keep("features")),
                   self.register_forward_hook(keep("logits"))]
        return hooks, handles


def minmax_per_image(x: torch.Tensor) -> torch.Tensor:
    """Scale each image of ``(B, C, ...)`` to [0, 1] (min -> 0, max -> 1; a constant image -> 0).

    MONAI's default CAM normaliser maps max -> 0 (flipped for display); anomaly maps need max -> 1.
    """
    x = x.detach()
    flat = x.reshape(x.shape[0], -1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return out.reshape(x.shape)


@torch.no_grad()
def extract_features(network: torch.nn.Module, loader, device=None, key: str = "image") -> torch.Tensor:
    """``embed()`` (eval mode) of every ``batch[key]`` of ``loader`` -> ``(N, 512)`` on the CPU.

    ``network`` may be wrapped (DDP); its train/eval mode is restored afterwards.
    """
    net = unwrap(network)
    device = device or next(net.parameters()).device
    with eval_mode(net):
        feats = [net.embed(convert_to_tensor(batch[key], track_meta=False).to(device)).cpu() for batch in loader]
    if not feats:
        raise ValueError("the loader yielded no images to fit the density on")
    return torch.cat(feats)


class DensityFitHandler:
    """ignite handler: at the trainer's ``COMPLETED``, fit ``network.density`` on the best weights and save both.

    AnatPaste (Sato et al., iScience 2023) Sec. III.C: the density is fitted on the features of the training
    normals once the classifier is trained. Loads the best weights from ``checkpoint_path`` if it exists,
    fits the density on :func:`extract_features` of ``loader`` (the clean training normals), logs the number
    of images and the time, and writes the checkpoint back atomically (:func:`scripts.robust.atomic_torch_save`:
    temporary file in the same folder + ``fsync`` + ``os.replace``) so that ``model.pt`` holds weights + density.
    The checkpoint may be a bare ``state_dict`` (what MONAI's ``CheckpointSaver`` writes for a single-entry
    ``save_dict``) or ``{"model": state_dict}``; it is written back in the format it was read, other entries
    kept. Without a checkpoint file the density is fitted on the in-memory weights and the bare ``state_dict`` is
    written. The in-memory network keeps the best weights and the fitted density. Enable it on one rank only
    under DDP (``_disabled_`` in the config).

    With ``run_state`` (``train#run_state``), the rewritten file is reported to it
    (:meth:`scripts.handlers.RunState.model_rewritten`): its checksum becomes the run's ``best_sha256``, in memory
    and in the training checkpoint, so evaluations still find their training run
    (:func:`scripts.tracking.train_run_id`) and a resumed run does not "repair" ``model.pt`` back to weights
    without the density.
    """

    def __init__(self, network: torch.nn.Module, loader, checkpoint_path, device=None, key: str = "image",
                 run_state=None):
        self.network, self.loader, self.path = network, loader, Path(checkpoint_path)
        self.device, self.key, self.run_state = device, key, run_state

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        net = unwrap(self.network)
        if not isinstance(getattr(net, "density", None), FeatureDensity):
            raise TypeError(f"DensityFitHandler needs a network with a FeatureDensity 'density', got {type(net)}")
        checkpoint, wrapped = None, False
        if self.path.is_file():
            checkpoint = torch.load(self.path, map_location="cpu", weights_only=True)
            state = model_state(checkpoint)
            wrapped = state is not checkpoint
            net.load_state_dict(state)
            logger.info("density fit: loaded the best weights from '%s'", self.path)
        else:
            logger.warning("density fit: no checkpoint at '%s', using the final weights", self.path)
        start = time.perf_counter()
        feats = extract_features(net, self.loader, self.device, self.key)
        net.density.fit(feats)
        logger.info("density fit: %s density on %d images in %.1f s", net.density.kind, feats.shape[0],
                    time.perf_counter() - start)
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        if wrapped:
            checkpoint["model"] = state
            state = checkpoint
        atomic_torch_save(state, self.path)
        logger.info("density fit: wrote weights + density to '%s'", self.path)
        if self.run_state is not None:
            self.run_state.model_rewritten(self.path)
