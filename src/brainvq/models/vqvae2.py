"""Two-level VQ-VAE (VQ-VAE-2, Razavi et al. 2019): a coarse top code grid for a slice's global layout, the
one-level model's 64x64 bottom grid for its detail.

    image --Encoder--> bottom latents [B, D, G, G] --top encoder--> [B, D, T, T] --top quantizer--> top codes
    top codes --top decoder--> layout [B, D, G, G]
    conv1x1([bottom latents, layout]) --quantizer--> bottom codes;   Decoder(bottom z_q + layout) --> image
with T = G / top_downsample (16 on the default 64x64 grid). The bottom level is the one-level model's own Encoder,
quantizer (codebook 32 x 128) and Decoder (models/vqvae.py), so no layer's maths is copied; the top level adds a
strided encoder, its own codebook and a decoder back to the bottom grid. Because the bottom codes are chosen
knowing the layout, they only have to carry what the top codes do not: a bottom prior conditioned on the top
codes (models/pixelcnn.py, `context_*`) models detail, and a small top prior with global reach models layout.

Used by benchmarks/two_level_design.py to compare this design with the one-level model's prior designs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from brainvq.config import VQVAEConfig
from brainvq.models.quantizer import VectorQuantizer
from brainvq.models.vqvae import VQVAE, VQVAEOutput, nearest_code_grid, residual_stack


@dataclass
class TwoLevelOutput(VQVAEOutput):
    """VQVAEOutput (`indices` are the bottom codes; the two losses are summed over both levels) and the top codes
    [B, T, T]."""

    top_indices: torch.Tensor


class TwoLevelVQVAE(VQVAE):
    """Codes are pairs (bottom [B, G, G], top [B, T, T]) of int64 grids."""

    def __init__(self, config: VQVAEConfig | None = None, *, top_downsample: int = 4,
                 top_codebook_size: int = 32) -> None:
        super().__init__(config)
        channels, code_dim = self.config.channels, self.config.code_dim
        steps = int(math.log2(top_downsample))
        if 2**steps != top_downsample or steps < 1 or self.config.grid_size % top_downsample:
            raise ValueError(f"top_downsample = {top_downsample} must be a power of 2 dividing the grid side "
                             f"{self.config.grid_size}")
        self.top_downsample = top_downsample
        down: list[nn.Module] = []
        for step in range(steps):
            down += [nn.Conv2d(code_dim if step == 0 else channels, channels, 4, stride=2, padding=1), nn.ReLU()]
        self.top_encoder = nn.Sequential(*down, residual_stack(channels, self.config.residual_channels,
                                                               self.config.residual_blocks),
                                         nn.Conv2d(channels, code_dim, 1))
        self.top_quantizer = VectorQuantizer(top_codebook_size, code_dim, ema=self.config.ema,
                                             ema_decay=self.config.ema_decay,
                                             restart_after_steps=self.config.restart_after_steps)
        up: list[nn.Module] = [nn.Conv2d(code_dim, channels, 3, padding=1),
                               residual_stack(channels, self.config.residual_channels, self.config.residual_blocks)]
        for step in range(steps):
            last = step == steps - 1
            up.append(nn.ConvTranspose2d(channels, code_dim if last else channels, 4, stride=2, padding=1))
            if not last:
                up.append(nn.ReLU())
        self.top_decoder = nn.Sequential(*up)
        self.bottom_mix = nn.Conv2d(2 * code_dim, code_dim, 1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> TwoLevelOutput:
        """images [B, 1, S, S] in [0, 1] (and labels [B, S, S] for a joint model) -> reconstruction, label
        logits, bottom and top codes and the quantizer losses of both levels."""
        latents = self.encoder(self._inputs(images, labels))
        top = self.top_quantizer(self.top_encoder(latents))
        layout = self.top_decoder(top.quantized)
        bottom = self.quantizer(self.bottom_mix(torch.cat([latents, layout], dim=1)))
        decoded = self.decoder(bottom.quantized + layout)
        return TwoLevelOutput(decoded[:, :1], decoded[:, 1:] if self.config.label_classes else None,
                              bottom.indices, bottom.codebook_loss + top.codebook_loss,
                              bottom.commitment_loss + top.commitment_loss, top.indices)

    @torch.no_grad()
    def encode(self, images: torch.Tensor,
               labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """images [B, 1, S, S] (and labels for a joint model) -> (bottom codes [B, G, G], top codes [B, T, T])."""
        latents = self.encoder(self._inputs(images, labels))
        top = nearest_code_grid(self.top_quantizer, self.top_encoder(latents))
        layout = self.top_decoder(self.top_quantizer.lookup(top))
        bottom = nearest_code_grid(self.quantizer, self.bottom_mix(torch.cat([latents, layout], dim=1)))
        return bottom, top

    @torch.no_grad()
    def decode(self, codes: tuple[torch.Tensor, torch.Tensor]  # type: ignore[override]
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(bottom [B, G, G], top [B, T, T]) -> (images [B, 1, S, S] in [0, 1], label maps [B, S, S] or None)."""
        bottom, top = codes
        layout = self.top_decoder(self.top_quantizer.lookup(top))
        return self._images_and_labels(self.decoder(self.quantizer.lookup(bottom) + layout))

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor,
                    labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """encode, then decode: (bottom codes [B, G, G], images [B, 1, S, S], label maps [B, S, S] or None)."""
        codes = self.encode(images, labels)
        return codes[0], *self.decode(codes)
