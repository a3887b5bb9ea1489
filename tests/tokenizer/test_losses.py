from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from unimm.tokenizer import (
    DualCodebookConfig,
    DualCodebookLoss,
    DualCodebookLossOutput,
    DualCodebookTokenizer,
    DualCodebookTokenizerOutput,
    losses,
)


def test_reconstruction_losses():
    prediction, target = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, -1.0], [2.0, 0.0]]]])
    assert losses.reconstruction_loss(prediction, target, "l1") == pytest.approx(1.0)
    assert losses.reconstruction_loss(prediction, target, "l2") == pytest.approx(1.5)
    with pytest.raises(ValueError, match="'l1' or 'l2'"):
        losses.reconstruction_loss(prediction, target, "huber")


def test_cosine_and_perceptual_losses():
    features = torch.randn(2, 3, 3, 8)
    assert losses.cosine_distillation_loss(features, features) == pytest.approx(0.0, abs=1e-6)
    assert losses.cosine_distillation_loss(features, -features) == pytest.approx(2.0, abs=1e-6)
    assert losses.perceptual_loss([features], [2 * features]) == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert losses.perceptual_loss([features], [-features]) == pytest.approx(4.0, abs=1e-5)  # |2u|^2 = 4
    with pytest.raises(ValueError, match="feature layers"):
        losses.perceptual_loss([features], [])


def test_hinge_losses():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    # real: relu(1-2)=0, relu(1-0)=1 -> 0.5; fake: relu(1-2)=0, relu(1.5)=1.5 -> 0.75; halved sum 0.625
    assert losses.hinge_discriminator_loss(real, fake) == pytest.approx(0.625)
    assert losses.hinge_generator_loss(fake) == pytest.approx(0.75)


def test_vector_quantization_losses_route_gradients():
    codes = torch.randn(4, 3, requires_grad=True)
    quantized = torch.randn(4, 3, requires_grad=True)
    codebook, commitment = losses.vector_quantization_losses(codes, quantized)
    codebook.backward()
    assert codes.grad is None and quantized.grad is not None
    commitment.backward()
    assert codes.grad is not None


def test_codebook_perplexity():
    assert losses.codebook_perplexity(torch.ones(8)) == pytest.approx(8.0)
    assert losses.codebook_perplexity(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert losses.codebook_perplexity(torch.tensor([1.0, 1.0, 2.0])) == pytest.approx(
        math.exp(1.5 * math.log(2))
    )


def tokenizer_losses(
    tokenizer: DualCodebookTokenizer,
    loss: DualCodebookLoss,
    pixel_values: torch.Tensor,
    step: int | None = None,
) -> tuple[DualCodebookTokenizerOutput, DualCodebookLossOutput]:
    """What the tokenizer stage's training model does: the tokenizer's outputs, then the loss on them."""
    outputs = tokenizer(pixel_values, output_teacher_hidden_states=loss.needs_teacher_hidden_states)
    grid = tuple(outputs.image_token_ids.shape[1:])
    network = partial(tokenizer.teacher_features, grid=grid, all_layers=True)
    return outputs, loss(pixel_values, outputs, step=step, perceptual_network=network)


def tiny_loss(**kwargs) -> DualCodebookLoss:
    """The loss as the tokenizer stage builds it for `tokenizer_config: tiny`."""
    config = DualCodebookConfig.tiny()
    kwargs.setdefault("discriminator_channels", 8)
    return DualCodebookLoss(config.num_channels, discriminator_norm_groups=config.norm_num_groups, **kwargs)


# Terms of the seeded tiny tokenizer (fixture seeds 0 and 1, then seed 123 for the data-dependent codebook
# init), recorded when these losses were computed inside DualCodebookTokenizer.forward (torch 2.13 CPU); the
# loss module reproduces them bitwise.
GOLDEN_TERMS = {
    "default": (
        {},
        {
            "loss": 1.9534436464309692,
            "reconstruction_loss": 0.5603517889976501,
            "perceptual_loss": 1.8608670234680176,
            "codebook_loss": 0.17705947160720825,
            "commitment_loss": 0.17705947160720825,
            "semantic_loss": 0.985680878162384,
        },
    ),
    "l2_without_perceptual": (
        {"reconstruction_loss": "l2", "perceptual_weight": 0.0},
        {
            "loss": 1.659609317779541,
            "reconstruction_loss": 0.45260417461395264,
            "codebook_loss": 0.17705947160720825,
            "commitment_loss": 0.17705947160720825,
            "semantic_loss": 0.985680878162384,
        },
    ),
    "reweighted": (
        {
            "codebook_weight": 0.7,
            "commitment_weight": 0.3,
            "semantic_weight": 2.0,
            "reconstruction_weight": 0.5,
        },
        {
            "loss": 2.6146838665008545,
            "reconstruction_loss": 0.5603517889976501,
            "perceptual_loss": 1.8608670234680176,
            "codebook_loss": 0.17705947160720825,
            "commitment_loss": 0.17705947160720825,
            "semantic_loss": 0.985680878162384,
        },
    ),
}


@pytest.mark.parametrize("case", sorted(GOLDEN_TERMS))
def test_golden_loss_terms_and_total(tiny_tokenizer, pixel_values, case):
    kwargs, expected = GOLDEN_TERMS[case]
    tiny_tokenizer.train()
    torch.manual_seed(123)
    _, result = tokenizer_losses(tiny_tokenizer, tiny_loss(**kwargs), pixel_values)
    got = {name: float(value.detach()) for name, value in result.items()}
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_total_is_the_weighted_sum_of_the_named_terms(tiny_tokenizer, pixel_values):
    weights = {
        "reconstruction_weight": 0.5,
        "perceptual_weight": 0.2,
        "codebook_weight": 0.7,
        "commitment_weight": 0.3,
        "semantic_weight": 2.0,
    }
    outputs, result = tokenizer_losses(tiny_tokenizer, tiny_loss(**weights), pixel_values)
    expected = (
        0.5 * result.reconstruction_loss
        + 0.2 * result.perceptual_loss
        + 0.7 * result.codebook_loss
        + 0.3 * result.commitment_loss
        + 2.0 * result.semantic_loss
    )
    torch.testing.assert_close(result.loss, expected)
    # The quantizer's own terms pass through unweighted.
    assert result.codebook_loss is outputs.codebook_loss and result.commitment_loss is outputs.commitment_loss
    assert result.generator_loss is None and result.discriminator_loss is None


def test_gradients_reach_trainable_parts_but_not_the_frozen_teacher(tiny_tokenizer, pixel_values):
    tiny_tokenizer.train()
    tokenizer_losses(tiny_tokenizer, tiny_loss(), pixel_values)[1].loss.backward()
    for name in (
        "pixel_encoder.conv_in.weight",
        "semantic_adapter.0.weight",
        "pixel_decoder.conv_out.weight",
        "semantic_decoder.conv_out.weight",
    ):
        assert tiny_tokenizer.get_parameter(name).grad.abs().sum() > 0, name
    assert tiny_tokenizer.quantizer.semantic_codebook.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny_tokenizer.teacher.parameters())
    assert not tiny_tokenizer.teacher.training  # a frozen teacher stays in eval mode


