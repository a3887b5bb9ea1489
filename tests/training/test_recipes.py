"""Every recipe shipped under recipes/ parses against its stage's dataclasses (any stage, any engineer's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unimm.training.arguments import TrainingArguments, load_recipe
from unimm.training.deepspeed_config import fill_deepspeed_config, load_deepspeed_config

REPOSITORY = Path(__file__).resolve().parents[2]
# Stage recipes; recipes/demo/llm_data.yaml configures the demo's data step (tests/training/test_demo_model.py).
RECIPES = sorted(
    path
    for path in (REPOSITORY / "recipes").rglob("*.yaml")
    if "accelerate" not in path.parts and path.name != "llm_data.yaml"
)
DEEPSPEED_CONFIGS = sorted((REPOSITORY / "recipes" / "deepspeed").glob("*.json"))


def test_recipes_are_found():
    assert any(path.parent.name == "llm" for path in RECIPES)
    assert {path.name for path in DEEPSPEED_CONFIGS} >= {
        "zero0.json",
        "zero2.json",
        "zero3.json",
        "zero3_offload.json",
    }


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: str(path.relative_to(REPOSITORY / "recipes")))
def test_recipe_is_valid(path):
    recipe = load_recipe(path)
    assert isinstance(recipe.training, TrainingArguments)
    assert isinstance(recipe.stage_args, recipe.stage_class.arguments_class)
    # Its DeepSpeed config (if any) combines with it for one process and for eight.
    for world_size in (1, 8):
        filled = fill_deepspeed_config(
            load_deepspeed_config(recipe.training.deepspeed_config), recipe.training, world_size
        )
        assert filled["train_micro_batch_size_per_gpu"] == recipe.training.per_device_train_batch_size


@pytest.mark.parametrize("path", DEEPSPEED_CONFIGS, ids=lambda path: path.name)
def test_deepspeed_configs_leave_recipe_values_to_the_recipe(path):
    config = json.loads(path.read_text())
    for key in (
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "train_batch_size",
        "gradient_clipping",
    ):
        assert config[key] == "auto", key
    assert config["bf16"] == {"enabled": "auto"}
