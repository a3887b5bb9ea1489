"""Encode and decode throughput (images/s) of the dual-codebook tokenizer at batch 1 and batch 64,
side by side with Pillow's JPEG and WebP codecs on the same 32x32 images (the reference codecs of
`benchmarks/tokenizer_quality.py`), in one run.

    python benchmarks/tokenizer.py [--model outputs/tokenizer-fmnist] [--threads 2] [--device cuda]

Without a trained model it times the `demo` config with random weights (the speed is the same). On CUDA the
tokenizer is timed in batches of 1 and 512 (a GPU's batch), its clock read after the device finishes
(``benchmarks/clocks.py``); the codecs always run on the CPU.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from clocks import Clock, add_device_argument
from PIL import Image

from unimm.tokenizer import DualCodebookConfig, DualCodebookTokenizer

BATCH_SIZES = {"cpu": (1, 64), "cuda": (1, 512)}  # per device type
CPU = Clock(torch.device("cpu"))


def images_per_second(
    run: Callable[[], object], images_per_call: int, min_seconds: float = 2.0, clock: Clock = CPU
) -> float:
    """Best-of-3 wall-clock rate after a warm-up call; each trial repeats ``run`` for at least
    ``min_seconds / 3`` (on CUDA, each call waits for the device)."""
    run()
    best = 0.0
    for _ in range(3):
        calls, start = 0, clock.read()[1]
        while clock.read()[1] - start < min_seconds / 3:
            run()
            calls += 1
        best = max(best, calls * images_per_call / (clock.read()[1] - start))
    return best


def codec_rates(images: np.ndarray, codec: str, quality: int) -> tuple[float, float]:
    """(encode, decode) images/s of a Pillow codec, one image per call (codecs have no batch axis)."""
    pil_images = [Image.fromarray(image) for image in images]
    encoded = []
    for image in pil_images:
        buffer = io.BytesIO()
        image.save(buffer, format=codec, quality=quality)
        encoded.append(buffer.getvalue())

    def encode() -> None:
        for image in pil_images:
            image.save(io.BytesIO(), format=codec, quality=quality)

    def decode() -> None:
        for data in encoded:
            Image.open(io.BytesIO(data)).load()

    return images_per_second(encode, len(images)), images_per_second(decode, len(images))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="outputs/tokenizer-fmnist")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per measurement")
    add_device_argument(parser)
    args = parser.parse_args()
    clock = Clock(torch.device(args.device))
    clock.pin_threads(args.threads)
    torch.manual_seed(0)
    if Path(args.model, "config.json").exists():
        model, source = DualCodebookTokenizer.from_pretrained(args.model), args.model
    else:
        model, source = DualCodebookTokenizer(DualCodebookConfig.named("demo")), "demo config, random weights"
    model.to(clock.device).eval()
    config = model.config
    size = config.image_size
    rows = []
    small, large = BATCH_SIZES[clock.device.type]
    with torch.inference_mode():
        for batch_size in (small, large):
            pixel_values = (
                torch.rand(batch_size, config.num_channels, size, size, device=clock.device) * 2 - 1
            )
            ids = model.encode(pixel_values)
            encode = images_per_second(
                lambda p=pixel_values: model.encode(p), batch_size, args.seconds, clock
            )
            decode = images_per_second(lambda i=ids: model.decode(i), batch_size, args.seconds, clock)
            rows.append((f"unimm tokenizer, batch {batch_size}", encode, decode))
    images = (np.random.default_rng(0).random((64, size, size)) * 255).astype(np.uint8)
    for codec, quality in (("JPEG", 10), ("WEBP", 10)):
        encode, decode = codec_rates(images, codec, quality)
        rows.append((f"Pillow {codec} q={quality}, 1 image/call", encode, decode))

    where = clock.describe() if clock.is_cuda else f"{torch.get_num_threads()} CPU threads"
    print(f"\nthroughput on {where}, {size}x{size} images ({source})")
    print(f"{'method':<36}{'encode img/s':>14}{'decode img/s':>14}")
    for name, encode, decode in rows:
        print(f"{name:<36}{encode:>14.1f}{decode:>14.1f}")
    (_, encode_1, decode_1), (_, encode_large, decode_large) = rows[0], rows[1]
    print(
        f"\nbatch {large} / batch {small}: encode x{encode_large / encode_1:.1f}, "
        f"decode x{decode_large / decode_1:.1f}"
    )
    jpeg = rows[2]
    print(
        f"tokenizer batch {large} / JPEG: encode x{encode_large / jpeg[1]:.2f}, decode x{decode_large / jpeg[2]:.2f}"
    )


if __name__ == "__main__":
    main()
