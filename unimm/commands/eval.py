"""Evaluate a checkpoint with tasks: report.json, report.md, PNG grids and per-example records.

    unimm eval                                     # the demo report and the skill tasks of the demo model
    unimm eval --task demo                         # the demo report alone, straight into outputs/eval
    unimm eval --task skills --limit 50            # the unified skills alone, 50 images per dataset task
    unimm eval outputs/demo-random --output-dir outputs/eval-random --images-per-class 20
    unimm eval checkpoints/mine --task understanding --dataset data/shapes --question "What colour is it?"
    unimm eval checkpoints/mine --task prompt_following --dataset data/shapes --judge judges.py:colour
    unimm eval checkpoints/mine --task reconstruction --task frechet --dataset data/shapes --limit 200
    unimm eval checkpoints/mine --tasks-file eval.yaml

Tasks (several --task run in one go, each in its own folder of --output-dir):
  understanding     images of --dataset asked --question; answers scored against the reference captions or
                    answers by exact match, contains and per-word F1
  reconstruction    PSNR/SSIM of encode -> decode (pixel decoder; the diffusion decoder on a subset), codebook usage
  prompt_following  images generated from the dataset's captions (or --prompt) scored by --judge:
                    module:function or file.py:function (images, prompts) -> scores in [0, 1], a transformers
                    image-classification folder (right when the predicted label's name is in the prompt), or
                    fashion_mnist; the judge on the real images is the ceiling
  frechet           Fréchet distance in a named feature space (--features teacher|judge|FOLDER) between generated
                    and real images, with a real-vs-real reference (two disjoint halves); not an FID
  demo              the demo report: Fashion-MNIST understanding and judged generation, reconstruction,
                    emoji Fréchet distance in judge features (needs `make data`); also called fashion_mnist
  skills            the unified skills' tasks below, each with its defaults (the demo recipe's classes and wordings,
                    the fashion_mnist judge); with demo, the default
  prompt_wording    every class in bare and unseen wordings, judged: mean and lowest prompt
  multi_turn        "draw another one like it" after a held-out image; "what did you draw?" after a drawing
  interleaved       "Show me X and Y." in interleaved mode: both images right and in order
  edit              mirror/darker/invert: PSNR against the exact result next to the tokenizer's reconstruction of it;
                    "turn it into Y": judged
  composition       "X next to Y" (wide) and "X above Y" (tall): both halves judged right
  naming            training-split emoji asked "What is this?": named exactly

--dataset is a dataset spec: a demo name, a path (image folder with metadata.jsonl, JSONL, parquet,
WebDataset tars, LLaVA JSON) or a JSON/YAML mapping. A task reads its test split when it has one, else
--split; --limit rows are drawn by --seed (default 1000; each skill task has its own smaller default). Each
task warns when words of its questions or prompts are unknown to the checkpoint's tokenizer, and when its
dataset is not in the checkpoint's model card.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import yaml

from unimm.commands.pipeline_arguments import (
    add_guidance_argument,
    add_pipeline_arguments,
    load_pipeline,
    report_error,
)

logger = logging.getLogger(__name__)

# As unimm.evaluation.skill_tasks.SKILL_TASKS (not imported: --help stays fast).
SKILL_TASK_NAMES = ("prompt_wording", "multi_turn", "interleaved", "edit", "composition", "naming")
SKILLS = "skills"  # every skill task
TASK_NAMES = (
    "understanding", "reconstruction", "prompt_following", "frechet", "demo", "fashion_mnist", SKILLS,
    *SKILL_TASK_NAMES,
)  # fmt: skip
DEFAULT_TASKS = ("demo", SKILLS)
# With --dataset and no --task: the tasks that need nothing else (and prompt_following given --judge).
DATASET_DEFAULT_TASKS = ("understanding", "reconstruction")
DEFAULT_LIMIT = 1000  # as unimm.evaluation.task_base.DEFAULT_LIMIT (not imported: --help stays fast)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint_path",
        nargs="?",
        default=None,
        metavar="CHECKPOINT",
        help="pipeline folder or Hub repo id, the same as --checkpoint (default: the demo model)",
    )
    add_pipeline_arguments(parser)
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("outputs/eval"),
        help="where report.md, report.json, the PNG grids and the records go (default: outputs/eval)",
    )
    _add_task_arguments(parser)
    _add_demo_arguments(parser)
    generation = parser.add_argument_group("generation, reconstruction and batching (every task)")
    generation.add_argument(
        "--decoder",
        choices=("pixel", "diffusion"),
        default="pixel",
        help="how generated image codes become pixels: the fast pixel decoder or the diffusion "
        "detokenizer (default: pixel)",
    )
    add_guidance_argument(generation)
    generation.add_argument(
        "--steps",
        type=int,
        default=20,
        help="diffusion decoder steps, generation and reconstruction (default: 20)",
    )
    generation.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="longest answer in tokens (default: 16 for demo, 32 for understanding)",
    )
    generation.add_argument(
        "--batch-size",
        type=int,
        default=250,
        help="images or conversations per pipeline call (default: 250)",
    )


def _add_task_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tasks")
    group.add_argument(
        "--task",
        action="append",
        choices=TASK_NAMES,
        default=None,
        help=f"a task to run; repeat for several (default: {' and '.join(DEFAULT_TASKS)}; with --dataset: "
        f"{' and '.join(DATASET_DEFAULT_TASKS)}, and prompt_following with --judge)",
    )
    group.add_argument(
        "--tasks-file",
        type=Path,
        default=None,
        help="a YAML list of tasks, each `task:` and its options (dataset, question, judge, ...), run "
        "after any --task",
    )
    group.add_argument(
        "--dataset", default=None, help="dataset spec: a demo name, a path or a JSON/YAML mapping"
    )
    group.add_argument(
        "--split", default=None, help="split to evaluate (default: test when the dataset has one, else train)"
    )
    group.add_argument(
        "--limit",
        type=int,
        default=None,
        help=f"rows per task at most, drawn by --seed from the split (default: {DEFAULT_LIMIT}; the skill tasks "
        "100); 0: all",
    )
    group.add_argument(
        "--question",
        default=None,
        help="understanding: the question asked (default: each row's, else 'What is this?')",
    )
    group.add_argument(
        "--judge",
        default=None,
        help="prompt_following (and --features judge): module:function, file.py:function, a transformers "
        "image-classification folder, or fashion_mnist",
    )
    group.add_argument(
        "--features",
        default="teacher",
        help="frechet: the feature space, teacher (the visual tokenizer's), judge (--judge's penultimate "
        "features) or a transformers model folder (default: teacher)",
    )
    group.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="prompt_following and frechet: a prompt to generate from instead of the captions (repeatable)",
    )
    group.add_argument(
        "--prompts-file", type=Path, default=None, help="a text file of prompts, one per line (as --prompt)"
    )
    group.add_argument(
        "--images-per-prompt", type=int, default=1, help="prompt_following: images per prompt (default: 1)"
    )
    group.add_argument(
        "--cache-dir", default=None, help="the datasets cache (default: the datasets library's)"
    )


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("the demo task")
    counts = (
        ("--num-understanding", 1000, "Fashion-MNIST test images asked 'What is this?'"),
        ("--images-per-class", 100, "images generated per Fashion-MNIST class and judged"),
        ("--num-judge-real", 10000, "real test images the judge classifies, the ceiling of generation"),
        ("--num-reconstruction", 500, "test images reconstructed per dataset with the pixel decoder"),
        (
            "--num-diffusion-reconstruction",
            50,
            "of those, reconstructed with the diffusion detokenizer too, if any; 0 skips it (also the "
            "reconstruction task's subset)",
        ),
        ("--num-emoji", 204, "emoji generated from the test captions for the Fréchet distance; 0 skips it"),
    )
    for option, default, text in counts:
        group.add_argument(option, type=int, default=default, help=f"{text} (default: {default})")


def _prompts(args: argparse.Namespace) -> list[str] | None:
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    return prompts or None


def _dataset(value: str | None):
    """A spec from the command line: a name or path, or a YAML/JSON flow mapping."""
    if value is None or not value.lstrip().startswith("{"):
        return value
    return yaml.safe_load(value)


def build_tasks(args: argparse.Namespace) -> list:
    """The tasks of the command line (--task with the shared options), then those of --tasks-file."""
    from unimm.evaluation.task_runner import ALL_TASKS, build_task, load_task_file

    values = vars(args) | {
        "dataset": _dataset(args.dataset),
        "prompts": _prompts(args),
        "num_diffusion_reconstruction": args.num_diffusion_reconstruction,
    }
    # --limit: unset, each task's default; 0, every row (None, which the filter below would drop).
    explicit = {"limit": None} if args.limit == 0 else {}
    if args.task or args.tasks_file:
        names = list(args.task or [])
    elif args.dataset is not None:  # the user's data: never the demo report by default
        names = [*DATASET_DEFAULT_TASKS, *(["prompt_following"] if args.judge else [])]
    else:
        names = list(DEFAULT_TASKS)
    names = [task for name in names for task in (SKILL_TASK_NAMES if name == SKILLS else (name,))]
    tasks = []
    for name in names:
        fields = {item.name for item in dataclasses.fields(ALL_TASKS[name])} - {"label"}
        options = {key: values[key] for key in fields if values.get(key) is not None}
        tasks.append(
            build_task(name, options | {key: value for key, value in explicit.items() if key in fields})
        )
    if args.tasks_file is not None:
        tasks += load_task_file(args.tasks_file)
    return tasks


def main(args: argparse.Namespace) -> int:
    from unimm.evaluation.task_base import TaskContext
    from unimm.evaluation.task_runner import run_tasks

    if args.checkpoint_path is not None:
        args.checkpoint = args.checkpoint_path
    if args.batch_size < 1 or (args.limit is not None and args.limit < 0):
        return report_error(
            ValueError(f"--batch-size must be >= 1 and --limit >= 0, got {args.batch_size} and {args.limit}")
        )
    try:
        tasks = build_tasks(args)  # option errors before the (slow) checkpoint load
        pipeline = load_pipeline(args)
        pipeline.set_progress_bar_config(disable=True)  # the tasks draw their own bars
        context = TaskContext(
            output_dir=args.output_dir,
            checkpoint=str(args.checkpoint),
            seed=args.seed,
            batch_size=args.batch_size,
            decoder=args.decoder,
            guidance_scale=args.guidance_scale,
            num_inference_steps=args.steps,
            cache_dir=args.cache_dir,
        )
        run = run_tasks(pipeline, tasks, context)
    except (OSError, ValueError, yaml.YAMLError) as error:
        return report_error(error)
    for result in run.results:
        print(result.summary if len(run.results) == 1 else f"{result.label}: {result.summary}")
    warnings = {warning for result in run.results for warning in result.warnings}
    if warnings:
        print(f"{len(warnings)} warning(s) above and in report.md: read them before the figures")
    print(f"report: {args.output_dir / 'report.md'} (and report.json, PNG grids)")
    return 0
