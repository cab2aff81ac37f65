"""A synthetic default cohort in the OASIS layout, made from the MNI152 template that ships with nilearn.

Nothing is downloaded. Each pseudo-subject is the (already skull-stripped) MNI152 2009 T1 template changed by
a random affine (rotation, per-axis scale, in-plane shift: brains differ in size and position as in real
scans), a smooth non-linear deformation, its own grey/white matter/CSF contrast and gamma, a smooth
multiplicative bias field and Rician noise inside the brain. The background stays exactly 0, like OASIS.

Every slice gets an OASIS-style segmentation mask too: the template's CSF, grey and white matter maps are
sampled through the very same mapping as the T1 and each brain pixel takes the most probable of the three.

Speed: the template is never warped as a whole. For each case only the 32 x 256 x 256 output pixels are
mapped back into the template (affine plus displacement) and interpolated there, once.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from brainvq.data.layout import (
    IMAGE_SIZE,
    SLICES_PER_CASE,
    SPLITS,
    mask_folder,
    mask_pixels,
    split_folder,
    staged_layout,
    write_case,
)
from brainvq.data.volumes import foreground_box, foreground_points, framed_grid, load_volume, scale_to_uint8
from brainvq.errors import ConfigError, DataError

_TEMPLATE_FILES = {tissue: f"mni_icbm152_{tissue}_tal_nlin_sym_09a_converted.nii.gz" for tissue in ("t1", "gm", "wm")}


@dataclass(frozen=True)
class _Template:
    """The MNI152 template cropped to the brain: T1 (float32, 0..1, 0 outside the brain) and tissue maps."""

    t1: np.ndarray
    grey: np.ndarray  # grey matter probability, 0..1
    white: np.ndarray  # white matter probability, 0..1
    csf: np.ndarray  # the rest of the brain mask, 0..1
    zooms: np.ndarray  # voxel size in mm, [3]
    brain_points: np.ndarray  # mm coordinates of brain voxels (see foreground_points), [3, M]
    box: np.ndarray  # the brain's foreground_box, [3, 2]


@dataclass(frozen=True)
class _Subject:
    """One pseudo-subject's random draw (see :func:`_draw_subject`)."""

    inverse_affine: np.ndarray  # subject mm -> template mm, about the centre of the template's brain, [3, 3]
    shift: np.ndarray  # the subject's displacement from the template in mm, [3]
    tissue_shifts: tuple[float, float, float]  # added to grey, white, CSF intensity (T1 range 0..1)
    gamma: float
    noise: float  # Rician noise level as a share of the brain's robust maximum
    robust_max: float  # 8-bit value of the brain's 99.5th intensity percentile


