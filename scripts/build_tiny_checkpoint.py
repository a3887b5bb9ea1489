"""Write a pipeline checkpoint folder of untrained components, for tests, benchmarks and serving work.

    python scripts/build_tiny_checkpoint.py outputs/tiny-checkpoint              # unit-test size (~1 MB)
    python scripts/build_tiny_checkpoint.py outputs/demo-random --size demo      # demo-model shapes

The folder is the Hub layout (model_index.json, llm/, processor/, visual_tokenizer/, detokenizer/, README.md):
every `unimm` command and `UniMMPipeline.from_pretrained` take it. Its outputs are noise: nothing is trained.
"""

from __future__ import annotations

import argparse
import sys

from unimm.pipelines.pipeline_unimm import PROMPT_FORMATS
from unimm.pipelines.testing import RANDOM_PIPELINE_SIZES, build_random_pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output", help="folder to write (replaced files, kept others)")
    parser.add_argument("--size", choices=sorted(RANDOM_PIPELINE_SIZES), default="tiny", help="default: tiny")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    parser.add_argument(
        "--prompt-format", choices=PROMPT_FORMATS, default="chat", help="how image prompts are written"
    )
    args = parser.parse_args(argv)
    pipeline = build_random_pipeline(args.size, seed=args.seed, prompt_format=args.prompt_format)
    pipeline.save_pretrained(
        args.output, training_data=[f"none: random weights (size {args.size!r}, seed {args.seed})"]
    )
    print(f"wrote a random {args.size} pipeline to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
