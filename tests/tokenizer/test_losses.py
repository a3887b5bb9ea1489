from __future__ import annotations

import math

import pytest
import torch

from unimm.tokenizer import losses


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
