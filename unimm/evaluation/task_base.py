"""What every evaluation task shares: the run's context, the result, and the helpers that write outputs.

A task is a dataclass of its options with a ``name`` and one method::

    result = task.run(pipeline, context)   # -> TaskResult: figures, report.md rows, warnings, files

It writes its figures (PNG grids, ``examples.jsonl`` of per-example records) under
``context.task_dir(task.key)``; :func:`unimm.evaluation.task_runner.run_tasks` gathers the results into
``report.json`` and ``report.md``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import PIL.Image
from PIL import ImageDraw
from tqdm.auto import tqdm

from .task_data import TaskData, TaskExample, load_task_data, vocabulary_warning

logger = logging.getLogger(__name__)

EXAMPLES_FILE = "examples.jsonl"
GRID_FILE = "grid.png"
GRID_CELL = 128  # pixels per image in the grids (small images are upscaled with nearest neighbours)
GRID_COLUMNS = 8
GRID_IMAGES = 32  # examples shown in a task's grid
LINE_HEIGHT = 12  # pixels per line of PIL's default font
CHARACTER_WIDTH = 6  # pixels per character of PIL's default font
MAX_WRAPPED_LINES = 3  # per caption line of a grid tile: a long answer is cut
RIGHT, WRONG, NEUTRAL = "darkgreen", "firebrick", "black"
DEFAULT_LIMIT = 1000  # rows a dataset task reads at most unless told otherwise (a seeded subset)


@dataclass
class TaskContext:
    """What the tasks of one evaluation run share.

    Attributes:
        output_dir: the run's folder; each task writes under ``output_dir / label``.
        checkpoint: the checkpoint's folder or repo id (its model card names its training data).
        seed: of the row subsets, sampling, generation and diffusion noise.
        batch_size: images, prompts or conversations per pipeline call.
        decoder, guidance_scale, num_inference_steps: how images are generated.
        cache_dir: the ``datasets`` cache.
        flat: a single task writes straight into ``output_dir`` (the demo report alone, as it always did).
    """

    output_dir: Path
    checkpoint: str | None = None
    seed: int = 0
    batch_size: int = 250
    decoder: str = "pixel"
    guidance_scale: float = 3.0
    num_inference_steps: int = 20
    cache_dir: str | None = None
    flat: bool = False
    _data: dict[tuple, TaskData] = field(default_factory=dict, repr=False)
    _logged: set[str] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)

    def task_dir(self, label: str) -> Path:
        folder = self.output_dir if self.flat else self.output_dir / label
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def relative(self, path: Path) -> str:
        """``path`` as ``report.md`` links it: relative to the output folder, with forward slashes."""
        return Path(os.path.relpath(path, self.output_dir)).as_posix()

    def load_data(self, pipeline: Any, spec: Any, split: str | None, limit: int | None) -> TaskData:
        """The examples of ``spec`` (see :func:`load_task_data`), loaded once per run."""
        key = (json.dumps(spec, sort_keys=True, default=str), split, limit)
        if key not in self._data:
            self._data[key] = load_task_data(
                spec,
                image_size=pipeline.visual_tokenizer.config.image_size,
                split=split,
                limit=limit,
                seed=self.seed,
                checkpoint=self.checkpoint_folder(pipeline),
                cache_dir=self.cache_dir,
            )
        return self._data[key]

    def warn(self, warnings: list[str], message: str | None) -> None:
        """Keep a warning for a task's report and log it, once per run (tasks on one dataset share
        its warnings); ``None``: nothing to say."""
        if not message:
            return
        warnings.append(message)
        if message not in self._logged:
            self._logged.add(message)
            logger.warning("%s", message)

    def checkpoint_folder(self, pipeline: Any) -> str | None:
        """The local folder the pipeline was loaded from, if any (a Hub repo's snapshot counts)."""
        for candidate in (self.checkpoint, getattr(pipeline, "name_or_path", None)):
            if candidate and Path(candidate).is_dir():
                return str(candidate)
        return None


@dataclass
class TaskResult:
    """What a task measured.

    Attributes:
        task: the task's name; ``label``: its key in the report (unique within a run).
        description: what it ran on ("data/shapes, test split, 200 rows; judge colour:judge").
        metrics: every figure (``report.json``).
        table: ``(metric, value, images)`` rows of its table in ``report.md``.
        warnings: what a reader must know before trusting the figures.
        notes: how it is measured, one sentence each.
        files: name -> path relative to the output folder (grids, per-example records).
        summary: one line for the terminal.
    """

    task: str
    label: str
    description: str
    metrics: dict[str, Any]
    table: list[tuple[str, str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    summary: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["table"] = [list(row) for row in self.table]
        return values

    def markdown_rows(self) -> list[str]:
        """The rows of its table in ``report.md`` (cells escaped)."""
        return ["| " + " | ".join(escape_cell(cell) for cell in row) + " |" for row in self.table]

    def markdown(self, warning_numbers: Sequence[int] | None = None) -> str:
        """Its section of ``report.md``: warnings, table, how it is measured, grids, records.

        ``warning_numbers``: the numbers of its warnings in the report's list above, which the section
        then refers to instead of repeating them."""
        lines = [f"## {self.label}", "", self.description, ""]
        if warning_numbers:
            numbers = ", ".join(str(number) for number in warning_numbers)
            lines += [f"> **Warnings** {numbers} above apply.", ""]
        elif self.warnings:
            lines += [*(f"- **Warning:** {warning}" for warning in self.warnings), ""]
        lines += ["| metric | value | images |", "|---|---|---|", *self.markdown_rows(), ""]
        lines += [f"- {note}" for note in self.notes]
        for name, path in self.files.items():
            if path.endswith(".png"):
                lines += ["", f"![{name}]({path})"]
            else:
                lines += ["", f"{name}: [{path}]({path})"]
        return "\n".join([*lines, ""])


class EvalTask:
    """The base of the tasks: ``name`` (registry key), ``label`` (report key; default the name), ``run``.

    ``writes_report``: the task writes its own ``report.md``/``report.json`` (the demo report), so when it
    runs alone the run adds none of its own."""

    name: ClassVar[str] = ""
    writes_report: ClassVar[bool] = False
    label: str | None

    @property
    def key(self) -> str:
        return self.label or self.name

    def run(self, pipeline: Any, context: TaskContext) -> TaskResult:
        raise NotImplementedError


@dataclass
class DatasetTask(EvalTask):
    """Options of the tasks that read a dataset: its spec, the split (default: its test split, else
    train) and at most ``limit`` rows drawn by the run's seed (``None``: all)."""

    dataset: Any = None
    split: str | None = None
    limit: int | None = DEFAULT_LIMIT
    label: str | None = None
    needs_dataset: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.needs_dataset and self.dataset is None:
            raise ValueError(f"task {self.name} needs a dataset (--dataset PATH_OR_SPEC)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"task {self.name}: limit must be at least 1, got {self.limit}")

    def load(self, pipeline: Any, context: TaskContext, warnings: list[str]) -> TaskData:
        data = context.load_data(pipeline, self.dataset, self.split, self.limit)
        for message in data.warnings:
            context.warn(warnings, message)
        return data


def mean_or_nan(values: Sequence[float]) -> float:
    """The mean, NaN for no values (JSON writes it as NaN; the report shows n/a)."""
    return float(np.mean(values)) if len(values) else math.nan


def image_paths(examples: Sequence[TaskExample], context: TaskContext, label: str) -> list[str]:
    """Where each example's image is: its source file, else a PNG saved under the task's ``images/``."""
    folder = context.task_dir(label) / "images"
    paths = []
    for example in examples:
        if example.source:
            paths.append(example.source)
            continue
        folder.mkdir(exist_ok=True)
        path = folder / f"{example.index:05d}.png"  # named by the row, like the records
        example.image.save(path)
        paths.append(context.relative(path))
    return paths


def escape_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def check_texts(
    pipeline: Any,
    texts: Sequence[str],
    what: str,
    context: TaskContext,
    warnings: list[str],
    consequence: str = "the model cannot read them",
) -> None:
    """The vocabulary warning of the texts a task is about to feed the model (or expects from it)."""
    context.warn(warnings, vocabulary_warning(pipeline.processor.tokenizer, texts, what, consequence))


def batches(items: Sequence, batch_size: int, description: str) -> Iterator[tuple[int, Sequence]]:
    """``(start, items[start:start + batch_size])`` under a progress bar."""
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, desc=description, total=len(starts), leave=False):
        yield start, items[start : start + batch_size]


def generate_images(
    pipeline: Any, prompts: Sequence[str], context: TaskContext, description: str
) -> list[PIL.Image.Image]:
    """One image per prompt; prompt ``i`` is seeded with ``context.seed + i``, so an image does not depend
    on the batch size or on the other prompts."""
    images: list[PIL.Image.Image] = []
    for start, batch in batches(prompts, context.batch_size, description):
        output = pipeline.generate_images(
            list(batch),
            guidance_scale=context.guidance_scale,
            seed=[context.seed + start + offset for offset in range(len(batch))],
            decoder=context.decoder,
            num_inference_steps=context.num_inference_steps,
        )
        images.extend(output.images)
    return images


def save_images(images: Sequence[PIL.Image.Image], folder: Path) -> list[Path]:
    """Images as ``folder/00000.png``, ``00001.png``, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{index:05d}.png" for index in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    return paths


def write_jsonl(records: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_outputs(
    context: TaskContext,
    label: str,
    records: Sequence[dict[str, Any]],
    grid: PIL.Image.Image,
) -> dict[str, str]:
    """A task's per-example records (``examples.jsonl``) and ``grid.png``; their paths for the report."""
    folder = context.task_dir(label)
    write_jsonl(records, folder / EXAMPLES_FILE)
    grid.save(folder / GRID_FILE)
    return {
        "grid": context.relative(folder / GRID_FILE),
        "examples": context.relative(folder / EXAMPLES_FILE),
    }


def generated_records(
    context: TaskContext, label: str, prompts: Sequence[str], images: Sequence[PIL.Image.Image]
) -> list[dict[str, Any]]:
    """Generated images saved as the task's ``images/NNNNN.png``, and a record per image."""
    paths = save_images(images, context.task_dir(label) / "images")
    return [
        {"index": index, "prompt": prompt, "image": context.relative(path)}
        for index, (prompt, path) in enumerate(zip(prompts, paths))
    ]


def annotated_grid(
    images: Sequence[PIL.Image.Image],
    captions: Sequence[Sequence[tuple[str, str]]],
    columns: int = GRID_COLUMNS,
    cell: int = GRID_CELL,
) -> PIL.Image.Image:
    """Images in rows of ``columns``, each upscaled to ``cell`` pixels with its caption lines underneath;
    a caption line is ``(text, colour)``, wrapped to the cell's width in at most ``MAX_WRAPPED_LINES``."""
    width = cell // CHARACTER_WIDTH
    wrapped = [
        [
            (piece, colour)
            for text, colour in lines
            for piece in textwrap.wrap(text, width, max_lines=MAX_WRAPPED_LINES, placeholder=" ...") or [""]
        ]
        for lines in captions
    ]
    text_height = LINE_HEIGHT * max((len(lines) for lines in wrapped), default=0) + 4
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    grid = PIL.Image.new("RGB", (columns * cell, max(rows, 1) * (cell + text_height)), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image, lines) in enumerate(zip(images, wrapped)):
        left, top = (index % columns) * cell, (index // columns) * (cell + text_height)
        grid.paste(image.convert("RGB").resize((cell, cell), PIL.Image.Resampling.NEAREST), (left, top))
        for line, (text, colour) in enumerate(lines):
            draw.text((left + 2, top + cell + 2 + line * LINE_HEIGHT), text, fill=colour)
    return grid


__all__ = [
    "DEFAULT_LIMIT",
    "DatasetTask",
    "EvalTask",
    "TaskContext",
    "TaskResult",
    "annotated_grid",
    "batches",
    "check_texts",
    "generate_images",
    "generated_records",
    "image_paths",
    "mean_or_nan",
    "percent",
    "save_images",
    "write_jsonl",
    "write_outputs",
]
