"""Draw a run's ``metrics.jsonl`` as a PNG chart, one panel per metric (train and eval together).

``unimm plot outputs/run`` writes ``outputs/run/metrics.png``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("metrics", help="a metrics.jsonl file or the run folder holding it")
    parser.add_argument("--output", default=None, help="PNG path (default: metrics.png next to the JSONL)")
    parser.add_argument("--keys", nargs="*", default=None, help="metrics to draw (default: all)")


def main(args: argparse.Namespace) -> int:
    from unimm.training.tracking import METRICS_FILE, plot_metrics

    path = Path(args.metrics)
    path = path / METRICS_FILE if path.is_dir() else path
    output = Path(args.output) if args.output else path.with_suffix(".png")
    logger.info("wrote %s", plot_metrics(path, output, args.keys))
    return 0
