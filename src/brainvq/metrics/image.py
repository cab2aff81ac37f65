"""Image-quality metrics for reconstructed slices: SSIM (whole image and brain only) and PSNR.

All functions take batches of single-channel images as float tensors [N, 1, H, W] with values in
[0, data_range] (data_range is 1 for brainvq's normalised slices), work on any device and return one value per
image. They compute in float32 whatever the input dtype, since bf16 loses too much precision in the variance
terms of SSIM.

SSIM follows Wang et al. (2004) with a Gaussian window and population covariance, and agrees with
``skimage.metrics.structural_similarity(a, b, data_range=1, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)``. Whole-image SSIM of a brain slice is inflated by the black background,
where any decent reconstruction is perfect, so ``masked_ssim`` and ``brain_mask`` restrict the average to
brain pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

K1 = 0.01  # Wang et al.'s constants, which keep SSIM stable where means or variances are near 0
K2 = 0.03
BRAIN_THRESHOLD = 0.03
"""Intensity (in [0, 1]) above which a pixel counts as brain: just above the background's noise floor."""
BRAIN_DILATION = 5
"""Side of the square max-pool that grows the thresholded mask, so the brain's dark rim is included."""
MIN_MSE = 1e-10
"""Floor on the mean squared error so that identical images give a large, finite PSNR (100 dB at range 1)."""


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected two [N, 1, H, W] tensors of the same shape, got {x.shape} and {y.shape}")


def _gaussian_weights(window_size: int, sigma: float) -> list[float]:
    """The 1-D Gaussian window: window_size weights summing to 1, like scipy's truncated kernel."""
    centre = (window_size - 1) / 2
    weights = [math.exp(-((i - centre) ** 2) / (2 * sigma**2)) for i in range(window_size)]
    total = sum(weights)
    return [weight / total for weight in weights]


def _gaussian_filter_valid(images: Tensor, weights: list[float]) -> Tensor:
    """Separable filter of float32 images [..., H, W] -> [..., H - k + 1, W - k + 1] with k = len(weights).

    It sums shifted copies rather than calling F.conv2d because GPU convolutions may round their inputs to
    TF32 (the cuDNN default) or to bf16 under autocast, and SSIM's variances, differences of nearly equal
    filtered moments, cannot afford that rounding. Elementwise products stay in float32; on CPU this is
    also faster than a grouped convolution.
    """
    size = len(weights)
    height, width = images.shape[-2:]
    rows = sum(weight * images[..., :, k : k + width - size + 1] for k, weight in enumerate(weights))
    return sum(weight * rows[..., k : k + height - size + 1, :] for k, weight in enumerate(weights))


def ssim_map(
    x: Tensor, y: Tensor, *, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5
) -> Tensor:
    """Local SSIM of each pair of images.

    Args:
        x, y: float tensors [N, 1, H, W] with values in [0, data_range]; any float dtype, any device.
        data_range: the value range of the images, which scales the stabilising constants C1 and C2.
        window_size: side of the (odd) Gaussian window.
        sigma: standard deviation of the Gaussian window, in pixels.

    Returns:
        float32 tensor [N, 1, H - window_size + 1, W - window_size + 1]: SSIM at every position where the
        window lies fully inside the image (values in [-1, 1], 1 where x and y agree). This is the region
        skimage averages after cropping (window_size - 1) // 2 pixels from each border.
    """
    luminance, contrast_structure = _ssim_terms(x, y, data_range, window_size, sigma)
    return luminance * contrast_structure


def _ssim_terms(x: Tensor, y: Tensor, data_range: float, window_size: int, sigma: float) -> tuple[Tensor, Tensor]:
    """SSIM's luminance and contrast-structure maps, each float32 [N, 1, H - window_size + 1, W - window_size + 1]."""
    _check_pair(x, y)
    if window_size % 2 == 0 or min(x.shape[-2:]) < window_size:
        raise ValueError(f"window_size must be odd and fit the image, got {window_size} for {x.shape}")
    x, y = x.float(), y.float()
    moments = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    moments = _gaussian_filter_valid(moments, _gaussian_weights(window_size, sigma))
    mu_x, mu_y, mean_xx, mean_yy, mean_xy = moments.split(1, dim=1)

    var_x = mean_xx - mu_x * mu_x
    var_y = mean_yy - mu_y * mu_y
    cov_xy = mean_xy - mu_x * mu_y
    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    luminance = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    contrast_structure = (2 * cov_xy + c2) / (var_x + var_y + c2)
    return luminance, contrast_structure


