"""Ask a causal LM the 20 general text questions (greedy, chat template) and print its score.

    python scripts/evaluate_text_questions.py --model ~/.cache/unimm/models/smollm2-135m-instruct \
        [--output report.json]

Any folder `AutoModelForCausalLM` loads works (importing unimm registers its own model types)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

import unimm  # noqa: F401  (registers the unimm model types with the Auto classes)
from unimm.evaluation.text_questions import DEFAULT_MAX_NEW_TOKENS, evaluate_text_questions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="model folder (or Hub id where a Hub is reachable)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--output", default=None, help="write the report (score and replies) as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    start = time.perf_counter()
    report = evaluate_text_questions(model, tokenizer, max_new_tokens=args.max_new_tokens)
    seconds = time.perf_counter() - start
    for row in report.results:
        print(f"[{'x' if row['correct'] else ' '}] {row['question']} -> {row['reply']!r}")
    print(f"{args.model}: {report.correct}/{report.total} correct ({seconds:.0f} s)")
    if args.output:
        result = asdict(report) | {"model": str(args.model), "seconds": round(seconds, 1)}
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
