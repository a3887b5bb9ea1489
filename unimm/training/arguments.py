"""Recipes: a YAML file of dataclass fields, parsed into the loop's arguments plus its stage's.

A recipe names its ``stage`` and sets fields of :class:`TrainingArguments` (what every stage shares:
batch size, schedule, checkpoints, the DeepSpeed config) and of the stage's ``arguments_class``.
``key=value`` overrides from the command line are applied on top (values are YAML, so ``bf16=true``
and ``max_steps=10`` get their types). Every mistake a recipe can hold -- an unknown key, a value of
the wrong type, a missing file -- is reported here, before a model is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser
from transformers.trainer_utils import SchedulerType

from unimm.training.stages import get_stage_class
from unimm.training.stages.base import TrainingStage

RESUME_AUTO = "auto"
RESUME_NEVER = "never"
TRACKERS = ("tensorboard", "wandb")
RECIPE_RELATIVE_FILES = ("deepspeed_config", "eval_tasks")


@dataclass
class TrainingArguments:
    """What the shared loop needs, whichever component it trains (names follow transformers')."""

    stage: str = field(metadata={"help": "registered stage name, or `package.module:ClassName`"})
    output_dir: str = field(default="outputs/run", metadata={"help": "checkpoints, metrics, samples, export"})
    deepspeed_config: str | None = field(
        default=None,
        metadata={"help": "DeepSpeed JSON (e.g. recipes/deepspeed/zero2.json); none = ZeRO stage 0"},
    )
    seed: int = 42
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; > 0 overrides num_train_epochs"})
    num_train_epochs: int = 1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    component_learning_rates: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "parameter-name prefix -> learning rate (e.g. a lower one for a vision tower)"},
    )
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "a transformers SchedulerType"})
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    bf16: bool = False
    torch_compile: bool = field(
        default=False,
        metadata={"help": "compile the model with torch.compile through DeepSpeed's engine.compile()"},
    )
    torch_compile_regions: bool = field(
        default=False,
        metadata={
            "help": "with torch_compile: compile each repeated block (decoder layer) once and the rest apart "
            "(accelerate's regional compilation), not the model as one graph: minutes less compile time on deep "
            "models, at each start and each new batch shape"
        },
    )
    logging_steps: int = 10
    eval_steps: int = field(default=0, metadata={"help": "evaluate every N steps (0: only at the end)"})
    sample_steps: int = field(default=0, metadata={"help": "write sample grids every N steps (0: never)"})
    save_steps: int = field(
        default=500, metadata={"help": "checkpoint every N steps (and always at the end)"}
    )
    save_total_limit: int = field(default=2, metadata={"help": "keep the last K checkpoints"})
    resume_from_checkpoint: str = field(
        default=RESUME_AUTO,
        metadata={"help": "`auto` (latest in output_dir, if any), `never`, or a checkpoint / run folder"},
    )
    export_at_end: bool = field(
        default=True, metadata={"help": "export the final model to output_dir/export"}
    )
    report_to: list[str] = field(default_factory=list, metadata={"help": f"extra trackers: {TRACKERS}"})
    dataloader_num_workers: int = 0
    group_by_length: bool = field(
        default=False,
        metadata={
            "help": "batches of samples of similar length, so padding wastes less (transformers' "
            "group_by_length: the epoch's random order is cut into groups of 50 batches, each sorted by "
            "length); a stage that gives its samples' lengths only (the LLM stages, unpacked)"
        },
    )
    length_group_batches: int | None = field(
        default=None,
        metadata={
            "help": "with group_by_length: batches per sorted group (default: transformers' choice, 50 or a "
            "quarter of the epoch); more groups less padding, fewer keep batches closer to random"
        },
    )
    ddp_timeout: int = field(
        default=1800,
        metadata={
            "help": "seconds a collective (and the watchdog) waits for a peer before this rank stops; also the "
            "process group's timeout"
        },
    )
    main_process_timeout: int = field(
        default=7200,
        metadata={
            "help": "seconds the other ranks wait while rank 0 alone writes samples or a checkpoint manifest"
        },
    )

    def __post_init__(self) -> None:
        positive = (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
        )
        positive += ("logging_steps", "save_steps", "save_total_limit", "num_train_epochs")
        positive += ("ddp_timeout", "main_process_timeout")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_steps", "sample_steps", "warmup_steps", "dataloader_num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.length_group_batches is not None and (
            not self.group_by_length or self.length_group_batches < 1
        ):
            raise ValueError(
                f"length_group_batches ({self.length_group_batches}) sizes group_by_length's groups: it needs "
                "group_by_length: true and a value >= 1"
            )
        if self.torch_compile_regions and not self.torch_compile:
            raise ValueError("torch_compile_regions says how to compile: it needs torch_compile: true")
        schedulers = [item.value for item in SchedulerType]
        if self.lr_scheduler_type not in schedulers:
            raise ValueError(f"lr_scheduler_type {self.lr_scheduler_type!r} is not one of {schedulers}")
        unknown_trackers = sorted(set(self.report_to) - set(TRACKERS))
        if unknown_trackers:
            raise ValueError(f"report_to: unknown tracker(s) {unknown_trackers}; expected some of {TRACKERS}")


