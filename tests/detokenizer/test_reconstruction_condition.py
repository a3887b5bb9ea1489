"""`condition_on_reconstruction`: the decoder also sees the tokenizer pixel decoder's image of the ids."""

import functools

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from unimm.detokenizer import DetokenizerPipeline, TokenDiffusionDecoder

IMAGE_SIZE, GRID, SAMPLE_CHANNELS, PIXEL_DIM = 16, 4, 3, 4


@pytest.fixture(name="tokenizer")
def tokenizer_fixture(make_tokenizer):
    return make_tokenizer()


@pytest.fixture(name="reconstructing_decoder")
def reconstructing_decoder_fixture(make_reconstructing_decoder, tokenizer):
    return functools.partial(make_reconstructing_decoder, tokenizer)


def test_reconstruction_is_the_tokenizer_decode_in_minus_one_to_one(
    reconstructing_decoder, tokenizer, image_token_ids
):
    decoder = reconstructing_decoder()
    # The tokenizer's normalisation is mean 0.5 / std 0.5: its decode is already in [-1, 1].
    torch.testing.assert_close(decoder.reconstruct(image_token_ids), tokenizer.decode(image_token_ids))
    assert decoder.unet.config.in_channels == SAMPLE_CHANNELS + PIXEL_DIM + 3
    copied = [
        param for name, param in decoder.named_parameters() if name.startswith("reconstruction_decoder.")
    ]
    assert copied and not any(param.requires_grad for param in copied)
    assert decoder.config.reconstruction_decoder_config["channel_multipliers"] == [1, 1, 1]


def test_dropped_rows_get_a_zero_reconstruction_and_the_prediction_depends_on_it(
    reconstructing_decoder, tokenizer, image_token_ids
):
    decoder = reconstructing_decoder()
    condition = decoder.embed_condition(image_token_ids, drop_condition=torch.tensor([True, False]))
    assert condition.reconstruction.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert condition.reconstruction[0].abs().sum() == 0
    torch.testing.assert_close(condition.reconstruction[1], decoder.reconstruct(image_token_ids)[1])
    sample = torch.randn(
        2, SAMPLE_CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        reference = decoder(sample, torch.tensor([10, 50]), condition=condition).sample
        condition.reconstruction = condition.reconstruction + 0.5
        shifted = decoder(sample, torch.tensor([10, 50]), condition=condition).sample
    assert reference.shape == (2, SAMPLE_CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
    assert not torch.allclose(reference, shifted)


def test_latent_samples_get_the_reconstruction_resized(reconstructing_decoder, tokenizer, image_token_ids):
    decoder = reconstructing_decoder(sample_channels=4, sample_size=IMAGE_SIZE // 2)
    sample = torch.randn(2, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)  # an autoencoder's latents, 2 px per cell
    with torch.no_grad():
        output = decoder(sample, torch.tensor([10, 50]), image_token_ids=image_token_ids)
    assert output.sample.shape == (2, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)


def test_bad_configurations_raise(make_decoder, reconstructing_decoder, tiny_unet, image_token_ids):
    with pytest.raises(ValueError, match="reconstruction_decoder_config.*missing \\['channel_multipliers'"):
        TokenDiffusionDecoder(
            condition_on_reconstruction=True,
            reconstruction_decoder_config={"num_channels": 3, "hidden_channels": 16},
            **tiny_unet,
        )
    with pytest.raises(ValueError, match="condition_on_reconstruction"):
        make_decoder().reconstruct(image_token_ids)
    decoder = reconstructing_decoder()
    condition = decoder.embed_condition(image_token_ids)
    condition.reconstruction = None
    with pytest.raises(ValueError, match="compute it with embed_condition"):
        decoder(torch.zeros(2, SAMPLE_CHANNELS, IMAGE_SIZE, IMAGE_SIZE), 10, condition=condition)


def test_default_is_off(make_decoder):
    decoder = make_decoder()
    assert decoder.config.condition_on_reconstruction is False and decoder.reconstruction_decoder is None
    assert not any(name.startswith("reconstruction_decoder.") for name in decoder.state_dict())


def test_pipeline_round_trip_gives_identical_images(
    reconstructing_decoder, tokenizer, image_token_ids, tmp_path
):
    scheduler = DDIMScheduler(num_train_timesteps=100, clip_sample=False)
    pipeline = DetokenizerPipeline(decoder=reconstructing_decoder(), scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.save_pretrained(tmp_path)
    loaded = DetokenizerPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.decoder.config.condition_on_reconstruction is True
    torch.testing.assert_close(
        loaded.decoder.reconstruct(image_token_ids), pipeline.decoder.reconstruct(image_token_ids)
    )
    images = [
        run(
            image_token_ids,
            num_inference_steps=3,
            guidance_scale=2.0,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images
        for run in (pipeline, loaded)
    ]
    assert images[0].shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_array_equal(images[0], images[1])
