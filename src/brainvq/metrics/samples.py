"""How good, how varied and how new generated slices are, measured against real ones.

- `c2st`: a subject-disjoint classifier two-sample test. A small CNN learns to tell generated from real slices of
  some subjects and is scored on other samples against real slices of other subjects; its ROC AUC is 0.5 when
  it cannot tell them apart and 1.0 when it always can.
- `mean_pairwise_ms_ssim`: diversity; lower means more varied. Compare samples with real slices.
- `nearest_ssim`: memorisation; for each image, SSIM to its most similar training slice. Samples that copy the
  training set score higher than real held-out slices do.
- `frechet_distance` / `fid`: Fréchet distance between feature statistics (FID with Inception features).

Images are float tensors [N, 1, H, W] in [0, 1]; training slices may be a uint8 array [M, H, W] (a memmap).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brainvq.metrics.image import ms_ssim, ssim
from brainvq.metrics.small_cnn import downsample, predict, train_small_cnn


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve of `scores` [N] for binary `labels` [N] (Mann-Whitney U, ties counted half)."""
    positive, negative = scores[labels == 1], scores[labels == 0]
    greater = (positive[:, None] > negative[None, :]).float().sum()
    ties = (positive[:, None] == negative[None, :]).float().sum()
    return float((greater + 0.5 * ties) / (len(positive) * len(negative)))


def c2st(first: tuple[Tensor, Tensor], second: tuple[Tensor, Tensor], *, epochs: int = 30, seed: int = 0,
         resamples: int = 1000) -> dict[str, Any]:
    """Subject-disjoint classifier two-sample test of candidates against real slices.

    `first` and `second` are (candidates [N, 1, H, W], real [M, 1, H, W]) with the real slices of each group from
    subjects of their own (the validation split and the test split). A SmallCNN learns to tell candidates from
    real slices on one group and is scored on the other; then the roles swap. The real slices it is scored on
    come from subjects it never trained on, so it cannot score above chance by recognising subjects.

    Returns {"auc": mean ROC AUC of the two scorings (0.5: indistinguishable, 1.0: always told apart),
    "ci95": bootstrap 95% interval of that mean (scored images resampled within each class), "fold_aucs",
    "n_candidates", "n_real"}."""
    scored = []
    for fold, (train_group, test_group) in enumerate(((first, second), (second, first))):
        images, labels = _labelled(*train_group)
        classifier = train_small_cnn(images, labels, loss="logistic", epochs=epochs, seed=seed * 1000 + fold)
        test_images, test_labels = _labelled(*test_group)
        scored.append((predict(classifier, test_images), test_labels))
    aucs = [roc_auc(scores, labels) for scores, labels in scored]
    generator = torch.Generator().manual_seed(seed)
    resampled = [float(np.mean([roc_auc(*_resample(scores, labels, generator)) for scores, labels in scored]))
                 for _ in range(resamples)]
    return {"auc": float(np.mean(aucs)), "ci95": [float(v) for v in np.percentile(resampled, [2.5, 97.5])],
            "fold_aucs": aucs, "n_candidates": len(first[0]) + len(second[0]), "n_real": len(first[1]) + len(second[1])}


