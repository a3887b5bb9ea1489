from __future__ import annotations

import math

import pytest
import torch

from unimm.evaluation import metrics


def test_psnr_known_value():
    target = torch.zeros(2, 1, 4, 4)
    prediction = torch.full_like(target, 0.1)  # MSE 0.01 -> 20 dB at range 1, 26.02 dB at range 2
    torch.testing.assert_close(metrics.psnr(prediction, target), torch.full((2,), 20.0))
    assert float(metrics.psnr(prediction, target, data_range=2.0)[0]) == pytest.approx(
        20 + 20 * math.log10(2)
    )


def test_ssim_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.image")
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(3, 3, 32, 32, generator=generator)
    prediction = (target + 0.1 * torch.randn(target.shape, generator=generator)).clamp(0, 1)
    reference = tm.structural_similarity_index_measure(prediction, target, data_range=1.0, reduction="none")
    torch.testing.assert_close(metrics.ssim(prediction, target), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(metrics.ssim(target, target), torch.ones(3))


def test_image_metric_errors():
    with pytest.raises(ValueError, match="one shape"):
        metrics.psnr(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="smaller than window"):
        metrics.ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_codebook_usage_perplexity_and_bits():
    counts = metrics.codebook_counts(torch.tensor([[0, 1], [1, 3]]), codebook_size=8)
    assert counts.tolist() == [1, 2, 0, 1, 0, 0, 0, 0]
    assert metrics.codebook_usage(counts) == 3 / 8
    assert metrics.codebook_perplexity(torch.ones(8)) == pytest.approx(8.0)
    assert metrics.bits_per_image(8, 8, 1024) == 640.0
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        metrics.codebook_counts(torch.tensor([8]), codebook_size=8)


def test_linear_probe_separates_informative_features_only():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (300,), generator=generator)
    noise = torch.randn(300, 5, generator=generator)
    informative = noise + 4.0 * torch.nn.functional.one_hot(labels, 5).float()
    accuracy = metrics.linear_probe_accuracy(informative[:200], labels[:200], informative[200:], labels[200:])
    assert accuracy > 0.95
    chance = metrics.linear_probe_accuracy(noise[:200], labels[:200], noise[200:], labels[200:])
    assert chance < 0.6
    with pytest.raises(ValueError, match="one D"):
        metrics.linear_probe_accuracy(noise[:10], labels[:10], noise[:10, :2], labels[:10])
