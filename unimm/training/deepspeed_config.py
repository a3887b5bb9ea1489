"""DeepSpeed JSON configs combined with a recipe: the recipe's values fill every ``"auto"``.

A DeepSpeed config says *how* to shard (ZeRO stage, offload, buckets); the recipe says *what* to train
(batch size, accumulation, precision, clipping, optimizer hyper-parameters). Like transformers' Trainer,
values the recipe owns are written ``"auto"`` in the JSON and filled here; a JSON value that disagrees
with the recipe is an error, so the two can never silently differ.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unimm.training.arguments import TrainingArguments

AUTO = "auto"
# DeepSpeed's own default progress printing is replaced by ours.
QUIET = {"steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}
ZERO_STAGE_0 = {"zero_optimization": {"stage": 0}}


def load_deepspeed_config(path: str | None) -> dict[str, Any]:
    if not path:
        return copy.deepcopy(ZERO_STAGE_0)
    try:
        config = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"DeepSpeed config {path}: not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"DeepSpeed config {path}: expected a JSON object")
    return config


def fill_deepspeed_config(config: dict[str, Any], args: TrainingArguments, world_size: int) -> dict[str, Any]:
    """Return a copy of ``config`` with every recipe-owned value set from ``args`` (checked if explicit)."""
    config = {**QUIET, **copy.deepcopy(config)}
    micro_batch = args.per_device_train_batch_size
    accumulation = args.gradient_accumulation_steps
    owned = {
        ("train_micro_batch_size_per_gpu",): micro_batch,
        ("gradient_accumulation_steps",): accumulation,
        ("train_batch_size",): micro_batch * accumulation * world_size,
        ("gradient_clipping",): args.max_grad_norm,
        ("bf16", "enabled"): args.bf16,
    }
    if "optimizer" in config:
        params = ("optimizer", "params")
        owned[(*params, "lr")] = args.learning_rate
        owned[(*params, "betas")] = [args.adam_beta1, args.adam_beta2]
        owned[(*params, "eps")] = args.adam_epsilon
        owned[(*params, "weight_decay")] = args.weight_decay
    else:
        # The loop passes its own torch optimizer (see loop.build_optimizer).
        config["zero_allow_untested_optimizer"] = True
    for keys, value in owned.items():
        _fill(config, keys, value)
    # Every rank must save under the same tag; DeepSpeed only warns about a mismatch unless told to fail.
    config.setdefault("checkpoint", {}).setdefault("tag_validation", "Fail")
    _check_supported(config)
    return config


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


@contextlib.contextmanager
def partitioned_model_init(config: dict[str, Any]) -> Iterator[None]:
    """Under ZeRO-3, models that transformers builds here (``from_pretrained``, ``from_config``) are
    partitioned as they are created (``deepspeed.zero.Init``), so no rank ever holds the whole model.

    transformers does this while an ``HfDeepSpeedConfig`` is alive (its integration outside the Trainer);
    the config lives only for this block, so models loaded later (e.g. for samples) are whole again."""
    if zero_stage(config) != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(config)  # noqa: F841 (transformers holds only a weak reference)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def _fill(config: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    section = config
    for key in keys[:-1]:
        section = section.setdefault(key, {})
    current = section.get(keys[-1], AUTO)
    if current == AUTO:
        section[keys[-1]] = value
    elif current != value:
        name = ".".join(keys)
        raise ValueError(
            f"DeepSpeed config sets {name} = {current!r} but the recipe implies {value!r}; "
            f'write "auto" in the JSON (the recipe fills it) or change the recipe'
        )


def _check_supported(config: dict[str, Any]) -> None:
    if "scheduler" in config:
        raise ValueError(
            "DeepSpeed config has a `scheduler` section; remove it: the loop builds the learning-rate "
            "schedule from the recipe (lr_scheduler_type, warmup_steps) with transformers.get_scheduler"
        )
    if config.get("fp16", {}).get("enabled") is True:
        raise ValueError("DeepSpeed config enables fp16; unimm trains in bf16 (recipe `bf16: true`) or fp32")
    leftover = [key for key, value in _walk(config) if value == AUTO]
    if leftover:
        raise ValueError(f"DeepSpeed config: no recipe value fills {leftover}; set them explicitly")


def _walk(config: dict[str, Any], prefix: str = ""):
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
