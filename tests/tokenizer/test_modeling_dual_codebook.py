from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, ViTConfig, ViTModel

from unimm.tokenizer import DualCodebookConfig, DualCodebookTokenizer, modeling_dual_codebook
from unimm.tokenizer.configuration_dual_codebook import TRAINING_ONLY_KEYS
from unimm.tokenizer.modeling_dual_codebook import (
    DualCodebookQuantizer,
    nearest_shared_index,
    shared_index_distances,
)


def test_forward_returns_what_a_loss_reads_without_weighting(tiny_tokenizer, pixel_values):
    output = tiny_tokenizer(pixel_values)
    assert output.image_token_ids.shape == (2, 4, 6)
    assert output.reconstruction.shape == pixel_values.shape
    assert output.semantic_embeddings.shape == (2, 4, 6, 8) and output.pixel_embeddings.shape == (2, 4, 6, 4)
    assert output.semantic_prediction.shape == output.teacher_features.shape == (2, 4, 6, 32)
    assert output.teacher_hidden_states is None  # asked for by the perceptual loss only
    assert torch.isfinite(output.codebook_loss) and torch.isfinite(output.commitment_loss)
    assert 0 < output.codebook_usage <= 1
    assert 1 <= output.perplexity <= tiny_tokenizer.config.codebook_size
    assert not hasattr(output, "loss") and not hasattr(tiny_tokenizer, "discriminator")


def test_teacher_hidden_states_end_with_the_configured_layer(tiny_tokenizer, pixel_values):
    output = tiny_tokenizer(pixel_values, output_teacher_hidden_states=True)
    # The tiny teacher's 2 layers: the first layer's output, then the configured one (last_hidden_state).
    assert len(output.teacher_hidden_states) == 2
    assert all(layer.shape == (2, 4, 6, 32) for layer in output.teacher_hidden_states)
    assert output.teacher_hidden_states[-1] is output.teacher_features


def test_encode_decode_embed_api(tiny_tokenizer, pixel_values):
    tiny_tokenizer.eval()
    ids = tiny_tokenizer.encode(pixel_values)
    assert ids.dtype == torch.long and ids.shape == (2, 4, 6)
    assert torch.equal(ids, tiny_tokenizer(pixel_values).image_token_ids)
    embeddings = tiny_tokenizer.embed(ids)
    assert embeddings.semantic_embeddings.shape == (2, 4, 6, 8)
    assert embeddings.pixel_embeddings.shape == (2, 4, 6, 4)
    semantic, pixel = tiny_tokenizer.get_codebook_vectors()
    assert semantic.shape == (16, 8) and pixel.shape == (16, 4)
    torch.testing.assert_close(embeddings.semantic_embeddings, semantic[ids])
    torch.testing.assert_close(semantic.norm(dim=-1), torch.ones(16))  # l2-normalised entries
    images = tiny_tokenizer.decode(ids)
    assert images.shape == (2, 3, 16, 24)
    assert images.min() >= -1 and images.max() <= 1  # the processor's range for mean = std = 0.5


def test_golden_ids_and_reconstruction(tiny_tokenizer, pixel_values):
    """Regression values of the seeded tiny model (fixture seeds 0 and 1)."""
    tiny_tokenizer.eval()
    ids = tiny_tokenizer.encode(pixel_values)
    reconstruction = tiny_tokenizer.decode(ids)
    assert ids[0, 0].tolist() == GOLDEN_IDS
    torch.testing.assert_close(reconstruction[0, 0, 0, :4], torch.tensor(GOLDEN_PIXELS), atol=1e-4, rtol=0)


# Recorded from this implementation (torch 2.13 CPU); a change means initialisation or the math moved.
GOLDEN_IDS = [8, 9, 8, 1, 7, 1]
GOLDEN_PIXELS = [-0.0835, 0.07091, 0.04428, 0.06908]


def test_teacher_under_bf16_autocast_gives_float32_features_close_to_float32(tiny_config, pixel_values):
    torch.manual_seed(0)
    reference = DualCodebookTokenizer(tiny_config).eval()
    fast = DualCodebookTokenizer(DualCodebookConfig.tiny(teacher_autocast_dtype="bfloat16")).eval()
    fast.load_state_dict(reference.state_dict())
    with torch.no_grad():
        (expected,) = reference.teacher_features(pixel_values, (4, 6))
        (features,) = fast.teacher_features(pixel_values, (4, 6))
    assert features.dtype == torch.float32 and features.shape == expected.shape == (2, 4, 6, 32)
    assert not torch.equal(features, expected)  # bf16 matmuls did run
    torch.testing.assert_close(features, expected, atol=0.1, rtol=0.05)  # bf16 keeps ~3 significant digits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("teacher_dtype", [None, torch.float32])
