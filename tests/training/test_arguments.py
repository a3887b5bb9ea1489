from __future__ import annotations

import json

import pytest

from unimm import cli
from unimm.training.arguments import TrainingArguments, load_recipe, parse_overrides, parse_recipe
from unimm.training.deepspeed_config import fill_deepspeed_config, load_deepspeed_config
from unimm.training.stages import get_stage_class


def test_recipe_splits_into_loop_and_stage_dataclasses(synthetic_recipe):
    recipe = parse_recipe({**synthetic_recipe, "hidden_size": 16})
    assert isinstance(recipe.training, TrainingArguments)
    assert isinstance(recipe.stage_args, get_stage_class("synthetic").arguments_class)
    assert recipe.training.max_steps == 8
    assert recipe.stage_args.hidden_size == 16
    assert recipe.to_dict()["hidden_size"] == 16


def test_yaml_with_overrides(tmp_path, synthetic_recipe):
    path = tmp_path / "recipe.yaml"
    path.write_text("\n".join(f"{key}: {json.dumps(value)}" for key, value in synthetic_recipe.items()))
    recipe = load_recipe(
        path, ["max_steps=3", "bf16=true", "component_learning_rates={model.embed_tokens: 0.1}"]
    )
    assert recipe.training.max_steps == 3
    assert recipe.training.bf16 is True
    assert recipe.training.component_learning_rates == {"model.embed_tokens": 0.1}


def test_overrides_are_typed_yaml_values():
    assert parse_overrides(["a=1", "b=0.5", "c=text", "d=[x, y]", "e="]) == {
        "a": 1,
        "b": 0.5,
        "c": "text",
        "d": ["x", "y"],
        "e": "",
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["max_steps"])


def test_unknown_key_is_named_with_a_suggestion(synthetic_recipe):
    with pytest.raises(
        ValueError,
        match=r"unknown key\(s\) for stage 'synthetic': 'learning_rat' \(did you mean 'learning_rate'\?\)",
    ):
        parse_recipe({**synthetic_recipe, "learning_rat": 0.1})


def test_wrong_type_is_named(synthetic_recipe):
    with pytest.raises(TypeError, match="`max_steps` should be int, got 'ten'"):
        parse_recipe({**synthetic_recipe, "max_steps": "ten"})
    with pytest.raises(TypeError, match="`component_learning_rates`"):
        parse_recipe({**synthetic_recipe, "component_learning_rates": {"model": "fast"}})


def test_invalid_values_and_stages(synthetic_recipe):
    with pytest.raises(ValueError, match="lr_scheduler_type 'zigzag'"):
        parse_recipe({**synthetic_recipe, "lr_scheduler_type": "zigzag"})
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be >= 1"):
        parse_recipe({**synthetic_recipe, "gradient_accumulation_steps": 0})
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        parse_recipe({**synthetic_recipe, "stage": "nope"})
    with pytest.raises(ValueError, match="missing the `stage` key"):
        parse_recipe({"max_steps": 1})
    with pytest.raises(ValueError, match="report_to"):
        parse_recipe({**synthetic_recipe, "report_to": ["mlflow"]})
    with pytest.raises(ValueError, match="length_group_batches .* needs group_by_length: true"):
        parse_recipe({**synthetic_recipe, "length_group_batches": 4})
    with pytest.raises(ValueError, match=r"length_group_batches \(0\)"):
        parse_recipe({**synthetic_recipe, "group_by_length": True, "length_group_batches": 0})


def test_missing_files_are_reported(tmp_path, synthetic_recipe):
    with pytest.raises(FileNotFoundError, match="does-not-exist.json"):
        parse_recipe({**synthetic_recipe, "deepspeed_config": "does-not-exist.json"}, base_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="recipe 'missing.yaml' does not exist"):
        load_recipe("missing.yaml")


def test_deepspeed_path_is_found_from_the_recipe_folder(tmp_path, synthetic_recipe):
    (tmp_path / "deepspeed").mkdir()
    (tmp_path / "deepspeed" / "zero2.json").write_text("{}")
    (tmp_path / "llm").mkdir()
    recipe = parse_recipe(
        {**synthetic_recipe, "deepspeed_config": "deepspeed/zero2.json"}, base_dir=tmp_path / "llm"
    )
    assert recipe.training.deepspeed_config == str(tmp_path / "deepspeed" / "zero2.json")


def _arguments(**values) -> TrainingArguments:
    return TrainingArguments(stage="synthetic", **values)


def test_deepspeed_auto_values_come_from_the_recipe():
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 2},
    }
    args = _arguments(
        per_device_train_batch_size=4, gradient_accumulation_steps=3, bf16=True, max_grad_norm=0.5
    )
    filled = fill_deepspeed_config(config, args, world_size=2)
    assert filled["train_micro_batch_size_per_gpu"] == 4
    assert filled["train_batch_size"] == 4 * 3 * 2
    assert filled["gradient_clipping"] == 0.5
    assert filled["bf16"] == {"enabled": True}
    assert filled["zero_allow_untested_optimizer"] is True
    assert config["train_batch_size"] == "auto", "the input config is not modified"


def test_deepspeed_optimizer_section_is_filled():
    config = {
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    }
    filled = fill_deepspeed_config(config, _arguments(learning_rate=3e-4, weight_decay=0.1), world_size=1)
    assert filled["optimizer"]["params"] == {
        "lr": 3e-4,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": 0.1,
    }
    assert "zero_allow_untested_optimizer" not in filled


def test_deepspeed_disagreement_is_an_error():
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu = 16 but the recipe implies 8"):
        fill_deepspeed_config({"train_micro_batch_size_per_gpu": 16}, _arguments(), world_size=1)
    with pytest.raises(ValueError, match="`scheduler` section"):
        fill_deepspeed_config({"scheduler": {"type": "WarmupLR"}}, _arguments(), world_size=1)
    with pytest.raises(ValueError, match=r"no recipe value fills \['zero_optimization.reduce_bucket_size'\]"):
        fill_deepspeed_config(
            {"zero_optimization": {"reduce_bucket_size": "auto"}}, _arguments(), world_size=1
        )


def test_deepspeed_config_defaults_to_stage_0_and_rejects_bad_json(tmp_path):
    assert load_deepspeed_config(None) == {"zero_optimization": {"stage": 0}}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_deepspeed_config(str(bad))


def test_train_command_rejects_an_unknown_key_before_training(tmp_path, synthetic_recipe, write_recipe):
    recipe = write_recipe(synthetic_recipe)
    with pytest.raises(ValueError, match="unknown key.*'bogus'"):
        cli.main(["train", str(recipe), "bogus=1"])
    assert not (tmp_path / "run").exists()
