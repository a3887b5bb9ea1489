from types import SimpleNamespace

import pytest
import torch

from unimm.detokenizer import TokenDiffusionDecoder

CODEBOOK_SIZE, SEMANTIC_DIM, PIXEL_DIM, IMAGE_SIZE, GRID = 16, 8, 4, 16, 4


def noisy_sample(batch_size: int = 2, size: int = IMAGE_SIZE) -> torch.Tensor:
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(3))


def test_forward_shape_and_golden_slice(decoder, image_token_ids):
    with torch.no_grad():
        output = decoder(noisy_sample(), torch.tensor([10, 50]), image_token_ids=image_token_ids)
    assert output.sample.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    expected = torch.tensor([-0.0703, 0.0302, 0.0399, -0.2264, -0.5818, -1.1212])
    torch.testing.assert_close(output.sample[0, 0, 0, :6], expected, atol=1e-4, rtol=1e-3)


def test_codebooks_are_frozen_buffers(decoder):
    parameter_names = {name for name, _ in decoder.named_parameters()}
    assert "semantic_codebook" not in parameter_names and "pixel_codebook" not in parameter_names
    assert {"semantic_codebook", "pixel_codebook"} <= set(decoder.state_dict())


def test_condition_uses_both_codebooks_and_upsampled_pixel_map(decoder, image_token_ids):
    condition = decoder.embed_condition(image_token_ids)
    assert condition.encoder_hidden_states.shape == (2, GRID * GRID, decoder.config.cross_attention_dim)
    torch.testing.assert_close(
        condition.pixel_code_map, decoder.pixel_codebook[image_token_ids].permute(0, 3, 1, 2)
    )
    # Changing only the semantic vector of the used ids changes the cross-attention states.
    decoder.semantic_codebook[image_token_ids[0, 0, 0]] += 1.0
    changed = decoder.embed_condition(image_token_ids)
    assert not torch.allclose(changed.encoder_hidden_states[0, 0], condition.encoder_hidden_states[0, 0])
    torch.testing.assert_close(changed.pixel_code_map, condition.pixel_code_map)


def test_dropped_condition_is_the_learned_null_for_any_ids(decoder):
    ids_a = torch.zeros(1, GRID, GRID, dtype=torch.long)
    ids_b = torch.full((1, GRID, GRID), CODEBOOK_SIZE - 1)
    drop = torch.tensor([True])
    null_a, null_b = decoder.embed_condition(ids_a, drop), decoder.embed_condition(ids_b, drop)
    torch.testing.assert_close(null_a.encoder_hidden_states, null_b.encoder_hidden_states)
    torch.testing.assert_close(null_a.pixel_code_map[0, :, 0, 0], decoder.null_token_embedding[SEMANTIC_DIM:])
    # The null vector is learned: the loss reaches it through a dropped row.
    output = decoder(noisy_sample(1), torch.tensor([5]), image_token_ids=ids_a, drop_condition=drop)
    output.sample.square().mean().backward()
    assert decoder.null_token_embedding.grad is not None and decoder.null_token_embedding.grad.abs().sum() > 0


def test_any_grid_multiple(decoder):
    ids = torch.randint(0, CODEBOOK_SIZE, (1, 2, 3))
    with torch.no_grad():
        output = decoder(torch.randn(1, 3, 8, 12), torch.tensor([1]), image_token_ids=ids)
    assert output.sample.shape == (1, 3, 8, 12)


def test_save_load_round_trip(decoder, image_token_ids, tmp_path):
    decoder.save_pretrained(tmp_path)
    loaded = TokenDiffusionDecoder.from_pretrained(tmp_path).eval()
    assert loaded.config.codebook_size == CODEBOOK_SIZE and loaded.config.prediction_type == "epsilon"
    torch.testing.assert_close(loaded.pixel_codebook, decoder.pixel_codebook)
    with torch.no_grad():
        expected = decoder(noisy_sample(), torch.tensor([10, 50]), image_token_ids=image_token_ids).sample
        actual = loaded(noisy_sample(), torch.tensor([10, 50]), image_token_ids=image_token_ids).sample
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)


def test_from_tokenizer_copies_codebook(make_decoder):
    semantic, pixel = torch.randn(CODEBOOK_SIZE, SEMANTIC_DIM), torch.randn(CODEBOOK_SIZE, PIXEL_DIM)
    tokenizer = SimpleNamespace(
        config=SimpleNamespace(
            codebook_size=CODEBOOK_SIZE,
            semantic_code_dim=SEMANTIC_DIM,
            pixel_code_dim=PIXEL_DIM,
            downsample_factor=4,
        ),
        get_codebook_vectors=lambda: (semantic, pixel),
    )
    reference = make_decoder()
    unet_kwargs = {
        key: reference.config[key] for key in ("block_out_channels", "down_block_types", "up_block_types")
    }
    unet_kwargs.update(
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        cross_attention_dim=32,
        sample_size=IMAGE_SIZE,
    )
    decoder = TokenDiffusionDecoder.from_tokenizer(tokenizer, **unet_kwargs)
    torch.testing.assert_close(decoder.semantic_codebook, semantic)
    torch.testing.assert_close(decoder.pixel_codebook, pixel)
    assert decoder.config.downsample_factor == 4


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.full((1, GRID, GRID), CODEBOOK_SIZE), r"\[0, 15\].*got values in \[16, 16\]"),
        (torch.full((1, GRID, GRID), -1), r"\[0, 15\]"),
        (torch.zeros(GRID, GRID, dtype=torch.long), r"shape \(B, h, w\)"),
        (torch.zeros(1, GRID, GRID), "integer tensor"),
    ],
)
def test_bad_token_ids(decoder, ids, message):
    with pytest.raises(ValueError, match=message):
        decoder(noisy_sample(1), torch.tensor([1]), image_token_ids=ids)


def test_bad_shapes(decoder, image_token_ids):
    with pytest.raises(ValueError, match=r"multiple of the token grid 4x4"):
        decoder(torch.randn(2, 3, 18, 18), torch.tensor([1, 1]), image_token_ids=image_token_ids)
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        decoder(torch.randn(2, 4, 16, 16), torch.tensor([1, 1]), image_token_ids=image_token_ids)
    with pytest.raises(ValueError, match=r"semantic codebook must have shape \(16, 8\)"):
        decoder.load_codebook(torch.randn(16, 9), torch.randn(16, 4))
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        TokenDiffusionDecoder(prediction_type="x0")
