"""Training losses of the dual-codebook tokenizer: plain functions of tensors, and [`DualCodebookLoss`], the
module that weighs them and owns the PatchGAN discriminator.

The loss lives beside the model rather than in it (as taming's ``VQLPIPSWithDiscriminator`` and diffusers'
training scripts keep it out of ``VQModel``): the tokenizer's forward returns what a loss needs, so a
checkpoint holds no discriminator and its config no loss weights, and any training driver (the ``tokenizer``
stage, a plain PyTorch loop) builds the loss from its own arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

if TYPE_CHECKING:
    from .modeling_dual_codebook import DualCodebookTokenizerOutput

RECONSTRUCTION_LOSSES = ("l1", "l2")


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


@dataclass
class DualCodebookLossOutput(ModelOutput):
    """Output of [`DualCodebookLoss`]: the weighted total `loss` and each unweighted term (`None` when off)."""

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    perceptual_loss: torch.FloatTensor | None = None
    codebook_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    semantic_loss: torch.FloatTensor | None = None
    generator_loss: torch.FloatTensor | None = None
    discriminator_loss: torch.FloatTensor | None = None


class DualCodebookDiscriminator(nn.Module):
    """PatchGAN discriminator: one real/fake logit per receptive-field patch."""

    def __init__(self, num_channels: int, channels: int, num_layers: int, norm_num_groups: int) -> None:
        super().__init__()
        width = channels
        layers: list[nn.Module] = [nn.Conv2d(num_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for _ in range(num_layers - 1):
            layers += [
                nn.Conv2d(width, width * 2, 4, stride=2, padding=1),
                nn.GroupNorm(min(norm_num_groups, width * 2), width * 2),
                nn.LeakyReLU(0.2),
            ]
            width *= 2
        layers.append(nn.Conv2d(width, 1, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.layers(pixel_values)


class DualCodebookLoss(nn.Module):
    r"""The tokenizer's training objective from a [`DualCodebookTokenizerOutput`]:
    ``w_rec * rec + w_perc * perceptual + w_cb * codebook + w_commit * commitment + w_sem * semantic
    (+ w_adv * generator + discriminator once ``step >= adversarial_start_step``)``.

    Args:
        num_channels (`int`): image channels (the discriminator's input).
        reconstruction_loss (`str`): `"l1"` or `"l2"` pixel error.
        *_weight (`float`): weights of the terms; `commitment_weight` is beta of VQ-VAE; `perceptual_weight`
            0 skips the teacher's second forward on the reconstruction.
        adversarial_weight (`float`): weight of the hinge generator term; > 0 builds the discriminator.
        adversarial_start_step (`int`): training step at which both GAN terms switch on.
        discriminator_channels, discriminator_layers, discriminator_norm_groups (`int`): the PatchGAN's size.
    """

    def __init__(
        self,
        num_channels: int = 3,
        reconstruction_loss: str = "l1",
        reconstruction_weight: float = 1.0,
        perceptual_weight: float = 0.1,
        codebook_weight: float = 1.0,
        commitment_weight: float = 0.25,
        semantic_weight: float = 1.0,
        adversarial_weight: float = 0.0,
        adversarial_start_step: int = 0,
        discriminator_channels: int = 32,
        discriminator_layers: int = 2,
        discriminator_norm_groups: int = 16,
    ) -> None:
        super().__init__()
        if reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(
                f"reconstruction_loss={reconstruction_loss!r}: expected one of {RECONSTRUCTION_LOSSES}"
            )
        self.reconstruction_kind = reconstruction_loss
        self.weights = {
            "reconstruction_loss": reconstruction_weight,
            "codebook_loss": codebook_weight,
            "commitment_loss": commitment_weight,
            "semantic_loss": semantic_weight,
            "perceptual_loss": perceptual_weight,
            "generator_loss": adversarial_weight,
            "discriminator_loss": 1.0,  # reaches only the discriminator's parameters
        }
        negative = sorted(name for name, weight in self.weights.items() if weight < 0)
        if negative:
            raise ValueError(f"loss weights of {negative}: expected non-negative weights")
        self.adversarial_start_step = adversarial_start_step
        self.discriminator = (
            DualCodebookDiscriminator(
                num_channels, discriminator_channels, discriminator_layers, discriminator_norm_groups
            )
            if adversarial_weight > 0
            else None
        )

    def extra_repr(self) -> str:
        weights = ", ".join(f"{name.removesuffix('_loss')}={weight}" for name, weight in self.weights.items())
        return f"{self.reconstruction_kind}, weights: {weights}, GAN from step {self.adversarial_start_step}"

    @property
    def needs_teacher_hidden_states(self) -> bool:
        """Whether `forward` reads `outputs.teacher_hidden_states` (call the tokenizer with
        `output_teacher_hidden_states=True`)."""
        return self.weights["perceptual_loss"] > 0

    def forward(
        self,
        pixel_values: torch.Tensor,
        outputs: DualCodebookTokenizerOutput,
        step: int | None = None,
        perceptual_network: Callable[[torch.Tensor], Sequence[torch.Tensor]] | None = None,
    ) -> DualCodebookLossOutput:
        """The named terms and their weighted sum for the images ``pixel_values`` (B, C, H, W) and the
        tokenizer's ``outputs`` on them. ``step`` (the training step; ``None`` outside training) switches
        the adversarial terms on. ``perceptual_network`` maps images to the feature layers of
        ``outputs.teacher_hidden_states``: the tokenizer's own frozen teacher serves as the LPIPS-style
        network, so the loss borrows it instead of holding a second copy."""
        terms = {
            "reconstruction_loss": reconstruction_loss(
                outputs.reconstruction, pixel_values, self.reconstruction_kind
            ),
            "codebook_loss": outputs.codebook_loss,
            "commitment_loss": outputs.commitment_loss,
            "semantic_loss": cosine_distillation_loss(outputs.semantic_prediction, outputs.teacher_features),
        }
        if self.needs_teacher_hidden_states:
            if perceptual_network is None or outputs.teacher_hidden_states is None:
                raise ValueError(
                    "perceptual_weight > 0: expected outputs of the tokenizer called with "
                    "output_teacher_hidden_states=True, and a perceptual_network "
                    "(partial(tokenizer.teacher_features, grid=grid, all_layers=True))"
                )
            terms["perceptual_loss"] = perceptual_loss(
                perceptual_network(outputs.reconstruction), outputs.teacher_hidden_states
            )
        if self.discriminator is not None and step is not None and step >= self.adversarial_start_step:
            terms.update(self._adversarial_losses(pixel_values, outputs.reconstruction))
        # Float addition is not associative: this order (reconstruction, codebook, commitment, semantic,
        # perceptual, GAN) is the one the golden totals in tests/tokenizer/test_losses.py pin.
        loss = sum(self.weights[name] * value for name, value in terms.items())
        return DualCodebookLossOutput(loss=loss, **terms)

    def _adversarial_losses(
        self, pixel_values: torch.Tensor, reconstruction: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Both GAN terms for one optimizer: the generator term sees the discriminator through detached
        parameters (no gradient into it), the discriminator term sees detached reconstructions."""
        frozen = {name: param.detach() for name, param in self.discriminator.named_parameters()}
        fake_for_generator = torch.func.functional_call(self.discriminator, frozen, (reconstruction,))
        real_logits = self.discriminator(pixel_values)
        fake_logits = self.discriminator(reconstruction.detach())
        return {
            "generator_loss": hinge_generator_loss(fake_for_generator),
            "discriminator_loss": hinge_discriminator_loss(real_logits, fake_logits),
        }


__all__ = [
    "RECONSTRUCTION_LOSSES",
    "DualCodebookDiscriminator",
    "DualCodebookLoss",
    "DualCodebookLossOutput",
    "codebook_perplexity",
    "cosine_distillation_loss",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "perceptual_loss",
    "reconstruction_loss",
    "vector_quantization_losses",
]
