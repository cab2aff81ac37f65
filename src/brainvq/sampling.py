"""Sampling code grids from the PixelCNN prior, one position at a time in raster order.

Two samplers give the same code grids for the same random numbers:
- `naive`: runs the whole network over the whole grid for every position (G*G full passes);
- `fast` (default): caches what earlier positions computed (Fast PixelCNN, Ramachandran et al. 2017). Per row,
  the vertical stack of every layer is computed once for that row (it only sees rows above); per position,
  only the horizontal stack at that position is computed, from cached features of the positions to its left.
Both draw all their random numbers up front (one uniform per position) and turn logits into a code with the
same inverse-CDF rule, so any difference between them would be a bug, which a test checks bit for bit.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from brainvq.errors import ConfigError
from brainvq.models.pixelcnn import GatedPixelCNN, layer_bias


def choose_codes(logits: torch.Tensor, uniforms: torch.Tensor, *, temperature: float = 1.0,
                 top_k: int | None = None) -> torch.Tensor:
    """Draw one code per row of `logits` [B, K] by inverse CDF of softmax(logits / T), restricted to the
    `top_k` most likely codes; `uniforms` [B] in [0, 1) are the random numbers. Returns [B] int64."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[1]:
        threshold = logits.topk(top_k, dim=1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    cumulative = logits.softmax(dim=1).cumsum(dim=1)
    # right=True: the first code whose cumulative probability exceeds u, so a code of probability 0 is never drawn.
    chosen = torch.searchsorted(cumulative, (uniforms * cumulative[:, -1]).unsqueeze(1).contiguous(), right=True)
    return chosen.squeeze(1).clamp_max(logits.shape[1] - 1)


def _rows(size: int, progress: bool) -> Iterable[int]:
    """Row indices 0..size-1, shown as a progress bar with an ETA when `progress` (a batch can take minutes)."""
    return tqdm(range(size), desc="sampling", unit="row", disable=not progress, leave=False, file=sys.stderr,
                dynamic_ncols=True)


def draw_uniforms(count: int, grid_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The random numbers of a sampling run: [count, G, G] uniforms in [0, 1)."""
    return torch.rand(count, grid_size, grid_size, generator=generator)


@torch.no_grad()
def sample_naive(model: GatedPixelCNN, uniforms: torch.Tensor, positions: torch.Tensor | None = None, *,
                 temperature: float = 1.0, top_k: int | None = None, progress: bool = False,
                 context: torch.Tensor | None = None) -> torch.Tensor:
    """uniforms [B, G, G] (and a context [B, Gc, Gc] int64 for a prior that takes one) -> code grids [B, G, G],
    by a full forward pass per position (a progress bar over the rows with `progress`)."""
    batch, size, _ = uniforms.shape
    device = next(model.parameters()).device
    codes = torch.zeros(batch, size, size, dtype=torch.int64, device=device)
    for row in _rows(size, progress):
        for column in range(size):
            logits = model(codes, positions, context)[:, :, row, column]
            codes[:, row, column] = choose_codes(logits, uniforms[:, row, column].to(device),
                                                 temperature=temperature, top_k=top_k)
    return codes


@torch.no_grad()
def sample_fast(model: GatedPixelCNN, uniforms: torch.Tensor, positions: torch.Tensor | None = None, *,
                temperature: float = 1.0, top_k: int | None = None, progress: bool = False,
                context: torch.Tensor | None = None) -> torch.Tensor:
    """uniforms [B, G, G] (and a context [B, Gc, Gc] int64 for a prior that takes one) -> code grids [B, G, G],
    computing only what each new code changes (a progress bar over the rows with `progress`).

    This function only keeps the caches and calls the model's incremental steps in order: the layers' maths
    lives in the model (`first_*_step`, `GatedLayer.vertical_step` / `horizontal_step`, `BlockAttention.step`)."""
    batch, size, _ = uniforms.shape
    if size != model.config.grid_size:
        raise ConfigError(f"cannot sample {size}x{size} grids from a prior of {model.config.grid_size}x"
                          f"{model.config.grid_size} grids")
    device = next(model.parameters()).device
    channels, reach, depth = model.config.channels, model.reach, len(model.layers)
    model.check_context(context, batch)
    conditioning = model.condition_vectors(positions, batch, device)  # [layers, B, 2C]
    locations = model.location_maps(context, positions)  # [layers, (B,) 2C, G, G]
    position_map = model.position_map(positions, batch)  # [B or 1, C, G, G]
    output_bias = model.output_bias(positions, batch)  # [B or 1, K, G, G]
    codes = torch.zeros(batch, size, size, dtype=torch.int64, device=device)
    # Embedded codes and each layer's vertical-stack input, zero-padded `reach` above and on both sides,
    # exactly as the full forward pass pads them; row r of the grid is row r + reach of these buffers.
    embedded = torch.zeros(batch, channels, size + reach, size + 2 * reach, device=device)
    vertical = [torch.zeros_like(embedded) for _ in range(depth)]
    # Attention blocks by the index of the layer they precede: their input over the grid (tokens are made from
    # it once a block row is complete) and the keys and values of the tokens made so far.
    attention = {int(index): block for index, block in model.attention.items()}
    attention_inputs = {index: torch.zeros(batch, channels, size, size, device=device) for index in attention}
    caches = {index: block.nothing_yet_token(batch) for index, block in attention.items()}

    for row in _rows(size, progress):
        for index, block in attention.items():
            if row and row % block.block == 0:  # the block row just above is complete: add its tokens
                rows = slice(row - block.block, row)
                added = block.tokens(attention_inputs[index][:, :, rows],
                                     embedded[:, :, rows.start + reach:rows.stop + reach, reach:reach + size],
                                     row // block.block - 1)
                caches[index] = tuple(torch.cat(pair, dim=2) for pair in zip(caches[index], added, strict=True))
        # Vertical stacks of this row: they only see rows above, all of which are final now.
        v, first_link = model.first_vertical_step(embedded[:, :, row:row + reach])  # [B, C, 1, G]
        vertical[0][:, :, row + reach, reach:reach + size] = v[:, :, 0]
        links, biases = [], []
        for index, layer in enumerate(model.layers):
            bias = layer_bias(conditioning[index], locations[index][..., row:row + 1, :], v.dtype)  # [B, 2C, 1, G]
            v, link = layer.vertical_step(vertical[index][:, :, row:row + reach + 1], bias)
            links.append(link)
            biases.append(bias)
            if index + 1 < depth:
                vertical[index + 1][:, :, row + reach, reach:reach + size] = v[:, :, 0]
        # Horizontal stacks, position by position; h_rows[i] holds layer i's input on this row, padded left.
        h_rows = [torch.zeros(batch, channels, 1, size + reach, device=device) for _ in range(depth)]
        for column in range(size):
            here = slice(column, column + 1)
            h = model.first_horizontal_step(embedded[:, :, row + reach:row + reach + 1, column:column + reach],
                                            first_link[:, :, :, here])  # [B, C, 1, 1]
            skip = torch.zeros_like(h)
            for index, layer in enumerate(model.layers):
                if index in attention:
                    attention_inputs[index][:, :, row, column] = h[:, :, 0, 0]
                    h = attention[index].step(h[:, :, 0, 0], *caches[index])[:, :, None, None]
                h_rows[index][:, :, :, column + reach] = h[:, :, :, 0]
                h, contribution = layer.horizontal_step(h_rows[index][:, :, :, column:column + reach + 1], h,
                                                        links[index][:, :, :, here], biases[index][:, :, :, here])
                skip = skip + contribution
            logits = model.logits(skip, output_bias[:, :, row:row + 1, here])[:, :, 0, 0]
            chosen = choose_codes(logits, uniforms[:, row, column].to(device), temperature=temperature, top_k=top_k)
            codes[:, row, column] = chosen
            embedded[:, :, row + reach, column + reach] = model.embed(chosen, position_map[:, :, row, column])
    return codes
