"""Segmentation transfer, "train on synthetic, test on real": do generated slices with their label maps teach a
segmentation network as well as real ones do?

The same small U-Net is trained three ways, with the same budget, and scored by per-class Dice on the real test
split (background excluded, accumulated over all pixels, brainvq.metrics.segmentation):

1. `real`: on the real training pairs (the train split of --data and its tissue masks),
2. `generated`: on the generated pairs of --samples (as `brainvq sample RUN --n N --out DIR` writes them:
   `sample_0000_slice_12.png` with its label map `sample_0000_slice_12_seg.png`, OASIS values 0/85/170/255),
3. `real+generated`: on both, every batch half real and half generated.

Same budget: the same number of optimizer steps, batch size, crop size, learning-rate schedule (AdamW, linear
warm-up then cosine decay to 0), seed (so the same initial weights and the same random stream for batches,
crops and flips) and architecture in all three arms. Model selection: the weights after the last step, in every
arm; neither the test nor the validate split is looked at during training.

Training batches are random 128x128 crops (placed over the brain's bounding box) of whole slices, flipped left-right
at random; the test is on whole 256x256 slices (the network is fully convolutional). Crops make a step about 4x
cheaper than whole slices, most of which is background. Loss: cross-entropy weighted by 1/sqrt(class share) plus
soft Dice of the three tissues.
fp32 on a CPU without native bf16 (emulated bf16 is several times slower there, benchmarks/RESULTS.md), bf16
autocast on CUDA; channels_last everywhere.

Target: generated/real of mean Dice >= 0.80. Run from the repository root:

    python benchmarks/segmentation_transfer.py --data DATA --samples SAMPLES [--steps 150] [--batch-size 16]
        [--seed 0] [--device auto] [--limit-generated N] [--json PATH] [--quick]

Until the generator writes samples, a stand-in folder of real pairs in the samples' naming (e.g. the validate
split's) can be made with `--make-stand-in validate`, which writes it to --samples and exits.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import CpuShare, add_output_arguments, environment, json_path, table, verdict, write_json
from PIL import Image
from torch import Tensor, nn

from brainvq.data.dataset import load_split
from brainvq.data.layout import MASK_VALUES, case_sort_key, read_mask, read_slice
from brainvq.errors import DataError
from brainvq.metrics.segmentation import TISSUE_NAMES, DiceCounter
from brainvq.run import SAMPLE_MASK_SUFFIX, sample_mask_path, sample_path
from brainvq.runtime import autocast, resolve_device, resolve_precision, seed_everything

CLASSES = len(MASK_VALUES)
TARGET_RATIO = 0.80
ARMS = ("real", "generated", "real+generated")
# A generated slice or its label map: <anything>_slice_<S>.png or <anything>_slice_<S>_seg.png.
_SAMPLE_NAME = re.compile(rf"(?P<stem>.+_slice_\d+)(?P<seg>{SAMPLE_MASK_SUFFIX})?\.png")


@dataclass(frozen=True)
class Settings:
    """The training budget and recipe, identical for every arm."""

    steps: int = 150
    batch_size: int = 16
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    crop: int = 128  # side of the square training crops; 0: whole slices
    width: int = 16  # channels of the U-Net's first level, doubled per level
    levels: int = 4
    seed: int = 0


@dataclass
class Pairs:
    """Slices and their label maps: uint8 [N, 256, 256] images and class indices 0..3."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


# --- data ---------------------------------------------------------------------------------------------------


def real_pairs(data_dir: Path, split: str) -> Pairs:
    """One split of a labelled data set (memory-mapped through brainvq's slice cache)."""
    slices = load_split(data_dir, split, progress=True)
    if slices.labels is None:
        raise DataError(f"the {split} split has no tissue masks (keras_png_slices_seg_{split})", data_dir)
    return Pairs(slices.images, slices.labels)


