"""Metrics: one JSON line per record in ``metrics.jsonl``, optionally mirrored to TensorBoard or W&B,
and a PNG chart drawn from the JSONL (``unimm plot``)."""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# Record fields that are bookkeeping, not curves.
NON_METRIC_KEYS = ("step", "split", "epoch", "time")


class MetricsLogger:
    """Appends metric records to ``output_dir/metrics.jsonl`` (and trackers); a no-op when disabled."""

    def __init__(
        self, output_dir: Path, report_to: Sequence[str] = (), enabled: bool = True, config: Any = None
    ):
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self._trackers: list[Any] = []
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._trackers = [_open_tracker(name, Path(output_dir), config) for name in report_to]

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        step, split = record.get("step", 0), record.get("split", "train")
        scalars = {f"{split}/{key}": value for key, value in record.items() if _is_metric(key, value)}
        for tracker in self._trackers:
            tracker.log(scalars, step)

    def truncate_after(self, step: int) -> None:
        """Forget records past ``step`` (a resumed run logs those steps again)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [record for record in read_metrics(self.path) if record.get("step", 0) <= step]
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        temporary.write_text("".join(json.dumps(record, sort_keys=True) + "\n" for record in kept))
        os.replace(temporary, self.path)

    def close(self) -> None:
        for tracker in self._trackers:
            tracker.close()


class _TensorBoard:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, output_dir: Path, config: Any) -> None:
        import wandb

        self.run = wandb.init(dir=str(output_dir), config=config)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def _open_tracker(name: str, output_dir: Path, config: Any) -> Any:
    try:
        if name == "tensorboard":
            return _TensorBoard(output_dir / "tensorboard")
        return _WandB(output_dir, config)
    except ImportError as error:
        raise ImportError(f"report_to includes {name!r} but it is not installed ({error})") from error


def _is_metric(key: str, value: Any) -> bool:
    return key not in NON_METRIC_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(path: Path, output: Path, keys: Sequence[str] | None = None) -> Path:
    """Draw one panel per metric (train and eval curves together) against the step; return the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    curves = _curves(read_metrics(path))
    names = sorted({name for name, _ in curves} if keys is None else set(keys))
    if not names:
        raise ValueError(f"{path}: no metrics to plot")
    missing = [name for name in names if not any(name == key for key, _ in curves)]
    if missing:
        raise ValueError(f"{path}: no metric(s) {missing}; found {sorted({key for key, _ in curves})}")
    columns = min(len(names), 3)
    rows = math.ceil(len(names) / columns)
    figure, axes = pyplot.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    for axis, name in zip(axes.flat, names):
        for (key, split), points in sorted(curves.items()):
            if key == name:
                steps, values = zip(*points)
                axis.plot(steps, values, marker="o" if len(points) < 30 else None, label=split)
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.legend()
    for axis in list(axes.flat)[len(names) :]:
        axis.set_visible(False)
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    pyplot.close(figure)
    return output


def _curves(records: list[dict[str, Any]]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    curves: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for record in records:
        for key, value in record.items():
            if _is_metric(key, value):
                curves[(key, record.get("split", "train"))].append((record.get("step", 0), float(value)))
    return curves
