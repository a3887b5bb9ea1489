"""`unimm eval`: free-text answers to classes, the report on a tiny random pipeline, the CLI in-process.

The random pipeline's outputs are noise: the report is checked for structure, ranges and determinism; the
judge's accuracy on real images is real."""

from __future__ import annotations

import argparse
import json
import logging
import math

import pytest

from unimm import cli
from unimm.data.demo_datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_TEMPLATES, fashion_mnist_caption
from unimm.evaluation.report import (
    EvaluationReport,
    answer_to_class,
    evaluate_pipeline,
    generation_prompts,
    render_markdown,
)
from unimm.pipelines import UniMMPipeline
from unimm.pipelines.testing import build_random_pipeline

TINY_COUNTS = {
    "num_understanding": 6,
    "images_per_class": 2,
    "num_judge_real": 200,
    "num_reconstruction": 4,
    "num_diffusion_reconstruction": 2,
    "num_emoji": 5,
    "num_inference_steps": 2,
    "max_new_tokens": 4,
    "batch_size": 8,
}
PNG_FILES = ("generation_grid.png", "emoji_grid.png", "reconstruction_grid.png")


# ---------------------------------------------------------------- answers to classes
@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ("a sneaker.", 7),
        ("A Sneaker", 7),
        ("sneakers", 7),
        ("This is a t-shirt.", 0),  # not also a "shirt"
        ("a T-shirt/top", 0),
        ("a shirt.", 6),
        ("shirts", 6),
        ("a pair of trousers.", 1),
        ("trousers", 1),
        ("an ankle boot.", 9),
        ("ankle boots", 9),
        ("a dress", 3),
        ("dresses", 3),
        ("It is a bag.", 8),
        ("a pullover", 2),
        ("a coat.", 4),
        ("a sandal", 5),
        ("a sneaker, a sneaker", 7),  # the same class twice is still one class
        ("a sneaker or a sandal", None),  # two classes
        ("a t-shirt and a shirt", None),
        ("an emoji of a cat", None),  # none
        ("", None),
        ("an address", None),  # "dress" inside a word
        ("an overcoat", None),
    ],
)
def test_answer_to_class(answer, label):
    assert answer_to_class(answer) == label


def test_every_caption_names_its_class():
    for label in range(len(FASHION_MNIST_CLASSES)):
        for template in range(len(FASHION_MNIST_TEMPLATES)):
            assert answer_to_class(fashion_mnist_caption(label, template)) == label
        assert answer_to_class(FASHION_MNIST_CLASSES[label]) == label


def test_generation_prompts_are_class_major():
    prompts, labels = generation_prompts(7)
    assert len(prompts) == len(labels) == 70
    assert labels.tolist() == [label for label in range(10) for _ in range(7)]
    assert all(answer_to_class(prompt) == label for prompt, label in zip(prompts, labels.tolist()))
    assert len(set(prompts[:7])) == len(FASHION_MNIST_TEMPLATES)  # the templates in turn


def test_markdown_names_the_feature_space():
    report = EvaluationReport(
        checkpoint="ckpt",
        seed=0,
        decoder="pixel",
        guidance_scale=3.0,
        understanding_accuracy=0.9,
        understanding_total=10,
        understanding_per_class=[1.0] * 9 + [None],
        generation_accuracy=0.8,
        generation_total=20,
        generation_per_class=[0.8] * 10,
        judge_real_accuracy=0.91,
        judge_real_total=100,
        judge_real_per_class=[0.91] * 10,
        reconstruction={"fashion_mnist/pixel": {"psnr": 25.0, "ssim": 0.9, "num_images": 4}},
        emoji_frechet_generated=12.5,
        emoji_frechet_reference=3.25,
        emoji_generated_total=5,
        emoji_reference_total=5,
        emoji_real_total=204,
        understanding_examples=[{"index": 0, "label": "Bag", "answer": "a | bag", "correct": True}],
    )
    text = render_markdown(report)
    assert "Fréchet distance in judge features" in text and "FID" not in text
    assert "| understanding accuracy" in text and "90.0%" in text and ">= 88% (met)" in text
    assert ">= 85% (not met)" in text and "91.0%" in text  # generation and its ceiling
    assert "25.00 dB / 0.900" in text and "12.50" in text and "3.25" in text
    assert "a \\| bag" in text  # table cells escaped


# ---------------------------------------------------------------- the report on a tiny random pipeline
@pytest.fixture(scope="module")
def tiny_pipeline():
    return build_random_pipeline("tiny")


def _json_without_timings(path):
    report = json.loads(path.read_text())
    report.pop("timings_seconds")
    return report


