"""The data of an evaluation task: a dataset spec's rows as (image, question, reference) examples, and the
two warnings a score needs beside it (words the checkpoint cannot read, data it never trained on).

    data = load_task_data("data/shapes", image_size=32, limit=200, seed=0, checkpoint="checkpoints/mine")

A task evaluates the spec's held-out ``test`` split when it has one, else the split the caller names
(``train`` by default, with a warning: the model may have trained on those rows). ``limit`` rows are drawn
from it by ``seed`` (sorted, so the same seed gives the same rows on every machine).

From a row's segments (:mod:`unimm.data.schema`): the first image with pixels; for a conversation (role
``user`` then ``assistant``) the user's text is the question and the assistant's the reference answer;
otherwise the text segments joined are the caption, the reference of "What is this?".
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image

from unimm.data.schema import IMAGE, TEXT, open_image
from unimm.data.spec import EVAL_SPLIT, TRAIN_SPLIT, load_dataset_spec, parse_dataset_spec
from unimm.llm.text_tokenizer import unknown_token_id

logger = logging.getLogger(__name__)

MODEL_CARD_FILE = "README.md"
TRAINING_DATA_HEADING = "## training data"
NUM_WORD_EXAMPLES = 8  # unknown words quoted in a vocabulary warning
WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")  # words with inner apostrophes or hyphens ("t-shirt")


@dataclass
class TaskExample:
    """One row of a task's split.

    Attributes:
        index: the row's position in its split.
        image: its first image, decoded (``None`` when it has none with pixels).
        reference: the assistant's answer of a conversation, else the row's caption (``None``: no text).
        question: the user's question of a conversation, else ``None``.
        source: the image's file, when it was read from one.
    """

    index: int
    image: PIL.Image.Image | None
    reference: str | None
    question: str | None = None
    source: str | None = None


@dataclass
class TaskData:
    """A task's examples, where they come from (for the report) and the warnings about them."""

    examples: list[TaskExample]
    description: str
    warnings: list[str] = field(default_factory=list)

    @property
    def with_images(self) -> list[TaskExample]:
        return [example for example in self.examples if example.image is not None]

    @property
    def captioned(self) -> list[TaskExample]:
        """Examples with an image and a reference text."""
        return [example for example in self.with_images if example.reference]


