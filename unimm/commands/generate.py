"""Generate images from text prompts; write each as a PNG and all of them as a grid (a row per prompt).

    unimm generate --prompt "a photo of a sneaker" --prompt "an emoji of a cat" --num-images-per-prompt 4

All prompts and images are generated in one batched call of the language model, then decoded in one batch.

The prompts of the field's benchmarks are drawn into the folder layout their official scorers read
(``unimm.evaluation.prompt_suites``), ``--batch-size`` prompts per call, prompt *i* with seed ``--seed + i``:

    unimm generate --geneval geneval/prompts/evaluation_metadata.jsonl --output-dir outputs/geneval
    unimm generate --dpg-bench ELLA/dpg_bench/prompts --output-dir outputs/dpg_bench --resume
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from unimm.commands.pipeline_arguments import (
    add_guidance_argument,
    add_pipeline_arguments,
    captioned_grid,
    load_pipeline,
    report_error,
    stack_rows,
)

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = (
    8  # as unimm.evaluation.prompt_suites.DEFAULT_BATCH_SIZE; `unimm --help` imports no torch
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pipeline_arguments(parser)
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a text prompt (repeat for several prompts)")
    prompts.add_argument(
        "--geneval",
        type=Path,
        metavar="JSONL",
        help="GenEval's evaluation_metadata.jsonl: write <output-dir>/<NNNNN>/metadata.jsonl + samples/<NNNN>.png",
    )
    prompts.add_argument(
        "--dpg-bench",
        type=Path,
        metavar="FOLDER",
        help="DPG-Bench's prompt folder (one <item id>.txt per prompt): write <output-dir>/<item id>.png, the "
        "prompt's images in a grid two wide",
    )
    parser.add_argument("--num-images-per-prompt", type=int, default=4, help="images per prompt (default: 4)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"with --geneval/--dpg-bench: prompts per batched call (default: {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="with --geneval/--dpg-bench: keep the prompts already drawn in --output-dir (same settings)",
    )
    add_guidance_argument(parser)
    parser.add_argument(
        "--height",
        type=int,
        default=None,
        help="pixels, a multiple of the tokenizer's factor (default: model's)",
    )
    parser.add_argument(
        "--width",
        type=int,
        default=None,
        help="pixels, a multiple of the tokenizer's factor (default: model's)",
    )
    parser.add_argument(
        "--decoder",
        choices=("diffusion", "pixel"),
        default="pixel",
        help="the tokenizer's fast pixel decoder, or the diffusion detokenizer (finer, several times slower; "
        "default: pixel)",
    )
    parser.add_argument("--steps", type=int, default=20, help="diffusion decoder steps (default: 20)")
    parser.add_argument(
        "--decoder-guidance-scale", type=float, default=2.0, help="diffusion decoder guidance (default: 2.0)"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature of image tokens (default: the checkpoint's generation config, else 1.0)",
    )
    parser.add_argument(
        "--top-k", type=int, default=None, help="keep the k likeliest image tokens (default: all)"
    )
    parser.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling of image tokens (default: off)"
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("outputs/generate"),
        help="where PNGs go (default: outputs/generate)",
    )


def main(args: argparse.Namespace) -> int:
    from unimm.llm import ModalitySampling

    options = {
        "guidance_scale": args.guidance_scale,
        "height": args.height,
        "width": args.width,
        "decoder": args.decoder,
        "num_inference_steps": args.steps,
        "decoder_guidance_scale": args.decoder_guidance_scale,
        "image_sampling": None,  # the checkpoint's own (its generation config), unless one is given here
    }
    if (args.temperature, args.top_k, args.top_p) != (None, None, None):
        options["image_sampling"] = ModalitySampling(
            do_sample=True,
            temperature=1.0 if args.temperature is None else args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
        )
    if args.geneval is not None or args.dpg_bench is not None:
        return _generate_suite(args, options)
    try:
        pipeline = load_pipeline(args)
        output = pipeline.generate_images(
            args.prompt, num_images_per_prompt=args.num_images_per_prompt, seed=args.seed, **options
        )
    except (OSError, ValueError) as error:
        return report_error(error)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    per_prompt = args.num_images_per_prompt
    rows = []
    for prompt_index, prompt in enumerate(args.prompt):
        images = output.images[prompt_index * per_prompt : (prompt_index + 1) * per_prompt]
        for image_index, image in enumerate(images):
            image.save(args.output_dir / f"{prompt_index:02d}-{image_index:02d}.png")
        rows.append(captioned_grid(images, [prompt] * len(images)))
    grid_path = args.output_dir / "grid.png"
    stack_rows(rows).save(grid_path)
    print(f"{len(output.images)} images in {args.output_dir}; grid: {grid_path}")
    return 0


def _generate_suite(args: argparse.Namespace, options: dict) -> int:
    """``--geneval`` / ``--dpg-bench``: every prompt of the suite, in its scorer's folder layout."""
    from unimm.evaluation.prompt_suites import DPG_BENCH, GENEVAL, generate_prompt_suite, read_prompt_suite

    suite, source = (GENEVAL, args.geneval) if args.geneval is not None else (DPG_BENCH, args.dpg_bench)
    try:
        read_prompt_suite(suite, source)  # a bad prompt file fails before the checkpoint loads
        run = generate_prompt_suite(
            load_pipeline(args),
            suite,
            source,
            args.output_dir,
            num_images_per_prompt=args.num_images_per_prompt,
            batch_size=args.batch_size,
            seed=args.seed,
            resume=args.resume,
            **options,
        )
    except (OSError, ValueError) as error:
        return report_error(error)
    print(f"{run.generated} prompts drawn, {run.skipped} already there, in {run.output_dir}")
    print(f"score with: {run.scorer_hint()}")
    return 0
