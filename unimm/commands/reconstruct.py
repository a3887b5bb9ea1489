"""Encode images into image tokens and decode them again; write the reconstructions, a grid (originals
above, reconstructions below) and print each image's PSNR.

    unimm reconstruct shirt.png cat.png --decoder pixel
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from unimm.commands.pipeline_arguments import (
    add_pipeline_arguments,
    captioned_grid,
    load_pipeline,
    report_error,
    stack_rows,
)

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pipeline_arguments(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to reconstruct")
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
        "--output-dir",
        type=Path,
        default=Path("outputs/reconstruct"),
        help="where PNGs go (default: outputs/reconstruct)",
    )


def main(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from unimm.evaluation.metrics import psnr

    try:
        pipeline = load_pipeline(args)
        output = pipeline.reconstruct(
            args.images,
            decoder=args.decoder,
            num_inference_steps=args.steps,
            guidance_scale=args.decoder_guidance_scale,
            seed=args.seed,
        )
    except (OSError, ValueError) as error:
        return report_error(error)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    image_processor = pipeline.processor.image_processor
    originals, captions = [], []
    for path, reconstruction in zip(args.images, output.images):
        # The original as the tokenizer saw it (resized to the grid), to compare pixel for pixel.
        pixel_values = image_processor(_open(path), return_tensors="pt")
        original = image_processor.postprocess(pixel_values["pixel_values"])[0]
        originals.append(original)
        reference, decoded = (
            torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
            for image in (original, reconstruction)
        )
        value = float(psnr(decoded, reference))
        captions.append(f"{value:.1f} dB")
        reconstruction.save(args.output_dir / f"{Path(path).stem}-reconstruction.png")
        print(f"{path}: PSNR {value:.2f} dB")
    grid_path = args.output_dir / "grid.png"
    names = [Path(path).name for path in args.images]
    stack_rows([captioned_grid(originals, names), captioned_grid(output.images, captions)]).save(grid_path)
    print(f"reconstructions in {args.output_dir}; grid: {grid_path}")
    return 0


def _open(path: str):
    from unimm.data.schema import open_image

    return open_image(path).convert("RGB")
