"""ART-ASyn losses: L_local + L_global + L_feat + L_dice (paper Sec. 3.3), with a differentiable Dice.

Shapes: images ``(B, C, H, W)`` (``C = 1``) in [0, 1]; masks of the same shape in [0, 1]; features ``(B, ...)``.
Binary masks (ART-ASyn, CutPaste) are the paper's case; soft labels of other synthesis methods (NSA's logistic
label, FPI's and AnatPaste's blend factor) enter as they are: as per-pixel weights in L_local and as soft targets
in the Dice term. Validation binarises them at ``mask_target_threshold`` (``AnomalyPostd``).
Every term is computed per sample and then averaged over the batch (see each function for the samples
that take part), so a term never mixes pixels of different images before its reduction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from custom_transforms.utils import is_number

__all__ = ["local_loss", "global_loss", "feature_alignment_loss", "soft_anomaly_mask", "soft_dice_loss",
           "ARTASynLoss"]


def local_loss(recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6,
               mode: str = "paper") -> torch.Tensor:
    """Reconstruction error inside the anomaly mask.

    ``"paper"`` (Eq. 4): per sample ``sum((I_norm - I_hat)^2 * M) / (sum M + eps)``, averaged over the
    samples whose mask is non-empty. Clean samples (``M = 0``) have nothing to restore locally: they take
    no part in the mean (a batch with no anomaly at all gives 0, still attached to the graph).
    ``"authors"``: the published code's ``2 * mean((I_norm - I_hat)^2 * M)`` over all pixels of the batch.
    """
    err = (target - recon) ** 2 * mask
    if mode == "authors":
        return 2.0 * err.mean()
    if mode != "paper":
        raise ValueError(f"local loss mode must be 'paper' or 'authors', got {mode!r}")
    area = mask.flatten(1).sum(1)
    per = err.flatten(1).sum(1) / (area + eps)
    has = area > 0
    return per[has].mean() if bool(has.any()) else recon.sum() * 0.0


def global_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean((I_norm - I_hat)^2)`` over all pixels (Eq. 3); equal sample sizes make it a mean of per-sample MSEs."""
    return F.mse_loss(recon, target)


def feature_alignment_loss(f_syn: torch.Tensor, f_norm: torch.Tensor, detach_target: bool = True) -> torch.Tensor:
    """``1 - cos(f_enc(I_syn), f_enc(I_norm))`` on flattened (L2-normalised) features, mean over the batch (Eq. 2).

    ``detach_target=True`` (default): the clean features are a fixed target, so the encoder learns to map an
    abnormal image onto its healthy version's features and not the reverse; letting the gradient into
    ``f_norm`` as well lets both collapse towards each other (a trivial, anomaly-blind encoder lowers the
    loss from both ends). ``scripts.engine`` computes ``f_norm`` under ``torch.no_grad`` for the same reason.
    """
    if f_syn.shape != f_norm.shape:
        raise ValueError(f"feature shapes differ: {tuple(f_syn.shape)} vs {tuple(f_norm.shape)}")
    if detach_target:
        f_norm = f_norm.detach()
    a = F.normalize(f_syn.flatten(1), dim=1, eps=1e-8)
    b = F.normalize(f_norm.flatten(1), dim=1, eps=1e-8)
    return (1.0 - (a * b).sum(1)).mean()


def soft_anomaly_mask(recon: torch.Tensor, synthetic: torch.Tensor, tau: float = 0.2, temperature: float = 0.05,
                      hard: bool = False, zero_floor: bool = False) -> torch.Tensor:
    """Predicted anomaly mask from the squared error ``e = (I_syn - I_hat)^2``.

    - soft (default): ``M_hat = sigmoid((e - tau) / temperature)``;
    - ``zero_floor=True``: the same rescaled so that ``e = 0`` maps to exactly 0,
      ``(M_hat - s0) / (1 - s0)`` with ``s0 = sigmoid(-tau / temperature)``. The plain sigmoid leaves every
      pixel at least ``s0`` (0.018 for tau 0.2, temperature 0.05: about 1,200 "flagged" pixels on a perfect
      256 x 256 reconstruction), a floor the Dice can never get under;
    - ``hard=True``: the published code's ``[e >= tau]``, which passes no gradient (for comparison only).
    """
    err = (synthetic - recon) ** 2
    if hard:
        return (err >= tau).to(recon.dtype).detach()
    m_hat = torch.sigmoid((err - tau) / temperature)
    if zero_floor:
        s0 = 1.0 / (1.0 + math.exp(tau / temperature))
        m_hat = ((m_hat - s0) / (1.0 - s0)).clamp(min=0.0)
    return m_hat


