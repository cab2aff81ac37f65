import math

import numpy as np
import pytest
import skimage.data
import torch
from pytorch_msssim import ms_ssim as reference_ms_ssim
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.transform import downscale_local_mean

from brainvq.metrics.image import ImageMetrics, brain_mask, masked_ssim, ms_ssim, psnr, ssim, ssim_map

# float32 here against skimage's float64 differs by about 2e-6; well inside the 1e-3 required, and tight
# enough to tell population covariance from sample covariance.
TOLERANCE = 1e-5


def _random(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    return rng.random(shape)


def _smooth(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    blurred = gaussian_filter(rng.random(shape), sigma=4)
    return (blurred - blurred.min()) / (blurred.max() - blurred.min())


def _camera(shape: tuple[int, int], _: np.random.Generator) -> np.ndarray:
    """The 512x512 camera photograph, downscaled by 2 and cropped to ``shape``."""
    photo = downscale_local_mean(skimage.data.camera() / 255.0, (2, 2))
    return photo[: shape[0], : shape[1]]


def _noisy(image: np.ndarray, rng: np.random.Generator, scale: float = 0.1) -> np.ndarray:
    return np.clip(image + scale * rng.standard_normal(image.shape), 0, 1)


def _batch(*images: np.ndarray) -> torch.Tensor:
    """numpy [H, W] images -> float32 tensor [N, 1, H, W]."""
    return torch.from_numpy(np.stack(images)[:, None]).float()


def _brain_on_black(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A textured disc (the 'brain') of radius size / 4 on a black background."""
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2
    return np.where(disc, 0.3 + 0.5 * _smooth((size, size), rng), 0.0)


@pytest.mark.parametrize("make", [_random, _smooth, _camera])
@pytest.mark.parametrize("shape", [(11, 11), (40, 57), (256, 256)])
def test_ssim_and_psnr_match_skimage(make, shape):
    rng = np.random.default_rng(0)
    original = make(shape, rng).astype(np.float32)
    degraded = _noisy(original, rng).astype(np.float32)

    expected_ssim = structural_similarity(
        original, degraded, data_range=1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    expected_psnr = peak_signal_noise_ratio(original, degraded, data_range=1)

    x, y = _batch(original), _batch(degraded)
    assert ssim(x, y).item() == pytest.approx(expected_ssim, abs=TOLERANCE)
    assert psnr(x, y).item() == pytest.approx(expected_psnr, abs=TOLERANCE)


# Sizes divisible by 16, so every one of the four halvings is exact. On odd sizes the two differ by convention:
# brainvq's 2x2 average pool drops the last row or column, pytorch-msssim zero-pads it (count_include_pad).
# 176 = 16 * 11 is the smallest size whose coarsest scale still fits brainvq's 11-pixel window.
@pytest.mark.parametrize("shape", [(176, 176), (192, 256)])
def test_ms_ssim_matches_pytorch_msssim(shape):
    rng = np.random.default_rng(10)
    originals = [_smooth(shape, rng), _camera(shape, rng), _random(shape, rng)]
    x = _batch(*originals)
    noisy = _batch(*(_noisy(image, rng) for image in originals))
    # 1 - x: contrast-structure is negative at every scale; both clamp each scale's mean at 0 (pytorch-msssim's
    # relu) before the fractional power, so the pair scores 0 rather than NaN.
    y = torch.cat([noisy, 1 - x[:1]])
    x = torch.cat([x, x[:1]])

    # Every setting spelt out (they are pytorch-msssim's defaults but for data_range), not read from brainvq: the
    # published weights of Wang, Simoncelli and Bovik (2003) and the constants K1, K2 of Wang et al. (2004).
    expected = reference_ms_ssim(x, y, data_range=1.0, size_average=False, win_size=11, win_sigma=1.5,
                                 weights=[0.0448, 0.2856, 0.3001, 0.2363, 0.1333], K=(0.01, 0.03))

    # float32 on both sides, convolutions against brainvq's shifted sums: they differ by up to about 5e-6.
    torch.testing.assert_close(ms_ssim(x, y), expected, rtol=0, atol=2e-5)
    assert expected[-1] == 0 and (expected[:-1] > 0.3).all()  # the cases above exercise what they claim to


def test_ssim_map_has_valid_shape_and_is_float32_for_bf16_input():
    rng = np.random.default_rng(1)
    x = _batch(_smooth((30, 40), rng), _smooth((30, 40), rng))
    y = x + 0.05 * torch.randn_like(x)

    local = ssim_map(x.bfloat16(), y.bfloat16())

    assert local.shape == (2, 1, 20, 30)
    assert local.dtype == torch.float32
    # Only the rounding of the inputs to bf16 separates the two results.
    assert torch.allclose(local.mean(dim=(1, 2, 3)), ssim(x, y), atol=5e-3)


def test_identical_images_give_ssim_one_and_large_finite_psnr():
    x = _batch(_smooth((32, 32), np.random.default_rng(2)))

    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    assert math.isfinite(psnr(x, x).item())
    assert psnr(x, x).item() >= 90


def test_batched_results_equal_per_image_results():
    rng = np.random.default_rng(4)
    originals = [_random((48, 48), rng), _smooth((48, 48), rng), _camera((48, 48), rng)]
    degraded = [_noisy(image, rng) for image in originals]
    x, y = _batch(*originals), _batch(*degraded)
    mask = brain_mask(x)

    singles = [(x[i : i + 1], y[i : i + 1], mask[i : i + 1]) for i in range(len(originals))]

    assert torch.allclose(ssim(x, y), torch.cat([ssim(a, b) for a, b, _ in singles]), atol=1e-6)
    assert torch.allclose(psnr(x, y), torch.cat([psnr(a, b) for a, b, _ in singles]), atol=1e-4)
    per_image_brain = torch.cat([masked_ssim(a, b, m) for a, b, m in singles])
    assert torch.allclose(masked_ssim(x, y, mask), per_image_brain, atol=1e-6)


def test_masked_ssim_averages_the_cropped_map_over_the_mask():
    rng = np.random.default_rng(5)
    original = _smooth((32, 32), rng)
    x, y = _batch(original), _batch(_noisy(original, rng))
    mask = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    mask[..., 0:12, 0:12] = True  # the first 5 rows and columns fall in the cropped border
    mask[..., 20:22, 25:32] = True  # the last 5 columns fall in the cropped border

    local = ssim_map(x, y)[0, 0]  # map position (i, j) is image pixel (i + 5, j + 5)
    expected = torch.cat([local[0:7, 0:7].flatten(), local[15:17, 20:22].flatten()]).mean()

    assert masked_ssim(x, y, mask).item() == pytest.approx(expected.item(), abs=1e-6)


def test_masked_ssim_is_nan_for_an_empty_mask():
    x = _batch(_smooth((32, 32), np.random.default_rng(6)))
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[..., :5, :] = True  # only border pixels, which the map does not cover

    assert masked_ssim(x, x, mask).isnan().all()


def test_brain_ssim_is_lower_than_whole_image_ssim_when_only_the_brain_is_noisy():
    rng = np.random.default_rng(7)
    original = _brain_on_black(rng)
    degraded = np.where(original > 0, _noisy(original, rng), 0.0)
    x, y = _batch(original), _batch(degraded)

    whole = ssim(x, y).item()
    brain = masked_ssim(x, y, brain_mask(x)).item()

    assert brain < whole - 0.1


def test_brain_mask_is_thresholded_then_dilated():
    image = torch.zeros(1, 1, 16, 16)
    image[..., 8, 8] = 0.5  # one brain pixel
    image[..., 2, 2] = 0.01  # background noise below the threshold

    mask = brain_mask(image)

    expected = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    expected[..., 6:11, 6:11] = True  # the 5x5 neighbourhood of the brain pixel
    assert torch.equal(mask, expected)


def test_image_metrics_averages_over_images_across_batches():
    rng = np.random.default_rng(8)
    brains = [_brain_on_black(rng) for _ in range(4)]
    black = np.zeros((64, 64))  # no brain pixels: excluded from ssim_brain only
    batches = [_batch(*brains[:3]), _batch(brains[3], black)]
    recons = [(batch + 0.05 * torch.randn_like(batch)).clamp(0, 1) for batch in batches]

    metrics = ImageMetrics()
    for original, reconstruction in zip(batches, recons, strict=True):
        metrics.update(original, reconstruction)
    result = metrics.compute()

    x, y = torch.cat(batches), torch.cat(recons)
    assert result["n_images"] == 5
    assert result["ssim"] == pytest.approx(ssim(x, y).mean().item(), abs=1e-6)
    assert result["psnr"] == pytest.approx(psnr(x, y).mean().item(), abs=1e-4)
    brain = masked_ssim(x[:4], y[:4], brain_mask(x[:4]))
    assert result["ssim_brain"] == pytest.approx(brain.mean().item(), abs=1e-6)


def test_image_metrics_without_images_gives_nan():
    result = ImageMetrics().compute()

    assert result["n_images"] == 0
    assert all(math.isnan(result[key]) for key in ("ssim", "ssim_brain", "psnr"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_results_equal_cpu_results():
    rng = np.random.default_rng(9)
    x = _batch(_brain_on_black(rng), _camera((64, 64), rng))
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    mask = brain_mask(x)

    whole = ssim(x.cuda(), y.cuda()).cpu()
    brain = masked_ssim(x.cuda(), y.cuda(), mask.cuda()).cpu()

    assert torch.allclose(whole, ssim(x, y), atol=1e-5)
    assert torch.allclose(brain, masked_ssim(x, y, mask), atol=1e-5)