def test_half_precision_encode_and_decode(tiny_tokenizer, pixel_values, dtype, teacher_dtype):
    # from_pretrained(dtype=bfloat16) crashed in encode ("mat1 and mat2 must have the same dtype"): the
    # features left the teacher as float32; a real checkpoint's teacher also stays float32.
    half = copy.deepcopy(tiny_tokenizer).to(dtype)
    if teacher_dtype is not None:
        half.teacher.to(teacher_dtype)
    ids = half.encode(pixel_values)  # float32 pixels: each branch casts to its own dtype
    assert ids.shape == (2, 4, 6)
    assert (ids == tiny_tokenizer.encode(pixel_values)).float().mean() > 0.5
    assert half.decode(ids).dtype == dtype


def test_a_teacher_saved_as_float32_loads_in_the_tokenizers_dtype(tiny_tokenizer, pixel_values, tmp_path):
    # The demo checkpoint's teacher_config records "dtype": "float32" (copied from the loaded teacher): its
    # teacher stayed float32 under from_pretrained(dtype=torch.bfloat16), beside a bfloat16 adapter.
    tiny_tokenizer.config.teacher_config = {**tiny_tokenizer.config.teacher_config, "dtype": "float32"}
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = DualCodebookTokenizer.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert {parameter.dtype for parameter in loaded.parameters()} == {torch.bfloat16}
    assert "dtype" not in loaded.config.teacher_config
    assert loaded.encode(pixel_values).shape == (2, 4, 6)
    default = DualCodebookTokenizer.from_pretrained(tmp_path)
    assert {parameter.dtype for parameter in default.parameters()} == {torch.float32}


def test_nearest_entry_search_of_half_precision_codes_is_the_float32_search():
    # In bfloat16, distances round and tie: about 1% of the demo tokenizer's ids flipped against float32.
    generator = torch.Generator().manual_seed(0)
    half = DualCodebookQuantizer(DualCodebookConfig.tiny(codebook_size=256)).to(torch.bfloat16)
    exact = copy.deepcopy(half).float()  # the same (bfloat16) values, in float32
    semantic = torch.randn(2, 32, 32, 8, generator=generator).to(torch.bfloat16)  # (B, h, w, Ds)
    pixel = torch.randn(2, 32, 32, 4, generator=generator).to(torch.bfloat16)  # (B, h, w, Dp)
    flat = [
        torch.nn.functional.normalize(codes.reshape(-1, codes.shape[-1]), dim=-1)
        for codes in (semantic, pixel)
    ]
    assert torch.equal(half.select(*flat), exact.select(*(codes.float() for codes in flat)))
    ids = half.nearest(semantic, pixel)
    assert ids.shape == (2, 32, 32)
    assert torch.equal(ids, exact.nearest(semantic.float(), pixel.float()))


def test_save_pretrained_round_trip_gives_identical_ids_and_images(tiny_tokenizer, pixel_values, tmp_path):
    tiny_tokenizer.train()
    tiny_tokenizer(pixel_values)  # data-dependent codebook init and EMA statistics change the state
    tiny_tokenizer.eval()
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, DualCodebookTokenizer)
    ids = tiny_tokenizer.encode(pixel_values)
    assert torch.equal(loaded.encode(pixel_values), ids)
    assert torch.equal(loaded.decode(ids), tiny_tokenizer.decode(ids))
    assert torch.equal(loaded.quantizer.usage, tiny_tokenizer.quantizer.usage)


