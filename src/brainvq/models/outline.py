"""A statistical shape model of the brain's outline at each slice position, which draws new outlines.

An outline is a grid [G, G] (the code grid's size) of 1 inside the brain and 0 outside. Per slice position the
model keeps the mean signed distance map of the training outlines (distance to the outline, negative inside) and
its `modes` principal modes of variation, each scaled by its standard deviation: a point distribution model
(Cootes et al. 1995) on signed distance maps (Leventon et al. 2000). A new outline is where
mean + sum_i z_i mode_i < 0, z ~ N(0, T^2) at temperature T. Signed distances rather than the masks themselves,
because an average of masks that are shifted against each other is a double edge (a ring of half-brain), while an
average of their distance maps is one smooth outline between them.

Why a separate model for the outline: a PixelCNN draws a slice's outline code by code, row by row, and one
unlucky code on the edge becomes a bite, a spur or a wedge that later rows cannot undo (README, "Generation"). A
shape model with a handful of smooth modes draws the whole outline at once; in the default demo that left
malformed outlines only at the lowest slice positions, whose real outlines vary most (benchmarks/RESULTS.md, "an
outline model").
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_fill_holes, distance_transform_edt
from torch import nn

# Where an outline's box lies in its frame (see `box_frame`): from -BOX_SPAN to BOX_SPAN on both axes, so that the
# frame keeps a margin around the brain for outlines that reach beyond the box of the slices it was learnt from.
BOX_SPAN = 0.8


def fill_holes(outlines: torch.Tensor) -> torch.Tensor:
    """outlines [N, G, G] (non-zero inside) -> int64 [N, G, G], 1 inside and in every hole inside (a dark
    ventricle is brain to the outline: the codes draw it)."""
    filled = np.zeros(outlines.shape, dtype=np.int64)
    for index, inside in enumerate(outlines.cpu().numpy().astype(bool)):
        filled[index] = binary_fill_holes(inside)
    return torch.from_numpy(filled)


def signed_distance(outlines: torch.Tensor) -> torch.Tensor:
    """outlines [N, G, G] (non-zero inside) -> float32 [N, G, G]: at each cell the distance in cells to the
    outline's edge, negative inside. An empty outline is G everywhere (far outside), a full one -G."""
    side = outlines.shape[-1]
    distances = []
    for inside in outlines.cpu().numpy().astype(bool):
        if not inside.any() or inside.all():
            distances.append(np.full(inside.shape, -side if inside.all() else side, dtype=np.float64))
        else:  # distance_transform_edt: each non-zero cell's distance to the nearest zero one
            distances.append(distance_transform_edt(~inside) - distance_transform_edt(inside))
    return torch.from_numpy(np.stack(distances)).float() if distances else torch.zeros(0, side, side)


def box_frame(outlines: torch.Tensor, *, inverse: bool = False, span: float = BOX_SPAN) -> torch.Tensor:
    """outlines [B, G, G] (non-zero inside) -> affine maps [B, 2, 3] from each outline's grid to its box frame (with
    `inverse`, back), in F.affine_grid's coordinates (x along columns, y along rows, -1..1 across the grid's
    cells). In the box frame the outline's bounding box spans -`span`..`span` on both axes, so a place of the frame
    is a place relative to the brain's extent: the middle of the brain, a tenth of its height above its lowest
    point, whatever the slice's shift and size. An empty outline's frame is its grid."""
    side = outlines.shape[-1]
    inside = outlines.bool()
    cells = torch.arange(side, device=outlines.device, dtype=torch.float32)
    maps = torch.zeros(len(outlines), 2, 3, device=outlines.device)
    for axis, occupied in enumerate((inside.any(dim=1), inside.any(dim=2))):  # [B, G]: columns (x), then rows (y)
        first = torch.where(occupied, cells, float(side)).amin(dim=1)
        last = torch.where(occupied, cells, -1.0).amax(dim=1)
        half = ((last - first + 1) / 2).clamp(min=0.5)
        # Grid coordinate of cell i: (2i + 1) / G - 1; frame coordinate: span * (i - centre) / half.
        scale = span * side / (2 * half)
        offset = span * (side / 2 - 0.5 - (first + last) / 2) / half
        empty = ~occupied.any(dim=1)
        scale, offset = torch.where(empty, 1.0, scale), torch.where(empty, 0.0, offset)
        maps[:, axis, axis] = 1 / scale if inverse else scale
        maps[:, axis, 2] = -offset / scale if inverse else offset
    return maps


