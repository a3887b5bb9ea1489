"""Write a quality report of a checkpoint: report.md, report.json and PNG grids.

    unimm eval                                     # the demo model (checkpoints/demo) -> outputs/eval
    unimm eval outputs/demo-random --output-dir outputs/eval-random --images-per-class 20

Measures understanding (Fashion-MNIST test images asked "What is this?", free-text answers matched to class
names), generation correctness (images generated from captions, judged by a CNN trained on real
Fashion-MNIST, next to the judge's accuracy on real test images: its ceiling), reconstruction PSNR/SSIM
(pixel decoder; the diffusion detokenizer on a subset) and, for emoji, a Fréchet distance in the judge's
features between generated and real images, with a real-vs-real reference. The same --seed gives the same
report. Needs the demo datasets (`make data`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from unimm.commands.pipeline_arguments import (
    add_guidance_argument,
    add_pipeline_arguments,
    load_pipeline,
    report_error,
)

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint_path",
        nargs="?",
        default=None,
        metavar="CHECKPOINT",
        help="pipeline folder or Hub repo id, the same as --checkpoint (default: the demo model)",
    )
    add_pipeline_arguments(parser)
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("outputs/eval"),
        help="where report.md, report.json and the PNG grids go (default: outputs/eval)",
    )
    parser.add_argument(
        "--num-understanding",
        type=int,
        default=1000,
        help="Fashion-MNIST test images asked 'What is this?' (default: 1000)",
    )
    parser.add_argument(
        "--images-per-class",
        type=int,
        default=100,
        help="images generated per Fashion-MNIST class and judged (default: 100)",
    )
    parser.add_argument(
        "--num-judge-real",
        type=int,
        default=10000,
        help="real test images the judge classifies, the ceiling of generation (default: 10000)",
    )
    parser.add_argument(
        "--num-reconstruction",
        type=int,
        default=500,
        help="test images reconstructed per dataset with the pixel decoder (default: 500)",
    )
    parser.add_argument(
        "--num-diffusion-reconstruction",
        type=int,
        default=50,
        help="of those, reconstructed with the diffusion detokenizer too, if any; 0 skips it (default: 50)",
    )
    parser.add_argument(
        "--num-emoji",
        type=int,
        default=204,
        help="emoji generated from the test captions for the Fréchet distance; 0 skips it (default: 204)",
    )
    parser.add_argument(
        "--decoder",
        choices=("pixel", "diffusion"),
        default="pixel",
        help="how generated image codes become pixels: the fast pixel decoder or the diffusion "
        "detokenizer (default: pixel)",
    )
    add_guidance_argument(parser)
    parser.add_argument(
        "--steps",
        type=int,
        default=20,
        help="diffusion decoder steps, generation and reconstruction (default: 20)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=16, help="longest answer in tokens (default: 16)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=250,
        help="images or conversations per pipeline call (default: 250)",
    )


def main(args: argparse.Namespace) -> int:
    from unimm.evaluation.report import evaluate_pipeline

    if args.checkpoint_path is not None:
        args.checkpoint = args.checkpoint_path
    counts = {
        "--num-understanding": args.num_understanding,
        "--images-per-class": args.images_per_class,
        "--num-judge-real": args.num_judge_real,
        "--num-reconstruction": args.num_reconstruction,
        "--num-diffusion-reconstruction": args.num_diffusion_reconstruction,
        "--num-emoji": args.num_emoji,
    }
    negative = [f"{option}={value}" for option, value in counts.items() if value < 0]
    if negative or args.batch_size < 1:
        return report_error(
            ValueError(
                f"counts must be >= 0 and --batch-size >= 1, got {', '.join(negative) or args.batch_size}"
            )
        )
    try:
        pipeline = load_pipeline(args)
        pipeline.set_progress_bar_config(disable=True)  # the report draws its own bars
        report = evaluate_pipeline(
            pipeline,
            args.output_dir,
            num_understanding=args.num_understanding,
            images_per_class=args.images_per_class,
            num_judge_real=args.num_judge_real,
            num_reconstruction=args.num_reconstruction,
            num_diffusion_reconstruction=args.num_diffusion_reconstruction,
            num_emoji=args.num_emoji,
            decoder=args.decoder,
            guidance_scale=args.guidance_scale,
            num_inference_steps=args.steps,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            batch_size=args.batch_size,
            checkpoint_name=str(args.checkpoint),
        )
    except (OSError, ValueError) as error:
        return report_error(error)
    print(
        f"understanding {100 * report.understanding_accuracy:.1f}% ({report.understanding_total} images), "
        f"generation correctness {100 * report.generation_accuracy:.1f}% "
        f"(judge ceiling {100 * report.judge_real_accuracy:.1f}%)"
    )
    print(f"report: {args.output_dir / 'report.md'} (and report.json, PNG grids)")
    return 0
