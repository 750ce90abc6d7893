"""SAGAN: Spatial-aware Attention GAN for restoration-based anomaly detection (Zhang et al., MICCAI 2024).

The generator restores a healthy-looking image ``x'`` from an input ``x``; the anomaly map is the
difference between them. Pieces, after SAGAN (Zhang et al., MICCAI 2024) Sec. 2:

- :func:`positional_codes`: the positional condition encoding of the anatomical consistency module (Sec. 2.2);
- :class:`SAGANGenerator`: encoder with position codes, residual bottleneck, decoder with attention gates
  (Sec. 2.3, Eq. 8-9) and multi-level feature fusion, producing an additive map ``I(x)`` that is gated and
  added to the input (Sec. 2.1, Eq. 1-2);
- :class:`SAGANDiscriminator`: a PatchGAN/StarGAN-style critic (Sec. 3.1);
- :func:`gradient_penalty`, :func:`critic_loss_terms`, :func:`generator_loss_terms`: the WGAN-GP objectives
  (Sec. 2.1, Eq. 3-7);
- :class:`SAGANTrainStep`: an ``iteration_update`` for MONAI's ``SupervisedTrainer`` doing ``n_critic``
  discriminator updates per generator update.

Intensities: the pipeline works in [0, 1]; the generator maps its input to [-1, 1] internally (the range of
``tanh`` in Eq. 2) and returns its output in [0, 1] again, so it is a drop-in restoration network. The
discriminator sees [0, 1] images (normal images and generator outputs alike).
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from monai.engines.utils import CommonKeys as Keys
from torch import nn

from scripts.engine import _to
from scripts.robust import check_finite_terms

__all__ = [
    "SAGANDiscriminator",
    "SAGANGenerator",
    "SAGANTrainStep",
    "critic_loss_terms",
    "generator_loss_terms",
    "gradient_penalty",
    "n_code_bits",
    "positional_codes",
]


# ----------------------------------------------------------------------------------------------------------
# positional condition encoding (Sec. 2.2)


def n_code_bits(n_windows: int) -> int:
    """Bits of the window code: ``ceil(log2(N * N) + 1)`` (SAGAN (Zhang et al., MICCAI 2024) Sec. 2.2)."""
    if n_windows < 1:
        raise ValueError(f"n_windows must be >= 1, got {n_windows}")
    return math.ceil(math.log2(n_windows * n_windows) + 1)


def _window_codes(n_windows: int, n_bits: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """``(n_bits, height, width)`` binary window codes on ``like``'s device and dtype (TorchScript-friendly)."""
    rows = torch.div(torch.arange(height, device=like.device) * n_windows, height, rounding_mode="floor")
    cols = torch.div(torch.arange(width, device=like.device) * n_windows, width, rounding_mode="floor")
    index = rows[:, None] * n_windows + cols[None, :]  # row-major window index, (H, W)
    powers = torch.pow(2, torch.arange(n_bits - 1, -1, -1, device=like.device))  # most significant bit first
    bits = torch.remainder(torch.div(index[None], powers[:, None, None], rounding_mode="floor"), 2)
    return bits.to(like.dtype)


