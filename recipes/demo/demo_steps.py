"""The demo model's own eval step, which the library does not need: its quality report, with the headline
figures put into the checkpoint's model card. The whole build is a multi-step recipe:

    unimm build recipes/demo/build.yaml                  # or `make demo-model`; resumes where it stopped
    unimm build recipes/demo/build.yaml --steps llm --force

whose steps are: ``tokenizer`` (``unimm train recipes/demo/tokenizer.yaml``, teacher classifier first),
``prepare`` (``unimm prepare recipes/demo/prepare.yaml``: the LLM's initial weights, a small Llama + image
vocabulary with code rows from the codebook and its text tokenizer, and the chat tables of every skill),
``llm`` and ``detokenizer`` (``unimm train``, one after the other), ``assemble`` (``unimm assemble`` into
``unimm/demo_checkpoint``, linked as ``checkpoints/demo``) and ``eval``:

    python recipes/demo/demo_steps.py eval --checkpoint unimm/demo_checkpoint --output-dir outputs/demo/eval --skills

The SmolLM2 build (``recipes/smollm2/build.yaml``) runs the same eval step with ``--text-model``: the
pretrained LM it started from, asked the general text questions before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer

from unimm.evaluation.task_data import training_data_lines
from unimm.evaluation.text_questions import (
    DEFAULT_MAX_NEW_TOKENS,
    evaluate_text_questions,
    judge_replies,
    load_text_questions,
)

logger = logging.getLogger(__name__)

STEPS = ("eval",)  # the demo-specific steps; recipes/demo/build.yaml runs them after the unimm commands
TEXT_QUESTIONS_FILE = "text_questions.json"
SKILLS_FOLDER = "skills"  # under the report's folder: the skill tasks' own report


def compare_text_skills(pipeline: Any, text_model_name_or_path: str, output_dir: Path) -> dict[str, Any]:
    """The 20 general text questions asked to the pretrained text model and to the trained unified model;
    writes ``text_questions.json`` (scores and every reply) and returns it.

    "after" asks the unified model the way a user does, ``pipeline.chat`` (text mode: no image token can
    start outside an image); "after_unconstrained" with plain ``generate``, which may wander into image
    tokens (decoded to nothing) and is kept for comparison."""
    before_model = AutoModelForCausalLM.from_pretrained(text_model_name_or_path).eval()
    before = evaluate_text_questions(before_model, AutoTokenizer.from_pretrained(text_model_name_or_path))
    questions = load_text_questions()
    replies = pipeline.chat([q.question for q in questions], max_new_tokens=DEFAULT_MAX_NEW_TOKENS).texts
    after = judge_replies(questions, replies)
    unconstrained = evaluate_text_questions(pipeline.llm, pipeline.processor.tokenizer)
    result = {
        "text_model": text_model_name_or_path,
        **{
            name: {"correct": report.correct, "total": report.total, "results": report.results}
            for name, report in (("before", before), ("after", after), ("after_unconstrained", unconstrained))
        },
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / TEXT_QUESTIONS_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "text questions: %d/%d before, %d/%d after (pipeline.chat), %d/%d after with plain generate",
        before.correct, before.total, after.correct, after.total, unconstrained.correct, unconstrained.total,
    )  # fmt: skip
    return result


def evaluate_and_card(
    checkpoint: Path,
    output_dir: Path,
    text_model_name_or_path: str | None = None,
    skills: bool = False,
    skill_tasks: Sequence[Any] | None = None,
    **report_options: Any,
) -> None:
    """Write the quality report (``report_options`` go to ``evaluate_pipeline``) and put its headline
    figures into the checkpoint's model card, keeping the training data the card lists (``unimm assemble
    --training-data``). With ``text_model_name_or_path`` (the pretrained LM the unified model started from)
    the text questions are asked before and after, see :func:`compare_text_skills`; with ``skills``, the
    unified skills' tasks too (:func:`skill_metrics`; ``skill_tasks``: which, default all at full size)."""
    from unimm.evaluation.report import evaluate_pipeline
    from unimm.pipelines import UniMMPipeline
    from unimm.pipelines.model_card import build_model_card

    training_data = training_data_lines(checkpoint)  # read before the card is rewritten
    pipeline = UniMMPipeline.from_pretrained(checkpoint)
    text_skills = (
        compare_text_skills(pipeline, text_model_name_or_path, output_dir)
        if text_model_name_or_path
        else None
    )
    report = evaluate_pipeline(pipeline, output_dir, checkpoint_name=str(checkpoint), **report_options)
    metrics = {
        f"understanding accuracy (Fashion-MNIST test, {report.understanding_total} images)": (
            f"{report.understanding_accuracy:.1%}"
        ),
        f"generation correctness (judge; its real-image accuracy {report.judge_real_accuracy:.1%})": (
            f"{report.generation_accuracy:.1%}"
        ),
    }
    for name, scores in report.reconstruction.items():  # e.g. "fashion_mnist/pixel"
        metrics[f"reconstruction PSNR / SSIM ({name})"] = f"{scores['psnr']:.2f} dB / {scores['ssim']:.3f}"
    if text_skills is not None:
        metrics["general text questions correct (before → after multimodal training)"] = (
            f"{text_skills['before']['correct']}/{text_skills['before']['total']} → "
            f"{text_skills['after']['correct']}/{text_skills['after']['total']}"
        )
        unconstrained = text_skills["after_unconstrained"]
        metrics["general text questions correct after, plain generate() without the text-mode constraint"] = (
            f"{unconstrained['correct']}/{unconstrained['total']}"
        )
    if skills:
        metrics.update(skill_metrics(pipeline, checkpoint, output_dir / SKILLS_FOLDER, skill_tasks))
    build_model_card(pipeline, training_data, metrics).save(checkpoint / "README.md")


