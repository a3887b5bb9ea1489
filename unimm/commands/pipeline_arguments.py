"""What the pipeline commands (chat, generate, reconstruct, demo) share: checkpoint options, loading,
error reporting and captioned PNG grids."""

from __future__ import annotations

import argparse
import logging
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

from unimm.commands.devices import add_device_argument, add_dtype_argument, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

# The demo model ships inside the package (checkpoints/demo in a source checkout links to it).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "demo_checkpoint"
CAPTION_HEIGHT = 28
CAPTION_CHARACTER_WIDTH = 6  # pixels per character of PIL's default font
CAPTION_LINES = 2  # what CAPTION_HEIGHT holds


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        default=str(DEFAULT_CHECKPOINT),
        help=f"pipeline folder (model_index.json + llm/, visual_tokenizer/, ...) or Hub repo id "
        f"(default: the demo model, {DEFAULT_CHECKPOINT})",
    )
    add_dtype_argument(parser)
    add_device_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="random seed of sampling and noise (default: 0)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="decode through the compiled engine (torch.compile: the first batch of each shape compiles, tens "
        "of seconds on a CPU; pays for many images, not for one)",
    )


def add_guidance_argument(parser: argparse.ArgumentParser) -> None:
    """``--guidance-scale``: classifier-free guidance of the language model inside images."""
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=3.0,
        help="classifier-free guidance of the language model; 1 turns it off (default: 3.0)",
    )


def load_pipeline(args: argparse.Namespace):
    """The ``UniMMPipeline`` named by ``--checkpoint``, on ``--device`` in ``--dtype``, compiled if ``--compile``."""
    from unimm.pipelines import UniMMPipeline

    device = resolve_device(args.device)
    pipeline = UniMMPipeline.from_pretrained(
        args.checkpoint,
        dtype=resolve_dtype(args.dtype, device),
        device=device,
        quantization=getattr(args, "quantize", None),
    )
    pipeline.enable_compile(getattr(args, "compile", False))
    return pipeline


def report_error(error: Exception) -> int:
    """Log a user error (bad path, bad size, partial checkpoint) as one line; the command's exit status."""
    logger.error("%s", error)
    return 1


def captioned_grid(images: list[Image.Image], captions: list[str], cell: int = 96) -> Image.Image:
    """Images side by side, each upscaled to ``cell`` pixels with its caption underneath."""
    grid = Image.new("RGB", (cell * len(images), cell + CAPTION_HEIGHT), "white")
    draw = ImageDraw.Draw(grid)
    for column, (image, caption) in enumerate(zip(images, captions)):
        grid.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (column * cell, 0))
        draw.text((column * cell + 2, cell + 2), _caption_lines(caption, cell), fill="black", spacing=1)
    return grid


def _caption_lines(caption: str, cell: int) -> str:
    """The caption wrapped to the cell's width, on at most ``CAPTION_LINES`` lines (an ellipsis when cut)."""
    width = cell // CAPTION_CHARACTER_WIDTH
    lines = textwrap.wrap(caption, width=width) or [""]
    if len(lines) > CAPTION_LINES:
        last = lines[CAPTION_LINES - 1]
        lines = [*lines[: CAPTION_LINES - 1], (last if len(last) < width else last[: width - 1]) + "…"]
    return "\n".join(lines)


def stack_rows(rows: list[Image.Image]) -> Image.Image:
    """Grid rows one under the other on white."""
    grid = Image.new("RGB", (max(row.width for row in rows), sum(row.height for row in rows)), "white")
    top = 0
    for row in rows:
        grid.paste(row, (0, top))
        top += row.height
    return grid