def test_shared_index_selection_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    semantic, pixel = torch.randn(50, 6, generator=generator), torch.randn(50, 3, generator=generator)
    semantic_codebook, pixel_codebook = (
        torch.randn(20, 6, generator=generator),
        torch.randn(20, 3, generator=generator),
    )
    for weights in ((1.0, 1.0), (0.3, 2.0), (1.0, 0.0)):
        distances = shared_index_distances(semantic, pixel, semantic_codebook, pixel_codebook, *weights)
        expected = torch.empty(50, 20)
        for i in range(50):
            for k in range(20):
                expected[i, k] = (
                    weights[0] * ((semantic[i] - semantic_codebook[k]) ** 2).sum()
                    + weights[1] * ((pixel[i] - pixel_codebook[k]) ** 2).sum()
                )
        torch.testing.assert_close(distances, expected, atol=1e-4, rtol=1e-4)
        reference = [min(range(20), key=lambda k, i=i: float(expected[i, k])) for i in range(50)]
        assert distances.argmin(-1).tolist() == reference
        codebooks = (semantic_codebook, pixel_codebook)
        assert nearest_shared_index(semantic, pixel, *codebooks, *weights).tolist() == reference
    # The shared index differs from either branch's own nearest entry: both distances count.
    alone = shared_index_distances(semantic, pixel, semantic_codebook, pixel_codebook, 1.0, 0.0).argmin(-1)
    joint = shared_index_distances(semantic, pixel, semantic_codebook, pixel_codebook, 1.0, 1.0).argmin(-1)
    assert not torch.equal(alone, joint)


def test_nearest_shared_index_searches_in_chunks(monkeypatch):
    monkeypatch.setattr(modeling_dual_codebook, "NEAREST_CHUNK_ROWS", 7)  # 50 rows: 8 chunks, the last short
    generator = torch.Generator().manual_seed(1)
    semantic, pixel = torch.randn(50, 6, generator=generator), torch.randn(50, 3, generator=generator)
    codebooks = (torch.randn(20, 6, generator=generator), torch.randn(20, 3, generator=generator))
    expected = shared_index_distances(semantic, pixel, *codebooks, 0.5, 2.0).argmin(-1)
    assert torch.equal(
        modeling_dual_codebook.nearest_shared_index(semantic, pixel, *codebooks, 0.5, 2.0), expected
    )
    empty = nearest_shared_index(semantic[:0], pixel[:0], *codebooks, 1.0, 1.0)
    assert empty.shape == (0,) and empty.dtype == torch.long


def test_quantizer_select_uses_normalised_codebook():
    config = DualCodebookConfig.tiny(semantic_distance_weight=0.5, pixel_distance_weight=2.0)
    quantizer = DualCodebookQuantizer(config)
    semantic = torch.nn.functional.normalize(torch.randn(30, 8), dim=-1)
    pixel = torch.nn.functional.normalize(torch.randn(30, 4), dim=-1)
    semantic_codebook, pixel_codebook = quantizer.codebook_vectors()
    cosine_score = 0.5 * (2 - 2 * semantic @ semantic_codebook.t()) + 2.0 * (
        2 - 2 * pixel @ pixel_codebook.t()
    )
    assert torch.equal(quantizer.select(semantic, pixel), cosine_score.argmin(-1))


def test_ema_codebook_moves_towards_assigned_codes_without_gradients(pixel_values):
    config = DualCodebookConfig.tiny(codebook_update="ema", codebook_l2_normalize=False, ema_decay=0.5)
    model = DualCodebookTokenizer(config).train()
    assert not model.quantizer.semantic_codebook.requires_grad
    model(pixel_values)  # first call: data-dependent init
    before = model.quantizer.pixel_codebook.detach().clone()
    output = model(pixel_values)
    assert output.codebook_loss == 0
    used = torch.unique(output.image_token_ids)
    assert not torch.allclose(model.quantizer.pixel_codebook[used], before[used])


def test_dead_entries_are_restarted_from_batch_codes(pixel_values):
    config = DualCodebookConfig.tiny(dead_code_restart_interval=2, dead_code_threshold=0.5, ema_decay=0.99)
    model = DualCodebookTokenizer(config).train()
    model(pixel_values)  # update 1: data-dependent init
    model.quantizer.usage[:8] = 0.0  # entries 0-7 look dead; 8-15 keep usage ~1, twice the average
    before = model.quantizer.semantic_codebook.detach().clone()
    model(pixel_values)  # update 2: restart
    after = model.quantizer.semantic_codebook.detach()
    assert not torch.isclose(after[:8], before[:8]).all(dim=-1).any()
    assert torch.equal(after[8:], before[8:])
    assert (model.quantizer.usage[:8] > 0).all()


