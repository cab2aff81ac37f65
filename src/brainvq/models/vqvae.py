"""VQ-VAE (van den Oord et al. 2017) for single-channel 256x256 slices.

    image [B, 1, S, S] --Encoder--> z [B, D, G, G] --VectorQuantizer--> z_q [B, D, G, G] --Decoder--> [B, 1, S, S]
with G = S / downsample. Each stride-2 convolution halves the side; the residual blocks are bottlenecked
(C -> R -> C channels) as in the original paper, which keeps the full-resolution work small on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from brainvq.config import VQVAEConfig
from brainvq.models.quantizer import VectorQuantizer


class ResidualBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))), channels C -> R -> C."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv1 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(F.relu(self.conv3(F.relu(x))))


def residual_stack(channels: int, hidden: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(*[ResidualBlock(channels, hidden) for _ in range(blocks)], nn.ReLU())


def _halving_widths(config: VQVAEConfig) -> list[int]:
    """Channel widths after each stride-2 step: half width first (full resolution is the costly part)."""
    steps = int(math.log2(config.downsample))
    return [config.channels // 2] + [config.channels] * (steps - 1)


class Encoder(nn.Module):
    """[B, 1, S, S] in [0, 1] -> latents [B, D, S/downsample, S/downsample]."""

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 1
        for width in _halving_widths(config):
            layers += [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.ReLU()]
            in_channels = width
        layers += [nn.Conv2d(in_channels, config.channels, 3, padding=1),
                   residual_stack(config.channels, config.residual_channels, config.residual_blocks),
                   nn.Conv2d(config.channels, config.code_dim, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class Decoder(nn.Module):
    """Quantized latents [B, D, G, G] -> images [B, 1, G*downsample, G*downsample] (unbounded; ~[0, 1])."""

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(config.code_dim, config.channels, 3, padding=1),
            residual_stack(config.channels, config.residual_channels, config.residual_blocks),
        ]
        widths = _halving_widths(config)[::-1]  # mirror of the encoder: [C, ..., C, C/2]
        for in_width, out_width in zip(widths, [*widths[1:], 1], strict=True):
            layers.append(nn.ConvTranspose2d(in_width, out_width, 4, stride=2, padding=1))
            if out_width != 1:
                layers.append(nn.ReLU())
        self.layers = nn.Sequential(*layers)

    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.layers(quantized)


@dataclass
class VQVAEOutput:
    reconstruction: torch.Tensor  # [B, 1, S, S]
    indices: torch.Tensor  # [B, G, G] int64
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor


class VQVAE(nn.Module):
    def __init__(self, config: VQVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or VQVAEConfig()
        self.config.validate()
        self.encoder = Encoder(self.config)
        self.quantizer = VectorQuantizer(self.config.codebook_size, self.config.code_dim, ema=self.config.ema,
                                         ema_decay=self.config.ema_decay,
                                         restart_after_steps=self.config.restart_after_steps)
        self.decoder = Decoder(self.config)

    def forward(self, images: torch.Tensor) -> VQVAEOutput:
        """images [B, 1, S, S] in [0, 1] -> reconstruction, code indices and the two quantizer losses."""
        quantized = self.quantizer(self.encoder(images))
        return VQVAEOutput(self.decoder(quantized.quantized), quantized.indices, quantized.codebook_loss,
                           quantized.commitment_loss)

    def loss(self, images: torch.Tensor, output: VQVAEOutput) -> dict[str, torch.Tensor]:
        """Reconstruction (MSE) + codebook + beta * commitment; each term returned for logging."""
        reconstruction = F.mse_loss(output.reconstruction.float(), images.float())
        total = reconstruction + output.codebook_loss + self.config.beta * output.commitment_loss
        return {"loss": total, "reconstruction": reconstruction, "codebook": output.codebook_loss,
                "commitment": output.commitment_loss}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 1, S, S] -> code indices [B, G, G] int64."""
        z = self.encoder(images)
        with torch.autocast(z.device.type, enabled=False):
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, self.config.code_dim)
            return self.quantizer.nearest_codes(flat).view(z.shape[0], z.shape[2], z.shape[3])

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """code indices [B, G, G] -> images [B, 1, S, S] clamped to [0, 1]."""
        return self.decoder(self.quantizer.lookup(indices)).float().clamp(0, 1)
