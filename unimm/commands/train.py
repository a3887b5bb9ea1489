"""Train one stage from a recipe: ``unimm train RECIPE.yaml [key=value ...]``.

Runs as one plain process, or under a launcher on many: ``torchrun --nproc_per_node N -m unimm.train
RECIPE.yaml`` or ``deepspeed --num_gpus N --module unimm.train RECIPE.yaml``. Rerunning the same command
after an interruption resumes from the newest checkpoint in the recipe's output_dir.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings

from unimm.commands.pipeline_arguments import report_error

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (e.g. recipes/llm/tiny_pretrain.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe fields to override")
    # Set by the `deepspeed` launcher; the rank is read from the environment it also exports.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    from unimm.training.arguments import load_recipe
    from unimm.training.checkpoint import CheckpointError
    from unimm.training.distributed import ClusterError
    from unimm.training.launchers import LaunchEnvironmentError
    from unimm.training.loop import train

    quiet_deepspeed()

    recipe = load_recipe(args.recipe, args.overrides)
    try:
        result = train(recipe)
    # No intact checkpoint to resume (or one that would run code), storage the nodes do not share, a
    # launcher's variables that do not add up: one line, not a traceback per rank.
    except (CheckpointError, ClusterError, LaunchEnvironmentError) as error:
        return report_error(error)
    if os.environ.get("RANK", "0") != "0":
        return 0
    logger.info(
        "trained %s for %d steps (last loss %s); checkpoint %s; export %s",
        recipe.training.stage,
        result.global_step,
        result.last_loss,
        result.checkpoint,
        result.export_dir,
    )
    return 0


def quiet_deepspeed() -> None:
    """Keep the progress bar readable: DeepSpeed's per-call INFO lines and torch's deprecation notices
    about the collectives DeepSpeed calls are not the user's to act on."""
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
