"""Export a training checkpoint (any ZeRO stage) to the component's Hub layout (safetensors).

``unimm export outputs/run`` exports the run's newest checkpoint to ``outputs/run/export``; a checkpoint
folder (``outputs/run/checkpoints/step-00000100``) and ``--output`` pick others.
"""

from __future__ import annotations

import argparse
import logging

from unimm.commands.pipeline_arguments import report_error

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run folder (its newest checkpoint) or a checkpoint folder")
    parser.add_argument("--output", default=None, help="destination folder (default: <run>/export)")


def main(args: argparse.Namespace) -> int:
    from unimm.training.checkpoint import CheckpointError
    from unimm.training.export import export_checkpoint

    try:
        output = export_checkpoint(args.checkpoint, args.output)
    except (CheckpointError, FileNotFoundError) as error:
        return report_error(error)
    logger.info("exported to %s", output)
    return 0
