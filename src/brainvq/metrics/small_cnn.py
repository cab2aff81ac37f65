"""The small CNN behind the learnt sample metrics (the C2ST classifier and the slice-position regressor).

Images [N, 1, H, W] in [0, 1] are average-pooled to `INPUT_SIZE`^2 first: enough for anatomy and outline, and
cheap on a CPU. Training never touches the global random state (a caller's RNG stays as it was).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INPUT_SIZE = 64


def downsample(images: Tensor) -> Tensor:
    """[N, 1, H, W] -> float32 [N, 1, INPUT_SIZE, INPUT_SIZE]."""
    return F.adaptive_avg_pool2d(images.float(), INPUT_SIZE)


class SmallCNN(nn.Module):
    """[N, 1, 64, 64] -> `features` [N, 64] (four stride-2 convolutions, global average) -> outputs [N, out]."""

    def __init__(self, outputs: int = 1) -> None:
        super().__init__()
        widths = (1, 16, 32, 64, 64)
        layers: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(widths):
            layers += [nn.Conv2d(width_in, width_out, 3, stride=2, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(widths[-1], outputs)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def train_small_cnn(images: Tensor, targets: Tensor, *, loss: str, epochs: int, seed: int, classes: int = 1,
                    batch_size: int = 32) -> SmallCNN:
    """Train a fresh SmallCNN on downsampled `images` [N, 1, S, S] for `targets` [N]: binary labels with loss
    "logistic" (one output), or class indices 0..classes-1 with loss "categorical" (`classes` outputs); returns
    it in eval mode."""
    def logistic(outputs: Tensor, labels: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(outputs.squeeze(1), labels.float())

    losses = {"logistic": logistic, "categorical": F.cross_entropy}
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # the initial weights, without reseeding the caller's global RNG
        torch.manual_seed(seed)
        network = SmallCNN(classes)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=generator).split(batch_size):
            value = losses[loss](network(images[batch]), targets[batch])
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
    return network.eval()


@torch.no_grad()
def predict(network: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Outputs [N] (or [N, D] for a feature extractor) of `network` over downsampled `images`, batch by batch."""
    return torch.cat([network(batch) for batch in images.split(batch_size)]).squeeze(-1)
