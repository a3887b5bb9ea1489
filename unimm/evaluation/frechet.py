"""Fréchet distance between two sets of feature vectors (each summarised as a Gaussian).

    d² = ‖μ_a − μ_b‖² + Tr(Σ_a) + Tr(Σ_b) − 2·Tr((Σ_a Σ_b)^½)

The trace of the matrix square root is computed from the eigenvalues of the symmetric matrix
Σ_a^½ Σ_b Σ_a^½ (same spectrum as Σ_a Σ_b), in float64, which avoids `scipy.linalg.sqrtm`'s complex
round-off. The number depends on the feature space: always report it as "Fréchet distance in <feature
space>" (this library has no Inception weights, so it never computes an FID).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class GaussianStatistics:
    """Mean (D,) and covariance (D, D) of a feature set, in float64."""

    mean: torch.Tensor
    covariance: torch.Tensor
    num_samples: int


def gaussian_statistics(features: torch.Tensor | np.ndarray) -> GaussianStatistics:
    """Mean and (unbiased) covariance of `features` of shape (N, D), N >= 2."""
    features = torch.as_tensor(features).detach().to(device="cpu", dtype=torch.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must have shape (N, D) with N >= 2 samples, got {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values")
    return GaussianStatistics(
        mean=features.mean(dim=0), covariance=torch.cov(features.T), num_samples=features.shape[0]
    )


def _symmetric_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance_from_statistics(a: GaussianStatistics, b: GaussianStatistics) -> float:
    """Fréchet distance between two Gaussians (squared form, as FID reports it)."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"feature dimensions differ: {tuple(a.mean.shape)} vs {tuple(b.mean.shape)}")
    sqrt_a = _symmetric_sqrt(a.covariance)
    product = sqrt_a @ b.covariance @ sqrt_a  # symmetric PSD, same eigenvalues as Σ_a Σ_b
    trace_sqrt_product = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0).sqrt().sum()
    mean_term = (a.mean - b.mean).square().sum()
    return float(mean_term + a.covariance.trace() + b.covariance.trace() - 2 * trace_sqrt_product)


def frechet_distance(features_a: torch.Tensor | np.ndarray, features_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between feature sets `features_a` (N, D) and `features_b` (M, D)."""
    return frechet_distance_from_statistics(gaussian_statistics(features_a), gaussian_statistics(features_b))
