"""What the skill tasks (:mod:`unimm.evaluation.skill_tasks`) share: their classes and how they are named,
the options every skill task has, and helpers that talk to the pipeline through its public API.

A task's classes are ``classes``, each ``"name"`` or ``"name, other name, ..."`` (the first is written in
prompts; any counts when an answer names the class); ``subject`` names one in a sentence (``"{article}
{label}"``). The defaults are the demo recipe's vocabulary (``recipes/demo/prepare.yaml``: its Fashion-MNIST
label names and synonyms).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import PIL.Image

from unimm.data.demo_datasets import FASHION_MNIST_CAPTION_NAMES
from unimm.data.skills import PhraseTemplate, article, numbered, one_line

from .prompt_judges import FASHION_MNIST_JUDGE, PromptJudge
from .task_base import (
    GRID_IMAGES,
    NEUTRAL,
    RIGHT,
    WRONG,
    DatasetTask,
    EvalTask,
    TaskContext,
    batches,
    mean_or_nan,
    save_images,
)
from .task_data import TaskExample

# --- the demo recipe's vocabulary (recipes/demo/prepare.yaml) ---------------------------------------
DEMO_SYNONYMS = {  # prepare.yaml label_synonyms: names a user may give; answers keep the label
    "t-shirt": ("tee", "t shirt", "top"),
    "pair of trousers": ("trousers", "pants", "jeans"),
    "pullover": ("sweater", "jumper"),
    "dress": ("gown",),
    "coat": ("jacket",),
    "sandal": ("sandals",),
    "shirt": ("blouse", "button-up shirt"),
    "sneaker": ("sneakers", "trainer", "running shoe"),
    "bag": ("handbag", "purse"),
    "ankle boot": ("boot", "boots"),
}
DEMO_CLASSES = tuple(", ".join((name, *DEMO_SYNONYMS.get(name, ()))) for name in FASHION_MNIST_CAPTION_NAMES)
DEMO_DATASET = "fashion_mnist"  # held-out images with captions naming their class
DEFAULT_SUBJECT = "{article} {label}"

DEFAULT_SKILL_LIMIT = 100  # held-out images per dataset-reading skill task: minutes for all on 2 CPU cores
CLASS_SEPARATOR = ","
SUBJECT_FIELDS = ("label", "article")
CLASS_FIELDS = ("label", "article", "subject")
PAIR_FIELDS = tuple(f"{name}_{index}" for index in (1, 2) for name in CLASS_FIELDS)
GRID_PAIRS = GRID_IMAGES // 2  # examples of two images each in a grid
LETTERBOX_FILL = (96, 96, 96)  # around wide and tall images in the grids


# --- classes ----------------------------------------------------------------------------------------


class ClassNames:
    """The classes of a task: ``entries[i]`` is ``"name"`` or ``"name, other name, ..."``.

    ``fields(i)`` are the template fields of class ``i`` (its first name); :meth:`named` finds the one class a
    text names (an answer, a caption), or ``None`` for none or several. Names match as whole words, case- and
    punctuation-insensitively, plurals included; longer names first, each match blanked, so "a t-shirt" is not
    also a "shirt"."""

    def __init__(self, entries: Sequence[str], subject: str = DEFAULT_SUBJECT) -> None:
        if isinstance(entries, str) or not entries:
            raise ValueError(f"classes: expected a list of class names, got {entries!r}")
        self.names = [[_words(name) for name in str(entry).split(CLASS_SEPARATOR)] for entry in entries]
        if any(not name for names in self.names for name in names):
            raise ValueError(f"classes: every class needs a name (and no empty synonym), got {list(entries)}")
        if len(self.names) < 2:
            raise ValueError(f"classes: a skill task needs at least two classes, got {list(entries)}")
        self.labels = [str(entry).split(CLASS_SEPARATOR)[0].strip() for entry in entries]
        owners: dict[str, int] = {}
        for index, names in enumerate(self.names):
            for name in names:
                if owners.setdefault(name, index) != index:
                    raise ValueError(
                        f"classes: {name!r} names two classes ({self.labels[owners[name]]!r}, ...)"
                    )
        self.subject = PhraseTemplate(subject, "subject", SUBJECT_FIELDS).require(SUBJECT_FIELDS)
        ordered = sorted(owners.items(), key=lambda item: -len(item[0]))
        self.patterns = [
            (re.compile(rf"(?<![\w-]){re.escape(name)}(?:e?s)?(?![\w-])"), index) for name, index in ordered
        ]

    def __len__(self) -> int:
        return len(self.labels)

    def fields(self, index: int) -> dict[str, str]:
        label = self.labels[index]
        values = {"label": label, "article": article(label)}
        return {**values, "subject": one_line(self.subject.sample(random.Random(0), values))}

    def pair_fields(self, first: int, second: int) -> dict[str, str]:
        return {**numbered(self.fields(first), 1), **numbered(self.fields(second), 2)}

    def named(self, text: str | None) -> int | None:
        text = _words(text or "")
        found: set[int] = set()
        for pattern, index in self.patterns:
            if pattern.search(text):
                found.add(index)
                text = pattern.sub(lambda match: " " * len(match.group()), text)
        return found.pop() if len(found) == 1 else None

    def other(self, index: int | None, rng: random.Random) -> int:
        """A class other than ``index`` (any class when ``index`` is ``None``), drawn by ``rng``."""
        if index is None:
            return rng.randrange(len(self))
        return (index + 1 + rng.randrange(len(self) - 1)) % len(self)


def _words(text: str) -> str:
    """Lower case, curly apostrophes straightened, punctuation other than ``-`` and ``'`` as spaces."""
    text = text.lower().replace("\u2019", "'")
    return " ".join(re.sub(r"[^\w\s'-]", " ", text).split())


