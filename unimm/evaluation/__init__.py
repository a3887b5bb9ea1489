"""Evaluation metrics: PSNR/SSIM, codebook usage and perplexity, bits per image, linear probes; the
Fashion-MNIST judge and the quality report of `unimm eval`."""

from .judge import FashionMNISTJudge, load_judge
from .metrics import (
    bits_per_image,
    codebook_counts,
    codebook_perplexity,
    codebook_usage,
    linear_probe_accuracy,
    psnr,
    ssim,
)
from .report import EvaluationReport, answer_to_class, evaluate_pipeline

__all__ = [
    "EvaluationReport",
    "FashionMNISTJudge",
    "answer_to_class",
    "bits_per_image",
    "codebook_counts",
    "codebook_perplexity",
    "codebook_usage",
    "evaluate_pipeline",
    "linear_probe_accuracy",
    "load_judge",
    "psnr",
    "ssim",
]
