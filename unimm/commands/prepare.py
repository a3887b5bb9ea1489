"""Prepare the LLM stage from your own data: its initial model folder and its token tables.

    unimm prepare recipes/prepare/tiny.yaml
    unimm prepare recipes/prepare/tiny.yaml dataset=data/pictures output_dir=outputs/prepare/mine

From a dataset spec (a demo name, an image folder with metadata.jsonl, LLaVA JSON, parquet, WebDataset
shards, ...), a trained visual tokenizer and a base LM (pretrained, or a backbone config trained from
scratch), writes OUTPUT/init (model + processor: the LLM recipe's model_name_or_path), OUTPUT/train and
OUTPUT/eval (its train_dataset and eval_dataset) and OUTPUT/prepare.json (what was built and skipped).
Rerun the same command after an interruption: finished steps are kept.
"""

from __future__ import annotations

import argparse
import logging

from unimm.commands.pipeline_arguments import report_error

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="prepare recipe YAML (e.g. recipes/prepare/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe fields to override")


def main(args: argparse.Namespace) -> int:
    from unimm.training.prepare import SUMMARY_FILE, load_prepare_recipe, prepare

    try:
        prepare_args = load_prepare_recipe(args.recipe, args.overrides)
        prepare(prepare_args)
    except (OSError, ValueError, TypeError) as error:  # a bad recipe, missing inputs, unusable data
        return report_error(error)
    logger.info("summary: %s/%s", prepare_args.output_dir, SUMMARY_FILE)
    return 0
