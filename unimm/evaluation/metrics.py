"""Image and tokenizer metrics: PSNR, SSIM, codebook usage and perplexity, bits per image, linear probe.

Images are float tensors (B, C, H, W) in a known `data_range` (1.0 for [0, 1], 2.0 for [-1, 1]).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _check_image_pair(prediction: torch.Tensor, target: torch.Tensor, name: str) -> None:
    if prediction.shape != target.shape or prediction.ndim != 4:
        raise ValueError(
            f"{name}: expected two (B, C, H, W) tensors of one shape, got {tuple(prediction.shape)} and "
            f"{tuple(target.shape)}"
        )


def psnr(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image (B,): ``10 log10(range^2 / MSE)``."""
    _check_image_pair(prediction, target, "psnr")
    mse = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse.clamp(min=1e-12))


def _gaussian_window(size: int, sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    return (kernel[:, None] * kernel[None, :]).expand(channels, 1, size, size)  # (C, 1, k, k) depthwise


def ssim(
    prediction: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity per image (B,) with a Gaussian window (Wang et al. 2004), averaged over channels
    and positions; borders are reflect-padded so every pixel counts, as in torchmetrics."""
    _check_image_pair(prediction, target, "ssim")
    if min(prediction.shape[-2:]) < window_size:
        raise ValueError(
            f"ssim: images of size {tuple(prediction.shape[-2:])} are smaller than window {window_size}"
        )
    pad = window_size // 2
    x = F.pad(prediction.double(), (pad, pad, pad, pad), mode="reflect")
    y = F.pad(target.double(), (pad, pad, pad, pad), mode="reflect")
    window = _gaussian_window(window_size, sigma, x.shape[1], x)

    def blur(images: torch.Tensor) -> torch.Tensor:
        return F.conv2d(images, window, groups=x.shape[1])

    mu_x, mu_y = blur(x), blur(y)
    var_x = (blur(x * x) - mu_x**2).clamp(min=0)
    var_y = (blur(y * y) - mu_y**2).clamp(min=0)
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1).to(prediction.dtype)


def codebook_counts(image_token_ids: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Hits per codebook entry (K,) over all ids."""
    ids = image_token_ids.flatten().long()
    if ids.numel() and (ids.min() < 0 or ids.max() >= codebook_size):
        raise ValueError(
            f"codebook ids must lie in [0, {codebook_size - 1}], got [{int(ids.min())}, {int(ids.max())}]"
        )
    return torch.bincount(ids, minlength=codebook_size)


def codebook_usage(counts: torch.Tensor) -> float:
    """Fraction of codebook entries used at least once."""
    return float((counts > 0).float().mean())


def codebook_perplexity(counts: torch.Tensor) -> float:
    """``exp(entropy)`` of the index distribution: K when uniform, 1 when one entry takes everything."""
    probs = counts.double() / counts.sum().clamp(min=1)
    return float(torch.exp(-(probs * torch.log(probs.clamp(min=1e-300))).sum()))


def bits_per_image(grid_height: int, grid_width: int, codebook_size: int) -> float:
    """Bits to store an image's ids with a fixed-length code: grid cells x log2 K."""
    return grid_height * grid_width * math.log2(codebook_size)


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    weight_decay: float = 1e-4,
    max_iterations: int = 100,
) -> float:
    """Test accuracy of a multinomial logistic regression fit on standardised (N, D) features (full-batch
    L-BFGS, L2-regularised); the usual linear probe of a representation."""
    if (
        train_features.ndim != 2
        or test_features.ndim != 2
        or train_features.shape[1] != test_features.shape[1]
    ):
        raise ValueError(
            f"linear probe: expected (N, D) features with one D, got {tuple(train_features.shape)} and "
            f"{tuple(test_features.shape)}"
        )
    if len(train_features) != len(train_labels) or len(test_features) != len(test_labels):
        raise ValueError("linear probe: features and labels differ in length")
    train_features, test_features = train_features.detach(), test_features.detach()
    mean = train_features.float().mean(0)
    std = train_features.float().std(0).clamp(min=1e-6)
    train_x = (train_features.float() - mean) / std
    test_x = (test_features.float() - mean) / std
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    with torch.enable_grad():
        probe = torch.nn.Linear(train_x.shape[1], num_classes)
        optimizer = torch.optim.LBFGS(
            probe.parameters(), max_iter=max_iterations, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = (
                F.cross_entropy(probe(train_x), train_labels.long())
                + weight_decay * probe.weight.pow(2).sum()
            )
            loss.backward()
            return loss

        optimizer.step(closure)
    with torch.no_grad():
        return float((probe(test_x).argmax(-1) == test_labels.long()).float().mean())


__all__ = [
    "bits_per_image",
    "codebook_counts",
    "codebook_perplexity",
    "codebook_usage",
    "linear_probe_accuracy",
    "psnr",
    "ssim",
]
