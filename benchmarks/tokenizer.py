"""Encode and decode throughput (images/s) of the dual-codebook tokenizer at batch 1 and batch 64,
side by side with Pillow's JPEG and WebP codecs on the same 32x32 images (the reference codecs of
`benchmarks/tokenizer_quality.py`), in one run.

    python benchmarks/tokenizer.py [--model outputs/tokenizer-fmnist] [--threads 2]

Without a trained model it times the `demo` config with random weights (the speed is the same).
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unimm.tokenizer import DualCodebookConfig, DualCodebookTokenizer


def images_per_second(run: Callable[[], object], images_per_call: int, min_seconds: float = 2.0) -> float:
    """Best-of-3 rate after a warm-up call; each trial repeats ``run`` for at least ``min_seconds / 3``."""
    run()
    best = 0.0
    for _ in range(3):
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_seconds / 3:
            run()
            calls += 1
        best = max(best, calls * images_per_call / (time.perf_counter() - start))
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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if Path(args.model, "config.json").exists():
        model, source = DualCodebookTokenizer.from_pretrained(args.model), args.model
    else:
        model, source = DualCodebookTokenizer(DualCodebookConfig.named("demo")), "demo config, random weights"
    model.eval()
    config = model.config
    size = config.image_size
    rows = []
    with torch.inference_mode():
        for batch_size in (1, 64):
            pixel_values = torch.rand(batch_size, config.num_channels, size, size) * 2 - 1
            ids = model.encode(pixel_values)
            encode = images_per_second(lambda p=pixel_values: model.encode(p), batch_size, args.seconds)
            decode = images_per_second(lambda i=ids: model.decode(i), batch_size, args.seconds)
            rows.append((f"unimm tokenizer, batch {batch_size}", encode, decode))
    images = (np.random.default_rng(0).random((64, size, size)) * 255).astype(np.uint8)
    for codec, quality in (("JPEG", 10), ("WEBP", 10)):
        encode, decode = codec_rates(images, codec, quality)
        rows.append((f"Pillow {codec} q={quality}, 1 image/call", encode, decode))

    print(f"\nthroughput on {torch.get_num_threads()} CPU threads, {size}x{size} images ({source})")
    print(f"{'method':<36}{'encode img/s':>14}{'decode img/s':>14}")
    for name, encode, decode in rows:
        print(f"{name:<36}{encode:>14.1f}{decode:>14.1f}")
    (_, encode_1, decode_1), (_, encode_64, decode_64) = rows[0], rows[1]
    print(f"\nbatch 64 / batch 1: encode x{encode_64 / encode_1:.1f}, decode x{decode_64 / decode_1:.1f}")
    jpeg = rows[2]
    print(f"tokenizer batch 64 / JPEG: encode x{encode_64 / jpeg[1]:.2f}, decode x{decode_64 / jpeg[2]:.2f}")


if __name__ == "__main__":
    main()
