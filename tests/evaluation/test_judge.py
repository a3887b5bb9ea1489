"""The Fashion-MNIST judge of `unimm eval`: the packaged weights, inputs, features, seeded training."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from unimm.evaluation.judge import (
    FEATURE_DIM,
    JUDGE_FILE,
    FashionMNISTJudge,
    fashion_mnist_tensors,
    images_to_tensor,
    judge_accuracy,
    judge_outputs,
    load_judge,
    train_judge,
)


def test_packaged_weights_are_small_and_load():
    from importlib import resources

    path = resources.files("unimm.evaluation") / "data" / JUDGE_FILE
    assert path.is_file() and path.stat().st_size < 1_000_000
    judge = load_judge()
    assert not judge.training
    assert load_judge() is judge  # loaded once per process


@pytest.mark.integration
def test_packaged_judge_scores_real_test_images():
    """Its accuracy on real images is the report's ceiling for generation (91.6% on all 10,000)."""
    pixel_values, labels = fashion_mnist_tensors("test", limit=3000)
    assert pixel_values.shape == (3000, 1, 32, 32) and 0.0 <= pixel_values.min() <= pixel_values.max() <= 1.0
    assert judge_accuracy(load_judge(), pixel_values, labels) >= 0.88


def test_images_to_tensor_is_grey_and_resizes():
    rng = np.random.default_rng(0)
    grey = PIL.Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), mode="L")
    small = PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    pixel_values = images_to_tensor([grey, grey.convert("RGB"), small])
    assert pixel_values.shape == (3, 1, 32, 32) and pixel_values.dtype == torch.float32
    assert pixel_values.min() >= 0.0 and pixel_values.max() <= 1.0
    torch.testing.assert_close(pixel_values[0], pixel_values[1])  # grey -> RGB -> L is exact
    assert images_to_tensor([]).shape == (0, 1, 32, 32)


def test_outputs_are_batch_independent_features():
    judge = load_judge()
    pixel_values = torch.rand(7, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    predictions, features = judge_outputs(judge, pixel_values, batch_size=3)
    assert predictions.shape == (7,) and features.shape == (7, FEATURE_DIM)
    assert predictions.min() >= 0 and predictions.max() < 10 and (features >= 0).all()  # after ReLU
    _, one_batch = judge_outputs(judge, pixel_values, batch_size=7)
    torch.testing.assert_close(features, one_batch, rtol=1e-5, atol=1e-5)
    empty_predictions, empty_features = judge_outputs(judge, pixel_values[:0])
    assert empty_predictions.shape == (0,) and empty_features.shape == (0, FEATURE_DIM)


def _toy_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(48, 1, 32, 32, generator=generator), torch.randint(0, 10, (48,), generator=generator)


def test_training_is_seeded_and_round_trips(tmp_path):
    pixel_values, labels = _toy_data()
    torch.manual_seed(123)
    state_before = torch.random.get_rng_state()
    first = train_judge(pixel_values, labels, epochs=1, batch_size=16, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state_before)  # the caller's RNG is left alone
    second = train_judge(pixel_values, labels, epochs=1, batch_size=16, seed=0)
    other = train_judge(pixel_values, labels, epochs=1, batch_size=16, seed=1)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert not torch.equal(first.hidden.weight, other.hidden.weight)
    assert not first.training
    path = tmp_path / "judge.safetensors"
    first.save_pretrained(path)
    loaded = FashionMNISTJudge.from_pretrained(path)
    torch.testing.assert_close(loaded(pixel_values), first(pixel_values))