@dataclass
class Recipe:
    """A parsed recipe: the loop's arguments, the stage's arguments and the stage class."""

    training: TrainingArguments
    stage_args: Any
    stage_class: type[TrainingStage]
    source: str

    def build_stage(self) -> TrainingStage:
        return self.stage_class(self.stage_args)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe, JSON-able: saved next to checkpoints so export can rebuild the stage."""
        return {**dataclasses.asdict(self.training), **dataclasses.asdict(self.stage_args)}


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe YAML, apply ``key=value`` overrides, and parse it (see :func:`parse_recipe`)."""
    path = Path(path)
    return parse_recipe(read_recipe_file(path, overrides), source=str(path), base_dir=path.parent)


def read_recipe_file(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A recipe YAML's mapping with ``key=value`` overrides (values read as YAML) applied."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(path)!r} does not exist")
    values = yaml.safe_load(path.read_text())
    if not isinstance(values, dict):
        raise ValueError(f"recipe {path}: expected a mapping of field: value, got {type(values).__name__}")
    values.update(parse_overrides(overrides))
    return values


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["max_steps=10", "bf16=true"]`` -> ``{"max_steps": 10, "bf16": True}`` (values read as YAML)."""
    parsed = {}
    for item in overrides:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        parsed[key.strip()] = yaml.safe_load(value) if value else ""
    return parsed


def parse_recipe(values: Mapping[str, Any], source: str = "<dict>", base_dir: Path | None = None) -> Recipe:
    """Check every key and type of a recipe mapping and build its dataclasses with ``HfArgumentParser``."""
    values = dict(values)
    if "stage" not in values:
        raise ValueError(f"recipe {source}: missing the `stage` key (one of the registered stages)")
    stage_class = get_stage_class(values["stage"])
    classes = (TrainingArguments, stage_class.arguments_class)
    _check_keys(values, classes, source, values["stage"])
    for dataclass_type in classes:
        _check_types(values, dataclass_type, source)
    for name in RECIPE_RELATIVE_FILES:  # small files that travel with recipes (not data or model folders)
        if values.get(name):
            values[name] = str(resolve_recipe_path(values[name], base_dir, source))
    try:
        training, stage_args = HfArgumentParser(classes).parse_dict(values, allow_extra_keys=False)
    except (ValueError, TypeError, FileNotFoundError) as error:  # raised by the dataclasses' __post_init__
        raise type(error)(f"recipe {source}: {error}") from error
    return Recipe(training=training, stage_args=stage_args, stage_class=stage_class, source=source)


def resolve_recipe_path(value: str, base_dir: Path | None, source: str) -> Path:
    """A path as written in a recipe: absolute, relative to the working directory, or to the recipe's
    folder or one of its parents (so ``recipes/deepspeed/zero2.json`` works from anywhere in a checkout)."""
    path = Path(value)
    candidates = (
        [path] if path.is_absolute() else [folder / path for folder in recipe_search_folders(base_dir)]
    )
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"recipe {source}: file {value!r} not found (looked in the working directory and above the recipe)"
    )


def recipe_search_folders(base_dir: Path | None) -> list[Path]:
    """Where a relative path written in a recipe is looked for, in order: the working directory, then the
    recipe's folder and its parents (so ``recipes/deepspeed/zero2.json`` works from anywhere in a checkout)."""
    if base_dir is None:
        return [Path.cwd()]
    base_dir = Path(base_dir).resolve()
    return [Path.cwd(), base_dir, *base_dir.parents]


def _check_keys(values: Mapping[str, Any], classes: Sequence[type], source: str, stage: str) -> None:
    known = {item.name for dataclass_type in classes for item in dataclasses.fields(dataclass_type)}
    unknown = sorted(set(values) - known)
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(
        f"recipe {source}: unknown key(s) for stage {stage!r}: {', '.join(hints)}. "
        f"Known keys: {', '.join(sorted(known))}"
    )


def _check_types(values: Mapping[str, Any], dataclass_type: type, source: str) -> None:
    hints = typing.get_type_hints(dataclass_type)
    for item in dataclasses.fields(dataclass_type):
        if item.name in values and not _matches(values[item.name], hints[item.name]):
            raise TypeError(
                f"recipe {source}: `{item.name}` should be {_type_name(hints[item.name])}, "
                f"got {values[item.name]!r} ({type(values[item.name]).__name__})"
            )


def _matches(value: Any, annotation: Any) -> bool:
    """A small structural type check for the JSON-able annotations recipes use."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item_type,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(_matches(item, item_type) for item in value)
    if origin is dict:
        key_type, value_type = typing.get_args(annotation) or (Any, Any)
        return isinstance(value, dict) and all(
            _matches(key, key_type) and _matches(item, value_type) for key, item in value.items()
        )
    if annotation in (dict, list):
        return isinstance(value, annotation)
    return isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
