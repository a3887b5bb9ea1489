"""The stage registry: recipe ``stage:`` name -> stage class, imported only when asked for.

Lazy imports keep one stage's missing optional dependency (or unfinished module) from breaking the
others. A stage outside unimm is named by its import path, ``package.module:ClassName``, or added
with :func:`register_stage`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unimm.training.stages.base import TrainingStage

# name -> "module:ClassName"
STAGES: dict[str, str] = {
    "tokenizer": "unimm.training.stages.tokenizer:TokenizerStage",
    "detokenizer": "unimm.training.stages.detokenizer:DetokenizerStage",
    "llm_pretrain": "unimm.training.stages.llm:LlmPretrainStage",
    "llm_sft": "unimm.training.stages.llm:LlmSftStage",
}


def register_stage(name: str, target: str) -> None:
    """Register ``target`` (``"package.module:ClassName"``) under the recipe name ``name``."""
    if ":" not in target:
        raise ValueError(f"stage target {target!r} must look like 'package.module:ClassName'")
    STAGES[name] = target


def get_stage_class(name: str) -> type[TrainingStage]:
    """The stage class for a registered name or a ``package.module:ClassName`` path."""
    from unimm.training.stages.base import TrainingStage

    if not isinstance(name, str) or not name:
        raise ValueError(f"stage must be a non-empty string, got {name!r}")
    target = STAGES.get(name, name)
    if ":" not in target:
        raise ValueError(
            f"unknown stage {name!r}; registered stages: {sorted(STAGES)} (or 'package.module:ClassName')"
        )
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"stage {name!r}: cannot import {module_name!r} ({error})") from error
    stage_class = getattr(module, class_name, None)
    if not (isinstance(stage_class, type) and issubclass(stage_class, TrainingStage)):
        raise TypeError(f"stage {name!r}: {target!r} is not a TrainingStage subclass")
    return stage_class
