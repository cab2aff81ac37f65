"""The VQ-VAE as a `TrainingTask`: one step is reconstruction + codebook + commitment loss on a batch (+ the label
map's cross-entropy for a joint model)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from brainvq.data.dataset import prepare_batch
from brainvq.models.quantizer import CodeUsage
from brainvq.models.vqvae import VQVAE
from brainvq.reconstruction import measure_reconstructions


class VQVAETask:
    selection_metric = "ssim"
    higher_is_better = True
    static_shapes = True

    def __init__(self, model: VQVAE, validation_set: Dataset, *, precision: str, val_images: int = 256) -> None:
        self.model = model
        self.network = model  # the training loop swaps in its DDP wrapper and/or torch.compile
        self.precision = precision
        # An evenly spaced subset covers every case and slice position at a fixed, small cost per epoch.
        count = min(val_images, len(validation_set))
        self.validation_set = Subset(validation_set, np.linspace(0, len(validation_set) - 1, count).astype(int))
        self.usage = CodeUsage(model.config.codebook_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def start_epoch(self) -> None:
        self.usage = CodeUsage(self.model.config.codebook_size)

    def training_step(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        images, labels = prepare_batch(batch, self.device, self.precision)
        output = self.network(images, labels)
        self.usage.update(output.indices)
        return self.model.loss(images, output, labels)

    def epoch_metrics(self) -> dict[str, float]:
        return {"codebook_used": self.usage.used, "perplexity": self.usage.perplexity}

    def validate(self) -> dict[str, float]:
        return measure_reconstructions(self.model, self.validation_set, device=self.device,
                                       precision=self.precision)
