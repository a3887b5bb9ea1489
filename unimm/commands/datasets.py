"""Build (or load from the cache) the offline demo datasets and print their splits.

Fashion-MNIST comes from the Debian package dataset-fashion-mnist, the emoji from fonts-noto-color-emoji
(`make data` installs both). The result is cached under $UNIMM_CACHE/datasets (~/.cache/unimm)."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-size", type=int, default=32, help="side of the square images (default: 32)")
    parser.add_argument(
        "--cache-dir", default=None, help="datasets cache folder (default: $UNIMM_CACHE/datasets)"
    )


def main(args: argparse.Namespace) -> int:
    from unimm.data.demo_datasets import load_emoji, load_fashion_mnist

    fashion = load_fashion_mnist(image_size=args.image_size, cache_dir=args.cache_dir)
    emoji = load_emoji(image_size=args.image_size, cache_dir=args.cache_dir)
    for name, dataset in (("fashion-mnist", fashion), ("emoji", emoji)):
        sizes = ", ".join(f"{split} {len(rows)}" for split, rows in dataset.items())
        logger.info("%s: %s; e.g. %r", name, sizes, dataset["train"][0]["caption"])
    return 0
