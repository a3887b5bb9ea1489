"""Run evaluation tasks on one pipeline and write the report: ``report.json`` (every figure, per task),
``report.md`` (a table per task, its warnings, grids and records) and each task's folder.

    run = run_tasks(pipeline, [UnderstandingTask(dataset="data/shapes")], TaskContext("outputs/eval"))

Tasks are built by name from options (:func:`build_task`), or read from a YAML task file
(:func:`load_task_file`)::

    tasks:
      - task: understanding
        dataset: data/shapes          # relative paths resolve against the YAML file's folder
        question: What colour is this?
      - task: prompt_following
        dataset: data/shapes
        judge: judges.py:colour
      - {task: frechet, dataset: data/shapes, features: teacher, label: frechet-teacher}
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unimm.data.spec import resolve_spec_paths
from unimm.llm.sampling import default_image_sampling, describe_sampling

from .skill_tasks import SKILL_TASKS
from .task_base import EvalTask, TaskContext, TaskResult
from .tasks import TASKS

logger = logging.getLogger(__name__)

REPORT_JSON, REPORT_MD = "report.json", "report.md"
TASK_KEY = "task"
# Options naming files, resolved against a task file's folder when they are relative paths there.
PATH_OPTIONS = ("judge", "features")
# Every task by name: those of unimm.evaluation.tasks and the unified skills' (unimm.evaluation.skill_tasks).
ALL_TASKS: dict[str, type[EvalTask]] = {**TASKS, **SKILL_TASKS}


@dataclass
class EvaluationRun:
    """The results of one run, in task order, and where the report is."""

    checkpoint: str | None
    seed: int
    results: list[TaskResult]
    output_dir: Path
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "seed": self.seed,
            "settings": self.settings,
            "tasks": {result.label: result.to_dict() for result in self.results},
        }


def build_task(name: str, options: Mapping[str, Any] | None = None) -> EvalTask:
    """The task ``name`` (one of ``ALL_TASKS``) with ``options`` (its dataclass fields); a one-line error for
    an unknown name or option."""
    if name not in ALL_TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(ALL_TASKS)}")
    task_class = ALL_TASKS[name]
    fields = [item.name for item in dataclasses.fields(task_class)]
    unknown = sorted(set(options or {}) - set(fields))
    if unknown:
        close = difflib.get_close_matches(unknown[0], fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"task {name}: unknown option {unknown[0]!r}{hint}; expected some of {fields}")
    return task_class(**dict(options or {}))


def load_task_file(path: str | os.PathLike) -> list[EvalTask]:
    """The tasks of a YAML file: a list of mappings (or ``{tasks: [...]}``), each ``task:`` plus options.
    Relative dataset, judge and feature paths resolve against the file's folder."""
    path = Path(path)
    content = yaml.safe_load(path.read_text(encoding="utf-8"))
    entries = content.get("tasks") if isinstance(content, dict) else content
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ValueError(
            f"{path}: expected a list of tasks (mappings with a `task:` key) or `tasks:` of them"
        )
    base_dir = path.parent.resolve()
    tasks = []
    for index, entry in enumerate(entries):
        options = dict(entry)
        name = options.pop(TASK_KEY, None)
        if name is None:
            raise ValueError(f"{path}: task {index + 1} has no `task:` key (one of {sorted(ALL_TASKS)})")
        if options.get("dataset") is not None:
            options["dataset"] = resolve_spec_paths(options["dataset"], base_dir)
        for option in PATH_OPTIONS:
            if isinstance(options.get(option), str):
                options[option] = _resolved_path_option(options[option], base_dir)
        tasks.append(build_task(name, options))
    return tasks


def _resolved_path_option(value: str, base_dir: Path) -> str:
    """``value`` with a relative file or folder part joined to ``base_dir`` when it exists there (a judge
    ``judges.py:colour`` or a model folder); names (``teacher``, ``pkg.module:function``) unchanged."""
    file_part, separator, rest = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    if not Path(file_part).is_absolute() and (base_dir / file_part).exists():
        return f"{base_dir / file_part}{separator}{rest}"
    return value


def unique_labels(tasks: Sequence[EvalTask]) -> None:
    """Give repeated tasks the labels ``name``, ``name-2``, ... so their folders and report keys differ."""
    seen: dict[str, int] = {}
    for task in tasks:
        key = task.key
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            task.label = f"{key}-{seen[key]}"


def run_tasks(pipeline: Any, tasks: Sequence[EvalTask], context: TaskContext) -> EvaluationRun:
    """Run ``tasks`` in order and write the report into ``context.output_dir``.

    A task that writes its own report (the demo report) and runs alone writes it straight into the output
    folder, and the run adds nothing: ``unimm eval`` with no task gives the report it always gave."""
    if not tasks:
        raise ValueError("no task to run")
    unique_labels(tasks)
    standalone = len(tasks) == 1 and tasks[0].writes_report
    context.flat = standalone
    context.output_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for task in tasks:
        logger.info("task %s (%s)", task.key, task.name)
        start = time.perf_counter()
        result = task.run(pipeline, context)
        result.seconds = round(time.perf_counter() - start, 2)
        logger.info("task %s: %s (%.1f s)", task.key, result.summary, result.seconds)
        results.append(result)
    run = EvaluationRun(
        checkpoint=context.checkpoint,
        seed=context.seed,
        results=results,
        output_dir=context.output_dir,
        settings={
            "decoder": context.decoder,
            "guidance_scale": context.guidance_scale,
            "num_inference_steps": context.num_inference_steps,
            "batch_size": context.batch_size,
            "image_sampling": dataclasses.asdict(default_image_sampling(pipeline.llm.generation_config)),
        },
    )
    if not standalone:
        write_report(run)
    return run


def write_report(run: EvaluationRun) -> None:
    """``report.json`` and ``report.md`` of a run."""
    (run.output_dir / REPORT_JSON).write_text(
        json.dumps(run.to_dict(), indent=2, default=str) + "\n", encoding="utf-8"
    )
    (run.output_dir / REPORT_MD).write_text(render_run_markdown(run), encoding="utf-8")
    logger.info("report written to %s", run.output_dir / REPORT_MD)


def render_run_markdown(run: EvaluationRun) -> str:
    settings = run.settings
    sampling = describe_sampling(settings.get("image_sampling", {}))
    lines = [
        f"# Evaluation of `{run.checkpoint or 'pipeline'}`",
        "",
        f"Seed {run.seed}; generated images decoded with the {settings['decoder']} decoder, language-model "
        f"guidance {settings['guidance_scale']:g}{sampling}. Tasks: {', '.join(result.label for result in run.results)}.",
        "",
    ]
    # Each distinct warning once, numbered, with the tasks it applies to (tasks on one dataset share some).
    numbers: dict[str, int] = {}
    for result in run.results:
        for warning in result.warnings:
            numbers.setdefault(warning, len(numbers) + 1)
    if numbers:
        lines += ["**Read the warnings before the figures:**", ""]
        for warning, number in numbers.items():
            labels = ", ".join(result.label for result in run.results if warning in result.warnings)
            lines.append(f"{number}. ({labels}) {warning}")
        lines.append("")
    lines += [result.markdown([numbers[warning] for warning in result.warnings]) for result in run.results]
    timing = ", ".join(f"{result.label} {result.seconds:.1f} s" for result in run.results)
    lines += [f"Time: {timing}.", ""]
    return "\n".join(lines)


__all__ = [
    "ALL_TASKS",
    "EvaluationRun",
    "build_task",
    "load_task_file",
    "render_run_markdown",
    "run_tasks",
    "unique_labels",
    "write_report",
]
