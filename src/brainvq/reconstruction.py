"""Run a trained VQ-VAE over a data set: reconstructions, their quality, and the codes they use."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from brainvq.metrics.image import ImageMetrics
from brainvq.models.quantizer import CodeUsage
from brainvq.models.vqvae import VQVAE
from brainvq.runtime import autocast, prepare_images


@torch.no_grad()
def reconstruct_batches(model: VQVAE, dataset: Dataset, *, device: torch.device, precision: str = "bf16",
                        batch_size: int = 32) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (originals [B, 1, S, S], reconstructions [B, 1, S, S] in [0, 1], codes [B, G, G]) on the CPU, in
    data set order."""
    model.eval()
    for images, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        with autocast(device, precision):
            codes = model.encode(prepare_images(images, device, precision))
            reconstructions = model.decode(codes)
        yield images, reconstructions.float().cpu(), codes.cpu()


def measure_reconstructions(model: VQVAE, dataset: Dataset, *, device: torch.device, precision: str = "bf16",
                            batch_size: int = 32) -> dict[str, Any]:
    """SSIM (whole image and brain pixels only), PSNR, and codebook usage over the whole `dataset`."""
    image_metrics = ImageMetrics()
    usage = CodeUsage(model.config.codebook_size)
    for originals, reconstructions, codes in reconstruct_batches(model, dataset, device=device,
                                                                   precision=precision, batch_size=batch_size):
        image_metrics.update(originals, reconstructions)
        usage.update(codes)
    return image_metrics.compute() | {"codebook_used": usage.used, "codebook_size": model.config.codebook_size,
                                      "perplexity": usage.perplexity}
