"""ART-ASyn losses: L_local + L_global + L_feat + L_dice (paper Sec. 3.3), with a differentiable Dice.

Shapes: images ``(B, 1, H, W)`` in [0, 1]; masks ``(B, 1, H, W)`` of 0/1; features ``(B, ...)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def local_loss(recon, target, mask, eps: float = 1e-6, mode: str = "paper") -> torch.Tensor:
    """Reconstruction error inside the anomaly mask.

    ``"paper"``: per sample ``sum((I_norm - I_hat)^2 * M) / (sum M + eps)``, averaged over the samples
    whose mask is non-empty (clean samples have nothing to restore locally and contribute 0).
    ``"authors"``: the published code's ``2 * mean((I_norm - I_hat)^2 * M)``.
    """
    err = (target - recon) ** 2 * mask
    if mode == "authors":
        return 2.0 * err.mean()
    if mode != "paper":
        raise ValueError(f"local loss mode must be 'paper' or 'authors', got {mode!r}")
    area = mask.flatten(1).sum(1)
    per = err.flatten(1).sum(1) / (area + eps)
    has = area > 0
    return per[has].mean() if has.any() else recon.sum() * 0.0


def global_loss(recon, target) -> torch.Tensor:
    """``mean((I_norm - I_hat)^2)`` over all pixels."""
    return F.mse_loss(recon, target)


def feature_alignment_loss(f_syn, f_norm, detach_target: bool = True) -> torch.Tensor:
    """``1 - cos(f_enc(I_syn), f_enc(I_norm))`` on flattened features, mean over the batch.

    The clean features are the target (``detach_target``): the encoder learns to map an abnormal image
    to the features of its healthy version, not the reverse.
    """
    if detach_target:
        f_norm = f_norm.detach()
    return (1.0 - F.cosine_similarity(f_syn.flatten(1), f_norm.flatten(1), dim=1, eps=1e-8)).mean()


def soft_anomaly_mask(recon, synthetic, tau: float = 0.2, temperature: float = 0.05, hard: bool = False):
    """``M_hat = sigmoid(((I_syn - I_hat)^2 - tau) / temperature)``; ``hard=True``: ``[err >= tau]`` (no gradient)."""
    err = (synthetic - recon) ** 2
    if hard:
        return (err >= tau).to(recon.dtype)
    return torch.sigmoid((err - tau) / temperature)


def soft_dice_loss(recon, synthetic, mask, tau: float = 0.2, temperature: float = 0.05, hard: bool = False,
                   smooth: float = 1.0) -> torch.Tensor:
    """Dice loss between ``M`` and ``M_hat`` per sample, mean over the batch.

    ``smooth`` in numerator and denominator keeps clean samples (``M = 0``) well defined: their loss is
    ``1 - 1 / (1 + sum M_hat)``, zero when nothing is flagged and growing with false positives.
    """
    m_hat = soft_anomaly_mask(recon, synthetic, tau, temperature, hard).flatten(1)
    m = mask.flatten(1)
    inter = (m_hat * m).sum(1)
    dice = (2.0 * inter + smooth) / (m_hat.sum(1) + m.sum(1) + smooth)
    return (1.0 - dice).mean()


class ARTASynLoss(torch.nn.Module):
    """``L = w_local L_local + w_global L_global + w_feat L_feat + w_dice L_dice``; returns a dict of terms.

    Terms with weight 0 are not computed. ``forward`` returns ``{"loss": total, "local": ..., ...}``.
    """

    def __init__(self, w_local: float = 1.0, w_global: float = 1.0, w_feat: float = 1.0, w_dice: float = 1.0,
                 tau: float = 0.2, temperature: float = 0.05, local_mode: str = "paper", hard_dice: bool = False,
                 detach_target: bool = True):
        super().__init__()
        weights = {"local": w_local, "global": w_global, "feat": w_feat, "dice": w_dice}
        bad = {k: w for k, w in weights.items() if not (isinstance(w, (int, float)) and w >= 0)}
        if bad:
            raise ValueError(f"loss weights must be numbers >= 0, got {bad}")
        if not any(weights.values()):
            raise ValueError("at least one loss weight must be > 0")
        if not 0.0 < tau < 1.0:
            raise ValueError(f"tau must be in (0, 1), got {tau}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if local_mode not in ("paper", "authors"):
            raise ValueError(f"local_mode must be 'paper' or 'authors', got {local_mode!r}")
        self.w_local, self.w_global, self.w_feat, self.w_dice = (float(w) for w in weights.values())
        self.tau, self.temperature, self.local_mode = tau, temperature, local_mode
        self.hard_dice, self.detach_target = hard_dice, detach_target

    def forward(self, recon, target, synthetic, mask, f_syn=None, f_norm=None) -> dict:
        terms = {}
        if self.w_local:
            terms["local"] = local_loss(recon, target, mask, mode=self.local_mode)
        if self.w_global:
            terms["global"] = global_loss(recon, target)
        if self.w_feat:
            if f_syn is None or f_norm is None:
                raise ValueError("w_feat > 0 needs the bottleneck features f_syn and f_norm")
            terms["feat"] = feature_alignment_loss(f_syn, f_norm, self.detach_target)
        if self.w_dice:
            terms["dice"] = soft_dice_loss(recon, synthetic, mask, self.tau, self.temperature, self.hard_dice)
        w = {"local": self.w_local, "global": self.w_global, "feat": self.w_feat, "dice": self.w_dice}
        terms["loss"] = sum(w[k] * v for k, v in terms.items())
        return terms
