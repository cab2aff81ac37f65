"""Run a trained VQ-VAE over a data set: reconstructions, their quality, and the codes they use."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from brainvq.data.dataset import prepare_batch
from brainvq.metrics.image import ImageMetrics
from brainvq.metrics.segmentation import DiceCounter
from brainvq.models.quantizer import CodeUsage
from brainvq.models.vqvae import VQVAE
from brainvq.runtime import autocast


@dataclass
class ReconstructedBatch:
    """One batch on the CPU: originals [B, 1, S, S] and reconstructions [B, 1, S, S] in [0, 1], codes [B, G, G];
    for a joint model also the true label maps and the decoded ones, class indices [B, S, S] (else None)."""

    originals: torch.Tensor
    reconstructions: torch.Tensor
    codes: torch.Tensor
    labels: torch.Tensor | None = None
    reconstructed_labels: torch.Tensor | None = None


@torch.no_grad()
def reconstruct_batches(model: VQVAE, dataset: Dataset, *, device: torch.device, precision: str = "bf16",
                        batch_size: int = 32) -> Iterator[ReconstructedBatch]:
    """Yield the reconstruction of each batch of `dataset` (SliceDataset items), in data set order."""
    model.eval()
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        with autocast(device, precision):
            images, labels = prepare_batch(batch, device, precision)
            codes, reconstructions, reconstructed_labels = model.reconstruct(images, labels)
        yield ReconstructedBatch(batch[0], reconstructions.float().cpu(), codes.cpu(),
                                 None if reconstructed_labels is None else batch[2].long(),
                                 None if reconstructed_labels is None else reconstructed_labels.cpu())


def measure_reconstructions(model: VQVAE, dataset: Dataset, *, device: torch.device, precision: str = "bf16",
                            batch_size: int = 32) -> dict[str, Any]:
    """SSIM (whole image and brain pixels only), PSNR, and codebook usage over the whole `dataset`; for a joint
    model also the Dice of each tissue class of the decoded label maps (metrics/segmentation.py)."""
    image_metrics = ImageMetrics()
    usage = CodeUsage(model.config.codebook_size)
    dice = DiceCounter() if model.config.label_classes else None
    for batch in reconstruct_batches(model, dataset, device=device, precision=precision, batch_size=batch_size):
        image_metrics.update(batch.originals, batch.reconstructions)
        usage.update(batch.codes)
        if dice is not None:
            dice.update(batch.reconstructed_labels, batch.labels)
    return image_metrics.compute() | (dice.compute() if dice else {}) | {
        "codebook_used": usage.used, "codebook_size": model.config.codebook_size, "perplexity": usage.perplexity}
