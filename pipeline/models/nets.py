"""Small torch models for the deep comparison methods (see :mod:`pipeline.evaluation.baselines`).

Kept deliberately small: they are reference points for the fusion-conv ViT autoencoder, trained in
seconds on CPU. Channels are always a parameter.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PixelAE", "PixelVAE", "ConvAE", "CONV_AE_MULTIPLE", "CONV_AE_HALO"]

# ConvAE halves the grid twice: inputs must be a multiple of 4 on each side.
CONV_AE_MULTIPLE = 4
# Context that reaches an output pixel (receptive field radius, rounded up to a multiple of 4).
CONV_AE_HALO = 24


def _mlp(sizes: list[int], last_act: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_act:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class PixelAE(nn.Module):
    """Per-pixel MLP autoencoder: [N, C] -> [N, C] through a ``latent``-wide bottleneck."""

    def __init__(self, channels: int, hidden: tuple[int, ...] = (32, 16), latent: int = 3):
        super().__init__()
        self.encoder = _mlp([channels, *hidden, latent], last_act=False)
        self.decoder = _mlp([latent, *reversed(hidden), channels], last_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class PixelVAE(nn.Module):
    """Per-pixel variational autoencoder (Gaussian latent, Gaussian decoder with unit variance).

    ``forward(x)`` [N, C] returns ``(recon [N, C], mu [N, L], logvar [N, L])``; in eval mode the
    latent is its mean (deterministic scores).
    """

    def __init__(self, channels: int, hidden: int = 32, latent: int = 3):
        super().__init__()
        self.body = _mlp([channels, hidden, hidden], last_act=True)
        self.mu = nn.Linear(hidden, latent)
        self.logvar = nn.Linear(hidden, latent)
        self.decoder = _mlp([latent, hidden, hidden, channels], last_act=False)

    def forward(self, x: torch.Tensor):
        h = self.body(x)
        mu, logvar = self.mu(h), self.logvar(h).clamp(-10, 10)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.decoder(z), mu, logvar

    @staticmethod
    def kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per sample, [N]."""
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1)


class ConvAE(nn.Module):
    """Fully convolutional autoencoder: [N, C, H, W] -> [N, C, H, W], H and W multiples of 4.

    Two stride-2 stages down to a narrow ``latent``-channel map at 1/4 resolution, then two
    transposed-conv stages up. Being fully convolutional, it reconstructs a whole block at once,
    which equals a stride-1 sliding window over the block (each pixel rebuilt from its
    receptive field, radius <= ``CONV_AE_HALO``).
    """

    def __init__(self, channels: int, width: int = 32, latent: int = 4):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width, latent, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(latent, width, 1),
            nn.GELU(),
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1),
            nn.GELU(),
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))
