"""Several datasets in one run: a recipe's ``sources``, each a dataset spec with its labels and repeats.

A source is a mapping of ``SOURCE_KEYS``::

    sources:
      - dataset: fashion_mnist                  # any dataset spec (unimm.data.spec)
        label_column: label                     # the class of each row (ints named by label_names, or text)
        label_names: [t-shirt, pair of trousers, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot]
        subject: "{article} {label}"            # how prompts and answers name a row: "a sneaker"
        label_synonyms: {bag: [handbag, purse]} # other names prompts may use (answers keep the label)
      - dataset: emoji
        label_column: name                      # "red_heart": underscores read as spaces
        subject: "an emoji of {label}"
        repeats: 16                             # passes over its training rows per pass over the others

The sources' rows are put in one table (``segments`` plus ``SOURCE_COLUMNS``): ``source`` (its index in the
list), ``label`` (``None`` without a label column) and ``source_row`` (the row's position in the table, which
finds its pixels again once its images are encoded). Each source's held-out split is its spec's own, else
``eval_fraction`` of its rows; ``max_train_samples`` and ``max_eval_samples`` cut each source (a source's
own values win). Repeats apply to training only, after the images are encoded, so a repeated image is
encoded once.

File formats keep only their captions, so a label column is for datasets that carry one (the demo datasets,
``save_to_disk`` folders); without labels, rows are grouped by their caption.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from unimm.data.bad_records import BadRecords
from unimm.data.schema import sample_features
from unimm.data.spec import (
    EVAL_SPLIT,
    TRAIN_SPLIT,
    load_dataset_spec,
    parse_dataset_spec,
    split_for_eval,
)

logger = logging.getLogger(__name__)

SOURCE_KEYS = (
    "dataset",
    "name",
    "repeats",
    "label_column",
    "label_names",
    "subject",
    "label_synonyms",
    "max_train_samples",
    "max_eval_samples",
)
LABELLED_SUBJECT, CAPTION_SUBJECT = "{article} {label}", "{caption}"
SOURCE_COLUMNS = {
    "source": datasets.Value("int32"),
    "label": datasets.Value("string"),
    "source_row": datasets.Value("int64"),
}


@dataclass(frozen=True)
class SourceSpec:
    """One entry of ``sources`` (see the module docstring); ``subject`` defaults by the label column."""

    dataset: str | dict[str, Any]
    name: str
    repeats: int = 1
    label_column: str | None = None
    label_names: tuple[str, ...] | None = None
    subject: str = CAPTION_SUBJECT
    label_synonyms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


def parse_sources(value: Any, where: str = "sources") -> list[SourceSpec]:
    """A recipe's ``sources`` list, checked without touching the disk."""
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ValueError(
            f"{where}: expected a non-empty list of sources ({{dataset: ..., ...}}), got {value!r}"
        )
    sources = [parse_source(item, f"{where}[{index}]") for index, item in enumerate(value)]
    names = [source.name for source in sources]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(
            f"{where}: the name {duplicated[0]!r} is given to two sources; set `name` to tell them apart"
        )
    return sources


def parse_source(value: Any, where: str) -> SourceSpec:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping with a `dataset` key, got {value!r}")
    unknown = [key for key in value if key not in SOURCE_KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), SOURCE_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{where}: unknown key {unknown[0]!r}{hint}; expected some of {list(SOURCE_KEYS)}")
    if value.get("dataset") is None:
        raise ValueError(f"{where}: missing `dataset` (a demo name, a path or a mapping)")
    spec = parse_dataset_spec(value["dataset"], f"{where}.dataset", random_access=True)
    repeats = value.get("repeats", 1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"{where}.repeats must be a whole number >= 1, got {repeats!r}")
    for key in ("max_train_samples", "max_eval_samples"):
        limit = value.get(key)
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
            raise ValueError(f"{where}.{key} must be a whole number >= 0, got {limit!r}")
    label_column = value.get("label_column")
    if label_column is not None and (not isinstance(label_column, str) or not label_column):
        raise ValueError(f"{where}.label_column: expected a column name, got {label_column!r}")
    label_names = value.get("label_names")
    if label_names is not None:
        if label_column is None:
            raise ValueError(f"{where}.label_names needs label_column (the column whose values they name)")
        if (
            not isinstance(label_names, Sequence)
            or isinstance(label_names, str)
            or not all(isinstance(name, str) and name.strip() for name in label_names)
        ):
            raise ValueError(f"{where}.label_names: expected a list of non-empty names, got {label_names!r}")
        label_names = tuple(label_names)
    subject = value.get("subject") or (LABELLED_SUBJECT if label_column else CAPTION_SUBJECT)
    if not isinstance(subject, str):
        raise ValueError(f"{where}.subject: expected a template string, got {subject!r}")
    if label_column is None and "{label}" in subject:
        raise ValueError(f"{where}.subject {subject!r} uses {{label}}: set label_column")
    synonyms = parse_synonyms(
        value.get("label_synonyms"), label_column, label_names, f"{where}.label_synonyms"
    )
    name = value.get("name") or _default_name(spec)
    return SourceSpec(
        dataset=value["dataset"], name=str(name), repeats=repeats, label_column=label_column,
        label_names=label_names, subject=subject, label_synonyms=synonyms,
        max_train_samples=value.get("max_train_samples"),
        max_eval_samples=value.get("max_eval_samples"),
    )  # fmt: skip


