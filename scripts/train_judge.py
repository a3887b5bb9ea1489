"""Train the Fashion-MNIST judge of `unimm eval` and write its weights; print its test accuracy.

    python scripts/train_judge.py                                   # writes the packaged weights
    python scripts/train_judge.py --output /tmp/judge.safetensors --epochs 2

Reproduces unimm/evaluation/data/fashion_mnist_judge.safetensors: seeded, on the 60,000 train images,
about 2.5 minutes on one CPU thread (the same weights on one machine and thread count). Needs the Debian
package dataset-fashion-mnist (`make data`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from unimm.evaluation.judge import JUDGE_FILE, fashion_mnist_tensors, judge_accuracy, train_judge

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "unimm" / "evaluation" / "data" / JUDGE_FILE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"default: {DEFAULT_OUTPUT}")
    parser.add_argument("--epochs", type=int, default=8, help="passes over the train split (default: 8)")
    parser.add_argument("--batch-size", type=int, default=128, help="default: 128")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="peak of the one-cycle schedule")
    parser.add_argument("--max-shift", type=int, default=2, help="random translation in pixels (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, order and shifts (default: 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    train_images, train_labels = fashion_mnist_tensors("train")
    test_images, test_labels = fashion_mnist_tensors("test")
    start = time.perf_counter()
    judge = train_judge(
        train_images,
        train_labels,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_shift=args.max_shift,
        seed=args.seed,
    )
    minutes = (time.perf_counter() - start) / 60
    args.output.parent.mkdir(parents=True, exist_ok=True)
    judge.save_pretrained(args.output)
    result = {
        "test_accuracy": round(judge_accuracy(judge, test_images, test_labels), 4),
        "train_accuracy": round(judge_accuracy(judge, train_images, train_labels), 4),
        "train_minutes": round(minutes, 2),
        "output": str(args.output),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
