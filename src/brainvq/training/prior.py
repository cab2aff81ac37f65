"""The PixelCNN prior as a `TrainingTask`: one step is the cross-entropy of a batch of code grids."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from brainvq.codes import CodeGrids
from brainvq.config import PixelCNNConfig
from brainvq.distributed import largest_over_processes, process_share, world_size
from brainvq.models.pixelcnn import NO_POSITION, GatedPixelCNN, Window
from brainvq.runtime import autocast


def code_dataset(*grids: CodeGrids, outlines: bool = False) -> TensorDataset:
    """The grids of one or more CodeGrids, in order. Items: (codes int64 [G, G], slice position int64), and with
    `outlines` (for a prior with an outline model) the slice's outline int64 [G, G] as the context."""
    def joined(name: str) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([getattr(part, name) for part in grids]).astype("int64"))

    return TensorDataset(joined("codes"), joined("slice_indices"), *([joined("outlines")] if outlines else []))


def prior_inputs(batch: Sequence[torch.Tensor],
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A batch (codes, positions) or (codes, positions, context) -> (codes, positions, context or None) on
    `device`."""
    context = batch[2].to(device) if len(batch) > 2 else None
    return batch[0].to(device), batch[1].to(device), context


def window_codes(model: GatedPixelCNN, codes: torch.Tensor,
                 context: torch.Tensor | None) -> tuple[torch.Tensor, Window]:
    """Code grids [B, G, G] -> those of the window `model` runs on for slices with the outlines `context` [B or 1,
    G, G] (`GatedPixelCNN.window_of`: the whole grid unless it is windowed), [B, H, W], and the window."""
    window = model.window_of(context)
    return codes[:, window.rows, window.columns], window


def drop_positions(positions: torch.Tensor, share: float) -> torch.Tensor:
    """This process's slice positions [b] -> the same with each replaced by NO_POSITION with probability `share`.

    The random numbers are drawn for the whole global batch and dealt as its images are, so one process and
    several hide the same images' positions."""
    draws = process_share(torch.rand(len(positions) * world_size())).to(positions.device)
    return torch.where(draws < share, NO_POSITION, positions)


def new_prior(config: PixelCNNConfig, train_set: TensorDataset) -> GatedPixelCNN:
    """A prior to train on `train_set` (items as `code_dataset` makes them): its position logits, if it has any,
    set from those grids' code frequencies, and its outline model, if it has one, fitted to their outlines (with
    the codes of their background)."""
    model = GatedPixelCNN(config)
    codes, positions = train_set.tensors[:2]
    outlines = train_set.tensors[2] if config.outline_modes else None
    if config.position_logits:
        model.init_position_logits(codes, positions, outlines)
    if outlines is not None:
        model.fit_outlines(outlines, positions)
    if config.keeps_background:
        model.fit_background(codes, outlines)
    return model


@torch.no_grad()
def nll_bits_per_code(model: GatedPixelCNN, dataset: TensorDataset, *, precision: str, batch_size: int = 64) -> float:
    """Mean negative log-likelihood of every code of `dataset` under `model`, in bits (of every code in the
    windows it runs on, for a windowed prior)."""
    model.eval()
    device = next(model.parameters()).device
    total_nats, count = 0.0, 0
    for batch in DataLoader(dataset, batch_size=batch_size):
        codes, positions, context = prior_inputs(batch, device)
        codes, window = window_codes(model, codes, context)
        with autocast(device, precision):
            logits = model(codes, positions, context, window)
        total_nats += float(F.cross_entropy(logits.float(), codes, reduction="sum"))
        count += codes.numel()
    return total_nats / count / math.log(2)


class PriorTask:
    selection_metric = "nll_bits_per_code"
    higher_is_better = False

    def __init__(self, model: GatedPixelCNN, validation_set: TensorDataset, *, precision: str) -> None:
        self.model = model
        self.network = model  # the training loop swaps in its DDP wrapper and/or torch.compile
        self.validation_set = validation_set
        self.precision = precision
        self.static_shapes = not model.config.windowed  # a window's shape changes from batch to batch

    def start_epoch(self) -> None:
        pass

    def training_step(self, batch: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch: (codes, positions) or (codes, positions, context)."""
        codes, positions, context = prior_inputs(batch, next(self.model.parameters()).device)
        if self.model.has_no_position_row:  # the unconditional model classifier-free guidance needs
            positions = drop_positions(positions, self.model.config.position_dropout)
        window_context = context
        if self.model.config.windowed:  # the window of the whole global batch: one process and several run alike
            window_context = largest_over_processes(context.amax(dim=0, keepdim=True))  # the outlines' union
        codes, window = window_codes(self.model, codes, window_context)
        nats = F.cross_entropy(self.network(codes, positions, context, window).float(), codes)
        return {"loss": nats, "bits_per_code": nats / math.log(2)}

    def epoch_metrics(self) -> dict[str, float]:
        return {}

    def validate(self) -> dict[str, float]:
        return {"nll_bits_per_code": nll_bits_per_code(self.model, self.validation_set, precision=self.precision)}