def generated_files(folder: Path) -> list[tuple[Path, Path]]:
    """(image, label map) of every generated pair in `folder`, in natural name order.

    Files named `<x>_slice_<S>.png` and `<x>_slice_<S>_seg.png` are paired by name; other files are ignored. A
    slice without its label map or a label map without its slice is a DataError naming the file."""
    if not folder.is_dir():
        raise DataError("samples folder does not exist", folder)
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    for path in folder.iterdir():
        if match := _SAMPLE_NAME.fullmatch(path.name):
            (masks if match["seg"] else images)[match["stem"]] = path
    for stem, mask in sorted(masks.items()):
        if stem not in images:
            raise DataError(f"label map has no slice beside it ({stem}.png is missing)", mask)
    for stem, image in sorted(images.items()):
        if stem not in masks:
            raise DataError(f"slice has no label map beside it ({stem}_seg.png is missing)", image)
    if not masks:
        raise DataError("no generated pairs (<name>_slice_<S>.png with <name>_slice_<S>_seg.png)", folder)
    return [(images[stem], masks[stem]) for stem in sorted(masks, key=case_sort_key)]


def read_generated(folder: Path, limit: int | None = None) -> Pairs:
    """The first `limit` (all if None) generated pairs of `folder`, decoded; a label map holding values other
    than 0/85/170/255, or a slice that is not 256x256, is a DataError naming the file."""
    files = generated_files(folder)[:limit]
    images = np.stack([read_slice(image) for image, _ in files])
    labels = np.stack([read_mask(mask) for _, mask in files])
    return Pairs(images, labels)


def write_pairs(pairs: Pairs, out: Path) -> None:
    """Write pairs in the generator's naming (`sample_0000_slice_0.png` and `..._seg.png`, OASIS mask values):
    a stand-in samples folder made of real pairs, for testing this benchmark before generated ones exist."""
    out.mkdir(parents=True, exist_ok=True)
    values = np.array(MASK_VALUES, dtype=np.uint8)
    for i, (image, label) in enumerate(zip(pairs.images, pairs.labels, strict=True)):
        path = sample_path(out, i, i % 32)
        Image.fromarray(np.asarray(image)).save(path)
        Image.fromarray(values[np.asarray(label)]).save(sample_mask_path(path))


def brain_boxes(images: np.ndarray) -> np.ndarray:
    """[N, 4] int (row0, row1, col0, col1), half-open, of each image's non-zero pixels (the whole image if none)."""
    boxes = np.empty((len(images), 4), dtype=np.int64)
    for i, image in enumerate(images):
        rows, cols = np.flatnonzero(np.asarray(image).any(1)), np.flatnonzero(np.asarray(image).any(0))
        if len(rows) == 0:
            rows = cols = np.array([0, image.shape[0] - 1])
        boxes[i] = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return boxes


# --- batches ------------------------------------------------------------------------------------------------


class BatchStream:
    """Training batches drawn from one or more sources of pairs: each batch takes an equal share of every source
    (the remainder going to the first ones), each source is walked in reshuffled epochs; random crops over the
    brain and left-right flips. Everything random comes from one seeded numpy generator."""

    def __init__(self, sources: Sequence[Pairs], settings: Settings) -> None:
        if not sources or any(len(source) == 0 for source in sources):
            raise ValueError("every source of training pairs must hold at least one pair")
        self.sources, self.settings = sources, settings
        self.random = np.random.default_rng(settings.seed)
        self.boxes = [brain_boxes(source.images) for source in sources]
        self.orders: list[list[int]] = [[] for _ in sources]
        share, extra = divmod(settings.batch_size, len(sources))
        self.shares = [share + (i < extra) for i in range(len(sources))]

    def _next_index(self, source: int) -> int:
        if not self.orders[source]:
            self.orders[source] = self.random.permutation(len(self.sources[source])).tolist()
        return self.orders[source].pop()

    def _crop(self, box: np.ndarray, size: int, side: int) -> tuple[int, int]:
        """Top-left corner of a `side` crop of a `size` image, as much over the box (row0, row1, col0, col1) as fits."""
        corner = []
        for low, high in (box[:2], box[2:]):
            first, last = sorted((low, high - side))
            first, last = max(0, min(first, size - side)), max(0, min(last, size - side))
            corner.append(int(self.random.integers(first, last + 1)))
        return corner[0], corner[1]

    def next(self) -> tuple[Tensor, Tensor, list[int]]:
        """(images float32 [B, 1, S, S] in [0, 1], labels int64 [B, S, S], source of each item)."""
        images, labels, origins = [], [], []
        for source, count in enumerate(self.shares):
            pairs = self.sources[source]
            for _ in range(count):
                index = self._next_index(source)
                image, label = np.asarray(pairs.images[index]), np.asarray(pairs.labels[index])
                side = self.settings.crop or image.shape[0]
                top, left = self._crop(self.boxes[source][index], image.shape[0], side)
                image, label = image[top:top + side, left:left + side], label[top:top + side, left:left + side]
                if self.random.random() < 0.5:
                    image, label = image[:, ::-1], label[:, ::-1]
                images.append(image)
                labels.append(label)
                origins.append(source)
        images_tensor = torch.from_numpy(np.stack(images)).float().div_(255).unsqueeze(1)
        return images_tensor, torch.from_numpy(np.stack(labels).astype(np.int64)), origins


