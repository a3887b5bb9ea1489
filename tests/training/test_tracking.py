from __future__ import annotations

import pytest
from PIL import Image

from unimm.training.tracking import MetricsLogger, plot_metrics, read_metrics


def test_metrics_jsonl_and_chart(tmp_path):
    logger = MetricsLogger(tmp_path)
    for step in range(1, 5):
        logger.log({"step": step, "split": "train", "loss": 1.0 / step, "lr": 0.1})
    logger.log({"step": 4, "split": "eval", "loss": 0.3})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [record["step"] for record in records] == [1, 2, 3, 4, 4]
    chart = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "chart.png")
    with Image.open(chart) as image:
        assert image.format == "PNG" and image.width > 100
    with pytest.raises(ValueError, match=r"no metric\(s\) \['accuracy'\]"):
        plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "other.png", keys=["accuracy"])


def test_disabled_logger_writes_nothing(tmp_path):
    MetricsLogger(tmp_path, enabled=False).log({"step": 1, "loss": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists()


def test_truncate_after_drops_later_records(tmp_path):
    logger = MetricsLogger(tmp_path)
    for step in range(1, 6):
        logger.log({"step": step, "loss": 1.0})
    logger.truncate_after(3)
    assert [record["step"] for record in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_tensorboard_receives_the_same_scalars(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    logger = MetricsLogger(tmp_path, report_to=["tensorboard"])
    for step, loss in ((1, 2.5), (2, 1.75)):
        logger.log({"step": step, "split": "train", "loss": loss, "epoch": 0})
    logger.log({"step": 2, "split": "eval", "loss": 2.0})
    logger.close()
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == [
        "eval/loss",
        "train/loss",
    ]  # epoch is bookkeeping, not a metric
    assert [(event.step, event.value) for event in events.Scalars("train/loss")] == [(1, 2.5), (2, 1.75)]
    assert [record["loss"] for record in read_metrics(tmp_path / "metrics.jsonl")] == [2.5, 1.75, 2.0]