def make_demo_cohort(
    out_dir: str | Path,
    *,
    train_cases: int = 40,
    val_cases: int = 5,
    test_cases: int = 5,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Write a synthetic cohort in the OASIS layout (256x256 8-bit PNGs, 32 slices per case) to ``out_dir``.

    Each slice's segmentation mask (see :func:`_tissue_labels`) goes to ``keras_png_slices_seg_<split>``.

    Cases are numbered consecutively across splits (train first), as OASIS uses disjoint case numbers per
    split. Case k's images depend only on ``seed`` and k, so the same seed always gives the same bytes. The
    cohort is built in a temporary folder and renamed into place at the end; a non-empty ``out_dir`` is
    refused.

    Returns ``{"cases": {split: n}, "slices": {split: n}, "seconds": float, "brain_coverage": float}``, the
    coverage being the mean share of non-zero pixels in the middle slice of each case.
    """
    counts = dict(zip(SPLITS, (train_cases, val_cases, test_cases), strict=True))
    if min(counts.values()) < 1:
        raise ConfigError(f"every split needs at least one demo case, got {counts}")
    start = time.perf_counter()
    template = _load_template()
    splits = [split for split, count in counts.items() for _ in range(count)]
    case_seeds = np.random.SeedSequence(seed).spawn(len(splits))
    coverages = []
    with staged_layout(out_dir, masks=True) as staging:
        for case_number, (split, case_seed) in enumerate(
            tqdm(list(zip(splits, case_seeds, strict=True)), desc="demo", unit="case", disable=not progress), start=1
        ):
            slices, masks = _synthesize_case(template, np.random.default_rng(case_seed))
            write_case(split_folder(staging, split), case_number, slices)
            write_case(mask_folder(staging, split), case_number, masks, prefix="seg")
            coverages.append(np.count_nonzero(slices[len(slices) // 2]) / slices[0].size)
    return {
        "cases": counts,
        "slices": {split: count * SLICES_PER_CASE for split, count in counts.items()},
        "seconds": time.perf_counter() - start,
        "brain_coverage": float(np.mean(coverages)),
    }


def template_folder() -> Path:
    """The folder inside the installed nilearn package that holds the MNI152 template files."""
    # find_spec locates nilearn without importing it (importing it is slow and pulls in much of sklearn).
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("nilearn is not installed; the demo cohort is made from the MNI152 template it ships")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def _load_template() -> _Template:
    volumes = {tissue: load_volume(template_folder() / name) for tissue, name in _TEMPLATE_FILES.items()}
    mask = volumes["t1"].data > 0  # the template is skull-stripped: exactly 0 outside the brain
    box = ndimage.find_objects(mask.astype(np.uint8))[0]  # cropping to the brain halves the work per case
    t1, grey, white = (volume.data[box] / volume.data.max() for volume in volumes.values())
    brain_points = foreground_points(mask[box], volumes["t1"].zooms)
    return _Template(
        t1=t1,
        grey=grey,
        white=white,
        csf=np.clip(mask[box] - grey - white, 0, 1),
        zooms=np.asarray(volumes["t1"].zooms, dtype=np.float32),
        brain_points=brain_points,
        box=foreground_box(brain_points),
    )


def _draw_subject(rng: np.random.Generator) -> _Subject:
    rotation = Rotation.from_euler("xyz", rng.uniform(-5, 5, size=3), degrees=True).as_matrix()
    scale = rng.uniform(0.9, 1.1, size=3)
    return _Subject(
        inverse_affine=rotation @ np.diag(1 / scale),
        # In-plane only: the slices follow each brain's own inferior-superior extent anyway.
        shift=np.array([*rng.uniform(-12, 12, size=2), 0.0]),
        tissue_shifts=(rng.uniform(-0.08, 0.08), rng.uniform(-0.05, 0.1), rng.uniform(-0.2, 0.0)),
        gamma=rng.uniform(0.9, 1.6),
        noise=rng.uniform(0.01, 0.03),
        robust_max=rng.uniform(230, 255),
    )


def _synthesize_case(
    template: _Template, rng: np.random.Generator, n_slices: int = SLICES_PER_CASE, size: int = IMAGE_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """One pseudo-subject's axial slices and their masks, both uint8 [n_slices, size, size]."""
    subject = _draw_subject(rng)
    centre = template.box.mean(axis=1)
    subject_centre = centre + subject.shift
    affine = np.linalg.inv(subject.inverse_affine)  # template -> subject, about the centre
    subject_points = affine @ (template.brain_points - centre[:, None]) + subject_centre[:, None]
    # Framed like the template in-plane, so that subjects differ in size and position as real scans do, but
    # sliced over their own inferior-superior extent.
    grid = framed_grid(np.vstack([template.box[:2], foreground_box(subject_points)[2:]]), n_slices, size)
    template_mm = (
        np.einsum("ij,j...->i...", subject.inverse_affine, grid - subject_centre[:, None, None, None])
        + centre[:, None, None, None]
        + _smooth_field(rng, grid.shape[1:], controls=(5, 8, 8), amplitude=2.5, channels=3)
    )
    grey_shift, white_shift, csf_shift = subject.tissue_shifts
    tissue = template.t1 + grey_shift * template.grey + white_shift * template.white + csf_shift * template.csf
    # Keep the brain strictly positive so that "> 0" after sampling still marks it.
    tissue = np.where(template.t1 > 0, np.maximum(tissue, 0.02), 0).astype(np.float32)
    voxels = template_mm / template.zooms[:, None, None, None]
    values = ndimage.map_coordinates(tissue, voxels, order=1, mode="constant", cval=0.0)
    brain = values > 0
    bias = np.exp(_smooth_field(rng, values.shape, controls=(3, 4, 4), amplitude=0.1)[0])
    values = values**subject.gamma * bias
    sigma = subject.noise * np.percentile(values[brain], 99.5)
    noise = rng.standard_normal((2, *values.shape), dtype=np.float32) * sigma
    values = np.where(brain, np.hypot(values + noise[0], noise[1]), 0)  # Rician: magnitude of complex noise
    images = scale_to_uint8(values, 0, np.percentile(values[brain], 99.5) * 255 / subject.robust_max)
    # The background is where the image is 0, not where the sampled template was: brain pixels that round to
    # 0 would otherwise be labelled tissue on a black image.
    return images, _tissue_labels(template, voxels, images > 0)


def _tissue_labels(template: _Template, voxels: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """The segmentation mask of a case's slices, uint8 [n_slices, H, W] of :data:`MASK_VALUES`.

    ``voxels`` (float [3, n_slices, H, W]) are the template voxel coordinates the T1 was sampled at, so the
    labels follow the case's affine and deformation exactly. Each pixel of ``brain`` (bool [n_slices, H, W])
    gets the most probable of CSF, grey and white matter; the rest is background.
    """
    # No random draws here: the images of a seed stay what they were before cases had masks.
    probabilities = np.stack(
        [
            ndimage.map_coordinates(tissue, voxels, order=1, mode="constant", cval=0.0)
            for tissue in (template.csf, template.grey, template.white)
        ]
    )
    return mask_pixels(np.where(brain, probabilities.argmax(axis=0) + 1, 0))


def _smooth_field(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    controls: tuple[int, ...],
    amplitude: float,
    channels: int = 1,
) -> np.ndarray:
    """A random smooth field (float32 [channels, *shape]) with standard deviation ``amplitude`` everywhere.

    Gaussian bumps on a grid of ``controls`` points per axis, each with a random weight; separable, so it is
    evaluated axis by axis instead of at every point.
    """
    field = rng.normal(0, amplitude, size=(channels, *controls)).astype(np.float32)
    for axis, (length, count) in enumerate(zip(shape, controls, strict=True), start=1):
        centres = np.linspace(0, length - 1, count)
        spacing = (length - 1) / (count - 1)
        weights = np.exp(-0.5 * ((np.arange(length)[:, None] - centres) / spacing) ** 2)
        # Unit-norm rows make every point a unit-variance mix of the weights, so the std is `amplitude`.
        weights /= np.linalg.norm(weights, axis=1, keepdims=True)
        field = np.moveaxis(np.tensordot(field, weights.astype(np.float32), axes=(axis, 1)), -1, axis)
    return field
