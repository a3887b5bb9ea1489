"""One training loop for every stage (tokenizer, detokenizer, llm) on the DeepSpeed engine.

    recipe = load_recipe("recipes/llm/tiny_pretrain.yaml", ["max_steps=10"])
    result = train(recipe)                  # checkpoints, metrics.jsonl, samples, export
    export_checkpoint(result.checkpoint)    # the same export, from any checkpoint

Names are imported on first use, so ``import unimm.training`` does not import DeepSpeed.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Recipe": "unimm.training.arguments",
    "TrainingArguments": "unimm.training.arguments",
    "load_recipe": "unimm.training.arguments",
    "parse_recipe": "unimm.training.arguments",
    "TrainResult": "unimm.training.loop",
    "train": "unimm.training.loop",
    "export_checkpoint": "unimm.training.export",
    "TrainingStage": "unimm.training.stages.base",
    "get_stage_class": "unimm.training.stages",
    "register_stage": "unimm.training.stages",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'unimm.training' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
