"""Evaluation metrics: PSNR/SSIM, codebook usage and perplexity, bits per image, linear probes."""

from .metrics import (
    bits_per_image,
    codebook_counts,
    codebook_perplexity,
    codebook_usage,
    linear_probe_accuracy,
    psnr,
    ssim,
)

__all__ = [
    "bits_per_image",
    "codebook_counts",
    "codebook_perplexity",
    "codebook_usage",
    "linear_probe_accuracy",
    "psnr",
    "ssim",
]