def load_task_data(
    spec: Any,
    *,
    image_size: int,
    split: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    base_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> TaskData:
    """The examples of ``spec`` a task evaluates (see the module docstring); ``image_size`` is the side of
    the demo datasets' images (files keep their own); ``checkpoint``'s model card is checked for the data."""
    parsed = parse_dataset_spec(os.fspath(spec) if isinstance(spec, os.PathLike) else spec)
    splits = load_dataset_spec(parsed, base_dir, image_size=image_size, cache_dir=cache_dir)
    warnings: list[str] = []
    if split is None:
        split = EVAL_SPLIT if EVAL_SPLIT in splits else TRAIN_SPLIT
        if split == TRAIN_SPLIT:
            warnings.append(
                f"dataset {describe_spec(parsed)} has no held-out test split: evaluating rows of its train "
                "split, which the model may have trained on (give an eval split in the spec, or --split)"
            )
    elif split not in splits:
        raise ValueError(f"dataset {describe_spec(parsed)} has the splits {list(splits)}, not {split!r}")
    rows, total = _subset(splits[split], limit, seed)
    examples = [_example(index, row) for index, row in rows]
    shown = (
        f"{len(examples)} of {total}" if total is not None and len(examples) < total else str(len(examples))
    )
    if checkpoint is not None:
        training_warning = training_data_warning(checkpoint, parsed)
        if training_warning:
            warnings.append(training_warning)
    return TaskData(examples, f"{describe_spec(parsed)}, {split} split, {shown} rows", warnings)


def describe_spec(spec: Any) -> str:
    """A short name of a spec for reports: the demo name, the path, or the first data file."""
    parsed = parse_dataset_spec(spec)
    if parsed.demo is not None:
        return parsed.demo
    return parsed.path or (parsed.data_files[0] if parsed.data_files else "dataset")


def _subset(
    split: datasets.Dataset | datasets.IterableDataset, limit: int | None, seed: int
) -> tuple[list[tuple[int, dict[str, Any]]], int | None]:
    """``limit`` rows of ``split`` as ``(index, row)``, drawn by ``seed`` (a stream: its first rows), and the
    split's size (``None`` for a stream)."""
    if isinstance(split, datasets.IterableDataset):
        stream = split if limit is None else split.take(limit)
        return list(enumerate(stream)), None
    total = len(split)
    if limit is None or limit >= total:
        indices = list(range(total))
    else:
        indices = sorted(np.random.default_rng(seed).permutation(total)[:limit].tolist())
    return [(index, split[index]) for index in indices], total


def _example(index: int, row: dict[str, Any]) -> TaskExample:
    image, source = None, None
    captions, questions, answers = [], [], []
    for segment in row["segments"]:
        if segment["type"] == IMAGE and image is None and segment.get("image") is not None:
            raw = segment["image"]
            source = getattr(raw, "filename", None) or None  # PIL keeps the path of a file it opened
            image = open_image(raw)
        elif segment["type"] == TEXT and segment.get("text"):
            role = segment.get("role") or ""
            {"user": questions, "assistant": answers}.get(role, captions).append(segment["text"].strip())
    if questions and answers:
        return TaskExample(index, image, answers[0], questions[0], source)
    reference = " ".join(captions) or (answers[0] if answers else None)
    return TaskExample(index, image, reference, None, source)


# --- warnings ---------------------------------------------------------------------------------------


@dataclass
class VocabularyCheck:
    """How many words of some texts the tokenizer turns into its unknown token."""

    num_words: int
    num_unknown: int
    num_texts: int
    num_texts_with_unknown: int
    unknown_words: list[str]  # the most frequent first

    @property
    def rate(self) -> float:
        return self.num_unknown / self.num_words if self.num_words else 0.0


def check_vocabulary(tokenizer: Any, texts: Sequence[str]) -> VocabularyCheck | None:
    """Which words of ``texts`` become ``tokenizer``'s unknown token; ``None`` when it has none (byte-level
    tokenizers read every word; see ``unknown_token_id``). Each distinct word is tokenized alone, once."""
    unk_id = unknown_token_id(tokenizer)
    if unk_id is None:
        return None
    words_per_text = [WORD.findall(text) for text in texts]
    counts = Counter(word for words in words_per_text for word in words)
    unknown = {word for word in counts if unk_id in tokenizer(word, add_special_tokens=False)["input_ids"]}
    return VocabularyCheck(
        num_words=sum(counts.values()),
        num_unknown=sum(counts[word] for word in unknown),
        num_texts=len(texts),
        num_texts_with_unknown=sum(any(word in unknown for word in words) for words in words_per_text),
        unknown_words=sorted(unknown, key=lambda word: (-counts[word], word)),
    )


def vocabulary_warning(
    tokenizer: Any, texts: Sequence[str], what: str, consequence: str = "the model cannot read them"
) -> str | None:
    """A warning when words of ``texts`` (``what`` they are: "questions", "prompts") become the unknown
    token, with the rate, examples and ``consequence``; ``None`` when every word is known."""
    check = check_vocabulary(tokenizer, texts)
    if check is None or not check.num_unknown:
        return None
    examples = ", ".join(repr(word) for word in check.unknown_words[:NUM_WORD_EXAMPLES])
    return (
        f"{100 * check.rate:.1f}% of the words of the {what} ({check.num_unknown} of {check.num_words}, in "
        f"{check.num_texts_with_unknown} of {check.num_texts} texts) become the tokenizer's unknown token "
        f"{tokenizer.unk_token!r}, e.g. {examples}: {consequence}"
    )


def training_data_lines(checkpoint: str | os.PathLike) -> list[str] | None:
    """The "Training data" list of a checkpoint folder's model card (``README.md``, as
    :mod:`unimm.pipelines.model_card` writes it); ``None`` when there is no card or it records none."""
    card = Path(checkpoint) / MODEL_CARD_FILE
    if not card.is_file():
        return None
    lines, inside = [], False
    for line in card.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            inside = line.strip().lower() == TRAINING_DATA_HEADING
        elif inside and line.startswith("- "):
            lines.append(line[2:].strip())
    return lines or None


def training_data_warning(checkpoint: str | os.PathLike, spec: Any) -> str | None:
    """A warning when ``checkpoint``'s model card does not list the dataset ``spec`` names (or lists no
    training data at all). A line lists a dataset when it contains the demo name, or the folder or file
    name of its path, ignoring case and punctuation ("fashion_mnist" is in "Fashion-MNIST (60,000 ...)")."""
    lines = training_data_lines(checkpoint)
    name = describe_spec(spec)
    if lines is None:
        return (
            f"the checkpoint's model card records no training data: cannot tell whether the model saw "
            f"data like {name} (pass --training-data to `unimm assemble` to record it)"
        )
    keys = {_squashed(key) for key in _spec_keys(parse_dataset_spec(spec))} - {""}
    if any(key in _squashed(line) for key in keys for line in lines):
        return None
    listed = "; ".join(lines)
    return (
        f"dataset {name} is not among the training data the checkpoint's model card lists ({listed}): "
        "the model may never have seen such images or words, so low scores may say only that"
    )


def _spec_keys(spec: Any) -> list[str]:
    if spec.demo is not None:
        return [spec.demo]
    keys = []
    for path in (spec.path, *spec.data_files):
        if path:
            path = Path(path)
            keys += [path.name] if not path.suffix else [path.name, path.parent.name]
    return keys


def _squashed(text: str) -> str:
    return re.sub(r"[\W_]+", "", text.lower())


__all__ = [
    "TaskData",
    "TaskExample",
    "VocabularyCheck",
    "check_vocabulary",
    "describe_spec",
    "load_task_data",
    "training_data_lines",
    "training_data_warning",
    "vocabulary_warning",
]