def test_adversarial_terms_switch_on_and_stay_separated(tiny_tokenizer, pixel_values):
    loss = tiny_loss(adversarial_weight=0.5, adversarial_start_step=10)
    tiny_tokenizer.train()
    assert tokenizer_losses(tiny_tokenizer, loss, pixel_values, step=9)[1].generator_loss is None
    assert tokenizer_losses(tiny_tokenizer, loss, pixel_values, step=None)[1].generator_loss is None
    _, result = tokenizer_losses(tiny_tokenizer, loss, pixel_values, step=10)
    assert torch.isfinite(result.generator_loss) and torch.isfinite(result.discriminator_loss)
    without_gan = result.loss - 0.5 * result.generator_loss - result.discriminator_loss
    torch.testing.assert_close(
        tokenizer_losses(tiny_tokenizer, loss, pixel_values, step=9)[1].loss, without_gan
    )
    result.generator_loss.backward(retain_graph=True)
    assert all(p.grad is None for p in loss.discriminator.parameters())  # generator term: no D update
    assert tiny_tokenizer.pixel_decoder.conv_out.weight.grad.abs().sum() > 0
    tiny_tokenizer.zero_grad()
    result.discriminator_loss.backward()
    assert tiny_tokenizer.pixel_decoder.conv_out.weight.grad is None  # D term: no generator update
    assert all(p.grad is not None for p in loss.discriminator.parameters())


def test_discriminator_exists_only_with_an_adversarial_weight():
    assert tiny_loss().discriminator is None and list(tiny_loss().parameters()) == []
    discriminator = tiny_loss(adversarial_weight=0.1, discriminator_layers=3).discriminator
    logits = discriminator(torch.zeros(2, 3, 16, 24))
    assert logits.shape == (2, 1, 2, 3)  # three stride-2 layers: one logit per 8x8-pixel patch


def test_perceptual_term_needs_the_teachers_hidden_states(tiny_tokenizer, pixel_values):
    loss = tiny_loss()
    assert (
        loss.needs_teacher_hidden_states and not tiny_loss(perceptual_weight=0.0).needs_teacher_hidden_states
    )
    outputs = tiny_tokenizer(pixel_values)
    with pytest.raises(ValueError, match="output_teacher_hidden_states=True"):
        loss(pixel_values, outputs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reconstruction_loss": "ssim"}, "reconstruction_loss='ssim'"),
        ({"commitment_weight": -0.25}, "non-negative"),
    ],
)
def test_bad_loss_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DualCodebookLoss(**kwargs)