def _labelled(candidates: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
    """Downsampled images of both sets and their labels (candidates 0, real 1)."""
    return (downsample(torch.cat([candidates, real])),
            torch.cat([torch.zeros(len(candidates)), torch.ones(len(real))]))


def _resample(scores: Tensor, labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A bootstrap resample of (scores, labels), drawn with replacement within each class."""
    chosen = []
    for label in (0, 1):
        members = (labels == label).nonzero().squeeze(1)
        chosen.append(members[torch.randint(len(members), (len(members),), generator=generator)])
    chosen = torch.cat(chosen)
    return scores[chosen], labels[chosen]


@torch.no_grad()
def mean_pairwise_ms_ssim(images: Tensor, *, max_pairs: int = 500, seed: int = 0) -> float:
    """Mean MS-SSIM over pairs of distinct images [N, 1, H, W] (a random subset of `max_pairs` pairs)."""
    pairs = list(itertools.combinations(range(len(images)), 2))
    if len(pairs) > max_pairs:
        chosen = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:max_pairs]
        pairs = [pairs[index] for index in chosen.tolist()]
    first, second = (torch.tensor(side) for side in zip(*pairs, strict=True))
    values = torch.cat([ms_ssim(images[a], images[b]) for a, b in zip(first.split(64), second.split(64),
                                                                         strict=True)])
    return float(values.mean())


@torch.no_grad()
def nearest_ssim(queries: Tensor, references: np.ndarray, *, shortlist: int = 16, batch_size: int = 256) -> Tensor:
    """For each query [N, 1, H, W], the highest SSIM to any reference image (uint8 [M, H, W]).

    Exact SSIM against all M references costs M * N full-resolution SSIMs; instead the `shortlist` nearest
    references by Euclidean distance at 32x32 are found first, and SSIM is computed for those only."""
    def small(images: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(images.float(), 32).flatten(1)

    query_features = small(queries)
    distances = torch.cat([torch.cdist(query_features, small(as_float_images(references[start:start + batch_size])))
                           for start in range(0, len(references), batch_size)], dim=1)  # [N, M]
    candidates = distances.topk(min(shortlist, len(references)), largest=False).indices  # [N, shortlist]
    best = torch.empty(len(queries))
    for index, query in enumerate(queries):
        chosen = as_float_images(references[np.sort(candidates[index].numpy())])
        best[index] = ssim(query.expand(len(chosen), -1, -1, -1), chosen).max()
    return best


def as_float_images(images: np.ndarray) -> Tensor:
    """uint8 [M, H, W] -> float32 [M, 1, H, W] in [0, 1]."""
    return torch.from_numpy(np.asarray(images, dtype=np.float32) / 255).unsqueeze(1)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrt(S_a S_b)) for feature sets [N, D] and [M, D].

    Tr sqrt(S_a S_b) is computed exactly without a D x D matrix square root (scipy's sqrtm takes over a minute
    for Inception's D = 2048 on two cores, and is unreliable on the singular covariances of N < D images): with
    S_a = L L^T, the product S_a S_b has the eigenvalues of the symmetric positive semi-definite L^T S_b L, so the
    trace is the sum of their square roots."""
    factor = _covariance_factor(features_a)
    cov_b = np.atleast_2d(np.cov(features_b, rowvar=False))
    cross = np.sqrt(np.linalg.eigvalsh(factor.T @ cov_b @ factor).clip(min=0)).sum()
    mean_term = ((features_a.mean(0) - features_b.mean(0)) ** 2).sum()
    return float(mean_term + (factor ** 2).sum() + np.trace(cov_b) - 2 * cross)


def _covariance_factor(features: np.ndarray) -> np.ndarray:
    """L [D, R] with L L^T the sample covariance of `features` [N, D]; R = min(N, D) keeps L^T S L small."""
    centred = features - features.mean(0)
    if len(features) <= features.shape[1]:  # few images: the centred data itself is a factor
        return centred.T / np.sqrt(len(features) - 1)
    values, vectors = np.linalg.eigh(centred.T @ centred / (len(features) - 1))
    return vectors * np.sqrt(values.clip(min=0))


@torch.no_grad()
def fid(real: Tensor, generated: Tensor, extractor: nn.Module, *, batch_size: int = 32) -> float:
    """Fréchet distance between `extractor` features of `real` and `generated` images [N, 1, H, W].

    `extractor` maps a float batch [B, 1, H, W] in [0, 1] to features [B, D]; for the standard FID it resizes
    to 299x299, repeats the channel three times and returns Inception-v3 pool features. Images and extractor
    may be on any device; the features are brought back to the CPU."""
    def features(images: Tensor) -> np.ndarray:
        return torch.cat([extractor(batch).double().cpu() for batch in images.split(batch_size)]).numpy()

    return frechet_distance(features(real), features(generated))
