"""VQ-VAE (van den Oord et al. 2017) for single-channel 256x256 slices.

    image [B, 1, S, S] --Encoder--> z [B, D, G, G] --VectorQuantizer--> z_q [B, D, G, G] --Decoder--> [B, 1, S, S]
with G = S / downsample. Each stride-2 convolution halves the side; the residual blocks are bottlenecked
(C -> R -> C channels) as in the original paper, which keeps the full-resolution work small on a CPU.

With ``label_classes = K > 0`` the model is joint: the encoder reads the image and its tissue label map (class
indices [B, S, S], one-hot as K more input channels), and the decoder gives the image and K label logits. The
codebook and the code grids are the same, so every code grid (a sampled one too) decodes into a slice and its
label map, consistent by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from brainvq.config import VQVAEConfig
from brainvq.metrics.image import ssim
from brainvq.models.quantizer import VectorQuantizer


def nearest_code_grid(quantizer: VectorQuantizer, latents: torch.Tensor) -> torch.Tensor:
    """latents [B, D, G, G] -> index of each position's nearest code [B, G, G] int64, in float32."""
    with torch.autocast(latents.device.type, enabled=False):
        flat = latents.float().permute(0, 2, 3, 1).reshape(-1, quantizer.code_dim)
        return quantizer.nearest_codes(flat).view(latents.shape[0], latents.shape[2], latents.shape[3])


def reconstruction_error(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the decoder's output [B, 1, S, S] against images in [0, 1], counting a pixel as exact
    where the image sits at a bound (0 or 1) and the output lies beyond it: `decode` clamps the output to [0, 1], so
    that pixel is shown exactly. Plain MSE pulled the output of the all-zero background (three quarters of a
    skull-stripped slice) towards 0 from both sides, leaving the half that lands above 0 as a faint haze that
    halved the whole-slice SSIM after a few hundred steps (0.39 in the background against 0.68 in the brain)."""
    reconstruction, images = reconstruction.float(), images.float()
    beyond = ((images <= 0) & (reconstruction < 0)) | ((images >= 1) & (reconstruction > 1))
    return torch.where(beyond, 0.0, reconstruction - images).pow(2).mean()


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
    """[B, 1 + K, S, S] (image in [0, 1], then K one-hot label channels) -> latents [B, D, S/downsample,
    S/downsample]."""

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 1 + config.label_classes
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
    """Quantized latents [B, D, G, G] -> [B, 1 + K, G*downsample, G*downsample]: the image (unbounded; ~[0, 1]),
    then K label logits."""

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(config.code_dim, config.channels, 3, padding=1),
            residual_stack(config.channels, config.residual_channels, config.residual_blocks),
        ]
        widths = _halving_widths(config)[::-1]  # mirror of the encoder: [C, ..., C, C/2]
        for step, (in_width, out_width) in enumerate(zip(widths, [*widths[1:], 1 + config.label_classes],
                                                         strict=True)):
            layers.append(nn.ConvTranspose2d(in_width, out_width, 4, stride=2, padding=1))
            if step < len(widths) - 1:
                layers.append(nn.ReLU())
        self.layers = nn.Sequential(*layers)

    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.layers(quantized)


@dataclass
class VQVAEOutput:
    reconstruction: torch.Tensor  # [B, 1, S, S]
    label_logits: torch.Tensor | None  # [B, K, S, S] for a joint model, else None
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

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> VQVAEOutput:
        """images [B, 1, S, S] in [0, 1] (and, for a joint model, labels [B, S, S] class indices; an image-only
        model ignores them) -> reconstruction, label logits, code indices and the two quantizer losses."""
        quantized = self.quantizer(self.encoder(self._inputs(images, labels)))
        decoded = self.decoder(quantized.quantized)
        return VQVAEOutput(decoded[:, :1], decoded[:, 1:] if self.config.label_classes else None,
                           quantized.indices, quantized.codebook_loss, quantized.commitment_loss)

    def loss(self, images: torch.Tensor, output: VQVAEOutput,
             labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Reconstruction (`reconstruction_error`) + codebook + beta * commitment, + ssim_weight * (1 - SSIM of the
        clamped output, the SSIM that evaluation reports), + label_weight * the label map's cross-entropy for a
        joint model; each term returned for logging."""
        reconstruction = reconstruction_error(output.reconstruction, images)
        total = reconstruction + output.codebook_loss + self.config.beta * output.commitment_loss
        terms = {"reconstruction": reconstruction, "codebook": output.codebook_loss,
                 "commitment": output.commitment_loss}
        if self.config.ssim_weight:
            terms["ssim"] = 1 - ssim(output.reconstruction.clamp(0, 1), images).mean()
            total = total + self.config.ssim_weight * terms["ssim"]
        if output.label_logits is not None:
            terms["labels"] = F.cross_entropy(output.label_logits.float(), self._checked_labels(labels))
            total = total + self.config.label_weight * terms["labels"]
        return {"loss": total} | terms

    @torch.no_grad()
    def encode(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, 1, S, S] (and labels [B, S, S] for a joint model) -> code indices [B, G, G] int64."""
        return nearest_code_grid(self.quantizer, self.encoder(self._inputs(images, labels)))

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """code indices [B, G, G] -> (images [B, 1, S, S] clamped to [0, 1], label maps [B, S, S] int64 (the
        most likely class of each pixel) for a joint model, else None)."""
        return self._images_and_labels(self.decoder(self.quantizer.lookup(indices)))

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor,
                    labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """encode, then decode: (code indices [B, G, G], images [B, 1, S, S], label maps [B, S, S] or None)."""
        indices = self.encode(images, labels)
        return indices, *self.decode(indices)

    def _images_and_labels(self, decoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decoder's output [B, 1 + K, S, S] -> (images clamped to [0, 1], label maps [B, S, S] or None)."""
        decoded = decoded.float()
        labels = decoded[:, 1:].argmax(1) if self.config.label_classes else None
        return decoded[:, :1].clamp(0, 1), labels

    def _inputs(self, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The encoder's input: the images, then (joint model) the label maps one-hot, in the images' dtype."""
        if not self.config.label_classes:
            return images
        one_hot = F.one_hot(self._checked_labels(labels), self.config.label_classes)
        # [B, S, S, K] -> [B, K, S, S] is a view in channels_last order, the images' own memory format.
        return torch.cat([images, one_hot.permute(0, 3, 1, 2).to(images.dtype)], dim=1)

    def _checked_labels(self, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            raise ValueError(f"this VQ-VAE is joint ({self.config.label_classes} label classes): it needs the "
                             "label map of each image")
        return labels.long()
