"""Settings as dataclasses, with a validated JSON round trip.

`VQVAEConfig` describes the network (what a checkpoint needs to be rebuilt); `TrainConfig` describes one training
run. Both are written into the run folder as JSON, so a run is self-describing, and read back with every key and
value checked: a hand-edited or tampered config gives a `ConfigError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from brainvq.atomic import atomic_write_bytes
from brainvq.errors import ConfigError

T = TypeVar("T")

# Field metadata key: the value a config file without that key stands for. A field added after configs were first
# written may default to something new while old files keep describing what they described.
ABSENT_MEANS = "absent_means"

# Upper bounds of the network's sizes, well above any useful value (the defaults are 256, 128 and 2): they turn
# a tampered or mistyped config.json into a ConfigError instead of an attempt to allocate gigabytes of weights
# (at these bounds the VQ-VAE has about 100M weights, 400 MB).
MAX_IMAGE_SIZE = 4096
MAX_WIDTH = 512
MAX_RESIDUAL_BLOCKS = 16
# Seeds must suit every generator they feed: NumPy's legacy seeding, SeedSequence (no negative seeds) and torch
# (64 bits, after the training loop derives per-epoch seeds from them).
MAX_SEED = 2**32 - 1

# Global gradient-norm clip. Typical norms, measured on the demo cohort: VQ-VAE about 0.3, prior 0.5-1 with a
# warm-up bump to 5; Adam is nearly blind to a uniform scale, so the clip only tames the rare spike that made an
# unclipped 8x VQ-VAE diverge.
MAX_GRAD_NORM = 1.0


# Once trained, the label map's cross-entropy (nats per pixel) is ~45x the image's mean squared error (0.034 against
# 0.00074 after 1.5 minutes on an H200, benchmarks/RESULTS.md), so an equal weight would let the label map crowd the
# image out of the loss; 0.05 makes the label term about twice the image's. Chosen by that ratio, not by a sweep.
LABEL_WEIGHT = 0.05

# Weight of the reconstruction's 1 - SSIM beside its mean squared error (models/vqvae.py). Squared error alone is
# a blurring objective; SSIM rewards local contrast and structure (as MS-SSIM + L1 in Zhao et al. 2017). At the
# demo's former 4.55 VQ-VAE minutes on the AVX2 CPU, weights 0 / 0.1 / 0.3 / 1 gave a test SSIM of 0.927 / 0.943 /
# 0.949 / 0.954 and a tissue Dice of 0.88 / 0.83 / 0.78 / 0.61: the term crowds out the label maps' cross-entropy,
# whose weight was set beside the squared error alone. After 7 minutes 0.3 / 0.5 / 1 (label weight 0.1) gave
# 0.954 / 0.957 / 0.957, Dice 0.83 / 0.82 / 0.80 (benchmarks/RESULTS.md).
SSIM_WEIGHT = 0.5

# The demo's training minutes (sampling, evaluation and the report come on top: 25 minutes in all on a 2-core
# CPU) and the VQ-VAE's share of them. With 13 minutes (35% VQ-VAE) the demo took 19 min 49 s and 20 min 25 s on a
# 2-core AVX2 CPU (about 7 min not training: cohort, encoding, sampling 256, evaluation, report), and its VQ-VAE's
# 4.55 minutes gave a test SSIM of 0.926. With the SSIM term at 0.5 it reached 0.957 after 7 minutes (0.954 with
# 0.3 after 7, 0.949 after 4.55), so the spare minutes go to the VQ-VAE; the prior keeps its 8.5 minutes.
DEMO_MINUTES = 15.5
DEMO_VQVAE_SHARE = 0.45
# Softmax temperature of `sample`, `evaluate-samples` and the demo. At 1.0 the CPU demo's prior gave samples more
# varied than real slices (mean MS-SSIM 0.53 against 0.57), with more holes and fragments; at 0.8 their variety
# matched real slices' (0.567 against 0.565) and the Fréchet distance fell from 2.1x to 1.7x real's.
SAMPLING_TEMPERATURE = 0.8
# Temperature of the outline model's draws (models/outline.py: each mode's weight ~ N(0, T^2)), set apart from the
# codes'. At 0.8 some of the lowest positions' outlines have narrow frontal spikes, detached pieces and bites; at
# 0.5 they are compact and whole, but the outlines vary less than real ones: on the CPU demo's prior the C2ST
# against reconstructions rose from 0.49 to 0.66 and the Fréchet distance from 0.78x to 1.19x real's, with as many
# malformed low slices (there the codes make them). After 3x the prior's minutes the outlines make most of them
# (benchmarks/RESULTS.md, "the outline's temperature"), so 0.5 is for longer-trained priors.
OUTLINE_TEMPERATURE = 0.8
# Classifier-free guidance (Ho & Salimans 2022) that `sample` and `evaluate-samples` use for a prior trained with
# `position_dropout` (others sample at 1, the plain conditional prior): logits = unconditional + guidance x
# (conditional - unconditional). On such a prior after the CPU demo's 8.5 minutes, guidance 1 / 1.25 / 1.5 / 2 gave
# a position error of 3.09 / 2.54 / 1.81 / 1.95 (real slices 2.53) and a Fréchet distance of 32 / 46 / 48 / 58 (real
# 23.5); 2 drew holes. After 3x the minutes, 1 / 1.5 gave 3.22 / 2.49 and 22 / 36; after 10x, 3.94 / 2.59 and
# 26 / 16, with a C2ST against reconstructions of 0.62 / 0.55 (real 0.48; benchmarks/RESULTS.md).
SAMPLING_GUIDANCE = 1.5
SAMPLES_EVALUATED = 256  # evaluate-samples' default n: 8 per OASIS slice position, 128 facing each held-out split

DEVICE_NAMES = "'auto', 'cpu', 'cuda', 'cuda:N' (GPU number N) or 'mps' (Apple GPUs)"
_DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


def is_device_name(name: str) -> bool:
    """Whether `name` is one of DEVICE_NAMES (whether that device exists is resolve_device's question)."""
    return _DEVICE_NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class VQVAEConfig:
    """The VQ-VAE network: 256x256 slice -> (256/downsample)^2 grid of codes -> 256x256 slice."""

    image_size: int = 256
    downsample: int = 4  # 4 -> 64x64 code grid, 8 -> 32x32 (README: "Choosing the down-sampling factor")
    channels: int = 128
    residual_blocks: int = 2
    residual_channels: int = 32  # bottleneck width inside each residual block
    codebook_size: int = 32
    code_dim: int = 128
    beta: float = 0.25  # commitment weight
    ema: bool = True  # codebook learnt by exponential moving averages instead of gradients
    ema_decay: float = 0.99
    restart_after_steps: int = 20  # a code unused for this many training steps is re-seeded from encoder outputs
    # Tissue label maps encoded and decoded with the images (0: images only). 4 for OASIS masks: background, CSF,
    # grey and white matter; train_vqvae picks it from the data unless a model config is given.
    label_classes: int = 0
    label_weight: float = LABEL_WEIGHT  # weight of the label map's cross-entropy beside the image's MSE
    # Weight of 1 - SSIM (of the clamped output) beside the image's MSE; configs written before it existed lack
    # the key and were trained on the squared error alone.
    ssim_weight: float = field(default=SSIM_WEIGHT, metadata={ABSENT_MEANS: 0.0})

    def validate(self) -> None:
        _require(self.downsample in (2, 4, 8, 16), "downsample", "must be 2, 4, 8 or 16")
        _require(self.image_size > 0 and self.image_size % self.downsample == 0, "image_size",
                 "must be a positive multiple of downsample")
        _require(self.image_size <= MAX_IMAGE_SIZE, "image_size", f"must be <= {MAX_IMAGE_SIZE}")
        for name in ("channels", "residual_channels", "codebook_size", "code_dim"):
            _require(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("channels", "residual_channels", "code_dim"):
            _require(getattr(self, name) <= MAX_WIDTH, name, f"must be <= {MAX_WIDTH}")
        _require(self.channels % 2 == 0, "channels", "must be even")
        _require(0 <= self.residual_blocks <= MAX_RESIDUAL_BLOCKS, "residual_blocks",
                 f"must be in 0..{MAX_RESIDUAL_BLOCKS}")
        _require(self.codebook_size <= 256, "codebook_size", "must be <= 256 (code grids are stored as uint8)")
        _require(self.beta >= 0, "beta", "must be >= 0")
        _require(0 < self.ema_decay < 1, "ema_decay", "must be in (0, 1)")
        _require(self.restart_after_steps >= 0, "restart_after_steps", "must be >= 0 (0 disables restarts)")
        _require(self.label_classes == 0 or 2 <= self.label_classes <= 256, "label_classes",
                 "must be 0 (images only) or 2..256")
        _require(self.label_weight >= 0, "label_weight", "must be >= 0")
        _require(self.ssim_weight >= 0, "ssim_weight", "must be >= 0")

    @property
    def grid_size(self) -> int:
        """Side of the square code grid."""
        return self.image_size // self.downsample


@dataclass(frozen=True)
class PixelCNNConfig:
    """The PixelCNN prior (models/pixelcnn.py) over code grids [G, G] of codebook_size codes."""

    codebook_size: int = 32
    channels: int = 32  # 64 trained 2.7x slower per step and measured worse at the CPU demo's budget (README)
    layers: int = 10
    kernel_size: int = 5  # odd; each layer reaches kernel_size // 2 further up, left and right
    conditional: bool = True  # condition on the slice position
    positions: int = 32  # slice positions; a new prior takes it from its data (api.default_prior_config)
    grid_size: int = 64  # side of the code grids (the VQ-VAE's image size / downsample)
    location_channels: int = 16  # learnt location map (0: none); tells each layer where in the grid it is
    position_map_size: int = 16  # side of the learnt per-position map added to the embedded codes (0: none)
    # A learnt logit per slice position, grid location and code, added to the output. Configs written before it
    # existed lack the key and describe priors without it (their checkpoints have no such tensor).
    position_logits: bool = field(default=True, metadata={ABSENT_MEANS: False})
    # Causal attention blocks between the gated layers (0: the plain gated PixelCNN, which configs written before
    # they existed describe).
    attention_layers: int = field(default=2, metadata={ABSENT_MEANS: 0})
    attention_heads: int = 4
    attention_block: int = 4  # side of the square of codes each attention token summarises (divides grid_size)
    context_codebook_size: int = 0  # codes of a coarser context grid the prior is conditioned on (0: no context)
    context_grid_size: int = 0  # side of that context grid (divides grid_size; 0 with no context)
    # Side of the position template each layer reads (models/pixelcnn.py; at most grid_size is used; 0: none).
    # Off by default: at the CPU demo's budget 16 gave a lower position error but no fewer malformed slices
    # (benchmarks/RESULTS.md, "a position template").
    position_template: int = 0
    # Share of training grids shown without their slice position (a conditional prior's per-position tables then get
    # an extra row for "no position"), so that the prior also learns the unconditional model that classifier-free
    # guidance needs (sampling.py). Off by default: at the CPU demo's budget guidance traded a lower position error
    # for a larger Fréchet distance and left as many malformed slices (benchmarks/RESULTS.md).
    position_dropout: float = 0.0
    # Principal modes of the outline model (models/outline.py) that draws each slice's brain outline before its
    # codes, which are then drawn inside it (the outline is the prior's context; 0: no outline model, the codes
    # make the outline as they come). Off for a bare network; a run's prior gets PRIOR_OUTLINE_MODES.
    outline_modes: int = 0
    # With an outline model and position logits: inside the slice's outline, the position logits are read in the
    # frame of the outline's box (models/outline.py, `box_frame`), so the anatomy a position leads one to expect
    # sits where it does relative to the brain's extent, whatever the slice's shift and size; outside it, in the
    # grid's own frame. At the demo's budget it took the samples' C2ST against reconstructions from 0.665 to 0.535
    # and their Fréchet distance from 75.7 to 39.0 (real 33.2; benchmarks/RESULTS.md, "position logits framed by
    # the outline"). Priors written before it existed read them in the grid's frame everywhere.
    outline_frame: bool = field(default=True, metadata={ABSENT_MEANS: False})
    # With an outline model: outside the drawn outline, sampling draws only the codes of the background (those of
    # the training cells outside the training outlines; `GatedPixelCNN.fit_background`), so that no speck or tag of
    # brain lies beyond the outline. Like top-k it only narrows what sampling draws: training and the NLL are the
    # same. Priors written before it existed draw every code outside the outline.
    outline_background: bool = field(default=True, metadata={ABSENT_MEANS: False})
    # With an outline model: the network runs on each batch's window, the box around its slices' outlines (plus
    # WINDOW_MARGIN cells, on whole attention blocks), not on the whole grid; outside it sampling puts each place's
    # likeliest background code (`GatedPixelCNN.window_of`). Fewer codes a step: at batch 2 on the demo cohort a
    # window covers about 57% of the grid. Off for a bare network; a run's prior gets PRIOR_WINDOWED. Priors written
    # before it existed run on the whole grid.
    windowed: bool = field(default=False, metadata={ABSENT_MEANS: False})

    def validate(self) -> None:
        # Upper bounds too: a tampered prior/config.json must not make the constructor allocate gigabytes.
        limits = {"codebook_size": (2, 256), "channels": (1, 1024), "layers": (1, 64), "kernel_size": (3, 15),
                  "positions": (1, 4096), "grid_size": (1, 512), "location_channels": (0, 256),
                  "position_map_size": (0, 64), "attention_layers": (0, 64), "attention_heads": (1, 64),
                  "attention_block": (1, 512), "context_codebook_size": (0, 256), "context_grid_size": (0, 512),
                  "position_template": (0, 512), "outline_modes": (0, 256)}
        for key, (low, high) in limits.items():
            value = getattr(self, key)
            if not low <= value <= high or (key == "kernel_size" and value % 2 == 0):
                odd = " and odd" if key == "kernel_size" else ""
                raise ConfigError(f"{key} = {value!r} is invalid (must be in {low}..{high}{odd})")
        if not 0 <= self.position_dropout < 1:
            raise ConfigError(f"position_dropout = {self.position_dropout!r} is invalid (must be in [0, 1))")
        if self.attention_layers:
            if self.attention_layers > self.layers:
                raise ConfigError(f"attention_layers = {self.attention_layers} must not exceed layers = {self.layers}")
            if self.grid_size % self.attention_block:
                raise ConfigError(f"attention_block = {self.attention_block} must divide grid_size = {self.grid_size}")
            if self.channels % self.attention_heads:
                raise ConfigError(f"attention_heads = {self.attention_heads} must divide channels = {self.channels}")
        if (self.context_codebook_size > 0) != (self.context_grid_size > 0):
            raise ConfigError(f"context_codebook_size = {self.context_codebook_size} and context_grid_size = "
                              f"{self.context_grid_size} must both be 0 (no context) or both be > 0")
        if self.outline_modes and self.context_grid_size:
            raise ConfigError("a prior conditioned on an outline (outline_modes > 0) takes no other context "
                              "(context_grid_size must be 0)")
        if self.context_side:
            if self.grid_size % self.context_side:
                raise ConfigError(f"context_grid_size = {self.context_grid_size} must divide grid_size = "
                                  f"{self.grid_size}")
            if self.location_channels == 0:
                # The context is added to the learnt location map: without one it has nowhere to enter.
                raise ConfigError("a context (context_grid_size > 0 or outline_modes > 0) needs location_channels > 0")
        if self.windowed and not self.keeps_background:
            # The window is the outlines' box, and what lies outside it is filled with background codes.
            raise ConfigError("a windowed prior (windowed = true) needs an outline model that keeps the background "
                              "(outline_modes > 0 and outline_background)")
        if self.position_template and (not self.position_logits or self.location_channels == 0):
            # The template is read from the position logits and enters where the location map does.
            raise ConfigError("a position template (position_template > 0) needs position_logits and "
                              "location_channels > 0")

    @property
    def framed_logits(self) -> bool:
        """Whether the position logits inside the outline are read in the outline's box frame (`outline_frame`)."""
        return self.outline_frame and self.outline_modes > 0 and self.position_logits

    @property
    def keeps_background(self) -> bool:
        """Whether sampling draws only background codes outside the drawn outline (`outline_background`)."""
        return self.outline_background and self.outline_modes > 0

    @property
    def context_side(self) -> int:
        """Side of the grid the prior is conditioned on besides the slice position: the outline's (grid_size),
        a coarser code grid's (context_grid_size), or 0 for none."""
        return self.grid_size if self.outline_modes else self.context_grid_size

    @property
    def context_codes(self) -> int:
        """Values a cell of that grid takes: 2 for an outline (outside, inside), else context_codebook_size."""
        return 2 if self.outline_modes else self.context_codebook_size

    @property
    def attention_before(self) -> tuple[int, ...]:
        """Indices of the gated layers that an attention block precedes, spread evenly over the depth."""
        count = self.attention_layers
        return tuple((index + 1) * self.layers // (count + 1) for index in range(count))


# Images per training step where none is given. On a CPU a short run is limited by its number of steps, not by
# what each step sees (images/s hardly depends on the batch there): in 4.55 minutes on 2 cores the VQ-VAE took 82
# steps of 16 slices, 320 of 4 or 640 of 2, and its test brain SSIM was 0.42, 0.70 and 0.73 (PSNR 23.5, 28.3 and
# 29.6 dB; the 16s with plain MSE). So did the prior on those codes: in 8.45 minutes 117 steps of 16 grids or 419
# of 4, validation NLL 0.82 or 0.73 bits per code, and its samples' C2ST AUC 0.93 or 0.73 (benchmarks/RESULTS.md).
# Today's prior on the demo's codes after its 8.5 minutes: 1,046 steps of 4 or 1,452 of 2, test NLL 0.897 or 0.879
# bits per code, Fréchet distance of its samples 1.38x or 1.04x real's (benchmarks/RESULTS.md, 2026-12-02 night).
# On a GPU pass a larger batch (the H200 runs in benchmarks/RESULTS.md used 64).
VQVAE_BATCH_SIZE = 2
PRIOR_BATCH_SIZE = 2


def default_batch_size(model_class: type) -> int:
    """Images (or code grids) per step for training a `model_class` (VQVAEConfig or PixelCNNConfig) network."""
    return VQVAE_BATCH_SIZE if model_class is VQVAEConfig else PRIOR_BATCH_SIZE


# Whether a run also learns from each training slice mirrored left-right, where none is said (brains are nearly
# symmetric, so a mirrored slice is another plausible one). The prior: yes. With ~40 training grids per slice
# position (the demo cohort) it learns its training grids faster than the shapes behind them: after the demo's
# 8.5 minutes its NLL per code was 0.80 on the training grids against 0.96 on the validation ones. At the steps
# of 3x those minutes, mirroring took the validation / test NLL from 0.845 / 0.971 to 0.781 / 0.899 bits per code
# and the samples' C2ST against reconstructions from 0.646 to 0.624, Fréchet distance 35.8 to 29.9
# (benchmarks/RESULTS.md, "mirrored training slices"). The VQ-VAE: no (not measured; short runs are step-bound).
PRIOR_MIRROR = True
VQVAE_MIRROR = False


# Modes of the outline model a run's prior gets where none is said (models/outline.py; 0: none, the codes make the
# outline as they come). In the default demo the outline model (8 modes, drawn at the sampling temperature) left 3
# malformed slices of the 32 in samples_grid.png, all at the lowest positions, where the demo before it had 6 over
# all positions; position error 2.16 against 2.59 (real 2.53), C2ST against reconstructions 0.623 against 0.645,
# but Fréchet distance 61.6 against 28.4 (real 23.5); each step costs ~15-20% more (benchmarks/RESULTS.md, "an
# outline model").
PRIOR_OUTLINE_MODES = 8
# Whether a run's prior runs on the window around each batch's outlines where none is said and it can (an outline
# model that keeps the background; PixelCNNConfig.windowed). On the default demo's codes, in the same 8.5 minutes,
# it took 2,359 steps against 1,735 and left 1 malformed and 1 borderline low slice in samples_grid.png against 3
# and 2, with a C2ST against reconstructions of 0.523 against 0.487 and a Fréchet distance of 0.92x against 0.78x
# real's (benchmarks/RESULTS.md, "the prior on windows").
PRIOR_WINDOWED = True


def default_mirror(model_class: type) -> bool:
    """Whether training a `model_class` (VQVAEConfig or PixelCNNConfig) network also uses mirrored slices."""
    return VQVAE_MIRROR if model_class is VQVAEConfig else PRIOR_MIRROR


# Warped copies of each training slice for the prior where none is said (data/warp.py). On the default demo's codes,
# in the same 8.5 minutes, two copies took the prior's test NLL from 0.968 to 0.929 bits per code and its samples'
# Fréchet distance from 0.78x to 0.65x real's (one copy: 0.946 and 0.81x), but the lowest slices went wrong about
# as often, and encoding the copies took the demo from 19 min 37 s to 21 min 57 s on a 2-core CPU with bf16; on the
# Intel Xeon whose demo took 21 min 42 s in fp32 (convolutions about half as fast) it would likely pass the demo's
# 25 minutes (estimated, not measured). So none unless asked (`--warped-copies 2`; benchmarks/RESULTS.md,
# "warped copies").
PRIOR_WARPED_COPIES = 0
VQVAE_WARPED_COPIES = 0  # not measured
MAX_WARPED_COPIES = 16


def default_warped_copies(model_class: type) -> int:
    """Warped copies of each training slice a `model_class` (VQVAEConfig or PixelCNNConfig) network trains on."""
    return VQVAE_WARPED_COPIES if model_class is VQVAEConfig else PRIOR_WARPED_COPIES


@dataclass(frozen=True)
class TrainConfig:
    """One training run. `max_minutes` bounds wall time (checked between steps, validation included)."""

    epochs: int = 40
    max_steps: int | None = None
    max_minutes: float | None = 14.0
    batch_size: int | None = None  # images per step; None: the model's default (`default_batch_size`)
    # Also train on each training slice mirrored left-right (the prior: on the mirrored slices' code grids); None:
    # the model's default (`default_mirror`). Configs written before it existed describe runs without.
    mirror: bool | None = field(default=None, metadata={ABSENT_MEANS: False})
    # Warped copies of each training slice (and of its mirror image, with `mirror`) the prior also trains on
    # (data/warp.py); None: the model's default (`default_warped_copies`). The VQ-VAE takes none. Configs written
    # before it existed describe runs without.
    warped_copies: int | None = field(default=None, metadata={ABSENT_MEANS: 0})
    lr: float = 1e-3
    # 10, not 100: a default (14-minute) run on a 2-core CPU took only 60-110 steps at batch 16 (hundreds at
    # today's smaller default batches), so 100 kept it in warm-up to the end. At the 15-minute demo's 57 prior
    # steps, warm-up 10 halved the prior's validation NLL (1.11 -> 0.61 bits/code) and lifted the VQ-VAE's test
    # SSIM at its 81 steps (0.68 -> 0.79; benchmarks/RESULTS.md).
    warmup_steps: int = 10
    # The learning rate falls linearly to 0 over this last share of the run (of its steps or of its minutes,
    # whichever ends it first): warm-up, constant, cool-down ("WSD", Hägele et al. 2024). At the demo's minutes
    # it took the prior's C2ST against reconstructions from 0.74 to 0.62 at equal NLL (benchmarks/RESULTS.md).
    # Configs written before it existed describe constant-rate runs.
    cooldown: float = field(default=0.2, metadata={ABSENT_MEANS: 0.0})
    weight_decay: float = 0.0
    max_grad_norm: float | None = MAX_GRAD_NORM  # gradients are clipped to this global norm (None: never)
    precision: str = "auto"  # "bf16" autocast (+ channels_last), "fp32", or "auto": bf16 where the hardware has it
    device: str = "auto"  # "auto" (cuda when present, else cpu), "cpu", "cuda", "cuda:N" or "mps"
    compile: str = "auto"  # torch.compile the network: "auto" (on CUDA only), "on" or "off"
    seed: int = 0
    val_images: int = 256  # validation subset per epoch (evenly spaced over the split)
    data_dir: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes recorded with the run

    def validate(self) -> None:
        _require(self.epochs >= 1, "epochs", "must be >= 1")
        _require(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1")
        _require(self.max_minutes is None or self.max_minutes > 0, "max_minutes", "must be > 0")
        _require(self.batch_size is None or self.batch_size >= 1, "batch_size", "must be >= 1")
        _require(self.warped_copies is None or 0 <= self.warped_copies <= MAX_WARPED_COPIES, "warped_copies",
                 f"must be in 0..{MAX_WARPED_COPIES}")
        _require(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        _require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _require(0 <= self.cooldown < 1, "cooldown", "must be in [0, 1)")
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        _require(self.precision in ("auto", "bf16", "fp32"), "precision", "must be 'auto', 'bf16' or 'fp32'")
        _require(is_device_name(self.device), "device", f"must be {DEVICE_NAMES}")
        _require(self.compile in ("auto", "on", "off"), "compile", "must be 'auto', 'on' or 'off'")
        _require(self.val_images >= 1, "val_images", "must be >= 1")
        _require(0 <= self.seed <= MAX_SEED, "seed", f"must be in 0..{MAX_SEED}")


def _require(condition: bool, key: str, problem: str) -> None:
    if not condition:
        raise ConfigError(f"{key} {problem}")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type[T], values: Any, *, source: str | Path = "config") -> T:
    """Build and validate `cls` from a plain dict; unknown keys and wrongly typed values are refused. A missing
    key takes the field's default, or what its absence means (`ABSENT_MEANS`) for keys added later."""
    if not isinstance(values, dict):
        raise ConfigError(f"expected a JSON object for {cls.__name__}", source)
    values = {f.name: f.metadata[ABSENT_MEANS] for f in dataclasses.fields(cls) if ABSENT_MEANS in f.metadata} | values
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} for {cls.__name__}", source)
    for key, value in values.items():
        if not _has_type(value, hints[key]):
            raise ConfigError(f"{key} = {value!r} is not of type {hints[key]}", source)
    config = cls(**values)
    try:
        config.validate()
    except ConfigError as error:
        raise ConfigError(error.problem, source) from None
    return config


def _has_type(value: Any, hint: Any) -> bool:
    """A JSON value against a dataclass field's type: int is accepted for float, bool is never an int."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def save_json(path: Path, values: dict[str, Any]) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    atomic_write_bytes(path, (json.dumps(values, indent=2, sort_keys=True) + "\n").encode())


def load_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError("file does not exist", path) from None
    except (OSError, ValueError, RecursionError) as error:
        # ValueError covers malformed JSON and numbers of more than 4300 digits; RecursionError, deep nesting.
        raise ConfigError(f"not valid JSON ({error})", path) from None
    if not isinstance(values, dict):
        raise ConfigError("expected a JSON object", path)
    return values
