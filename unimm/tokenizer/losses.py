"""Loss functions of the dual-codebook tokenizer; plain functions of tensors so they test in isolation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean L1 (``kind="l1"``) or squared (``"l2"``) pixel error."""
    if kind == "l1":
        return F.l1_loss(reconstruction, target)
    if kind == "l2":
        return F.mse_loss(reconstruction, target)
    raise ValueError(f"reconstruction loss kind {kind!r}: expected 'l1' or 'l2'")


def cosine_distillation_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between predicted and teacher features along the last dim, averaged over positions."""
    return (1.0 - F.cosine_similarity(prediction, target.detach(), dim=-1)).mean()


def perceptual_loss(
    features: Sequence[torch.Tensor], target_features: Sequence[torch.Tensor]
) -> torch.Tensor:
    """LPIPS-style distance in a feature space: unit-normalise each position's channels, then average the
    squared differences over positions and layers. Layers are (B, ..., D) tensors."""
    if len(features) != len(target_features) or not features:
        raise ValueError(f"perceptual loss: got {len(features)} and {len(target_features)} feature layers")
    total = features[0].new_zeros(())
    for feature, target in zip(features, target_features):
        diff = F.normalize(feature, dim=-1) - F.normalize(target.detach(), dim=-1)
        total = total + diff.pow(2).sum(-1).mean()
    return total / len(features)


def vector_quantization_losses(
    codes: torch.Tensor, quantized: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codebook, commitment)`` losses of VQ-VAE: pull entries to codes, and codes to their entries."""
    codebook = F.mse_loss(quantized, codes.detach())
    commitment = F.mse_loss(codes, quantized.detach())
    return codebook, commitment


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """PatchGAN hinge loss of the discriminator (real above +1, fake below -1)."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: raise the discriminator's score of reconstructions."""
    return -fake_logits.mean()


def codebook_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """``exp(entropy)`` of the empirical index distribution given per-entry hit counts (K,)."""
    probs = counts.float() / counts.sum().clamp(min=1)
    entropy = -(probs * torch.log(probs.clamp(min=1e-12))).sum()
    return entropy.exp()


__all__ = [
    "codebook_perplexity",
    "cosine_distillation_loss",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "perceptual_loss",
    "reconstruction_loss",
    "vector_quantization_losses",
]
