"""Generate images from text prompts; write each as a PNG and all of them as a grid (a row per prompt).

    unimm generate --prompt "a photo of a sneaker" --prompt "an emoji of a cat" --num-images-per-prompt 4

All prompts and images are generated in one batched call of the language model, then decoded in one batch.
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pipeline_arguments(parser)
    parser.add_argument(
        "--prompt", action="append", required=True, help="a text prompt (repeat for several prompts)"
    )
    parser.add_argument("--num-images-per-prompt", type=int, default=4, help="images per prompt (default: 4)")
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
        default="diffusion",
        help="diffusion detokenizer, or the tokenizer's fast pixel decoder (default: diffusion)",
    )
    parser.add_argument("--steps", type=int, default=20, help="diffusion decoder steps (default: 20)")
    parser.add_argument(
        "--decoder-guidance-scale", type=float, default=2.0, help="diffusion decoder guidance (default: 2.0)"
    )
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature of image tokens (default: 1.0)"
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

    try:
        pipeline = load_pipeline(args)
        output = pipeline.generate_images(
            args.prompt,
            num_images_per_prompt=args.num_images_per_prompt,
            guidance_scale=args.guidance_scale,
            height=args.height,
            width=args.width,
            seed=args.seed,
            decoder=args.decoder,
            num_inference_steps=args.steps,
            decoder_guidance_scale=args.decoder_guidance_scale,
            image_sampling=ModalitySampling(
                do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p
            ),
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
