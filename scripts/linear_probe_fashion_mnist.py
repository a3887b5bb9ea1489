"""Linear-probe accuracy of a vision backbone's features on Fashion-MNIST (e.g. the converted DINOv2).

    python scripts/linear_probe_fashion_mnist.py --model ~/.cache/unimm/models/dinov2-small \
        [--num-train 5000] [--num-test 2000] [--image-size 224] [--dtype bfloat16] [--output probe.json]
    # the semantic teacher inside a visual tokenizer folder, e.g. the demo's built-in ViT:
    python scripts/linear_probe_fashion_mnist.py --model checkpoints/demo/visual_tokenizer --image-size 32

Needs the Debian package dataset-fashion-mnist (`make data`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel, BitImageProcessor

from unimm.evaluation.linear_probe import DEFAULT_BATCH_SIZE, fashion_mnist_linear_probe
from unimm.tokenizer import DualCodebookConfig, DualCodebookTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="folder with the backbone and its image processor")
    parser.add_argument("--num-train", type=int, default=5000)
    parser.add_argument("--num-test", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=224, help="side the 28 px images are resized to")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the backbone")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--seed", type=int, default=0, help="seed of the train and test subsets")
    parser.add_argument("--output", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if AutoConfig.from_pretrained(args.model).model_type == DualCodebookConfig.model_type:
        # A visual tokenizer folder: probe its semantic teacher, normalised as the tokenizer feeds it.
        tokenizer_config = DualCodebookConfig.from_pretrained(args.model)
        model = DualCodebookTokenizer.from_pretrained(args.model).teacher.to(DTYPES[args.dtype]).eval()
        processor = BitImageProcessor(
            image_mean=tokenizer_config.teacher_image_mean or tokenizer_config.image_mean,
            image_std=tokenizer_config.teacher_image_std or tokenizer_config.image_std,
        )
    else:
        model = AutoModel.from_pretrained(args.model, dtype=DTYPES[args.dtype]).eval()
        processor = AutoImageProcessor.from_pretrained(args.model)
    result = fashion_mnist_linear_probe(
        model, processor, args.num_train, args.num_test, args.image_size, args.batch_size, args.seed
    )
    result |= {"model": str(args.model), "dtype": args.dtype}
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
