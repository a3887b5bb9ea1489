"""Chat and image generation with the embedded demo model.

Until the demo checkpoint exists (it is trained by recipes/demo/), this writes a grid of the offline demo
data with its captions to the output folder and says which components are still missing."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from PIL import Image, ImageDraw

from unimm.data.demo_datasets import load_emoji, load_fashion_mnist

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="demo model folder")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"), help="where PNGs are written")
    parser.add_argument("--num-images", type=int, default=8, help="images per dataset in the data grid")


def captioned_grid(images: list[Image.Image], captions: list[str], cell: int = 96) -> Image.Image:
    """Images side by side, each upscaled to ``cell`` pixels with its caption underneath."""
    caption_height = 28
    grid = Image.new("RGB", (cell * len(images), cell + caption_height), "white")
    draw = ImageDraw.Draw(grid)
    for column, (image, caption) in enumerate(zip(images, captions)):
        grid.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (column * cell, 0))
        words = caption.removeprefix("an emoji of ").removeprefix("a photo of ")
        draw.text((column * cell + 2, cell + 2), words[: cell // 6], fill="black")
    return grid


def write_data_grid(output_dir: Path, num_images: int) -> Path:
    rows = []
    for dataset in (load_fashion_mnist()["test"], load_emoji()["test"]):
        samples = dataset.select(range(num_images))
        rows.append(captioned_grid([s["segments"][0]["image"] for s in samples], samples["caption"]))
    grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    for index, row in enumerate(rows):
        grid.paste(row, (0, sum(r.height for r in rows[:index])))
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "demo_data.png"
    grid.save(path)
    return path


def main(args: argparse.Namespace) -> int:
    path = write_data_grid(args.output_dir, args.num_images)
    logger.info("demo data (Fashion-MNIST and emoji test images with captions): %s", path)
    # Chat and generation need UniMMPipeline and the demo checkpoint trained by recipes/demo/ (issue 8).
    logger.warning(
        "chat and image generation are not built yet: they need UniMMPipeline and the trained demo "
        "checkpoint (%s). Only the data grid was written.",
        args.checkpoint,
    )
    return 0