def test_checkpoint_with_loss_settings_and_discriminator_weights_loads_cleanly(
    tiny_tokenizer, pixel_values, tmp_path, caplog
):
    """Folders saved before the loss left the model: training keys in config.json, maybe `discriminator.*`
    weights in model.safetensors. They load with no missing or unexpected keys and no warning."""
    tiny_tokenizer.eval().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    legacy = {
        "reconstruction_loss": "l1",
        "reconstruction_weight": 1.0,
        "perceptual_weight": 0.1,
        "codebook_weight": 1.0,
        "commitment_weight": 0.25,
        "semantic_weight": 1.0,
        "adversarial_weight": 0.1,
        "adversarial_start_step": 2,
        "discriminator_channels": 8,
        "discriminator_layers": 2,
    }
    assert set(legacy) == set(TRAINING_ONLY_KEYS)
    (tmp_path / "config.json").write_text(json.dumps({**config, **legacy}))
    weights = load_file(tmp_path / "model.safetensors")
    weights["discriminator.layers.0.weight"] = torch.zeros(8, 3, 4, 4)
    weights["discriminator.layers.0.bias"] = torch.zeros(8)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.INFO):
        loaded, info = DualCodebookTokenizer.from_pretrained(tmp_path, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert not warnings  # e.g. transformers' LOAD REPORT table of missing/unexpected keys
    assert not any(hasattr(loaded.config, key) for key in TRAINING_ONLY_KEYS)
    assert torch.equal(loaded.eval().encode(pixel_values), tiny_tokenizer.encode(pixel_values))
    loaded.save_pretrained(tmp_path / "resaved")  # the stale loss settings are not written again
    assert not set(TRAINING_ONLY_KEYS) & set(json.loads((tmp_path / "resaved" / "config.json").read_text()))


def test_teacher_loaded_by_path_is_recorded_in_config(tmp_path, pixel_values):
    teacher = ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=16,
            patch_size=4,
        )
    )
    teacher.save_pretrained(tmp_path / "teacher")
    config = DualCodebookConfig.tiny(teacher_name_or_path=str(tmp_path / "teacher"), teacher_config=None)
    model = DualCodebookTokenizer(config)
    torch.testing.assert_close(model.teacher.embeddings.cls_token, teacher.embeddings.cls_token)
    assert model.config.teacher_config["model_type"] == "vit"
    model.save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "teacher" / "model.safetensors").unlink()  # reloading needs only the tokenizer folder
    loaded = DualCodebookTokenizer.from_pretrained(tmp_path / "tokenizer")
    torch.testing.assert_close(loaded.teacher.embeddings.cls_token, teacher.embeddings.cls_token)


TEACHERS = {
    "vit": {
        "model_type": "vit",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 16,
        "patch_size": 4,
    },
    "dinov2": {
        "model_type": "dinov2",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "mlp_ratio": 2,
        "image_size": 14,
        "patch_size": 7,
    },
    "clip_vision_model": {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 16,
        "patch_size": 8,
    },
    "siglip_vision_model": {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 16,
        "patch_size": 4,
    },
}


@pytest.mark.parametrize("family", sorted(TEACHERS))
def test_teacher_families(family, pixel_values):
    model = DualCodebookTokenizer(DualCodebookConfig.tiny(teacher_config=TEACHERS[family]))
    output = model(pixel_values, output_teacher_hidden_states=True)
    assert output.image_token_ids.shape == (2, 4, 6)
    assert torch.isfinite(output.reconstruction).all()
    assert all(layer.shape == (2, 4, 6, 32) for layer in output.teacher_hidden_states)
    features = model.teacher_features(pixel_values, (4, 6))
    assert features[0].shape == (2, 4, 6, 32)


@pytest.mark.parametrize(
    ("pixel_values", "message"),
    [
        (torch.zeros(1, 1, 16, 16), r"expected \(B, 3, H, W\)"),
        (torch.zeros(3, 16, 16), r"expected \(B, 3, H, W\)"),
        (torch.zeros(1, 3, 16, 18), "multiples of downsample_factor=4"),
        (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "expected a float tensor"),
        (torch.full((1, 3, 16, 16), float("nan")), "NaN"),
    ],
)
def test_bad_pixel_values_raise(tiny_tokenizer, pixel_values, message):
    for method in (tiny_tokenizer.encode, tiny_tokenizer.forward):
        with pytest.raises(ValueError, match=message):
            method(pixel_values)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.full((1, 4, 4), 16), r"expected ids in \[0, 15\]"),
        (torch.full((1, 4, 4), -1), r"expected ids in \[0, 15\]"),
        (torch.zeros(1, 4, 4), "integer tensor"),
        (torch.zeros(4, 4, dtype=torch.long), r"expected \(B, h, w\)"),
    ],
)
def test_bad_ids_raise(tiny_tokenizer, ids, message):
    with pytest.raises(ValueError, match=message):
        tiny_tokenizer.decode(ids)