def ssim(
    x: Tensor, y: Tensor, *, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5
) -> Tensor:
    """Mean SSIM of each pair of images [N, 1, H, W] (see ``ssim_map``), as a float32 tensor [N]."""
    return ssim_map(x, y, data_range=data_range, window_size=window_size, sigma=sigma).mean(dim=(1, 2, 3))


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Weights of the five scales of multi-scale SSIM (Wang, Simoncelli and Bovik 2003)."""


def ms_ssim(x: Tensor, y: Tensor, *, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Multi-scale SSIM of each pair of images [N, 1, H, W] (H, W >= 16 * window_size), float32 [N].

    Contrast-structure at the four finest scales and luminance * contrast-structure at the coarsest, each
    clamped at 0 before the weighted geometric mean, halving the images (2x2 average) between scales. Used
    to measure how alike two generated images are: mean pairwise MS-SSIM is a diversity measure.
    """
    factors = []
    for scale, weight in enumerate(MS_SSIM_WEIGHTS):
        luminance, contrast_structure = _ssim_terms(x, y, data_range, window_size, sigma)
        last = scale == len(MS_SSIM_WEIGHTS) - 1
        term = (luminance * contrast_structure if last else contrast_structure).mean(dim=(1, 2, 3))
        factors.append(term.clamp_min(0) ** weight)
        x, y = F.avg_pool2d(x.float(), 2), F.avg_pool2d(y.float(), 2)
    return torch.stack(factors).prod(dim=0)


def masked_ssim(
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    *,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
) -> Tensor:
    """Mean SSIM of each pair of images over the pixels selected by ``mask``.

    Args:
        x, y: float tensors [N, 1, H, W] with values in [0, data_range].
        mask: bool tensor [N, 1, H, W], true for the pixels to average over (e.g. ``brain_mask(x)``). Its
            border is cropped like the SSIM map's, so only pixels whose window fits the image count.
        data_range, window_size, sigma: as for ``ssim_map``.

    Returns:
        float32 tensor [N]. An image whose cropped mask is empty gets NaN, so that callers can leave it out
        of an average with ``torch.nanmean``.
    """
    if mask.shape != x.shape or mask.dtype != torch.bool:
        raise ValueError(f"expected a bool mask of shape {x.shape}, got {mask.dtype} {mask.shape}")
    local = ssim_map(x, y, data_range=data_range, window_size=window_size, sigma=sigma)
    border = (window_size - 1) // 2
    mask = mask[..., border : mask.shape[-2] - border, border : mask.shape[-1] - border]
    total = (local * mask).sum(dim=(1, 2, 3))
    count = mask.sum(dim=(1, 2, 3))
    return total / count  # 0 / 0 is NaN, which is what an empty mask should give


def brain_mask(x: Tensor, threshold: float = BRAIN_THRESHOLD) -> Tensor:
    """Pixels of original images [N, 1, H, W] (values in [0, 1]) that belong to the brain.

    A pixel is brain if its intensity exceeds ``threshold``, or if it lies within BRAIN_DILATION // 2 pixels
    of one that does: the dilation takes in the dark edge of the brain, where reconstruction errors show.
    Holes are not filled, beyond the small ones that the dilation closes.

    Returns:
        bool tensor [N, 1, H, W].
    """
    above = (x.float() > threshold).float()
    grown = F.max_pool2d(above, kernel_size=BRAIN_DILATION, stride=1, padding=BRAIN_DILATION // 2)
    return grown.bool()


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB of each pair of images [N, 1, H, W], as a float32 tensor [N].

    The mean squared error is floored at MIN_MSE, so identical images give a large finite value, not inf.
    """
    _check_pair(x, y)
    mse = (x.float() - y.float()).square().mean(dim=(1, 2, 3)).clamp(min=MIN_MSE)
    return 10 * torch.log10(data_range**2 / mse)


class ImageMetrics:
    """Per-image averages of SSIM, brain SSIM and PSNR over an evaluation set fed in batches.

    Inputs to ``update`` must be in [0, 1]; clamping reconstructions is left to callers. Clamping first also
    scores the images as they will be shown and saved.
    """

    def __init__(self) -> None:
        self._ssim_sum = 0.0
        self._psnr_sum = 0.0
        self._brain_ssim_sum = 0.0
        self._n_images = 0
        self._n_brain_images = 0

    @torch.no_grad()
    def update(self, originals: Tensor, reconstructions: Tensor) -> None:
        """Add a batch: ``originals`` and ``reconstructions`` are float tensors [N, 1, H, W] in [0, 1]."""
        brain = masked_ssim(originals, reconstructions, brain_mask(originals))
        self._ssim_sum += ssim(originals, reconstructions).sum().item()
        self._psnr_sum += psnr(originals, reconstructions).sum().item()
        self._brain_ssim_sum += brain.nansum().item()
        self._n_images += originals.shape[0]
        self._n_brain_images += int((~brain.isnan()).sum().item())

    def compute(self) -> dict[str, float]:
        """Per-image averages so far, plus the count of images seen.

        Keys: "ssim", "psnr", "ssim_brain" (over the images with any brain pixels) and "n_images". A metric
        with no image to average over is NaN.
        """
        return {
            "ssim": _mean(self._ssim_sum, self._n_images),
            "ssim_brain": _mean(self._brain_ssim_sum, self._n_brain_images),
            "psnr": _mean(self._psnr_sum, self._n_images),
            "n_images": self._n_images,
        }


def _mean(total: float, count: int) -> float:
    return total / count if count else math.nan
