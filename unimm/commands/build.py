"""Build a model from a multi-step recipe: each step a unimm command, finished steps skipped.

    unimm build recipes/demo/build.yaml                  # every step not done yet
    unimm build recipes/demo/build.yaml --steps llm eval --force
    unimm build my_build.yaml --work-dir outputs/try2 --dry-run

A step is done when its `output` exists; a rerun resumes at the first unfinished step. Logs go to
WORK_DIR/logs/STEP.log and a record of every step (status, minutes, command) to WORK_DIR/build.json.
The recipe format is described in recipes/README.md.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from unimm.commands.pipeline_arguments import report_error

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="the build recipe (YAML with work_dir and steps)")
    parser.add_argument("--steps", nargs="+", default=None, metavar="STEP", help="run only these steps")
    parser.add_argument(
        "--force", action="store_true", help="run the chosen steps even if their output exists"
    )
    parser.add_argument("--work-dir", default=None, help="replace the recipe's work_dir")
    parser.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")


def main(args: argparse.Namespace) -> int:
    from unimm.training.build import BuildError, load_build_recipe, run_build

    # SIGTERM (a scheduler, `kill`) as an exception, so that the build stops the steps it started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    try:
        recipe = load_build_recipe(args.recipe, work_dir=args.work_dir)
        status = run_build(recipe, args.steps, force=args.force, dry_run=args.dry_run)
    except BuildError as error:
        return report_error(error)
    ran = {name: entry for name, entry in status.items() if entry.get("status") == "ran"}
    if ran:
        minutes = ", ".join(f"{name} {entry['seconds'] / 60:.1f} min" for name, entry in ran.items())
        logger.info("built %s: %s", recipe.work_dir, minutes)
    return 0