def soft_dice_loss(recon: torch.Tensor, synthetic: torch.Tensor, mask: torch.Tensor, tau: float = 0.2,
                   temperature: float = 0.05, hard: bool = False, smooth: float = 1.0,
                   zero_floor: bool = False) -> torch.Tensor:
    """Dice loss between ``M`` and ``M_hat`` (:func:`soft_anomaly_mask`) per sample, mean over the batch (Eq. 6).

    Per sample ``1 - (2 sum(M_hat M) + smooth) / (sum M_hat + sum M + smooth)`` with ``smooth`` in pixel units
    in numerator and denominator. That keeps clean samples (``M = 0``) well defined: their loss is
    ``1 - smooth / (smooth + sum M_hat)``, 0 when nothing is flagged and growing with false positives, so
    the clean copies in a batch still teach the network not to flag healthy tissue. ``hard=True`` gives the
    same value with the hard mask and no gradient.
    """
    if smooth <= 0:
        raise ValueError(f"smooth must be > 0 (it defines the loss on clean samples), got {smooth}")
    m_hat = soft_anomaly_mask(recon, synthetic, tau, temperature, hard, zero_floor).flatten(1)
    m = mask.flatten(1).to(m_hat.dtype)
    inter = (m_hat * m).sum(1)
    dice = (2.0 * inter + smooth) / (m_hat.sum(1) + m.sum(1) + smooth)
    return (1.0 - dice).mean()


def _number(x) -> bool:
    return is_number(x) and math.isfinite(x)


class ARTASynLoss(torch.nn.Module):
    """``L = w_local L_local + w_global L_global + w_feat L_feat + w_dice L_dice`` (Eq. 7); returns a dict.

    Args:
        w_local, w_global, w_feat, w_dice: term weights (>= 0, at least one > 0); a term with weight 0 is
            not computed and is absent from the returned dict.
        tau: threshold on the squared error ``(I_syn - I_hat)^2`` for ``M_hat``, in (0, 1).
        temperature: sigmoid temperature of the soft mask, > 0.
        local_mode: ``"paper"`` or ``"authors"`` (see :func:`local_loss`).
        hard_dice: the published hard threshold (no gradient: the Dice term then trains nothing).
        detach_target: stop the gradient into ``f_norm`` (see :func:`feature_alignment_loss`).
        dice_smooth, dice_zero_floor: see :func:`soft_dice_loss` / :func:`soft_anomaly_mask`.

    ``forward(recon, target, synthetic, mask, f_syn, f_norm)`` returns ``{"loss": total, "local": ...,
    "global": ..., "feat": ..., "dice": ...}`` (only the enabled terms, unweighted).
    """

    TERMS = ("local", "global", "feat", "dice")

    def __init__(self, w_local: float = 1.0, w_global: float = 1.0, w_feat: float = 1.0, w_dice: float = 1.0,
                 tau: float = 0.2, temperature: float = 0.05, local_mode: str = "paper", hard_dice: bool = False,
                 detach_target: bool = True, dice_smooth: float = 1.0, dice_zero_floor: bool = False):
        super().__init__()
        weights = {"local": w_local, "global": w_global, "feat": w_feat, "dice": w_dice}
        bad = {k: w for k, w in weights.items() if not (_number(w) and w >= 0)}
        if bad:
            raise ValueError(f"loss weights must be finite numbers >= 0, got {bad}")
        if not any(weights.values()):
            raise ValueError("at least one loss weight must be > 0")
        if not (_number(tau) and 0.0 < tau < 1.0):
            raise ValueError(f"tau must be in (0, 1), got {tau}")
        if not (_number(temperature) and temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if local_mode not in ("paper", "authors"):
            raise ValueError(f"local_mode must be 'paper' or 'authors', got {local_mode!r}")
        if not (_number(dice_smooth) and dice_smooth > 0):
            raise ValueError(f"dice_smooth must be > 0, got {dice_smooth}")
        self.w_local, self.w_global, self.w_feat, self.w_dice = (float(w) for w in weights.values())
        self.tau, self.temperature, self.local_mode = float(tau), float(temperature), local_mode
        self.hard_dice, self.detach_target = bool(hard_dice), bool(detach_target)
        self.dice_smooth, self.dice_zero_floor = float(dice_smooth), bool(dice_zero_floor)

    @property
    def weights(self) -> dict[str, float]:
        return {"local": self.w_local, "global": self.w_global, "feat": self.w_feat, "dice": self.w_dice}

    def forward(self, recon: torch.Tensor, target: torch.Tensor, synthetic: torch.Tensor, mask: torch.Tensor,
                f_syn: torch.Tensor | None = None, f_norm: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if not (recon.shape == target.shape == synthetic.shape):
            raise ValueError(f"recon {tuple(recon.shape)}, target {tuple(target.shape)} and synthetic "
                             f"{tuple(synthetic.shape)} must have the same shape")
        if (self.w_local or self.w_dice) and mask.shape != recon.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from the image shape {tuple(recon.shape)}")
        terms: dict[str, torch.Tensor] = {}
        if self.w_local:
            terms["local"] = local_loss(recon, target, mask, mode=self.local_mode)
        if self.w_global:
            terms["global"] = global_loss(recon, target)
        if self.w_feat:
            if f_syn is None or f_norm is None:
                raise ValueError("w_feat > 0 needs the bottleneck features f_syn and f_norm")
            terms["feat"] = feature_alignment_loss(f_syn, f_norm, self.detach_target)
        if self.w_dice:
            terms["dice"] = soft_dice_loss(recon, synthetic, mask, self.tau, self.temperature, self.hard_dice,
                                           self.dice_smooth, self.dice_zero_floor)
        w = self.weights
        total = sum(w[k] * v for k, v in terms.items())
        terms["loss"] = total
        return terms