def positional_codes(n_windows: int, height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Binary positional condition codes, SAGAN (Zhang et al., MICCAI 2024) Sec. 2.2.

    The ``height x width`` plane is split into ``n_windows x n_windows`` non-overlapping windows (pixel row
    ``r`` lies in window row ``floor(r * N / height)``, so sizes need not divide evenly); window ``k``
    (row-major) gets the binary code of ``k`` on ``n_code_bits(N)`` bits, most significant first, broadcast
    as constant channels over the window. Returns ``(n_bits, height, width)``; window 0 is all zeros.
    """
    like = torch.empty(0, device=device, dtype=dtype)
    return _window_codes(n_windows, n_code_bits(n_windows), height, width, like)


class PositionalConcat(nn.Module):
    """Concatenate the window codes of Sec. 2.2 to a feature map: ``(B, C, H, W) -> (B, C + n_bits, H, W)``."""

    def __init__(self, n_windows: int):
        super().__init__()
        self.n_windows = n_windows
        self.n_bits = n_code_bits(n_windows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = _window_codes(self.n_windows, self.n_bits, x.shape[2], x.shape[3], x)
        return torch.cat([x, codes[None].expand(x.shape[0], -1, -1, -1)], dim=1)


# ----------------------------------------------------------------------------------------------------------
# generator (Sec. 2.1-2.3)


def _conv_block(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Conv + InstanceNorm (affine, no running stats: train and eval normalise alike) + ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=(kernel - 1) // 2 if stride == 1 else 1),
        nn.InstanceNorm2d(c_out, affine=True),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """``x + IN(conv(ReLU(IN(conv(x)))))``: the bottleneck blocks of the generator."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            _conv_block(channels, channels, 3),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.InstanceNorm2d(channels, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class AttentionGate(nn.Module):
    """``alpha = sigmoid(C3(ReLU(C1(f) + C2(g))))``, ``g <- alpha * g``: SAGAN (Zhang et al., MICCAI 2024)
    Sec. 2.3, Eq. 8-9, with ``f`` the decoder feature and ``g`` the skip connection (same size), 1x1 convs."""

    def __init__(self, f_channels: int, g_channels: int, inter_channels: int):
        super().__init__()
        self.c1 = nn.Conv2d(f_channels, inter_channels, 1)
        self.c2 = nn.Conv2d(g_channels, inter_channels, 1)
        self.c3 = nn.Conv2d(inter_channels, 1, 1)

    def forward(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        alpha = torch.sigmoid(self.c3(F.relu(self.c1(f) + self.c2(g))))
        return alpha * g


class DecoderLevel(nn.Module):
    """Upsample x2 (nearest + 3x3 conv), gate the skip (Eq. 8-9), concatenate and fuse with a 3x3 conv."""

    def __init__(self, c_in: int, c_skip: int, c_out: int):
        super().__init__()
        self.up = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), _conv_block(c_in, c_out, 3))
        self.gate = AttentionGate(c_out, c_skip, max(1, min(c_out, c_skip) // 2))
        self.fuse = _conv_block(c_out + c_skip, c_out, 3)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        f = self.up(x)
        return self.fuse(torch.cat([f, self.gate(f, skip)], dim=1))


class FusionHead(nn.Module):
    """One branch of the multi-level feature fusion (Sec. 2.3): 1x1 conv to the map's channels, then bilinear
    upsampling to full size (both linear, so this equals upsample-then-conv at a fraction of the cost)."""

    def __init__(self, c_in: int, c_out: int, scale: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1)
        self.up = nn.Upsample(scale_factor=float(scale), mode="bilinear", align_corners=False) if scale > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.up is not None:
            y = self.up(y)
        return y


class SAGANGenerator(nn.Module):
    """Spatial-aware attention generator, SAGAN (Zhang et al., MICCAI 2024) Sec. 2.1-2.3 (Fig. 2).

    Encoder: 7x7 conv (``b`` channels) and three stride-2 4x4 convs (``2b, 4b, 8b``), InstanceNorm + ReLU.
    The window codes of Sec. 2.2 are concatenated to the features at the three depths that feed the stride-2
    convs (full, 1/2 and 1/4 size); these position-encoded features are also the skip connections.
    Bottleneck: ``n_res_blocks`` residual blocks at 1/8 size. Decoder: three levels (``4b, 2b, b``), each
    upsampling x2 and gating its skip with an attention gate (Eq. 8-9); multi-level feature fusion: every
    level's output is mapped by a 1x1 conv to ``in_channels``, upsampled to full size and summed: ``I(x)``.

    ``forward(x)``, ``x`` in [0, 1] of shape ``(B, C, H, W)`` with ``H, W`` divisible by 8: with
    ``x_s = 2x - 1``, ``G = I(x_s) * delta + (1 - delta) * x_s`` (Eq. 1; ``delta ~ Bernoulli(gate_prob)`` per
    pixel in training mode, ``delta = 1`` in eval mode), ``x' = tanh(G + x_s)`` (Eq. 2); returns
    ``(x' + 1) / 2`` in [0, 1], same shape as ``x``. Scriptable and traceable.
    """

    def __init__(
        self, in_channels: int = 1, base_channels: int = 64, n_windows: int = 2, n_res_blocks: int = 6,
        gate_prob: float = 0.95,
    ):
        super().__init__()
        if not 0.0 <= gate_prob <= 1.0:
            raise ValueError(f"gate_prob must lie in [0, 1], got {gate_prob}")
        b, self.gate_prob = base_channels, float(gate_prob)
        self.pos = PositionalConcat(n_windows)
        nb = self.pos.n_bits
        self.stem = _conv_block(in_channels, b, 7)
        self.down1 = _conv_block(b + nb, 2 * b, 4, stride=2)
        self.down2 = _conv_block(2 * b + nb, 4 * b, 4, stride=2)
        self.down3 = _conv_block(4 * b + nb, 8 * b, 4, stride=2)
        self.res = nn.Sequential(*[ResidualBlock(8 * b) for _ in range(n_res_blocks)])
        self.dec3 = DecoderLevel(8 * b, 4 * b + nb, 4 * b)
        self.dec2 = DecoderLevel(4 * b, 2 * b + nb, 2 * b)
        self.dec1 = DecoderLevel(2 * b, b + nb, b)
        self.head3 = FusionHead(4 * b, in_channels, 4)
        self.head2 = FusionHead(2 * b, in_channels, 2)
        self.head1 = FusionHead(b, in_channels, 1)

    def additive_map(self, x_s: torch.Tensor) -> torch.Tensor:
        """``I(x_s)``: the additive map of Sec. 2.1 for an input in [-1, 1]."""
        s0 = self.pos(self.stem(x_s))
        s1 = self.pos(self.down1(s0))
        s2 = self.pos(self.down2(s1))
        y3 = self.dec3(self.res(self.down3(s2)), s2)
        y2 = self.dec2(y3, s1)
        y1 = self.dec1(y2, s0)
        return self.head3(y3) + self.head2(y2) + self.head1(y1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_s = 2.0 * x - 1.0
        g = self.additive_map(x_s)
        if self.training and self.gate_prob < 1.0:  # Eq. 1: per-pixel Bernoulli gate of the map
            delta = torch.bernoulli(torch.full_like(g, self.gate_prob))
            g = g * delta + (1.0 - delta) * x_s
        return (torch.tanh(g + x_s) + 1.0) * 0.5  # Eq. 2, back to [0, 1]


# ----------------------------------------------------------------------------------------------------------
# discriminator and losses (Sec. 2.1, Eq. 3-7; Sec. 3.1)


class SAGANDiscriminator(nn.Module):
    """PatchGAN/StarGAN-style critic (SAGAN (Zhang et al., MICCAI 2024) Sec. 3.1).

    ``n_layers`` 4x4 stride-2 convs with LeakyReLU(0.01), channels ``base, 2 base, ...`` capped at
    ``max_channels``, then a 3x3 conv to one channel. No normalisation (WGAN-GP penalises per-sample
    gradients). ``forward(x) -> (B,)``: the mean of the output patch map, one critic value per image.

    ``init``: ``"kaiming"`` (default) draws the conv weights with He's fan-in normal for LeakyReLU(0.01) and zero
    biases, so the signal keeps its scale through the layers; ``"torch"`` keeps PyTorch's default, which shrinks
    it at every layer: at 64 px the critic's input-gradient norm starts near 3e-4 (He: about 0.16), so the
    gradient penalty sits at ~1 and the critic learns nothing for thousands of updates at the paper's learning
    rate (the paper does not state its initialisation; it trains 100k iterations).
    """

    INITS = ("kaiming", "torch")

    def __init__(self, in_channels: int = 1, base_channels: int = 64, n_layers: int = 6, max_channels: int = 2048,
                 init: str = "kaiming"):
        super().__init__()
        if init not in self.INITS:
            raise ValueError(f"critic init (critic_init) must be one of {self.INITS}, got {init!r}")
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(n_layers):
            c_out = min(base_channels * 2**i, max_channels)
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.01)]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, 1, 3, padding=1))
        self.model = nn.Sequential(*layers)
        if init == "kaiming":
            for m in self.model:
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, a=0.01, nonlinearity="leaky_relu")
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).flatten(1).mean(dim=1)


