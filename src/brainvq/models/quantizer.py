"""Vector quantizer: snaps each latent vector to its nearest codebook entry.

Forward pass (shapes for a batch of B latent grids of side G and code dimension D, codebook of K codes):
    z [B, D, G, G] -> nearest code index per position [B, G, G] -> quantized z_q [B, D, G, G]
The decoder receives `z + (z_q - z).detach()`: the value of z_q with the gradient of z (straight-through).

Two ways to learn the codebook:
- gradients, through the codebook loss ||sg(z) - e||^2 (van den Oord et al. 2017);
- exponential moving averages of the vectors assigned to each code (`ema=True`, the default), which is more
  stable and, together with restarts, keeps the codebook in use.
Dead-code restart: a code that no vector has chosen for `restart_after_steps` training steps is moved onto a
randomly chosen encoder output of the current batch, so it starts competing again. Without EMA and restarts a
32-code book on brain slices collapsed to 2-3 live codes in our measurements.

Under data-parallel training (torchrun) the codebook must stay identical in every process: the per-batch code
counts and vector sums are summed over processes before the EMA update, so it sees the global batch as one
process would, and restarted codes are drawn from the global batch, gathered from all processes in one process's
order, with the same random draw in every process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from brainvq.distributed import global_batch, world_size


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # [B, D, G, G], straight-through: forward value of the codes, gradient of the input
    indices: torch.Tensor  # [B, G, G] int64
    codebook_loss: torch.Tensor  # scalar, ||sg(z) - e||^2 (carries no gradient to an EMA codebook)
    commitment_loss: torch.Tensor  # scalar, ||z - sg(e)||^2


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int = 32, code_dim: int = 128, *, ema: bool = True, ema_decay: float = 0.99,
                 restart_after_steps: int = 20, epsilon: float = 1e-5) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.ema = ema
        self.ema_decay = ema_decay
        self.restart_after_steps = restart_after_steps
        self.epsilon = epsilon
        initial = torch.randn(codebook_size, code_dim) * code_dim**-0.5
        if ema:
            self.register_buffer("codebook", initial)
            self.register_buffer("ema_count", torch.ones(codebook_size))
            self.register_buffer("ema_sum", initial.clone())
        else:
            self.codebook = nn.Parameter(initial)
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.int64))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z: [B, D, G, G] (any float dtype) -> QuantizerOutput; the arithmetic runs in float32."""
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            vectors = z.permute(0, 2, 3, 1).contiguous()  # [B, G, G, D]; contiguous, so that reshapes are views
            flat = vectors.view(-1, self.code_dim)  # [B*G*G, D]
            indices = self.nearest_codes(flat)
            if self.training:
                self._learn(vectors.detach(), indices)
            codes = self.codebook[indices]  # [B*G*G, D]
            quantized = codes.view(z.shape[0], z.shape[2], z.shape[3], self.code_dim).permute(0, 3, 1, 2)
            codebook_loss = F.mse_loss(quantized, z.detach())
            commitment_loss = F.mse_loss(z, quantized.detach())
            straight_through = z + (quantized - z).detach()
        return QuantizerOutput(straight_through, indices.view(z.shape[0], z.shape[2], z.shape[3]),
                               codebook_loss, commitment_loss)

    def nearest_codes(self, flat: torch.Tensor) -> torch.Tensor:
        """flat: [N, D] float32 -> index of the nearest code (squared Euclidean distance), [N] int64."""
        codebook = self.codebook.float()
        distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)
        return distances.argmin(1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [B, G, G] -> code vectors [B, D, G, G]."""
        return self.codebook[indices].permute(0, 3, 1, 2)

    @torch.no_grad()
    def _learn(self, vectors: torch.Tensor, indices: torch.Tensor) -> None:
        """One training step's codebook update. vectors: [B, G, G, D] float32, this process's encoder outputs;
        indices: [B*G*G] their nearest codes."""
        flat = vectors.reshape(-1, self.code_dim)  # [B*G*G, D]
        counts = torch.bincount(indices, minlength=self.codebook_size).to(flat.dtype)
        if world_size() > 1:
            dist.all_reduce(counts)
        if self.ema:
            sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, flat)
            if world_size() > 1:
                dist.all_reduce(sums)
            self.ema_count.lerp_(counts, 1 - self.ema_decay)
            self.ema_sum.lerp_(sums, 1 - self.ema_decay)
            # Laplace smoothing keeps a rarely used code's divisor away from zero.
            total = self.ema_count.sum()
            smoothed = (self.ema_count + self.epsilon) / (total + self.codebook_size * self.epsilon) * total
            self.codebook.copy_(self.ema_sum / smoothed.unsqueeze(1))
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        if self.restart_after_steps > 0:
            self._restart_dead_codes(vectors)

    def _restart_dead_codes(self, vectors: torch.Tensor) -> None:
        """Move each code unused for `restart_after_steps` steps onto an encoder output drawn at random from the
        global batch. vectors: [B, G, G, D], this process's share of that batch."""
        # steps_unused follows the summed counts, so every process finds the same dead codes and gathers together.
        dead = (self.steps_unused >= self.restart_after_steps).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        # Every process holds the global batch in one process's order and draws with the same generator state
        # (seeded alike at each epoch), so each picks the vectors one process would, with no broadcast.
        candidates = global_batch(vectors).reshape(-1, self.code_dim)  # [B_global*G*G, D]
        replacements = candidates[torch.randint(0, candidates.shape[0], (dead.numel(),), device=candidates.device)]
        codebook = self.codebook.data if isinstance(self.codebook, nn.Parameter) else self.codebook
        codebook[dead] = replacements
        if self.ema:
            self.ema_count[dead] = 1.0
            self.ema_sum[dead] = replacements
        self.steps_unused[dead] = 0


class CodeUsage:
    """Histogram of chosen codes accumulated over many batches (a whole epoch or split, not one batch)."""

    def __init__(self, codebook_size: int) -> None:
        self.counts = torch.zeros(codebook_size, dtype=torch.int64)

    def update(self, indices: torch.Tensor) -> None:
        self.counts += torch.bincount(indices.flatten().cpu(), minlength=len(self.counts))

    @property
    def used(self) -> int:
        """Number of codes chosen at least once."""
        return int((self.counts > 0).sum())

    @property
    def perplexity(self) -> float:
        """exp(entropy) of the code distribution: K when all K codes are equally used, 1 when one is."""
        probabilities = self.counts.double() / max(int(self.counts.sum()), 1)
        entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum()
        return float(entropy.exp())
