"""Gated PixelCNN prior over code grids (van den Oord et al. 2016), without a blind spot.

Input: code grids [B, G, G] (int64 in [0, K)) and, optionally, the slice position of each grid [B] (0..positions-1;
0..31 for OASIS) and, for a prior configured with one, a coarser context code grid [B, Gc, Gc] (int64).
Output: logits [B, K, G, G]; logits[:, :, r, c] depends only on codes before (r, c) in raster order.

Two stacks of features keep that promise:
- the vertical stack v[r, c] sees only rows strictly above r (any column within its reach);
- the horizontal stack h[r, c] sees row r strictly left of c, plus v[r, c] through a 1x1 link.
The first layer reads the embedded codes with kernels that exclude the current row (v) or column (h); later
layers use kernels that include the current row/column of the previous layer's features, which are already
causal. Because v covers the whole triangle above (not just a cone), there is no blind spot.

Conditioning (none of it depends on the codes, so causality holds):
- each gated layer adds a bias before its gates: a learnt vector per slice position (so a user can ask for
  "slice 20") plus a learnt map over grid locations (the location-dependent conditioning of van den Oord et al.),
  which lets a small receptive field know where in the slice it is;
- a learnt coarse map per slice position (`position_map_size`^2 cells, bilinearly upsampled to the grid) is added
  to the embedded codes. A bias vector alone cannot say "at slice 0 the brain is small and the cerebellum sits
  low": that needs position and location together, which this map gives every layer from the first;
- with `position_logits`, a learnt logit per (slice position, grid location, code) is added to the output: the
  log-frequency of each code at each place of each slice position, set from the training grids before training
  (`init_position_logits`) while the head starts at zero. So from step 0 the prior draws the layout of each
  position (where brain, ventricles and background lie), and the network learns what the codes around a
  position add to it; left to learn that layout through the bias maps, a prior trained for minutes on a CPU
  drew frame-filling texture (README, "Prior designs");
- with `context_codebook_size` > 0, a coarser code grid [B, Gc, Gc] (the top level of a two-level VQ-VAE-2, say):
  its codes are embedded, upsampled by nearest neighbour (each covers a (G/Gc)^2 square) and added to the
  learnt location map, so the context enters each layer's bias exactly where the location does;
- with `outline_modes` > 0, the context is the slice's outline [B, G, G] (1 inside the brain, 0 outside), one
  cell per code, and the prior owns the outline model (models/outline.py) that draws new ones: sampling draws
  the outline first and the codes inside it, so the codes no longer make the outline as they come. With
  `outline_frame` too (`framed_logits`), the position logits inside the outline are read in the frame of the
  outline's box: they start as the frequencies of the codes inside the training outlines at their places
  relative to each brain's extent, so the anatomy of a position (the cerebellum at the back of a low slice,
  the ventricles in the middle of a middle one) lands inside the drawn outline wherever it lies and whatever
  its size; in the grid's frame, the training slices' differing shifts and sizes blur it. Outside the outline
  they are the frequencies of the codes outside the training outlines, and with `outline_background` sampling
  draws only those codes there (`allowed_codes`): the outline model, not a stray code, says where the brain ends;
- with `position_template` > 0, each layer's bias also says what the slice position leads one to expect around
  each place, below and to the right included: the code probabilities of the position logits, averaged over
  squares to a `position_template`^2 grid, are read by a small convolutional network that looks every way (they
  are conditioning, not codes, so causality holds) and enter where the location map does. The position map
  above only reaches a place from above and from the left, through the causal stacks, and the position logits
  only reach the output, so without the template the lower half of a slice is drawn without knowing the
  anatomy expected there.

Global reach: `attention_layers` causal attention blocks (models/attention.py) sit between gated layers and
let every position see a coarse summary of the whole slice above it; with `attention_layers=0` this is the
plain gated PixelCNN of earlier versions (README, "Prior designs").

All padding is explicit (`_pad_above`, `_pad_left`), so each layer's convolutions can also be evaluated on a
window of one row or one position: that is the incremental step fast sampling (sampling.py) drives, through
`GatedLayer.vertical_step` / `horizontal_step` and `BlockAttention.step`, with no second copy of their maths.

A `windowed` prior runs on a `Window` of the grid, the box around a batch's outlines with a margin of background
(`window_of`), in training, in the NLL and in sampling alike: everything it learns per place (location maps,
position maps and logits, attention tokens' places) is read at the window's places, and the window's edges are
padded as the grid's are. Outside the window sampling puts the likeliest background code of each place
(`complete`), which the decoder turns into background as it does the training grids' own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from brainvq.config import PixelCNNConfig
from brainvq.errors import ConfigError
from brainvq.models.attention import BlockAttention
from brainvq.models.outline import OutlineModel, from_box_frame, into_box_frame

# The slice position of a grid shown without one: a prior trained with `position_dropout` > 0 has a row for it in
# each per-position table, and its output for it is the unconditional model that classifier-free guidance needs.
NO_POSITION = -1

# A code is background (`fit_background`) when it lies on at least this share of the training cells outside the
# outlines. Not any share above 0: the encoder gives a brain code to a handful of all-dark cells (in the demo cohort
# 5 codes on 1-5 of 3.7 million cells each), while the background's codes each cover thousands or more.
BACKGROUND_SHARE = 1e-4

# Added to every count of `init_position_logits`: a code never seen at a place of a slice position (out of ~40
# training grids there) starts ~6 nats below the commonest, unlikely but not impossible.
POSITION_LOGIT_SMOOTHING = 0.1

# Cells of background a windowed prior's window keeps around the outlines (`GatedPixelCNN.window_of`), so that the
# codes at the brain's edge see background around them as on the whole grid: as far as the kernel reaches.
WINDOW_MARGIN = 2


@dataclass(frozen=True)
class Window:
    """The part of the code grid a network runs on: `height` rows from row `top`, `width` columns from `left`."""

    top: int
    left: int
    height: int
    width: int

    @property
    def rows(self) -> slice:
        return slice(self.top, self.top + self.height)

    @property
    def columns(self) -> slice:
        return slice(self.left, self.left + self.width)


def _pad_above(x: torch.Tensor, rows: int, side: int) -> torch.Tensor:
    """Zero rows above and `side` zero columns left and right: [B, C, H, W] -> [B, C, H + rows, W + 2 side]."""
    return F.pad(x, (side, side, rows, 0))


def _pad_left(x: torch.Tensor, columns: int) -> torch.Tensor:
    """Zero columns on the left: [B, C, H, W] -> [B, C, H, W + columns]."""
    return F.pad(x, (columns, 0, 0, 0))


def _template_reader(codes: int, channels: int) -> nn.Sequential:
    """Code probabilities [B, codes, T, T] -> features [B, channels, T, T]; each feature sees 9x9 cells around
    it (the last convolution is dilated), so with a 16x16 template on the 64x64 grid a place learns what lies up
    to 16 codes away in every direction."""
    return nn.Sequential(nn.Conv2d(codes, channels, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(channels, channels, 3, padding=2, dilation=2))


def layer_bias(vector: torch.Tensor, location: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """vector [B, 2C] + location [2C, R, W] or [B or 1, 2C, R, W] (per slice) -> bias [B, 2C, R, W] in `dtype`,
    stored channels-last.

    Why `dtype`: under autocast the convolutions give bf16, but the conditioning embedding stays fp32, and an
    fp32 bias would push every gate, and its backward, into fp32. Why channels-last: the backward pass sums the
    bias's gradient over the batch for `location`, and PyTorch (2.13, CPU) sums a channels-first tensor over
    dim 0 about 15x slower than the same numbers stored channels-innermost; it took 14% of a prior training step.
    """
    bias = vector[:, None, None, :].to(dtype) + location.movedim(-3, -1).to(dtype)  # [B, R, W, 2C]
    return bias.contiguous().permute(0, 3, 1, 2)


def gate(x: torch.Tensor) -> torch.Tensor:
    """tanh(a) * sigmoid(b) for x = [a, b] split along channels: [B, 2C, ...] -> [B, C, ...]."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer of both stacks; a bias [B, 2C, ...] (slice position and location) is added before each gate.

    The layer is evaluated in two halves that fast sampling also calls on their own: `vertical_step` for whole
    rows (the vertical stack only sees rows above) and `horizontal_step` for positions along a row."""

    def __init__(self, channels: int, kernel_size: int, *, last: bool = False) -> None:
        super().__init__()
        self.reach = kernel_size // 2
        self.vertical = nn.Conv2d(channels, 2 * channels, (self.reach + 1, kernel_size))
        self.horizontal = nn.Conv2d(channels, 2 * channels, (1, self.reach + 1))
        self.link = nn.Conv2d(2 * channels, 2 * channels, 1)
        # Nothing reads the last layer's stacks, only its skip output: it has no residual to learn.
        self.residual = None if last else nn.Conv2d(channels, channels, 1)
        self.skip = nn.Conv2d(channels, channels, 1)

    def vertical_step(self, v_above: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """v_above [B, C, R + reach, G + 2 reach]: the vertical stack of R rows and the `reach` rows above them,
        zero-padded at the sides -> (new v, link into the horizontal stack) [B, C, R, G] and [B, 2C, R, G]."""
        features = self.vertical(v_above)
        return gate(features + bias), self.link(features)

    def horizontal_step(self, h_left: torch.Tensor, h: torch.Tensor, link: torch.Tensor,
                        bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h_left [B, C, R, W + reach]: the horizontal stack of W positions and the `reach` positions left of
        them; h [B, C, R, W] itself; link and bias [B, 2C, R, W] -> (new h, skip) [B, C, R, W]."""
        gated = gate(self.horizontal(h_left) + link + bias)
        return h if self.residual is None else h + self.residual(gated), self.skip(gated)

    def forward(self, v: torch.Tensor, h: torch.Tensor,
                bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """v, h [B, C, G, G], bias [B, 2C, G, G] (or broadcastable) -> (new v, new h, skip), each [B, C, G, G]."""
        v_next, link = self.vertical_step(_pad_above(v, self.reach, self.reach), bias)
        h_next, skip = self.horizontal_step(_pad_left(h, self.reach), h, link, bias)
        return v_next, h_next, skip


class GatedPixelCNN(nn.Module):
    def __init__(self, config: PixelCNNConfig | None = None) -> None:
        super().__init__()
        self.config = config or PixelCNNConfig()
        self.config.validate()
        channels, kernel_size = self.config.channels, self.config.kernel_size
        self.reach = kernel_size // 2
        self.embedding = nn.Embedding(self.config.codebook_size, channels)
        # First layer: v sees the `reach` rows above (not the current one), h the `reach` columns to the left.
        self.first_vertical = nn.Conv2d(channels, channels, (self.reach, kernel_size))
        self.first_horizontal = nn.Conv2d(channels, channels, (1, self.reach))
        self.first_link = nn.Conv2d(channels, channels, 1)
        depth = self.config.layers
        self.layers = nn.ModuleList([GatedLayer(channels, kernel_size, last=i == depth - 1) for i in range(depth)])
        block = self.config.attention_block
        # Keyed by the index of the gated layer each block precedes.
        self.attention = nn.ModuleDict({str(index): BlockAttention(channels, self.config.grid_size, block,
                                                                   self.config.attention_heads)
                                        for index in self.config.attention_before})
        conditions = self.config.positions + int(self.has_no_position_row) if self.config.conditional else 1
        self.conditioning = nn.Embedding(conditions, 2 * channels * self.config.layers)
        nn.init.zeros_(self.conditioning.weight)
        size, location_channels = self.config.grid_size, self.config.location_channels
        self.location = nn.Parameter(torch.randn(location_channels, size, size))
        self.location_projection = nn.Conv2d(location_channels, 2 * channels * self.config.layers, 1, bias=False)
        nn.init.zeros_(self.location_projection.weight)  # starts as no bias at all; learnt from there
        if self.config.context_side:  # only then: priors without a context keep their parameters
            self.context_embedding = nn.Embedding(self.config.context_codes, location_channels)
        if self.config.outline_modes:
            self.outline = OutlineModel(self.config.positions if self.config.conditional else 1, size,
                                        self.config.outline_modes)
        if self.config.keeps_background:  # which codes sampling may draw outside the outline; all until fitted
            self.register_buffer("background_codes", torch.ones(self.config.codebook_size, dtype=torch.bool))
        if self.config.position_template:  # only then: priors without a template keep their parameters
            self.template_reader = _template_reader(self.config.codebook_size, location_channels)
        map_size = self.config.position_map_size if self.config.conditional else 0
        self.position_maps = nn.Parameter(torch.zeros(conditions, channels, map_size, map_size))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(),
                                  nn.Conv2d(channels, self.config.codebook_size, 1))
        logit_maps = conditions if self.config.position_logits else 0
        self.position_logits = nn.Parameter(torch.zeros(logit_maps, self.config.codebook_size, size, size))
        if self.config.framed_logits:  # only then: other priors keep their parameters
            # The position logits inside the outline, over the outline's box frame (see `output_bias`).
            self.outline_logits = nn.Parameter(torch.zeros_like(self.position_logits))
        if self.config.position_logits:  # the output starts as the position logits alone (see the docstring)
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)

    @property
    def has_no_position_row(self) -> bool:
        """Whether the per-position tables have a row for grids without a position (NO_POSITION)."""
        return self.config.conditional and self.config.position_dropout > 0

    def condition_vectors(self, positions: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """Per-layer conditioning biases [layers, B, 2C]; all-equal (a learnt bias) when unconditional."""
        if self.config.conditional and positions is not None and positions.numel():
            valid = (positions >= 0) & (positions < self.config.positions)
            if self.has_no_position_row:
                valid |= positions == NO_POSITION
            if not valid.all():
                without = f" or {NO_POSITION} (no position)" if self.has_no_position_row else ""
                raise ConfigError(f"slice positions must be in 0..{self.config.positions - 1}{without}")
        rows = self._table_rows(positions, batch, device)
        return self.conditioning(rows).view(batch, self.config.layers, -1).transpose(0, 1)

    def _table_rows(self, positions: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """Which row of each per-position table (conditioning, position maps, position logits) the slices use:
        `positions` [B] int64 (NO_POSITION: the last row), or row 0 for all `batch` slices when the prior is
        unconditional or none are given."""
        if not self.config.conditional or positions is None:
            return torch.zeros(batch, dtype=torch.int64, device=device)
        return torch.where(positions == NO_POSITION, self.config.positions, positions)

    def check_context(self, context: torch.Tensor | None, batch: int) -> None:
        """Refuse a context [B, Gc, Gc] int64 that this prior does not take, or lacks when it needs one."""
        side, codes = self.config.context_side, self.config.context_codes
        if not side:
            if context is not None:
                raise ConfigError("this prior has no context (context_grid_size = 0), but a context was given")
            return
        expected = (batch, side, side)
        if context is None:
            what = "outlines" if self.config.outline_modes else "code grids"
            raise ConfigError(f"this prior needs a context: {what} of shape {expected} (int64)")
        if tuple(context.shape) != expected or context.dtype != torch.int64:
            raise ConfigError(f"context is {context.dtype} of shape {tuple(context.shape)}, expected int64 of shape "
                              f"{expected}")
        if context.numel() and (context.min() < 0 or context.max() >= codes):
            raise ConfigError(f"context codes must be in 0..{codes - 1}")

    def location_maps(self, context: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                      rows: slice = slice(None)) -> torch.Tensor:
        """Per-layer location biases of the grid rows `rows` (R of them; all G by default): [layers, 2C, R, G]
        when they are the same for every slice (zeros when location_channels is 0); [layers, B, 2C, R, G] with a
        context [B, Gc, Gc] int64 (see `check_context`) or a position template (for the slice `positions` [B], as
        in `forward`). Fast sampling asks for one row at a time: per slice, all rows at once would hold
        layers x B x 2C x G x G numbers (2.7 GB for 256 slices of the default prior)."""
        size, layers = self.config.grid_size, self.config.layers
        start, stop, _ = rows.indices(size)
        if self.config.location_channels == 0:  # validate() allows no context or template then
            return torch.zeros(layers, 2 * self.config.channels, stop - start, size, device=self.location.device)
        location = self.location[:, start:stop].unsqueeze(0)  # [1, L, R, G]
        per_slice = []  # what each slice adds to the location map: [B or 1, L, R, G] each
        if context is not None:
            # Nearest-neighbour upsampling by repetition: exact for any integer factor, where F.interpolate
            # computes source indices through a float scale. Only the context rows that cover `rows` are read.
            scale = size // self.config.context_side
            first = start // scale
            embedded = self.context_embedding(context[:, first:-(-stop // scale)]).movedim(-1, 1)  # [B, L, r, Gc]
            grown = embedded.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
            per_slice.append(grown[:, :, start - first * scale:stop - first * scale])
        if self.config.position_template:
            per_slice.append(self.position_template(positions, context)[:, :, start:stop])
        if not per_slice:
            return self.location_projection(location).view(layers, -1, stop - start, size)
        maps = self.location_projection(location + sum(per_slice))  # [B, layers * 2C, R, G]
        return maps.view(maps.shape[0], layers, -1, stop - start, size).transpose(0, 1)

    def position_template(self, positions: torch.Tensor | None, context: torch.Tensor | None = None) -> torch.Tensor:
        """What each slice's position leads one to expect around each place: the position logits' code
        probabilities [B, K, G, G], averaged over squares to [B, K, T, T] (T = position_template, at most G), read
        by the template reader and upsampled back -> [B, L, G, G] ([1, L, G, G], row 0's, without `positions` or
        `context`, the outlines [B, G, G] that frame a prior's position logits; see `output_bias`)."""
        size = self.config.grid_size
        batch = len(positions) if positions is not None else len(context) if context is not None else 1
        probabilities = self.output_bias(positions, batch, context).softmax(dim=1)
        template = F.adaptive_avg_pool2d(probabilities, min(self.config.position_template, size))
        return F.interpolate(self.template_reader(template), size=(size, size), mode="nearest")

    @torch.no_grad()
    def fit_outlines(self, outlines: torch.Tensor, positions: torch.Tensor | None) -> None:
        """Fit the outline model to the training outlines [N, G, G] int64 (1 inside the brain) at their slice
        `positions` [N] int64 (None: unconditional)."""
        if not self.config.outline_modes:
            raise ConfigError("this prior has no outline model (outline_modes = 0)")
        self.outline.fit(outlines, self._table_rows(positions, len(outlines), outlines.device))

    @torch.no_grad()
    def fit_background(self, codes: torch.Tensor, outlines: torch.Tensor) -> None:
        """Find the background codes: those on at least BACKGROUND_SHARE of the cells outside the training
        `outlines` [N, G, G] int64 in their grids `codes` [N, G, G] int64 (every code when no cell is outside)."""
        if not self.config.keeps_background:
            raise ConfigError("this prior does not keep the background (it needs outline_modes > 0 and "
                              "outline_background)")
        counts = torch.bincount(codes[outlines == 0].cpu(), minlength=self.config.codebook_size)
        self.background_codes.copy_(counts >= BACKGROUND_SHARE * counts.sum())  # all of them when nothing is outside

    def allowed_codes(self, context: torch.Tensor | None) -> torch.Tensor | None:
        """Which codes sampling may draw at each place of slices with the outlines `context` [B, G, G] int64:
        [B, K, G, G] bool, every code inside the outline and the background codes outside it; None (every code
        everywhere) for a prior that does not keep the background."""
        if not self.config.keeps_background:
            return None
        if context is None:
            raise ConfigError("this prior draws only background codes outside the outline: it needs the outlines")
        return (context[:, None] > 0) | self.background_codes[None, :, None, None]

    def window_of(self, context: torch.Tensor | None) -> Window:
        """The window the network runs on for slices with the outlines `context` [B, G, G] int64: the whole grid,
        unless the prior is `windowed`; then the box around every cell inside any of the outlines, WINDOW_MARGIN
        cells wider on each side, its edges moved out onto whole attention blocks, within the grid (the whole grid
        when every outline is empty)."""
        size = self.config.grid_size
        inside = context.bool().any(dim=0) if self.config.windowed and context is not None else None
        if inside is None or not inside.any():
            return Window(0, 0, size, size)
        step = self.config.attention_block if self.attention else 1  # attention tokens are whole blocks

        def span(occupied: torch.Tensor) -> tuple[int, int]:  # first and one-past-last index, as a window edge
            indices = occupied.nonzero().flatten()
            first = max(int(indices[0]) - WINDOW_MARGIN, 0) // step * step
            end = min(-(-(int(indices[-1]) + 1 + WINDOW_MARGIN) // step) * step, size)
            return first, end - first

        (top, height), (left, width) = span(inside.any(dim=1)), span(inside.any(dim=0))
        return Window(top, left, height, width)

    def complete(self, codes: torch.Tensor, window: Window, positions: torch.Tensor | None,
                 context: torch.Tensor | None) -> torch.Tensor:
        """Code grids of a `window` [B, H, W] int64 -> whole grids [B, G, G]: outside the window each place gets
        its likeliest code among those sampling may draw there (`allowed_codes`; the background's, for a windowed
        prior, whose window holds the outlines `context`) under the output bias of the slice `positions`."""
        size = self.config.grid_size
        if (window.height, window.width) == (size, size):
            return codes
        bias = self.output_bias(positions, len(codes), context).float()
        allowed = self.allowed_codes(context)
        if allowed is not None:
            bias = bias.masked_fill(~allowed, float("-inf"))
        whole = bias.argmax(dim=1).expand(len(codes), size, size).clone()
        whole[:, window.rows, window.columns] = codes
        return whole

    def draw_outlines(self, positions: torch.Tensor | None, batch: int, generator: torch.Generator | None = None, *,
                      temperature: float = 1.0) -> torch.Tensor:
        """New outlines [B, G, G] int64 for `batch` slices at slice `positions` [B] int64 in 0..positions-1
        (None: unconditional), drawn by the outline model with `generator` at `temperature` (OutlineModel.sample);
        the context of `forward`."""
        if not self.config.outline_modes:
            raise ConfigError("this prior has no outline model (outline_modes = 0)")
        return self.outline.sample(self._table_rows(positions, batch, torch.device("cpu")), generator,
                                   temperature=temperature)

    def position_map(self, positions: torch.Tensor | None, batch: int) -> torch.Tensor:
        """What is added to the embedded codes: [B, C, G, G] ([1, C, G, G] of zeros without a map)."""
        size = self.config.grid_size
        if self.position_maps.shape[-1] == 0:
            return self.position_maps.new_zeros(1, self.config.channels, size, size)
        rows = self._table_rows(positions, batch, self.position_maps.device)
        return F.interpolate(self.position_maps[rows], size=(size, size), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def init_position_logits(self, codes: torch.Tensor, positions: torch.Tensor | None,
                             outlines: torch.Tensor | None = None, smoothing: float = POSITION_LOGIT_SMOOTHING,
                             batch: int = 256) -> None:
        """Set the position logits to the log-frequencies of the training code grids `codes` [N, G, G] int64
        at their slice `positions` [N] int64 (None: unconditional), each count plus `smoothing`, so that a code
        never seen at a place stays possible but unlikely there; the NO_POSITION row, if any, to their
        mixture over the positions. The grids are counted `batch` at a time.

        A prior whose logits are framed by the outline (`framed_logits`) needs the grids' `outlines` [N, G, G]
        int64, and its output bias says what a code is given whether its place is inside the outline: the outline
        logits count the codes inside each outline at their places in its box frame, the position logits the
        codes outside it at their places in the grid. A place that no training
        grid of a position has outside its outline counts as that position's codes outside the outline, pooled
        over the grid: a drawn outline may leave it out, and uniform odds there drew specks of brain beyond the
        outline."""
        if not self.config.position_logits:
            raise ConfigError("this prior has no position logits (position_logits = false)")
        if self.config.framed_logits and outlines is None:
            raise ConfigError("this prior reads its position logits in the outline's frame: it needs the outlines")
        rows = self._table_rows(positions, len(codes), codes.device)
        framed = self.config.framed_logits
        counted = (outlines == 0) if framed else torch.ones_like(codes, dtype=torch.bool)  # in the grid's frame
        counts = self._code_counts(codes, rows, counted, batch=batch)
        if framed:
            pooled = counts.sum(dim=(2, 3), keepdim=True)
            unseen = counts.sum(dim=1, keepdim=True) == 0
            counts = counts + unseen * pooled / pooled.sum(dim=1, keepdim=True).clamp(min=1)
        self.position_logits.copy_(self._log_frequencies(counts, rows, smoothing))
        if framed:
            inside = self._code_counts(codes, rows, outlines > 0, framed_by=outlines, batch=batch)
            self.outline_logits.copy_(self._log_frequencies(inside, rows, smoothing))

    def _code_counts(self, codes: torch.Tensor, rows: torch.Tensor, counted: torch.Tensor, *,
                     framed_by: torch.Tensor | None = None, batch: int = 256) -> torch.Tensor:
        """How often each code lies at each place in the grids `codes` [N, G, G] int64, summed per table row
        (`rows` [N]), only where `counted` [N, G, G] bool: float64 [table rows, K, G, G]. With `framed_by`
        (outlines [N, G, G] int64) each grid's places are those of its outline's box frame (`into_box_frame`,
        so a count may spread over neighbouring places). In batches of `batch` grids: the one-hot maps of all of
        them at once would take N x K x G x G numbers."""
        size, codebook = self.config.grid_size, self.config.codebook_size
        counts = torch.zeros(self.position_logits.shape[0], codebook, size, size, dtype=torch.float64)
        for start in range(0, len(codes), batch):
            part = slice(start, start + batch)
            grids, weights = codes[part, None].cpu(), counted[part, None].float().cpu()
            maps = torch.zeros(len(grids), codebook, size, size).scatter_(1, grids, weights)  # weighted one-hot
            if framed_by is not None:
                maps = into_box_frame(maps, framed_by[part].cpu())
            counts.index_add_(0, rows[part].cpu(), maps.double())
        return counts

    def _log_frequencies(self, counts: torch.Tensor, rows: torch.Tensor, smoothing: float) -> torch.Tensor:
        """Code counts [table rows, K, G, G] float64 of grids at table `rows` [N] -> log-frequencies of the same
        shape in the position logits' dtype (see `init_position_logits`)."""
        frequencies = (counts + smoothing) / (counts + smoothing).sum(dim=1, keepdim=True)
        if self.has_no_position_row:
            # The mixture of the positions' frequencies, each weighted by its share of the grids. Not the
            # frequencies of the pooled counts: their smoothing would be ~positions times smaller beside the counts,
            # making the unconditional output surer than any conditional one (guidance then draws brain into the
            # background, where every position agrees).
            shares = torch.bincount(rows, minlength=len(frequencies)).to(frequencies) / len(rows)
            frequencies[-1] = torch.einsum("p,pkhw->khw", shares[:-1], frequencies[:-1])
        return frequencies.log().to(self.position_logits)

    def output_bias(self, positions: torch.Tensor | None, batch: int,
                    context: torch.Tensor | None = None) -> torch.Tensor:
        """What is added to the head's output: [B, K, G, G] ([1, K, G, G] of zeros without position logits). A
        prior whose logits are framed by the outline reads them inside the outline `context` [B, G, G] from its
        outline logits, placed by the outline's box frame (models/outline.py)."""
        size = self.config.grid_size
        if not self.config.position_logits:
            return self.position_logits.new_zeros(1, self.config.codebook_size, size, size)
        rows = self._table_rows(positions, batch, self.position_logits.device)
        if not self.config.framed_logits:
            return self.position_logits[rows]
        framed = from_box_frame(self.outline_logits[rows], context)
        return torch.where(context[:, None] > 0, framed, self.position_logits[rows])

    def logits(self, skip: torch.Tensor, output_bias: torch.Tensor) -> torch.Tensor:
        """The summed skip outputs [B, C, ...] and the matching slice of `output_bias` [B, K, ...] -> logits
        [B, K, ...]."""
        return self.head(skip) + output_bias

    def embed(self, codes: torch.Tensor, position_map: torch.Tensor) -> torch.Tensor:
        """codes [B, ...] and the matching slice of `position_map` [B, C, ...] -> embedded codes [B, C, ...]."""
        return self.embedding(codes).movedim(-1, 1) + position_map

    def first_vertical_step(self, x_above: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_above [B, C, R + reach - 1, G + 2 reach]: embedded codes from `reach` rows above the first of R rows
        to the row above the last -> (v, link into the horizontal stack) [B, C, R, G], strictly above."""
        v = self.first_vertical(x_above)
        return v, self.first_link(v)

    def first_horizontal_step(self, x_left: torch.Tensor, link: torch.Tensor) -> torch.Tensor:
        """x_left [B, C, R, W + reach - 1]: embedded codes from `reach` positions left of the first of W positions
        to the one left of the last; link [B, C, R, W] -> h [B, C, R, W], strictly left (and above, via link)."""
        return self.first_horizontal(x_left) + link

    def forward(self, codes: torch.Tensor, positions: torch.Tensor | None = None,
                context: torch.Tensor | None = None, window: Window | None = None) -> torch.Tensor:
        """codes [B, G, G] int64 (or [B, H, W], those of a `window` of the grid, for a windowed prior: see
        `window_of`), positions [B] int64 or None, context [B, Gc, Gc] int64 (exactly when the prior is
        configured with one; the slices' whole outlines [B, G, G] for a prior with `outline_modes`) -> logits
        [B, K, G, G] (or [B, K, H, W])."""
        size = self.config.grid_size
        window = window or Window(0, 0, size, size)
        shape = (window.height, window.width)
        if tuple(codes.shape[-2:]) != shape or max(window.rows.stop, window.columns.stop) > size:
            part = "" if shape == (size, size) else f", here a {shape[0]}x{shape[1]} window of them"
            raise ConfigError(f"code grids are {tuple(codes.shape[-2:])}, this prior models {size}x{size}{part}")
        self.check_context(context, codes.shape[0])
        conditioning = self.condition_vectors(positions, codes.shape[0], codes.device)
        here = (..., window.rows, window.columns)
        locations = self.location_maps(context, positions)[here]  # [layers, (B,) 2C, H, W]
        x = self.embed(codes, self.position_map(positions, codes.shape[0])[here])
        # The last row (column) of x is never above (left of) a position: the first layer's windows end before it.
        v, link = self.first_vertical_step(_pad_above(x, self.reach, self.reach)[:, :, :-1])
        h = self.first_horizontal_step(_pad_left(x, self.reach)[:, :, :, :-1], link)
        skip = torch.zeros_like(h)
        first_block = (window.top // self.config.attention_block, window.left // self.config.attention_block)
        for index, (layer, vector, location) in enumerate(zip(self.layers, conditioning, locations, strict=True)):
            if str(index) in self.attention:
                h = self.attention[str(index)](h, x, first_block)
            v, h, contribution = layer(v, h, layer_bias(vector, location, v.dtype))
            skip = skip + contribution
        return self.logits(skip, self.output_bias(positions, codes.shape[0], context)[here])
