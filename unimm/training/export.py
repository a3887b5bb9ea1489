"""Export a checkpoint (any ZeRO stage, any number of ranks) to the component's Hub layout.

DeepSpeed's ``zero_to_fp32`` utilities consolidate the sharded fp32 master weights of a ZeRO 1/2/3
checkpoint into one state dict (ZeRO-0 keeps the whole module in one file); a fresh model built by
the stage receives them, and the stage's ``export`` writes it (``save_pretrained``, safetensors). The
recipe saved in the checkpoint rebuilds the stage, so ``unimm export CHECKPOINT`` needs nothing else.
The checkpoint is verified against its manifest first, and no file of it is unpickled beyond tensors
and plain values (see ``checkpoint.load_file``).
"""

from __future__ import annotations

import logging
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from torch import nn

from unimm.training.arguments import Recipe, parse_recipe
from unimm.training.checkpoint import (
    DEEPSPEED_GLOBALS,
    TEMPORARY_PREFIX,
    load_file,
    locate_checkpoint,
    read_trainer_state,
)
from unimm.training.stages.base import TrainingStage

logger = logging.getLogger(__name__)

EXPORT_DIR = "export"
ZERO_0_MODEL_FILE = "mp_rank_00_model_states.pt"


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is an intact checkpoint, else the newest intact checkpoint of the run
    folder ``path`` (a damaged one raises ``CheckpointError`` naming the file)."""
    found = locate_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path} is neither a unimm checkpoint nor a run folder with checkpoints")
    return found


def recipe_of(checkpoint: Path) -> Recipe:
    """The recipe a checkpoint was trained with (its DeepSpeed file is not needed to export)."""
    values = {**read_trainer_state(checkpoint)["recipe"], "deepspeed_config": None}
    return parse_recipe(values, source=f"{checkpoint}/trainer_state.json")


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) module state dict stored in a DeepSpeed checkpoint folder."""
    zero_stage = read_trainer_state(checkpoint)["zero_stage"]
    if zero_stage == 0:
        return load_file(checkpoint / ZERO_0_MODEL_FILE, DEEPSPEED_GLOBALS, map_location="cpu")["module"]
    # zero_to_fp32 unpickles its files with weights_only=False: each must first load with weights only
    # (memory-mapped, so the tensors are not read twice).
    for path in sorted(checkpoint.glob("*_states.pt")):
        load_file(path, DEEPSPEED_GLOBALS, map_location="cpu", mmap=zipfile.is_zipfile(path))
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


def load_trained_model(checkpoint: Path, stage: TrainingStage) -> nn.Module:
    """Build the stage's model and load the checkpoint's weights and stage state into it."""
    model = stage.build_model()
    load_full_state_dict(model, consolidated_state_dict(checkpoint))
    stage.load_state_dict(load_file(checkpoint / "stage_state_rank0.pt"))
    return model


def load_full_state_dict(model: nn.Module, state_dict: dict[str, Any]) -> None:
    """``load_state_dict`` that tolerates only the missing aliases of tied parameters."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    loaded = {
        id(param) for name, param in model.named_parameters(remove_duplicate=False) if name in state_dict
    }
    parameters = dict(model.named_parameters(remove_duplicate=False))
    truly_missing = [name for name in missing if name not in parameters or id(parameters[name]) not in loaded]
    if truly_missing or unexpected:
        raise ValueError(
            f"checkpoint does not fit the model built by the recipe: missing {truly_missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )


def export_checkpoint(
    checkpoint: str | Path, output_dir: str | Path | None = None, recipe: Recipe | None = None
) -> Path:
    """Export ``checkpoint`` (or a run folder's newest) to ``output_dir`` (default: ``<run>/export``)."""
    checkpoint = find_checkpoint(checkpoint)
    recipe = recipe or recipe_of(checkpoint)
    output_dir = Path(output_dir) if output_dir else checkpoint.parent.parent / EXPORT_DIR
    stage = recipe.build_stage()
    model = load_trained_model(checkpoint, stage).eval()
    temporary = output_dir.with_name(f"{TEMPORARY_PREFIX}{output_dir.name}")
    shutil.rmtree(temporary, ignore_errors=True)
    stage.export(model, temporary)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    os.replace(temporary, output_dir)
    logger.info("exported %s to %s", checkpoint, output_dir)
    return output_dir