def phrase_template(text: str, where: str, fields: Sequence[str], *required: Sequence[str]) -> PhraseTemplate:
    """A wording checked at once: only ``fields``, and one field of each ``required`` group in every draw."""
    return PhraseTemplate(text, where, fields).require(*required)


def fill(template: PhraseTemplate, values: Mapping[str, str], rng: random.Random) -> str:
    """One drawing of a wording (``rng`` picks its alternatives), on one line."""
    return one_line(template.sample(rng, values))


# --- shared options and helpers ---------------------------------------------------------------------


@dataclass
class SkillTask(EvalTask):
    """Options every skill task has: the classes, how a class is named in a sentence, and the judge."""

    classes: list[str] = field(default_factory=lambda: list(DEMO_CLASSES))
    subject: str = DEFAULT_SUBJECT
    judge: str = FASHION_MNIST_JUDGE
    label: str | None = None

    def __post_init__(self) -> None:
        self.class_names = ClassNames(self.classes, self.subject)  # checks both

    def rng(self, context: TaskContext) -> random.Random:
        """The task's own generator (class pairs, alternatives of wordings): the same for the same seed."""
        return random.Random(f"{context.seed}:{self.name}")


@dataclass
class SkillDatasetTask(DatasetTask, SkillTask):
    """A skill task over held-out images with captions naming their class (default: Fashion-MNIST test)."""

    dataset: Any = DEMO_DATASET
    limit: int | None = DEFAULT_SKILL_LIMIT

    def __post_init__(self) -> None:
        DatasetTask.__post_init__(self)
        SkillTask.__post_init__(self)

    def examples(
        self, pipeline: Any, context: TaskContext, warnings: list[str]
    ) -> tuple[list[TaskExample], str]:
        """The rows with an image and a caption, and where they come from."""
        data = self.load(pipeline, context, warnings)
        if not data.captioned:
            raise ValueError(f"{self.name}: no row of {data.description} has an image and a caption")
        return data.captioned, data.description


