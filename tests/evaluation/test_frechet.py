import numpy as np
import pytest
import scipy.linalg
import torch

from unimm.evaluation.frechet import frechet_distance, gaussian_statistics


def reference_frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The textbook computation with scipy's general matrix square root."""
    mean_a, mean_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    sqrt_product = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(
        ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(sqrt_product)
    )


def test_matches_scipy_reference():
    rng = np.random.default_rng(0)
    features_a = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    features_b = rng.normal(loc=0.5, size=(150, 6)) @ rng.normal(size=(6, 6))
    expected = reference_frechet_distance(features_a, features_b)
    assert frechet_distance(features_a, features_b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(torch.from_numpy(features_a).float(), features_b) == pytest.approx(
        expected, rel=1e-5
    )


def test_identical_sets_and_known_gaussians():
    features = torch.randn(500, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-9)
    # Same covariance, means 3 apart along one axis: distance = 3² = 9 exactly.
    shifted = features.clone()
    shifted[:, 0] += 3.0
    assert frechet_distance(features, shifted) == pytest.approx(9.0, rel=1e-9)
    # Isotropic covariances σ²=1 and σ²=4 in D=2, equal means: 2·(1 + 4 − 2·√(1·4)) = 2.
    unit_cross = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]) * np.sqrt(1.5)
    assert gaussian_statistics(unit_cross).covariance.diag().tolist() == pytest.approx([1.0, 1.0])
    assert frechet_distance(unit_cross, 2 * unit_cross) == pytest.approx(2.0)


def test_bad_input():
    with pytest.raises(ValueError, match=r"\(N, D\) with N >= 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance(np.random.rand(5, 3), np.random.rand(5, 4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((5, 3), np.nan), np.random.rand(5, 3))
