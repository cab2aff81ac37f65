"""Sampling code grids from the PixelCNN prior, one position at a time in raster order.

Two samplers give the same code grids for the same random numbers:
- `naive`: runs the whole network over the whole grid for every position (G*G full passes);
- `fast` (default): caches what earlier positions computed (Fast PixelCNN, Ramachandran et al. 2017). Per row,
  the vertical stack of every layer is computed once for that row (it only sees rows above); per position,
  only the horizontal stack at that position is computed, from cached features of the positions to its left.
Both draw all their random numbers up front (one uniform per position) and turn logits into a code with the
same inverse-CDF rule, so any difference between them would be a bug, which a test checks bit for bit. A windowed
prior samples only the window around the batch's outlines (`GatedPixelCNN.window_of`), each place with its own
uniform of the whole grid, and puts background codes outside it (`GatedPixelCNN.complete`).

With `guidance` g != 1 (classifier-free guidance, Ho & Salimans 2022) both run the batch twice over, once with
the slice positions and once with NO_POSITION, and draw each code from unconditional + g (conditional -
unconditional) logits: g > 1 stresses what the slice position says about the codes, towards the anatomy of that
position. It needs a prior trained with position_dropout > 0.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from brainvq.errors import ConfigError
from brainvq.models.pixelcnn import NO_POSITION, GatedPixelCNN, layer_bias


def choose_codes(logits: torch.Tensor, uniforms: torch.Tensor, *, temperature: float = 1.0,
                 top_k: int | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one code per row of `logits` [B, K] by inverse CDF of softmax(logits / T), restricted to the
    `allowed` codes ([B, K] bool; None: all) and among them to the `top_k` most likely; `uniforms` [B] in [0, 1)
    are the random numbers. Returns [B] int64."""
    logits = logits.float() / temperature
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if top_k is not None and top_k < logits.shape[1]:
        threshold = logits.topk(top_k, dim=1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    cumulative = logits.softmax(dim=1).cumsum(dim=1)
    # right=True: the first code whose cumulative probability exceeds u, so a code of probability 0 is never drawn.
    chosen = torch.searchsorted(cumulative, (uniforms * cumulative[:, -1]).unsqueeze(1).contiguous(), right=True)
    return chosen.squeeze(1).clamp_max(logits.shape[1] - 1)


def guided_inputs(model: GatedPixelCNN, positions: torch.Tensor | None, context: torch.Tensor | None,
                  guidance: float) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """What the network is run on: (positions, context, copies). Without guidance (g = 1) the inputs as given and
    1 copy; with guidance the batch twice, first with its `positions` [B], then with NO_POSITION, and 2 copies."""
    if guidance == 1:
        return positions, context, 1
    if not model.has_no_position_row or positions is None:
        raise ConfigError(f"guidance {guidance:g} needs slice positions and a prior trained with position_dropout "
                          "> 0 (guidance 1 samples without it)")
    context = None if context is None else context.repeat(2, 1, 1)
    return torch.cat([positions, torch.full_like(positions, NO_POSITION)]), context, 2


def guided_logits(logits: torch.Tensor, guidance: float) -> torch.Tensor:
    """Logits [copies * B, K] of `guided_inputs`' batch -> [B, K]: unconditional + g (conditional - unconditional)."""
    if guidance == 1:
        return logits
    conditional, unconditional = logits.float().chunk(2)
    return unconditional + guidance * (conditional - unconditional)


def _rows(size: int, progress: bool) -> Iterable[int]:
    """Row indices 0..size-1, shown as a progress bar with an ETA when `progress` (a batch can take minutes)."""
    return tqdm(range(size), desc="sampling", unit="row", disable=not progress, leave=False, file=sys.stderr,
                dynamic_ncols=True)


def _at(allowed: torch.Tensor | None, row: int, column: int) -> torch.Tensor | None:
    """The codes `allowed` [B, K, G, G] (or None) at one place of the grid -> [B, K] (or None)."""
    return None if allowed is None else allowed[:, :, row, column]


def draw_uniforms(count: int, grid_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The random numbers of a sampling run: [count, G, G] uniforms in [0, 1)."""
    return torch.rand(count, grid_size, grid_size, generator=generator)


@torch.no_grad()
def sample_naive(model: GatedPixelCNN, uniforms: torch.Tensor, positions: torch.Tensor | None = None, *,
                 temperature: float = 1.0, top_k: int | None = None, guidance: float = 1.0, progress: bool = False,
                 context: torch.Tensor | None = None) -> torch.Tensor:
    """uniforms [B, G, G] (and a context [B, Gc, Gc] int64 for a prior that takes one) -> code grids [B, G, G],
    by a full forward pass (over the window, for a windowed prior) per position (a progress bar over the rows with
    `progress`)."""
    batch = len(uniforms)
    device = next(model.parameters()).device
    window = model.window_of(context)
    allowed = model.allowed_codes(context)  # [B, K, G, G] or None
    run_positions, run_context, copies = guided_inputs(model, positions, context, guidance)
    codes = torch.zeros(copies * batch, window.height, window.width, dtype=torch.int64, device=device)
    for row in _rows(window.height, progress):
        for column in range(window.width):
            logits = guided_logits(model(codes, run_positions, run_context, window)[:, :, row, column], guidance)
            place = (window.top + row, window.left + column)
            chosen = choose_codes(logits, uniforms[:, place[0], place[1]].to(device), temperature=temperature,
                                  top_k=top_k, allowed=_at(allowed, *place))
            codes[:, row, column] = chosen.repeat(copies)
    return model.complete(codes[:batch], window, positions, context)


@torch.no_grad()
def sample_fast(model: GatedPixelCNN, uniforms: torch.Tensor, positions: torch.Tensor | None = None, *,
                temperature: float = 1.0, top_k: int | None = None, guidance: float = 1.0, progress: bool = False,
                context: torch.Tensor | None = None) -> torch.Tensor:
    """uniforms [B, G, G] (and a context [B, Gc, Gc] int64 for a prior that takes one) -> code grids [B, G, G],
    computing only what each new code changes (a progress bar over the rows with `progress`).

    This function only keeps the caches and calls the model's incremental steps in order: the layers' maths
    lives in the model (`first_*_step`, `GatedLayer.vertical_step` / `horizontal_step`, `BlockAttention.step`)."""
    size = uniforms.shape[1]
    if size != model.config.grid_size:
        raise ConfigError(f"cannot sample {size}x{size} grids from a prior of {model.config.grid_size}x"
                          f"{model.config.grid_size} grids")
    device = next(model.parameters()).device
    window = model.window_of(context)  # the whole grid unless the prior is windowed
    height, width = window.height, window.width
    allowed = model.allowed_codes(context)  # [B, K, G, G] or None
    run_positions, run_context, copies = guided_inputs(model, positions, context, guidance)
    batch = copies * len(uniforms)  # what the network runs on
    channels, reach, depth = model.config.channels, model.reach, len(model.layers)
    model.check_context(run_context, batch)
    conditioning = model.condition_vectors(run_positions, batch, device)  # [layers, B, 2C]
    here = (..., window.rows, window.columns)
    position_map = model.position_map(run_positions, batch)[here]  # [B or 1, C, H, W]
    output_bias = model.output_bias(run_positions, batch, run_context)[here]  # [B or 1, K, H, W]
    codes = torch.zeros(batch, height, width, dtype=torch.int64, device=device)
    # Embedded codes and each layer's vertical-stack input, zero-padded `reach` above and on both sides,
    # exactly as the full forward pass pads them; row r of the window is row r + reach of these buffers.
    embedded = torch.zeros(batch, channels, height + reach, width + 2 * reach, device=device)
    vertical = [torch.zeros_like(embedded) for _ in range(depth)]
    # Attention blocks by the index of the layer they precede: their input over the window (tokens are made from
    # it once a block row is complete) and the keys and values of the tokens made so far.
    attention = {int(index): block for index, block in model.attention.items()}
    attention_inputs = {index: torch.zeros(batch, channels, height, width, device=device) for index in attention}
    caches = {index: block.nothing_yet_token(batch) for index, block in attention.items()}

    for row in _rows(height, progress):
        for index, block in attention.items():
            if row and row % block.block == 0:  # the block row just above is complete: add its tokens
                rows = slice(row - block.block, row)
                added = block.tokens(attention_inputs[index][:, :, rows],
                                     embedded[:, :, rows.start + reach:rows.stop + reach, reach:reach + width],
                                     (window.top + row) // block.block - 1, window.left // block.block)
                caches[index] = tuple(torch.cat(pair, dim=2) for pair in zip(caches[index], added, strict=True))
        # Vertical stacks of this row: they only see rows above, all of which are final now.
        v, first_link = model.first_vertical_step(embedded[:, :, row:row + reach])  # [B, C, 1, W]
        vertical[0][:, :, row + reach, reach:reach + width] = v[:, :, 0]
        links, biases = [], []
        grid_row = slice(window.top + row, window.top + row + 1)
        locations = model.location_maps(run_context, run_positions, rows=grid_row)[..., window.columns]
        for index, layer in enumerate(model.layers):  # locations: [layers, (B,) 2C, 1, W]
            bias = layer_bias(conditioning[index], locations[index], v.dtype)  # [B, 2C, 1, W]
            v, link = layer.vertical_step(vertical[index][:, :, row:row + reach + 1], bias)
            links.append(link)
            biases.append(bias)
            if index + 1 < depth:
                vertical[index + 1][:, :, row + reach, reach:reach + width] = v[:, :, 0]
        # Horizontal stacks, position by position; h_rows[i] holds layer i's input on this row, padded left.
        h_rows = [torch.zeros(batch, channels, 1, width + reach, device=device) for _ in range(depth)]
        for column in range(width):
            at = slice(column, column + 1)
            h = model.first_horizontal_step(embedded[:, :, row + reach:row + reach + 1, column:column + reach],
                                            first_link[:, :, :, at])  # [B, C, 1, 1]
            skip = torch.zeros_like(h)
            for index, layer in enumerate(model.layers):
                if index in attention:
                    attention_inputs[index][:, :, row, column] = h[:, :, 0, 0]
                    h = attention[index].step(h[:, :, 0, 0], *caches[index])[:, :, None, None]
                h_rows[index][:, :, :, column + reach] = h[:, :, :, 0]
                h, contribution = layer.horizontal_step(h_rows[index][:, :, :, column:column + reach + 1], h,
                                                        links[index][:, :, :, at], biases[index][:, :, :, at])
                skip = skip + contribution
            logits = guided_logits(model.logits(skip, output_bias[:, :, row:row + 1, at])[:, :, 0, 0], guidance)
            place = (window.top + row, window.left + column)
            chosen = choose_codes(logits, uniforms[:, place[0], place[1]].to(device), temperature=temperature,
                                  top_k=top_k, allowed=_at(allowed, *place)).repeat(copies)
            codes[:, row, column] = chosen
            embedded[:, :, row + reach, column + reach] = model.embed(chosen, position_map[:, :, row, column])
    return model.complete(codes[:len(uniforms)], window, positions, context)