@pytest.mark.integration
def test_report_is_complete_in_range_and_deterministic(tiny_pipeline, tmp_path):
    first = evaluate_pipeline(tiny_pipeline, tmp_path / "a", seed=3, **TINY_COUNTS)
    # 1. Files and counts.
    for name in ("report.md", "report.json", *PNG_FILES):
        assert (tmp_path / "a" / name).is_file(), name
    assert first.understanding_total == 6 and first.generation_total == 20 and first.judge_real_total == 200
    assert first.emoji_generated_total == first.emoji_reference_total == 5 and first.emoji_real_total == 204
    assert len(first.understanding_examples) == 6
    # 2. Ranges: accuracies are fractions, the judge really classifies real images.
    for value in (first.understanding_accuracy, first.generation_accuracy):
        assert 0.0 <= value <= 1.0
    assert first.judge_real_accuracy >= 0.85
    assert len(first.generation_per_class) == len(first.judge_real_per_class) == 10
    assert set(first.reconstruction) == {
        "fashion_mnist/pixel",
        "emoji/pixel",
        "fashion_mnist/diffusion",
        "emoji/diffusion",
    }
    for key, metrics in first.reconstruction.items():
        assert math.isfinite(metrics["psnr"]) and -1.0 <= metrics["ssim"] <= 1.0, key
    assert metrics["num_images"] == 2  # the diffusion subset
    assert first.emoji_frechet_generated >= 0.0 and first.emoji_frechet_reference >= 0.0
    text = (tmp_path / "a" / "report.md").read_text()
    assert "Fréchet distance in judge features" in text and "generation_grid.png" in text
    # 3. The same seed gives the same numbers and images; another seed other images.
    evaluate_pipeline(tiny_pipeline, tmp_path / "b", seed=3, **TINY_COUNTS)
    assert _json_without_timings(tmp_path / "a" / "report.json") == _json_without_timings(
        tmp_path / "b" / "report.json"
    )
    for name in PNG_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    evaluate_pipeline(tiny_pipeline, tmp_path / "c", seed=4, **TINY_COUNTS)
    grid = "generation_grid.png"
    assert (tmp_path / "a" / grid).read_bytes() != (tmp_path / "c" / grid).read_bytes()


@pytest.mark.integration
def test_report_without_detokenizer_and_with_zero_counts(tiny_pipeline, tmp_path):
    pipeline = UniMMPipeline(tiny_pipeline.llm, tiny_pipeline.processor, tiny_pipeline.visual_tokenizer, None)
    counts = TINY_COUNTS | {"num_understanding": 0, "images_per_class": 0, "num_emoji": 0}
    report = evaluate_pipeline(pipeline, tmp_path, **counts)
    assert set(report.reconstruction) == {"fashion_mnist/pixel", "emoji/pixel"}
    assert report.generation_total == 0 and report.emoji_frechet_generated is None
    assert (tmp_path / "report.md").is_file() and not (tmp_path / "generation_grid.png").exists()


# ---------------------------------------------------------------- the command
def _eval_subparser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return subparsers.choices["eval"]


def test_help_describes_every_option(capsys):
    subparser = _eval_subparser()
    assert [action.dest for action in subparser._actions if not action.help] == []
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "CHECKPOINT" in text and "Fréchet" in text
    for action in subparser._actions:
        assert all(option in text for option in action.option_strings)


def test_missing_checkpoint_is_a_one_line_error(tmp_path, caplog):
    missing = tmp_path / "no-such-checkpoint"
    with caplog.at_level(logging.ERROR):
        status = cli.main(["eval", str(missing), "--output-dir", str(tmp_path / "out")])
    assert status == 1
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and "no checkpoint folder" in errors[0] and "\n" not in errors[0]
    assert not (tmp_path / "out" / "report.md").exists()


def test_negative_count_is_refused(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        status = cli.main(["eval", str(tmp_path), "--images-per-class", "-1"])
    assert status == 1 and "--images-per-class=-1" in caplog.text


@pytest.mark.integration
def test_cli_writes_the_report(tiny_pipeline, tmp_path, capsys):
    checkpoint = tmp_path / "tiny"
    tiny_pipeline.save_pretrained(checkpoint)
    output_dir = tmp_path / "eval"
    options = [f"--{name.replace('_', '-')}={value}" for name, value in TINY_COUNTS.items()]
    options = [option.replace("--num-inference-steps", "--steps") for option in options]
    # The demo report alone is written straight into the output folder (the default adds the skill tasks).
    status = cli.main(
        ["eval", str(checkpoint), "--task", "demo", "--output-dir", str(output_dir), "--seed", "1", *options]
    )
    assert status == 0
    out = capsys.readouterr().out
    assert "generation correctness" in out and str(output_dir / "report.md") in out
    report = json.loads((output_dir / "report.json").read_text())
    assert report["checkpoint"] == str(checkpoint) and report["seed"] == 1
    assert report["generation_total"] == 20 and report["understanding_total"] == 6
    for name in PNG_FILES:
        assert (output_dir / name).is_file()
