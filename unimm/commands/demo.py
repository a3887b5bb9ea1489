"""Chat and image generation with the embedded demo model.

With a checkpoint (a folder holding model_index.json): asks "What is this?" about Fashion-MNIST and emoji
test images, generates images for class names and emoji captions, and writes both as PNG grids. Until the
demo checkpoint exists (it is trained by recipes/demo/), this writes a grid of the offline demo data with
its captions and says what is missing."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from PIL import Image

from unimm.commands.pipeline_arguments import (
    DEFAULT_CHECKPOINT,
    add_pipeline_arguments,
    captioned_grid,
    load_pipeline,
    report_error,
    stack_rows,
)

logger = logging.getLogger(__name__)

QUESTION = "What is this?"
# Well-known glyphs (of the training split: held-out emoji are scored by `unimm eval`, not shown here).
EMOJI_PROMPTS = (
    "an emoji of grinning face",
    "an emoji of red heart",
    "an emoji of pizza",
    "an emoji of fire",
    "an emoji of rocket",
    "an emoji of sun",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pipeline_arguments(parser)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"), help="where PNGs are written")
    parser.add_argument(
        "--num-images", type=int, default=8, help="test images per dataset to ask about (default: 8)"
    )
    parser.add_argument("--num-prompts", type=int, default=4, help="prompts per dataset to draw (default: 4)")
    parser.add_argument(
        "--num-images-per-prompt", type=int, default=4, help="images drawn per prompt (default: 4)"
    )
    parser.add_argument(
        "--decoder",
        choices=("diffusion", "pixel"),
        default="diffusion",
        help="diffusion detokenizer, or the tokenizer's fast pixel decoder (default: diffusion)",
    )


def demo_samples(num_images: int) -> list[tuple[list[Image.Image], list[str]]]:
    """(images, captions) of the first ``num_images`` Fashion-MNIST and emoji test samples."""
    from unimm.data.demo_datasets import load_emoji, load_fashion_mnist  # here: `unimm --help` stays light

    samples = []
    for dataset in (load_fashion_mnist()["test"], load_emoji()["test"]):
        rows = dataset.select(range(min(num_images, len(dataset))))
        samples.append(([row["segments"][0]["image"] for row in rows], rows["caption"]))
    return samples


def write_data_grid(output_dir: Path, num_images: int) -> Path:
    rows = [captioned_grid(images, captions) for images, captions in demo_samples(num_images)]
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "demo_data.png"
    stack_rows(rows).save(path)
    return path


def run_pipeline_demo(args: argparse.Namespace) -> int:
    # 1. The model, and the test images with their true captions.
    try:
        pipeline = load_pipeline(args)
    except (OSError, ValueError) as error:
        return report_error(error)
    samples = demo_samples(args.num_images)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    # 2. Understanding: one batched chat call per dataset.
    chat_rows = []
    for images, captions in samples:
        answers = pipeline.chat([QUESTION] * len(images), images=images, seed=args.seed).texts
        for caption, answer in zip(captions, answers):
            print(f"{QUESTION} [{caption}] -> {answer}")
        chat_rows.append(captioned_grid(images, answers))
    chat_path = args.output_dir / "demo_chat.png"
    stack_rows(chat_rows).save(chat_path)
    # 3. Generation: class names and emoji captions, all in one call.
    from unimm.data.demo_datasets import FASHION_MNIST_CAPTION_NAMES, fashion_mnist_caption

    labels = range(min(args.num_prompts, len(FASHION_MNIST_CAPTION_NAMES)))
    prompts = [fashion_mnist_caption(label, template_index=0) for label in labels]  # "a photo of a ..."
    prompts += list(EMOJI_PROMPTS[: args.num_prompts])
    output = pipeline.generate_images(
        prompts, num_images_per_prompt=args.num_images_per_prompt, seed=args.seed, decoder=args.decoder
    )
    per_prompt = args.num_images_per_prompt
    generation_rows = [
        captioned_grid(output.images[index * per_prompt : (index + 1) * per_prompt], [prompt] * per_prompt)
        for index, prompt in enumerate(prompts)
    ]
    generation_path = args.output_dir / "demo_generate.png"
    stack_rows(generation_rows).save(generation_path)
    print(f"answers: {chat_path}\nimages: {generation_path}")
    return 0


def main(args: argparse.Namespace) -> int:
    if (Path(args.checkpoint) / "model_index.json").is_file():
        return run_pipeline_demo(args)
    path = write_data_grid(args.output_dir, args.num_images)
    logger.info("demo data (Fashion-MNIST and emoji test images with captions): %s", path)
    logger.warning(
        "no demo checkpoint at %s (it is trained by recipes/demo/): only the data grid was written; "
        "pass --checkpoint to use another model",
        args.checkpoint,
    )
    return 0


__all__ = ["DEFAULT_CHECKPOINT", "add_arguments", "main"]