def gradient_penalty(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """``mean((||grad_xhat D(xhat)||_2 - 1)^2)``, SAGAN (Zhang et al., MICCAI 2024) Sec. 2.1, Eq. 7.

    ``xhat = eps * real + (1 - eps) * fake`` with one ``eps ~ U[0, 1)`` per sample (``fake`` is detached).
    The gradient is taken with ``create_graph=True``, so the penalty backpropagates into the critic.
    """
    if real.shape != fake.shape:
        raise ValueError(f"real and fake must have the same shape, got {tuple(real.shape)} and {tuple(fake.shape)}")
    eps = torch.rand((real.shape[0],) + (1,) * (real.ndim - 1), device=real.device, dtype=real.dtype)
    xhat = (eps * real.detach() + (1.0 - eps) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(xhat).sum(), xhat, create_graph=True)
    norm = torch.sqrt(grad.flatten(1).pow(2).sum(dim=1) + 1e-12)  # eps: finite gradient at a zero norm
    return (norm - 1.0).pow(2).mean()


def critic_loss_terms(
    discriminator: nn.Module, x_n: torch.Tensor, fake_u: torch.Tensor, lambda_gp: float = 10.0
) -> dict[str, torch.Tensor]:
    """WGAN-GP critic loss, Eq. 7: ``d_loss = mean D(x'_u) - mean D(x_n) + lambda_gp * gp``.

    ``fake_u`` (the restored unlabelled images ``x'_u``) is detached. Also returns ``d_wasserstein =
    mean D(x_n) - mean D(x'_u)`` (the critic's Wasserstein estimate) and ``gp``.
    """
    fake_u = fake_u.detach()
    wasserstein = discriminator(x_n).mean() - discriminator(fake_u).mean()
    gp = gradient_penalty(discriminator, x_n, fake_u)
    return {"d_loss": -wasserstein + lambda_gp * gp, "d_wasserstein": wasserstein, "gp": gp}


def generator_loss_terms(
    generator: nn.Module, discriminator: nn.Module, x_n: torch.Tensor, x_p: torch.Tensor, x_u: torch.Tensor,
    lambda_id: float = 1.0, lambda_rec: float = 1.0,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Generator loss, SAGAN (Zhang et al., MICCAI 2024) Sec. 2.1, Eq. 3-6; returns ``(terms, x'_n)``.

    ``g_id = L1(x'_n, x_n)`` (Eq. 3), ``g_rec = MSE(x'_p, x_n)`` (Eq. 4), ``g_adv = -mean D(x'_u)`` (Eq. 5),
    ``loss = g_adv + lambda_id g_id + lambda_rec g_rec`` (Eq. 6). The three batches go through the generator
    in one call (InstanceNorm and the per-pixel gate are per sample, so this equals three calls).
    """
    out = generator(torch.cat([x_n, x_p, x_u]))
    out_n, out_p, out_u = out.split([x_n.shape[0], x_p.shape[0], x_u.shape[0]])
    g_adv = -discriminator(out_u).mean()
    g_id = F.l1_loss(out_n, x_n)
    g_rec = F.mse_loss(out_p, x_n)
    loss = g_adv + lambda_id * g_id + lambda_rec * g_rec
    return {"loss": loss, "g_adv": g_adv, "g_id": g_id, "g_rec": g_rec}, out_n


# ----------------------------------------------------------------------------------------------------------
# training step for MONAI's SupervisedTrainer


class SAGANTrainStep:
    """``iteration_update`` for MONAI's ``SupervisedTrainer``: ``engine.network`` is the generator,
    ``engine.optimizer`` the generator's optimizer; the step owns the discriminator and its optimizer.

    Per iteration (SAGAN (Zhang et al., MICCAI 2024) Sec. 3.1): ``n_critic`` critic updates on Eq. 7 with
    ``x'_u = G(x_u)`` computed once, without gradient (neither changes between critic updates), then one
    generator update on Eq. 6 (the critic's parameters are frozen meanwhile, so no stale gradient accumulates
    in them). Batch keys: normal images ``x_n``, their FPI pseudo-anomalies ``x_p`` and unlabelled images
    ``x_u``, ``(B, C, H, W)`` in [0, 1]. The discriminator must already be on the engine's device (the config
    moves it there).

    Returns MONAI's output dict: image ``x_u``, label ``x_n``, pred ``x'_n`` (detached), loss ``L^G`` and the
    terms as floats under ``"terms"`` (``loss, g_adv, g_id, g_rec`` and, from the last critic update,
    ``d_loss, d_wasserstein, gp``) for a ``StatsHandler``/``MLFlowHandler`` with ``lambda x: x["terms"]``.

    Raises:
        scripts.robust.NonFiniteError: a critic or generator term is NaN or infinite (checked before that
            network's optimiser step, so its weights keep their last finite values).
    """

    def __init__(
        self, discriminator: nn.Module, d_optimizer: torch.optim.Optimizer, n_critic: int = 2,
        lambda_gp: float = 10.0, lambda_id: float = 1.0, lambda_rec: float = 1.0,
        normal_key: str = "image", pseudo_key: str = "synthetic", unlabelled_key: str = "unlabelled",
    ):
        if n_critic < 1:
            raise ValueError(f"n_critic must be >= 1, got {n_critic}")
        self.discriminator, self.d_optimizer, self.n_critic = discriminator, d_optimizer, int(n_critic)
        self.lambda_gp, self.lambda_id, self.lambda_rec = float(lambda_gp), float(lambda_id), float(lambda_rec)
        self.normal_key, self.pseudo_key, self.unlabelled_key = normal_key, pseudo_key, unlabelled_key

    def critic_step(self, x_n: torch.Tensor, fake_u: torch.Tensor, engine=None) -> dict[str, torch.Tensor]:
        """One critic update on Eq. 7 against ``fake_u = G(x_u)`` (computed without gradient); returns the
        detached terms.

        Raises:
            scripts.robust.NonFiniteError: a critic term is NaN or infinite (before the critic's optimiser step);
                the message names the epoch and iteration of ``engine`` and the critic's learning rate.
        """
        self.d_optimizer.zero_grad(set_to_none=True)
        terms = critic_loss_terms(self.discriminator, x_n, fake_u, self.lambda_gp)
        values = {k: v.detach() for k, v in terms.items()}
        where = None if engine is None else types.SimpleNamespace(state=engine.state, optimizer=self.d_optimizer)
        check_finite_terms(values, where, what="critic loss")
        terms["d_loss"].backward()
        self.d_optimizer.step()
        return values

    def generator_step(self, engine, x_n, x_p, x_u) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One generator update on Eq. 6 with the critic frozen; returns ``(detached terms, x'_n)``.

        Raises:
            scripts.robust.NonFiniteError: a generator term is NaN or infinite (before the optimiser step).
        """
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        flags = [p.requires_grad for p in self.discriminator.parameters()]
        self.discriminator.requires_grad_(False)
        try:
            terms, out_n = generator_loss_terms(
                engine.network, self.discriminator, x_n, x_p, x_u, self.lambda_id, self.lambda_rec
            )
            values = {k: v.detach() for k, v in terms.items()}
            check_finite_terms(values, engine)  # a NaN/inf loss stops training before it reaches the weights
            terms["loss"].backward()
        finally:
            for p, flag in zip(self.discriminator.parameters(), flags):
                p.requires_grad_(flag)
        engine.optimizer.step()
        return values, out_n.detach()

    def __call__(self, engine, batchdata: dict) -> dict:
        device, nb = engine.state.device, engine.non_blocking
        x_n = _to(batchdata, self.normal_key, device, nb)
        x_p = _to(batchdata, self.pseudo_key, device, nb)
        x_u = _to(batchdata, self.unlabelled_key, device, nb)
        self.discriminator.train()
        engine.network.train()
        with torch.no_grad():  # the generator and x_u do not change between critic updates
            fake_u = engine.network(x_u)
        d_terms: dict[str, torch.Tensor] = {}
        for _ in range(self.n_critic):
            d_terms = self.critic_step(x_n, fake_u, engine)
        g_terms, out_n = self.generator_step(engine, x_n, x_p, x_u)
        terms = {**g_terms, **d_terms}
        return {
            Keys.IMAGE: x_u, Keys.LABEL: x_n, Keys.PRED: out_n, Keys.LOSS: g_terms["loss"],
            "terms": {k: float(v) for k, v in terms.items()},
        }
