"""Causal attention from every code to a coarse summary of the rows above it (PixelSNAIL-style, Chen et al. 2018).

A gated PixelCNN sees only `reach * (layers + 1)` rows above each code (22 of the default's 64), so the lower
half of a slice would be generated without seeing the upper half. This block gives every position the whole
slice above it:

- the grid is cut into blocks of `block` x `block` positions (4x4 on the default 64x64 grid, so a 16x16 grid of
  blocks), and each block becomes one token: the mean over the block of the layer's features and of the embedded
  codes, plus a learnt embedding of where the block is;
- a position in row r attends, with multi-head attention, to the tokens of every block row that ends at or
  above row r - 1, and to a learnt "nothing yet" token. A token only holds codes of rows complete before r, so
  the block is causal. The few rows between the last complete block row and r are within the PixelCNN's own
  reach.

Why tokens and not every position: on the 2-core development CPU, causal attention over all 4,096 positions of
a batch of 16 grids took 5-19 s a layer (forward and backward) against 1.2 s for the whole PixelCNN step; over
257 tokens it takes 0.2-0.3 s (benchmarks/RESULTS.md, "Prior designs").

Shapes: features [B, C, G, G]; tokens [B, heads, T, C / heads] with T = (G / block)^2 (+1 for "nothing yet").
A windowed prior runs the block on a window of the grid [B, C, H, W] whose corner lies on a block: its tokens
are the window's blocks, each with the learnt embedding of its place in the whole grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def allowed_tokens(height: int, width: int, block: int) -> torch.Tensor:
    """Which token each position of a [height, width] grid (or window) may attend to: bool [H * W, 1 + (H / block)
    * (W / block)], raster order, "nothing yet" first. Position (r, c) sees the token of block (i, j) when block
    row i ends above r: (i + 1) * block <= r."""
    rows = torch.arange(height).repeat_interleave(width)  # row of each position
    token_ends = (torch.arange(height // block).repeat_interleave(width // block) + 1) * block
    return torch.cat([torch.ones(height * width, 1, dtype=torch.bool), token_ends[None, :] <= rows[:, None]], dim=1)


class BlockAttention(nn.Module):
    """Multi-head attention of each position's features to the completed blocks above it; adds its output to
    the features (a residual), starting as the identity (zero-initialised output projection)."""

    def __init__(self, channels: int, grid_size: int, block: int, heads: int) -> None:
        super().__init__()
        self.block, self.heads = block, heads
        self.blocks_per_side = grid_size // block
        self.token_place = nn.Parameter(torch.zeros(self.blocks_per_side ** 2, 2 * channels))  # where each block is
        self.nothing_yet = nn.Parameter(torch.zeros(2 * channels))  # what row 0 (and any row) may always see
        self.key_value = nn.Linear(2 * channels, 2 * channels)
        self.query = nn.Linear(channels, channels)
        self.output = nn.Linear(channels, channels)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)
        self.register_buffer("allowed", allowed_tokens(grid_size, grid_size, block), persistent=False)

    def tokens(self, features: torch.Tensor, embedded: torch.Tensor, first_block_row: int,
               first_block_column: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, heads, T, d] of the blocks in a strip of whole block rows.

        features, embedded [B, C, R, W] (R and W multiples of `block`) are the grid's rows from first_block_row *
        block and columns from first_block_column * block onwards."""
        pooled = F.avg_pool2d(torch.cat([features, embedded], dim=1), self.block)  # [B, 2C, R/b, W/b]
        block_rows, block_columns = pooled.shape[2:]
        pooled = pooled.flatten(2).transpose(1, 2)  # [B, T, 2C], raster order of blocks
        places = self.token_place.view(self.blocks_per_side, self.blocks_per_side, -1)[
            first_block_row:first_block_row + block_rows, first_block_column:first_block_column + block_columns]
        return self._split_heads(self.key_value(pooled + places.reshape(pooled.shape[1:]).to(pooled.dtype)))

    def nothing_yet_token(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, heads, 1, d] of the token every position may attend to."""
        return self._split_heads(self.key_value(self.nothing_yet).expand(batch, 1, -1))

    def attend(self, features: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               allowed: torch.Tensor | None = None) -> torch.Tensor:
        """features [B, N, C] (one query each) -> features + attention output, [B, N, C]."""
        batch, count, channels = features.shape
        queries = self.query(features).view(batch, count, self.heads, -1).transpose(1, 2)
        dtype = features.dtype
        if features.device.type == "cpu":
            # Measured on the development CPU (PyTorch 2.13): bf16 attention forward + backward is 4x slower
            # than fp32 here, so the attention core runs in fp32; the projections stay in autocast's bf16.
            queries, keys, values = queries.float(), keys.float(), values.float()
        with torch.autocast(features.device.type, enabled=False):
            mixed = F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed)
        mixed = mixed.transpose(1, 2).reshape(batch, count, channels).to(dtype)
        return features + self.output(mixed)

    def forward(self, features: torch.Tensor, embedded: torch.Tensor,
                first_block: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """features, embedded [B, C, H, W] (the whole grid, or a window whose first block is `first_block`, as
        (block row, block column) of the grid) -> features with attention added, [B, C, H, W]."""
        batch, channels, height, width = features.shape
        keys, values = (torch.cat(pair, dim=2) for pair in zip(self.nothing_yet_token(batch),
                                                                self.tokens(features, embedded, *first_block),
                                                                strict=True))
        whole = height == width == self.blocks_per_side * self.block
        allowed = self.allowed if whole else allowed_tokens(height, width, self.block).to(features.device)
        mixed = self.attend(features.flatten(2).transpose(1, 2), keys, values, allowed)  # [B, H*W, C]
        return mixed.transpose(1, 2).reshape(batch, channels, height, width)

    def step(self, features: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """One position during sampling: features [B, C] and the keys and values of every token it may see
        (the cache fast sampling keeps) -> features with attention added, [B, C]."""
        return self.attend(features[:, None], keys, values)[:, 0]

    def _split_heads(self, key_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, 2C] -> keys, values [B, heads, T, C / heads]."""
        batch, count, _ = key_value.shape
        keys, values = key_value.view(batch, count, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return keys, values