def skill_metrics(
    pipeline: Any, checkpoint: Path, output_dir: Path, tasks: Sequence[Any] | None = None
) -> dict[str, str]:
    """The unified skills' tasks (``unimm eval --task skills``: their report goes to ``output_dir``), as the
    model card's rows: "<skill>: <metric>" -> value. ``tasks`` default to every skill task at its default
    size (minutes on the CPU); a test passes small ones."""
    from unimm.evaluation import TaskContext, run_tasks
    from unimm.evaluation.skill_tasks import SKILL_TASKS

    if tasks is None:
        tasks = [task_class() for task_class in SKILL_TASKS.values()]
    run = run_tasks(pipeline, list(tasks), TaskContext(output_dir=output_dir, checkpoint=str(checkpoint)))
    return {f"{result.label}: {metric}": value for result in run.results for metric, value, _ in result.table}


def build_parser() -> argparse.ArgumentParser:
    """The step's command line (the build recipes' ``eval`` steps pass theirs)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("step", choices=STEPS, help="eval: the quality report and the model card's figures")
    parser.add_argument("--checkpoint", default="unimm/demo_checkpoint", help="the checkpoint folder")
    parser.add_argument(
        "--text-model",
        default=None,
        metavar="PATH",
        help="the pretrained text LM the model started from (folder or Hub id; ~ expanded): the general "
        "text questions are asked to it and to the checkpoint (default: none, a model trained from scratch)",
    )
    parser.add_argument(
        "--skills", action="store_true", help="the unified skills' tasks too (unimm eval --task skills)"
    )
    parser.add_argument("--output-dir", default="outputs/demo/eval", help="the report's folder")
    parser.add_argument(
        "--num-understanding", type=int, default=None, help="test images asked (default: the report's)"
    )
    parser.add_argument(
        "--images-per-class",
        type=int,
        default=None,
        help="images generated per class (default: the report's)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report_options = {
        name: value
        for name, value in (
            ("num_understanding", args.num_understanding),
            ("images_per_class", args.images_per_class),
        )
        if value is not None
    }
    evaluate_and_card(
        Path(args.checkpoint),
        Path(args.output_dir),
        text_model_name_or_path=os.path.expanduser(args.text_model) if args.text_model else None,
        skills=args.skills,
        **report_options,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