# --- model --------------------------------------------------------------------------------------------------


def conv_block(inputs: int, outputs: int) -> nn.Sequential:
    """Two 3x3 convolutions, each with BatchNorm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True),
        nn.Conv2d(outputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """A small U-Net: `levels` resolutions of `width * 2**level` channels (max-pooling down, bilinear up, skip
    connections by concatenation), 4-class logits at the input's resolution (its sides divisible by
    2**(levels - 1))."""

    def __init__(self, width: int = 16, levels: int = 4, classes: int = CLASSES) -> None:
        super().__init__()
        widths = [width * 2**level for level in range(levels)]
        self.down = nn.ModuleList(conv_block(inputs, outputs)
                                  for inputs, outputs in zip([1, *widths[:-1]], widths, strict=True))
        self.up = nn.ModuleList(conv_block(widths[level] + widths[level + 1], widths[level])
                                for level in reversed(range(levels - 1)))
        self.head = nn.Conv2d(widths[0], classes, 1)

    def forward(self, images: Tensor) -> Tensor:
        skips = []
        features = images
        for level, block in enumerate(self.down):
            features = block(features if level == 0 else F.max_pool2d(features, 2))
            skips.append(features)
        skips.pop()  # the deepest level's features are `features` itself
        for block in self.up:
            skip = skips.pop()
            upsampled = F.interpolate(features, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            features = block(torch.cat([skip, upsampled], 1))
        return self.head(features)


def class_weights(sources: Sequence[Pairs]) -> Tensor:
    """Cross-entropy weight of each class: 1 / sqrt(its share of the training pixels), scaled to mean 1.

    Without it the U-Net learned grey and white matter but never predicted CSF, the smallest class, within the
    default budget (Dice 0 on the demo cohort). Computed from each arm's own training pairs."""
    counts = sum(np.bincount(np.asarray(source.labels).ravel(), minlength=CLASSES) for source in sources)
    weights = 1 / np.sqrt(np.maximum(counts, 1) / counts.sum())
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def segmentation_loss(logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """Cross-entropy (with class `weights`) plus (1 - soft Dice) averaged over the three tissues (background
    left out, as in scoring)."""
    logits = logits.float()
    probabilities = logits.softmax(1)[:, 1:]
    truth = F.one_hot(labels, CLASSES).permute(0, 3, 1, 2)[:, 1:].float()
    overlap = (probabilities * truth).sum((0, 2, 3))
    total = probabilities.sum((0, 2, 3)) + truth.sum((0, 2, 3))
    soft_dice = (2 * overlap + 1) / (total + 1)
    return F.cross_entropy(logits, labels, weight=weights) + (1 - soft_dice).mean()


def learning_rate_factor(step: int, settings: Settings) -> float:
    """Linear warm-up over the first `warmup_fraction` of the steps, then cosine decay to 0 at the last."""
    warmup = max(1, round(settings.warmup_fraction * settings.steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, settings.steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


# --- training and scoring -----------------------------------------------------------------------------------


def train(sources: Sequence[Pairs], settings: Settings, device: torch.device,
          progress: bool = False) -> tuple[UNet, dict[str, Any]]:
    """Train a fresh U-Net (initial weights from `settings.seed`) for exactly `settings.steps` steps on batches of
    `sources`; returns the model after the last step and a record of what was done."""
    precision = resolve_precision("auto", device)
    seed_everything(settings.seed)
    model = UNet(settings.width, settings.levels).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, settings))
    batches = BatchStream(sources, settings)
    weights = class_weights(sources).to(device)
    model.train()
    losses, per_source = [], [0] * len(sources)
    started = time.perf_counter()
    report_every = max(1, settings.steps // 6)
    for step in range(settings.steps):
        images, labels, origins = batches.next()
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(images)
        loss = segmentation_loss(logits, labels.to(device, non_blocking=True), weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        for origin in origins:
            per_source[origin] += 1
        if progress and (step + 1) % report_every == 0:
            print(f"  step {step + 1}/{settings.steps}: loss {np.mean(losses[-report_every:]):.3f}, "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    record = {"steps": len(losses), "precision": precision, "train_seconds": time.perf_counter() - started,
              "pairs_seen_per_source": per_source, "first_loss": losses[0], "last_losses": losses[-10:],
              "final_learning_rate": schedule.get_last_lr()[0], "class_weights": weights.tolist()}
    return model, record


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 16) -> np.ndarray:
    """Class indices uint8 [N, H, W] of whole uint8 slices [N, H, W]."""
    precision = resolve_precision("auto", device)
    model.eval()
    predictions = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.array(images[start:start + batch_size])).float().div_(255).unsqueeze(1)
        with autocast(device, precision):
            logits = model(batch.to(device).contiguous(memory_format=torch.channels_last))
        predictions.append(logits.argmax(1).to(torch.uint8).cpu().numpy())
    return np.concatenate(predictions)


def score(model: nn.Module, test: Pairs, device: torch.device, batch_size: int = 16) -> dict[str, float]:
    """Per-tissue and mean Dice of the model's predictions against the test label maps."""
    counter = DiceCounter()
    for start in range(0, len(test), batch_size):
        predicted = predict(model, test.images[start:start + batch_size], device, batch_size)
        counter.update(torch.from_numpy(predicted), torch.from_numpy(np.array(test.labels[start:start + batch_size])))
    return counter.compute()


def run_arms(real: Pairs, generated: Pairs, test: Pairs, settings: Settings, device: torch.device,
             arms: Sequence[str] = ARMS, progress: bool = False) -> dict[str, dict[str, Any]]:
    """Train and score each arm in turn: {arm: {"dice": {...}, "train": record, "test_seconds": s, "pairs": n}}."""
    sources = {"real": [real], "generated": [generated], "real+generated": [real, generated]}
    results = {}
    for arm in arms:
        print(f"training on {arm} ({settings.steps} steps)...", flush=True)
        model, record = train(sources[arm], settings, device, progress)
        started = time.perf_counter()
        dice = score(model, test, device)
        test_seconds = time.perf_counter() - started
        results[arm] = {"pairs": sum(len(source) for source in sources[arm]), "dice": dice, "train": record,
                        "test_seconds": test_seconds, "seconds": record["train_seconds"] + test_seconds}
        print(f"  {arm}: mean Dice {dice['dice_mean']:.3f}, {results[arm]['seconds']:.0f} s", flush=True)
    return results


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Mean Dice of the generated and the real+generated arms relative to the real arm's."""
    real = results["real"]["dice"]["dice_mean"]
    return {f"{arm}/real": results[arm]["dice"]["dice_mean"] / real if real > 0 else math.nan
            for arm in ARMS[1:] if arm in results}


# --- command ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="labelled data set (train and test splits with masks)")
    parser.add_argument("--samples", type=Path, required=True,
                        help="folder of generated pairs: <x>_slice_<S>.png with <x>_slice_<S>_seg.png")
    parser.add_argument("--steps", type=int, default=Settings.steps, help=f"optimizer steps per arm "
                        f"(default {Settings.steps}: the whole benchmark took 12.8 min on 2 shared AMD EPYC cores, "
                        "about 0.9-1 s a step when they were idle)")
    parser.add_argument("--batch-size", type=int, default=Settings.batch_size)
    parser.add_argument("--seed", type=int, default=Settings.seed)
    parser.add_argument("--learning-rate", type=float, default=Settings.learning_rate, help="peak learning rate")
    parser.add_argument("--crop", type=int, default=Settings.crop, help="side of the training crops (0: whole slices)")
    parser.add_argument("--width", type=int, default=Settings.width, help="channels of the U-Net's first level")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--limit-generated", type=int, default=None, metavar="N", help="use the first N pairs only")
    parser.add_argument("--make-stand-in", choices=["train", "validate", "test"], default=None, metavar="SPLIT",
                        help="write SPLIT's real pairs to --samples in the generator's naming, then exit (a "
                             "stand-in for generated samples; validate is the sensible choice)")
    add_output_arguments(parser, "segmentation_transfer")
    args = parser.parse_args()
    if args.make_stand_in:
        write_pairs(real_pairs(args.data, args.make_stand_in), args.samples)
        print(f"wrote the {args.make_stand_in} split's pairs to {args.samples}")
        return
    env = environment(args)
    device = resolve_device(args.device)
    settings = Settings(steps=3 if args.quick else args.steps, batch_size=args.batch_size, seed=args.seed,
                        learning_rate=args.learning_rate, crop=args.crop, width=args.width)
    command = shlex.join(["python", *sys.argv])
    print(command)

    real, test = real_pairs(args.data, "train"), real_pairs(args.data, "test")
    generated = read_generated(args.samples, 4 if args.quick else args.limit_generated)
    if args.quick:
        test = Pairs(test.images[:8], test.labels[:8])
    print(f"training pairs: {len(real)} real, {len(generated)} generated, {len(real) + len(generated)} "
          f"real+generated; test pairs (real): {len(test)}; device {device}")
    with CpuShare() as share:
        results = run_arms(real, generated, test, settings, device, progress=True)
    relative = ratios(results)

    print(f"\nsegmentation transfer: {env['machine']}, torch {env['torch']}, {env['threads']} threads; "
          f"{settings.steps} steps of {settings.batch_size} {settings.crop}x{settings.crop} crops per arm, "
          f"weights after the last step; Dice on the real test split")
    rows = [[arm, results[arm]["pairs"], *(results[arm]["dice"][f"dice_{name}"] for name in TISSUE_NAMES),
             results[arm]["dice"]["dice_mean"],
             1.0 if arm == "real" else relative[f"{arm}/real"], results[arm]["seconds"]] for arm in ARMS]
    print(table(["trained on", "pairs", "Dice CSF", "Dice GM", "Dice WM", "Dice mean", "mean / real", "seconds"],
                rows))
    holds = relative["generated/real"] >= TARGET_RATIO
    print(f"generated/real {relative['generated/real']:.3f}, (real+generated)/real "
          f"{relative['real+generated/real']:.3f}")
    print(f"target: generated/real of mean Dice >= {TARGET_RATIO}: {verdict(holds)}")
    print(share.line())
    write_json(json_path(args, "segmentation_transfer"), {
        "benchmark": "segmentation_transfer", **env, "command": command, "quick": args.quick,
        "device": str(device), "data": str(args.data), "samples": str(args.samples),
        "settings": asdict(settings), "model_selection": "weights after the last step (no split consulted)",
        "pairs": {"real": len(real), "generated": len(generated), "test": len(test)},
        "cpu_share": share.record(), "arms": results, "ratios": relative,
        "target": {"name": f"generated/real of mean Dice >= {TARGET_RATIO}", "holds": holds}})


if __name__ == "__main__":
    main()