def reply_segments(
    pipeline: Any,
    conversations: Sequence[list[dict]],
    context: TaskContext,
    output: str,
    description: str,
    **options: Any,
) -> list[list[str | PIL.Image.Image]]:
    """``pipeline.generate`` over conversations, ``batch_size`` per call; conversation ``i`` is seeded with
    ``context.seed + i`` so its reply does not depend on the batch."""
    segments: list[list[str | PIL.Image.Image]] = []
    for start, batch in batches(conversations, context.batch_size, description):
        output_batch = pipeline.generate(
            list(batch),
            output=output,
            guidance_scale=context.guidance_scale,
            seed=[context.seed + start + offset for offset in range(len(batch))],
            decoder=context.decoder,
            num_inference_steps=context.num_inference_steps,
            **options,
        )
        segments.extend(output_batch.segments)
    return segments


def chat_answers(
    pipeline: Any,
    conversations: Sequence[list[dict]],
    context: TaskContext,
    max_new_tokens: int,
    description: str,
) -> list[str]:
    """Greedy text answers, ``batch_size`` conversations per call."""
    answers: list[str] = []
    for _, batch in batches(conversations, context.batch_size, description):
        answers.extend(pipeline.chat(list(batch), max_new_tokens=max_new_tokens, seed=context.seed).texts)
    return answers


def images_of(segments: Sequence[str | PIL.Image.Image]) -> list[PIL.Image.Image]:
    return [segment for segment in segments if isinstance(segment, PIL.Image.Image)]


def first_image(segments: Sequence[str | PIL.Image.Image], size: tuple[int, int]) -> PIL.Image.Image:
    """The reply's first image, or a black one of ``size`` (judged wrong like any blank) when it has none."""
    images = images_of(segments)
    return images[0] if images else PIL.Image.new("RGB", size)


def user(text: str, image: PIL.Image.Image | None = None) -> dict:
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image", "image": image})
    return {"role": "user", "content": content}


def assistant(content: str | PIL.Image.Image) -> dict:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    return {"role": "assistant", "content": [{"type": "image", "image": content}]}


def default_image_size(pipeline: Any) -> tuple[int, int]:
    """``(width, height)`` in pixels of the model's default image."""
    height, width = pipeline.image_grid()
    factor = pipeline.visual_tokenizer.config.downsample_factor
    return width * factor, height * factor


def scores_of(judge: PromptJudge, images: Sequence[PIL.Image.Image], texts: Sequence[str]) -> list[bool]:
    """The judge's verdicts (a score of at least one half is right)."""
    return [score >= 0.5 for score in judge.score(list(images), list(texts))] if images else []


def share(values: Sequence[bool | None]) -> float:
    """The share of true values among those that are not ``None`` (NaN for none)."""
    kept = [float(value) for value in values if value is not None]
    return mean_or_nan(kept)


def letterboxed(image: PIL.Image.Image) -> PIL.Image.Image:
    """A wide or tall image centred on a grey square (the grids draw square tiles; grey shows its frame)."""
    side = max(image.size)
    canvas = PIL.Image.new("RGB", (side, side), LETTERBOX_FILL)
    canvas.paste(image.convert("RGB"), ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def save_grid(context: TaskContext, label: str, name: str, grid: PIL.Image.Image) -> str:
    path = context.task_dir(label) / name
    grid.save(path)
    return context.relative(path)


def saved_paths(
    context: TaskContext, label: str, folder: str, images: Sequence[PIL.Image.Image]
) -> list[str]:
    """``images`` saved as ``<task>/<folder>/00000.png``, ... (nothing for none); their report paths."""
    if not images:
        return []
    return [context.relative(path) for path in save_images(images, context.task_dir(label) / folder)]


def records_of(**columns: Sequence[Any]) -> list[dict[str, Any]]:
    """Per-example records (``examples.jsonl``) from equal-length columns, in the columns' order."""
    lengths = {len(values) for values in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"records_of: columns of different lengths {sorted(lengths)}")
    return [dict(zip(columns, row)) for row in zip(*columns.values())]


def verdict(right: bool | None, text: str) -> tuple[str, str]:
    return text, NEUTRAL if right is None else RIGHT if right else WRONG


__all__ = [
    "DEFAULT_SKILL_LIMIT",
    "DEMO_CLASSES",
    "ClassNames",
    "SkillDatasetTask",
    "SkillTask",
    "fill",
    "phrase_template",
]
