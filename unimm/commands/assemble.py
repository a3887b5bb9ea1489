"""Assemble a checkpoint folder (Hub layout, with its model card) from separately trained parts.

    unimm assemble --llm outputs/llm/export --visual-tokenizer outputs/tokenizer/export \\
        --detokenizer outputs/detokenizer/export --output checkpoints/mine --dtype bfloat16

The processor (text tokenizer with its chat template, image processor) comes from the LLM folder (an
LLM export carries the one it was trained with) unless ``--processor`` names another folder. The parts
must share one codebook and one text vocabulary; the command says which ones do not.
"""

from __future__ import annotations

import argparse
import logging

from unimm.commands.devices import DTYPES
from unimm.commands.pipeline_arguments import report_error

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--llm", required=True, help="the trained LLM folder (e.g. the LLM stage's export)")
    parser.add_argument("--visual-tokenizer", required=True, help="the visual tokenizer folder")
    parser.add_argument("--output", required=True, help="the checkpoint folder to write")
    parser.add_argument("--processor", default=None, help="processor folder (default: the one in --llm)")
    parser.add_argument("--detokenizer", default=None, help="diffusion detokenizer folder (optional)")
    parser.add_argument(
        "--dtype", default=None, choices=DTYPES, help="store the LLM in this dtype (default: as it is stored)"
    )
    parser.add_argument(
        "--prompt-format", default="chat", choices=("chat", "caption"), help="how image prompts are written"
    )
    parser.add_argument(
        "--image-temperature",
        type=float,
        default=None,
        help="the checkpoint's own sampling temperature of image codes, used when a call names none (default: 1)",
    )
    parser.add_argument(
        "--image-top-k",
        type=int,
        default=None,
        help="the checkpoint's own top-k of image codes (default: off)",
    )
    parser.add_argument(
        "--image-top-p",
        type=float,
        default=None,
        help="the checkpoint's own top-p of image codes (default: off)",
    )
    parser.add_argument(
        "--training-data",
        action="append",
        default=None,
        metavar="TEXT",
        help="a line of the model card's training data (repeatable)",
    )


def main(args: argparse.Namespace) -> int:
    import torch

    from unimm.llm import ModalitySampling
    from unimm.pipelines.assembly import assemble_pipeline

    sampling = None
    if (args.image_temperature, args.image_top_k, args.image_top_p) != (None, None, None):
        temperature = 1.0 if args.image_temperature is None else args.image_temperature
        sampling = ModalitySampling(
            do_sample=True, temperature=temperature, top_k=args.image_top_k, top_p=args.image_top_p
        )
    try:
        output = assemble_pipeline(
            llm=args.llm,
            visual_tokenizer=args.visual_tokenizer,
            output_dir=args.output,
            processor=args.processor,
            detokenizer=args.detokenizer,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            prompt_format=args.prompt_format,
            training_data=args.training_data,
            image_sampling=sampling,
        )
    except (OSError, ValueError) as error:  # a missing part, parts that do not fit together
        return report_error(error)
    logger.info("wrote %s: load it with UniMMPipeline.from_pretrained(%r)", output, str(output))
    return 0
