import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from brainvq.metrics.samples import (
    c2st,
    fid,
    frechet_distance,
    mean_pairwise_ms_ssim,
    nearest_ssim,
    roc_auc,
)


def discs(count: int, seed: int, brightness: float = 0.8, size: int = 192) -> torch.Tensor:
    """Bright discs of random radius and position on black, [count, 1, size, size]."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.arange(size).float()
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    centres = size / 2 + (torch.rand(count, 2, generator=generator) - 0.5) * size / 4
    radii = size / 5 + torch.rand(count, generator=generator) * size / 8
    inside = (y - centres[:, 0, None, None]) ** 2 + (x - centres[:, 1, None, None]) ** 2 < radii[:, None, None] ** 2
    return (inside.float() * brightness).unsqueeze(1)


def test_roc_auc_of_perfect_reversed_and_tied_scores():
    labels = torch.tensor([1, 1, 0, 0])
    assert roc_auc(torch.tensor([0.9, 0.8, 0.2, 0.1]), labels) == 1.0
    assert roc_auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), labels) == 0.0
    assert roc_auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), labels) == 0.5


def subject_slices(subjects: range, per_subject: int = 4) -> torch.Tensor:
    """Discs whose brightness and size depend on a subject of their own (as scans differ between people), the
    subjects' own values drawn from one population: [len(subjects) * per_subject, 1, 96, 96]."""
    slices = []
    for subject in subjects:
        brightness = 0.6 + 0.2 * torch.rand(1, generator=torch.Generator().manual_seed(1000 + subject)).item()
        slices.append(discs(per_subject, seed=subject, brightness=brightness, size=96))
    return torch.cat(slices)


def test_c2st_scores_real_slices_of_unseen_subjects_near_chance():
    # Every set comes from the same population of subjects, but no subject appears in two sets: a classifier
    # that could only recognise subjects has nothing to go on, so the AUC must be near 0.5.
    training = subject_slices(range(0, 32))
    validation, test = subject_slices(range(32, 48)), subject_slices(range(48, 64))
    result = c2st((training[:64], validation), (training[64:], test), epochs=15)
    assert abs(result["auc"] - 0.5) < 0.12
    # A real bootstrap interval around it: 2 x 128 scored images give a 95% width of about 0.14 (0.13 here), so
    # an interval that collapsed (resampling without replacement) or ignored the data would fail.
    assert result["ci95"][0] <= result["auc"] <= result["ci95"][1]
    assert 0.05 < result["ci95"][1] - result["ci95"][0] < 0.3
    assert result["n_candidates"] == 128 and result["n_real"] == 128


def test_c2st_tells_a_different_set_apart_with_a_tight_interval():
    validation, test = subject_slices(range(32, 48)), subject_slices(range(48, 64))
    darker = discs(128, seed=99, brightness=0.2, size=96)  # same shapes, far darker: an easy tell
    result = c2st((darker[:64], validation), (darker[64:], test), epochs=15)
    assert result["auc"] > 0.9 and result["ci95"][0] > 0.8
    assert len(result["fold_aucs"]) == 2


def test_c2st_leaves_the_global_random_state_alone():
    validation, test = subject_slices(range(32, 36)), subject_slices(range(36, 40))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    c2st((validation, test), (test, validation), epochs=1, resamples=10)
    assert torch.equal(torch.rand(3), expected)


def test_pairwise_ms_ssim_is_one_for_copies_and_lower_for_varied_images():
    copies = discs(1, seed=0).expand(5, -1, -1, -1)
    assert mean_pairwise_ms_ssim(copies) == pytest.approx(1.0, abs=1e-5)
    assert mean_pairwise_ms_ssim(discs(6, seed=0)) < 0.95


def test_nearest_ssim_finds_a_copied_training_image():
    train = (discs(30, seed=3).squeeze(1).numpy() * 255).round().astype(np.uint8)
    copied = torch.from_numpy(train[[7, 21]].astype(np.float32) / 255).unsqueeze(1)
    new = discs(2, seed=4, brightness=0.5)
    nearest = nearest_ssim(torch.cat([copied, new]), train)
    assert nearest[:2].tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert (nearest[2:] < 0.999).all()


def test_frechet_distance_of_gaussians_with_shifted_means():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(4000, 3))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    shifted = features + np.array([3.0, 0.0, 4.0])  # same covariance: the distance is |shift|^2 = 25
    assert frechet_distance(features, shifted) == pytest.approx(25.0, rel=1e-6)


def test_frechet_distance_of_gaussian_samples_approaches_the_closed_form():
    # Two Gaussians with correlated, non-commuting covariances: FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)),
    # here 18.46, from the population parameters with scipy's sqrtm. With 20,000 samples a side the estimate is
    # within about 0.5% (seeded, so it is always the same draw); shortcuts that would be exact only for
    # commuting covariances, such as Tr(sqrt(S1) sqrt(S2)), are 3.6% off.
    rng = np.random.default_rng(2)
    root_1, root_2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6)) * 0.5
    cov_1, cov_2 = root_1 @ root_1.T + 0.1 * np.eye(6), root_2 @ root_2.T + 0.1 * np.eye(6)
    mean_1 = rng.normal(size=6)
    mean_2 = mean_1 + 0.5
    expected = 6 * 0.5**2 + np.trace(cov_1 + cov_2 - 2 * scipy.linalg.sqrtm(cov_1 @ cov_2).real)
    features_1 = rng.multivariate_normal(mean_1, cov_1, size=20_000)
    features_2 = rng.multivariate_normal(mean_2, cov_2, size=20_000)
    assert frechet_distance(features_1, features_2) == pytest.approx(expected, rel=0.015)
    # Identical sets are at 0; a shifted copy (same covariance) exactly at the squared length of the shift.
    assert frechet_distance(features_1, features_1) == pytest.approx(0.0, abs=1e-9)
    shift = np.arange(6.0)
    assert frechet_distance(features_1, features_1 + shift) == pytest.approx((shift**2).sum(), rel=1e-9)


@pytest.mark.parametrize(("count_a", "count_b"), [(40, 30), (5, 6), (40, 4)])  # more, fewer and mixed vs D = 8
def test_frechet_distance_equals_the_definition_with_singular_covariances_too(count_a, count_b):
    rng = np.random.default_rng(1)
    features_a = rng.normal(size=(count_a, 8)) @ rng.normal(size=(8, 8))
    features_b = rng.normal(size=(count_b, 8)) * 0.7 + 0.3
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    # Tr sqrt(S_a S_b) straight from the eigenvalues of the (non-symmetric) product
    root_trace = np.sqrt(np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)).sum()
    mean_term = ((features_a.mean(0) - features_b.mean(0)) ** 2).sum()
    expected = mean_term + np.trace(cov_a) + np.trace(cov_b) - 2 * root_trace
    assert frechet_distance(features_a, features_b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(features_b, features_a) == pytest.approx(expected, rel=1e-6)


def test_fid_with_a_tiny_feature_extractor():
    extractor = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten())  # [B, 1, H, W] -> [B, 16]
    real, alike, darker = discs(64, seed=0), discs(64, seed=1), discs(64, seed=2, brightness=0.4)
    assert fid(real, real, extractor) == pytest.approx(0.0, abs=1e-6)
    assert fid(real, alike, extractor) < fid(real, darker, extractor)