def parse_synonyms(
    value: Any, label_column: str | None, label_names: tuple[str, ...] | None, where: str
) -> dict[str, tuple[str, ...]]:
    """``{label: [other names]}``: labels read as :func:`read_labels` writes them, each a known label name."""
    if value is None:
        return {}
    if label_column is None:
        raise ValueError(f"{where} needs label_column (synonyms name labels)")
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected {{label: [synonym, ...]}}, got {value!r}")
    known = {_label_text(name) for name in label_names} if label_names else None
    synonyms = {}
    for label, names in value.items():
        if isinstance(names, str):
            names = [names]
        if (
            not isinstance(names, Sequence)
            or not names
            or not all(isinstance(name, str) and name.strip() for name in names)
        ):
            raise ValueError(f"{where}.{label}: expected a list of non-empty names, got {names!r}")
        label = _label_text(str(label))
        if known is not None and label not in known:
            close = difflib.get_close_matches(label, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: {label!r} is not one of label_names{hint}")
        synonyms[label] = tuple(" ".join(name.split()) for name in names)
    return synonyms


def _label_text(value: str) -> str:
    """A label as prompts say it: underscores read as spaces, runs of spaces as one."""
    return " ".join(value.replace("_", " ").split())


def _default_name(spec: Any) -> str:
    if spec.demo is not None:
        return spec.demo
    path = spec.path or spec.eval_path or spec.data_files[0]
    return Path(os.path.normpath(path)).stem or str(path)


def load_sources(
    sources: Sequence[SourceSpec],
    *,
    image_size: int,
    eval_fraction: float,
    seed: int,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    cache_dir: str | None = None,
    bad_records: BadRecords | None = None,
) -> tuple[dict[str, datasets.Dataset | None], list[dict[str, Any]]]:
    """``({"train", "eval"}, record)``: every source's split in one table (``eval`` is ``None`` when no
    source has held-out rows) and, per source, its name, rows per split and repeats."""
    bad_records = bad_records if bad_records is not None else BadRecords()
    parts: dict[str, list[datasets.Dataset]] = {TRAIN_SPLIT: [], EVAL_SPLIT: []}
    record = []
    for index, source in enumerate(sources):
        where = f"sources[{index}] ({source.name})"
        spec = parse_dataset_spec(source.dataset, random_access=True)
        loaded = load_dataset_spec(spec, image_size=image_size, cache_dir=cache_dir, bad_records=bad_records)
        train, held_out = loaded[TRAIN_SPLIT], loaded.get(EVAL_SPLIT)
        if not len(train):
            raise ValueError(
                f"{where}: dataset {spec.to_value()!r} has no usable rows: {bad_records.report()}"
            )
        train, held_out = split_for_eval(
            train, held_out, eval_fraction, seed,
            _first_set(source.max_train_samples, max_train_samples),
            _first_set(source.max_eval_samples, max_eval_samples),
        )  # fmt: skip
        for split, dataset in ((TRAIN_SPLIT, train), (EVAL_SPLIT, held_out)):
            if dataset is not None and len(dataset):
                parts[split].append(labelled(dataset, source, index, where))
        rows = {
            split: 0 if dataset is None else len(dataset)
            for split, dataset in (("train", train), ("eval", held_out))
        }
        record.append({"name": source.name, "rows": rows, "repeats": source.repeats})
        logger.info(
            "source %s: %d train rows (x%d), %d eval rows",
            source.name,
            rows["train"],
            source.repeats,
            rows["eval"],
        )
    splits = {"train": _combined(parts[TRAIN_SPLIT]), "eval": _combined(parts[EVAL_SPLIT])}
    if splits["train"] is None:
        raise ValueError("sources: no training rows")
    return splits, record


def _first_set(*values: int | None) -> int | None:
    return next((value for value in values if value is not None), None)


def labelled(dataset: datasets.Dataset, source: SourceSpec, index: int, where: str) -> datasets.Dataset:
    """The rows' ``segments`` with their ``source`` index and ``label`` (names read from the label column)."""
    labels: list[str | None] = [None] * len(dataset)
    if source.label_column is not None:
        labels = read_labels(dataset, source, where)
    segments = dataset.select_columns(["segments"])
    expected = sample_features()
    if segments.features != expected:  # loaders of other formats may store the image field differently
        segments = segments.cast(expected)
    segments = segments.add_column("source", [index] * len(dataset), feature=SOURCE_COLUMNS["source"])
    return segments.add_column("label", labels, feature=SOURCE_COLUMNS["label"])


def read_labels(dataset: datasets.Dataset, source: SourceSpec, where: str) -> list[str | None]:
    """The label column as names: integers by ``label_names`` (else a ``ClassLabel``'s own names), text as
    it is; underscores read as spaces ("ankle_boot" is "ankle boot")."""
    column = source.label_column
    if column not in dataset.column_names:
        raise ValueError(
            f"{where}.label_column {column!r}: no such column (the rows have {dataset.column_names})"
        )
    feature = dataset.features[column]
    names = source.label_names or (tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else None)
    labels = []
    for value in dataset[column]:
        if value is None or (isinstance(value, int) and value < 0):  # ClassLabel's "no label"
            labels.append(None)
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            if names is None:
                raise ValueError(f"{where}.label_column {column!r} holds integers: give label_names")
            if value >= len(names):
                raise ValueError(
                    f"{where}.label_names: {len(names)} names, but the column holds label {value}"
                )
            value = names[value]
        labels.append(_label_text(str(value)) or None)
    return labels


def _combined(parts: list[datasets.Dataset]) -> datasets.Dataset | None:
    if not parts:
        return None
    table = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return table.add_column("source_row", list(range(len(table))), feature=SOURCE_COLUMNS["source_row"])


__all__ = ["SOURCE_COLUMNS", "SourceSpec", "labelled", "load_sources", "parse_sources", "read_labels"]
