"""Checks that a pipeline checkpoint folder is whole before anything is loaded from it.

A folder copied halfway or a component saved on its own fails here with one line that names the missing
part and what to do, instead of deep inside transformers or diffusers.
"""

from __future__ import annotations

import json
from pathlib import Path

MODEL_INDEX = "model_index.json"
# A component folder holds at least one of these (models, processors, schedulers, nested pipelines).
CONFIG_FILES = ("config.json", "processor_config.json", "scheduler_config.json", MODEL_INDEX)
WEIGHT_SUFFIXES = (".safetensors", ".bin")
SAVE_HINT = "save it again with UniMMPipeline.save_pretrained or copy the whole folder"


def check_checkpoint_folder(folder: Path, root: Path | None = None) -> None:
    """Raise ``FileNotFoundError`` (one line, with the fix) unless ``folder`` is a complete pipeline folder:
    a ``model_index.json`` whose every component has its subfolder, a config and, for models, weights."""
    root = root or folder
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no checkpoint folder at {folder}: pass a folder written by UniMMPipeline.save_pretrained "
            "(python scripts/build_tiny_checkpoint.py writes a tiny random one) or a Hub repo id"
        )
    index = folder / MODEL_INDEX
    if not index.is_file():
        raise FileNotFoundError(
            f"{folder} has no {MODEL_INDEX}, so it is not a pipeline checkpoint: pass the folder that "
            "UniMMPipeline.save_pretrained wrote (the one holding llm/, visual_tokenizer/, detokenizer/)"
        )
    try:
        components = json.loads(index.read_text())
    except json.JSONDecodeError as error:
        raise FileNotFoundError(f"{index} is not valid JSON ({error}): {SAVE_HINT}") from None
    for name, entry in components.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue  # metadata, settings, or an optional component saved as absent
        _check_component(folder / name, root)


def _check_component(component: Path, root: Path) -> None:
    where = component.relative_to(root)
    if not component.is_dir():
        raise FileNotFoundError(f"checkpoint {root} is incomplete: {where}/ is missing; {SAVE_HINT}")
    if (component / MODEL_INDEX).is_file():
        check_checkpoint_folder(component, root)
        return
    files = {path.name for path in component.iterdir() if path.is_file()}
    if not files.intersection(CONFIG_FILES):
        raise FileNotFoundError(
            f"checkpoint {root} is incomplete: {where}/ has no config "
            f"({', '.join(CONFIG_FILES[:3])}); {SAVE_HINT}"
        )
    if "config.json" in files and not any(name.endswith(WEIGHT_SUFFIXES) for name in files):
        raise FileNotFoundError(
            f"checkpoint {root} is incomplete: {where}/ has no weights (*.safetensors); {SAVE_HINT}"
        )