def into_box_frame(maps: torch.Tensor, outlines: torch.Tensor) -> torch.Tensor:
    """maps [B, C, G, G] over each slice's grid -> the same over its outline's box frame (`box_frame`),
    interpolated bilinearly; frame cells beyond the grid take its nearest edge."""
    return _resampled(maps, box_frame(outlines, inverse=True))


def from_box_frame(maps: torch.Tensor, outlines: torch.Tensor) -> torch.Tensor:
    """maps [B, C, G, G] over each outline's box frame -> the same over the slice's grid (the inverse of
    `into_box_frame`)."""
    return _resampled(maps, box_frame(outlines))


def _resampled(maps: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """maps [B, C, H, W] read at the places `affine` [B, 2, 3] sends each output cell to -> [B, C, H, W]."""
    places = F.affine_grid(affine.to(maps.dtype), list(maps.shape), align_corners=False)
    return F.grid_sample(maps, places, mode="bilinear", padding_mode="border", align_corners=False)


class OutlineModel(nn.Module):
    """Shape models of `rows` slice positions over [G, G] grids (`grid_size`), each with `modes` modes.

    Buffers (saved with the prior that owns the model): `mean` [rows, G, G] and `modes` [rows, modes, G, G], the
    mean signed distance map and the principal modes scaled by their standard deviations (zero for modes a
    position's training outlines do not have)."""

    def __init__(self, rows: int, grid_size: int, modes: int) -> None:
        super().__init__()
        # Before `fit`: every position's outline is empty (all distances positive).
        self.register_buffer("mean", torch.full((rows, grid_size, grid_size), float(grid_size)))
        self.register_buffer("modes", torch.zeros(rows, modes, grid_size, grid_size))

    @torch.no_grad()
    def fit(self, outlines: torch.Tensor, rows: torch.Tensor) -> None:
        """Fit every row to the training `outlines` [N, G, G] (1 inside) whose row (slice position) is given by
        `rows` [N] int64; a row without outlines keeps an empty mean, one with a single outline no modes."""
        distances = signed_distance(outlines).double()
        rows = rows.cpu()
        for row in range(len(self.mean)):
            members = distances[rows == row].flatten(1)  # [n, G*G]
            if len(members) == 0:
                continue
            mean = members.mean(dim=0)
            self.mean[row] = mean.view_as(self.mean[row]).to(self.mean)
            self.modes[row] = 0
            if len(members) < 2:
                continue
            _, singular, directions = torch.linalg.svd(members - mean, full_matrices=False)
            kept = min(self.modes.shape[1], len(singular))
            scaled = singular[:kept, None] / (len(members) - 1) ** 0.5 * directions[:kept]  # [kept, G*G]
            self.modes[row, :kept] = scaled.view(kept, *self.mean.shape[1:]).to(self.modes)

    def sample(self, rows: torch.Tensor, generator: torch.Generator | None = None, *,
               temperature: float = 1.0) -> torch.Tensor:
        """New outlines of the slice positions `rows` [B] int64 -> int64 [B, G, G] (1 inside, holes filled as in
        the training outlines), drawn with `generator` (on the CPU, so a seed gives the same outlines anywhere).
        `temperature` scales each mode's standard deviation: below 1, outlines nearer each position's mean."""
        weights = temperature * torch.randn(len(rows), self.modes.shape[1], generator=generator).to(self.mean)
        rows = rows.to(self.mean.device)
        distances = self.mean[rows] + torch.einsum("bm,bmhw->bhw", weights, self.modes[rows])
        return fill_holes(distances < 0).to(self.mean.device)
