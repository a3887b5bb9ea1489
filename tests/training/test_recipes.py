"""Every recipe shipped under recipes/ parses against its stage's dataclasses (any stage, any engineer's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from unimm.training.arguments import TrainingArguments, load_recipe
from unimm.training.deepspeed_config import fill_deepspeed_config, load_deepspeed_config

REPOSITORY = Path(__file__).resolve().parents[2]
YAML_FILES = sorted((REPOSITORY / "recipes").rglob("*.yaml"))
# What each kind of recipe holds, by a key only it has (a training stage, build steps, or a prepare recipe's
# visual tokenizer); accelerate/ holds accelerate's own configs.
RECIPES = sorted(path for path in YAML_FILES if "stage" in yaml.safe_load(path.read_text()))
BUILD_RECIPES = sorted(path for path in YAML_FILES if "steps" in yaml.safe_load(path.read_text()))
PREPARE_RECIPES = sorted(
    path for path in YAML_FILES if "visual_tokenizer" in yaml.safe_load(path.read_text())
)
OTHER_YAML = sorted(path for path in YAML_FILES if "accelerate" in path.parts)
# Task files of `unimm eval --tasks-file` (and of a recipe's eval_tasks): a list of `task:` mappings.
EVAL_TASK_FILES = sorted(path for path in YAML_FILES if isinstance(yaml.safe_load(path.read_text()), list))
DEEPSPEED_CONFIGS = sorted((REPOSITORY / "recipes" / "deepspeed").glob("*.json"))


def test_every_yaml_file_is_a_recipe_of_a_known_kind():
    kinds = (RECIPES, BUILD_RECIPES, PREPARE_RECIPES, OTHER_YAML, EVAL_TASK_FILES)
    assert sorted(path for kind in kinds for path in kind) == YAML_FILES


@pytest.mark.parametrize(
    "path", EVAL_TASK_FILES, ids=lambda path: str(path.relative_to(REPOSITORY / "recipes"))
)
def test_eval_task_file_is_valid(path):
    from unimm.evaluation.task_runner import load_task_file

    assert load_task_file(path)


@pytest.mark.parametrize(
    "path", PREPARE_RECIPES, ids=lambda path: str(path.relative_to(REPOSITORY / "recipes"))
)
def test_prepare_recipe_is_valid(path):
    from unimm.training.prepare import PrepareArguments, load_prepare_recipe

    args = load_prepare_recipe(path)
    assert isinstance(args, PrepareArguments)
    assert (args.backbone is None) != (args.text_model_name_or_path is None)
    assert not (args.text_model_name_or_path or "").startswith("~")  # expanded


def test_every_prepare_recipe_is_found():
    """The demo's and SmolLM2's data steps are prepare recipes, so the test above checks them."""
    found = {str(path.relative_to(REPOSITORY / "recipes")) for path in PREPARE_RECIPES}
    assert found >= {"demo/prepare.yaml", "smollm2/prepare.yaml", "prepare/tiny.yaml"}


@pytest.mark.parametrize(
    "path", BUILD_RECIPES, ids=lambda path: str(path.relative_to(REPOSITORY / "recipes"))
)
def test_build_recipe_is_valid(path):
    from unimm.training.build import load_build_recipe

    assert load_build_recipe(path).steps


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
