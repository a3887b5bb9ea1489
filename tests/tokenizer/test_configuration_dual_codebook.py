from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from unimm.tokenizer import DualCodebookConfig
from unimm.tokenizer.configuration_dual_codebook import NAMED_CONFIGS, TRAINING_ONLY_KEYS


def test_tiny_config_round_trip(tmp_path):
    config = DualCodebookConfig.tiny(codebook_update="ema")
    config.save_pretrained(tmp_path)
    json.loads((tmp_path / "config.json").read_text())  # plain JSON
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, DualCodebookConfig)
    assert loaded.to_diff_dict() | {"_name_or_path": ""} == config.to_diff_dict() | {"_name_or_path": ""}
    assert (loaded.codebook_size, loaded.grid_size, loaded.bits_per_token) == (16, 4, 4.0)


@pytest.mark.parametrize("name", sorted(NAMED_CONFIGS))
def test_named_configs_build(name):
    config = DualCodebookConfig.named(name)
    assert config.image_size % config.downsample_factor == 0
    assert len(config.channel_multipliers) == config.downsample_factor.bit_length()


def test_named_image_size_override_follows_into_builtin_teacher():
    assert DualCodebookConfig.named("demo", image_size=64).teacher_config["image_size"] == 64


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"downsample_factor": 3}, "power of two"),
        ({"channel_multipliers": [1, 2]}, "3 levels"),
        ({"image_size": 18}, "multiple of downsample_factor"),
        ({"norm_num_groups": 5}, "divisor"),
        ({"codebook_update": "kmeans"}, "codebook_update"),
        ({"codebook_size": 1}, "at least 2"),
        ({"image_mean": [0.5]}, "num_channels=3"),
        ({"teacher_autocast_dtype": "float64"}, "teacher_autocast_dtype"),
    ],
)
def test_invalid_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DualCodebookConfig.tiny(**kwargs)


def test_loss_settings_are_not_config_fields():
    """Loss weights and the discriminator belong to DualCodebookLoss; old config.json files still load."""
    config = DualCodebookConfig.tiny(adversarial_weight=0.1, perceptual_weight=0.0, reconstruction_loss="l2")
    assert not {"adversarial_weight", "perceptual_weight", "reconstruction_loss"} & set(config.to_dict())
    assert not any(key in values for values in NAMED_CONFIGS.values() for key in TRAINING_ONLY_KEYS)


def test_unknown_named_config():
    with pytest.raises(ValueError, match="expected one of"):
        DualCodebookConfig.named("huge")
