"""Dataset specs: what a recipe's ``dataset`` field may say, resolved to ``datasets`` in this one place.

A spec is one of

- a demo name (``DEMO_DATASETS``): the offline demo data, built at the stage's image size;
- a path, its format inferred: an image folder with ``metadata.jsonl``/``metadata.csv`` (captioned), an
  image folder without metadata (images only), a ``.tar`` WebDataset shard or a folder of them, a
  ``.parquet``/``.jsonl`` file or a folder of them, a LLaVA ``.json``, a ``save_to_disk`` folder, or a
  glob of files of one format;
- a mapping of ``SPEC_KEYS``: ``format`` (one of ``FORMATS``; inferred when left out), ``path`` or
  ``data_files``, ``image_root``, ``image_column``, ``text_column``, an eval split as ``eval_path`` or
  ``eval_fraction`` (held out by ``seed``, deterministically), and ``streaming``. From YAML it is a
  mapping; from the command line a YAML/JSON flow mapping (``dataset={format: images, path: pics}``),
  and a JSON object in a string is read too.

Relative paths resolve against ``base_dir`` (a recipe's folder, when the caller knows it), else the
working directory. A demo name wins over a folder of the same name: write ``./NAME`` for the folder.

Rows follow the sample schema (``segments`` plus metadata columns); the loaders skip and count bad
records. A JSONL/parquet file's rows are read as pairs, conversations, interleaved documents or
ready-made samples by the columns of its first record.
"""

from __future__ import annotations

import difflib
import glob
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow
import pyarrow.compute
import pyarrow.parquet

from unimm.data import readers
from unimm.data.bad_records import BadRecords
from unimm.data.demo_datasets import DEMO_DATASETS, load_demo_dataset
from unimm.data.loaders import (
    CONVERSATION,
    INTERLEAVED,
    PAIR,
    SAMPLES,
    load_image_folder,
    load_interleaved,
    load_jsonl,
    load_llava,
    load_parquet,
    load_records,
    load_webdataset,
)
from unimm.data.schema import IMAGE, image_segment

logger = logging.getLogger(__name__)

IMAGEFOLDER, IMAGES, WEBDATASET, PARQUET, JSONL, LLAVA, DISK = (
    "imagefolder",
    "images",
    "webdataset",
    "parquet",
    "jsonl",
    "llava",
    "disk",
)
INTERLEAVED_FORMAT = INTERLEAVED
FORMATS = (IMAGEFOLDER, IMAGES, WEBDATASET, PARQUET, JSONL, LLAVA, INTERLEAVED_FORMAT, DISK)
FOLDER_FORMATS = (IMAGEFOLDER, IMAGES, DISK)  # read as one folder, never as a list of files
SPEC_KEYS = (
    "format",
    "path",
    "data_files",
    "image_root",
    "image_column",
    "text_column",
    "eval_path",
    "eval_fraction",
    "seed",
    "streaming",
)
# File extension → format, for files, globs and the files of a folder (checked in this order).
EXTENSION_FORMATS = {".tar": WEBDATASET, ".parquet": PARQUET, ".jsonl": JSONL, ".json": LLAVA}
FORMAT_EXTENSIONS = {
    WEBDATASET: (".tar",),
    PARQUET: (".parquet",),
    JSONL: (".jsonl",),
    LLAVA: (".json", ".jsonl"),
    INTERLEAVED_FORMAT: (".jsonl", ".parquet"),
}
# The files ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` write at the top of their folder.
DISK_MARKERS = ("dataset_dict.json", "state.json")
TRAIN_SPLIT, EVAL_SPLIT = "train", "test"
EVAL_SPLIT_NAMES = ("test", "validation", "eval")  # a save_to_disk DatasetDict's held-out split
GLOB_CHARACTERS = frozenset("*?[")
DEMO_IMAGE_SIZE = 32
# Held out for evaluation when a spec names no eval split (see ``load_image_splits``).
DEFAULT_EVAL_FRACTION = 0.05


class DatasetSpecError(ValueError):
    """A spec that cannot name a dataset; the message is one line that names the field."""


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed spec: a demo dataset (``demo``) or files of ``format`` (``None``: inferred)."""

    demo: str | None = None
    format: str | None = None
    path: str | None = None
    data_files: tuple[str, ...] = ()
    image_root: str | None = None
    image_column: str | None = None
    text_column: str | None = None
    eval_path: str | None = None
    eval_fraction: float | None = None
    seed: int = 0
    streaming: bool = False

    def resolved(self, base_dir: str | os.PathLike | None = None) -> DatasetSpec:
        """The same spec with every relative path joined to ``base_dir`` (default: the working directory)."""
        if self.demo is not None:
            return self
        base = Path(base_dir) if base_dir is not None else Path.cwd()

        def absolute(path: str | None) -> str | None:
            return None if path is None else os.path.normpath(base / os.path.expanduser(path))

        return replace(
            self,
            path=absolute(self.path),
            data_files=tuple(absolute(path) for path in self.data_files),
            image_root=absolute(self.image_root),
            eval_path=absolute(self.eval_path),
        )

    def to_value(self) -> str | dict[str, Any]:
        """The spec as a recipe writes it: a name or path alone when nothing else is set, else a mapping."""
        if self.demo is not None:
            return self.demo
        if self == DatasetSpec(path=self.path):
            return self.path
        values = {key: getattr(self, key) for key in SPEC_KEYS}
        values["data_files"] = list(self.data_files) or None
        defaults = DatasetSpec()
        return {key: value for key, value in values.items() if value not in (None, getattr(defaults, key))}


def parse_dataset_spec(value: Any, name: str = "dataset", random_access: bool = False) -> DatasetSpec:
    """Check a spec's form without touching the disk (paths are checked when it is loaded).

    ``random_access``: the caller reads rows by index, so ``streaming`` is refused here."""
    if isinstance(value, DatasetSpec):
        spec = value
    elif isinstance(value, str):
        spec = _parse_string(value.strip(), name)
    elif isinstance(value, Mapping):
        spec = _parse_mapping(value, name)
    else:
        raise DatasetSpecError(
            f"{name}: expected a demo name {DEMO_DATASETS}, a path or a mapping, got {type(value).__name__}"
        )
    if random_access and spec.streaming:
        raise DatasetSpecError(
            f"{name}.streaming: this stage reads its images by index (random access); remove `streaming`"
        )
    return spec


def resolve_spec_paths(
    value: Any, base_dir: str | os.PathLike | None, names: Sequence[str] = ()
) -> str | dict[str, Any]:
    """A spec as a recipe writes it, with relative paths made absolute against ``base_dir``; ``names``
    (a stage's own dataset names, like the tokenizer's ``synthetic``) are left as they are."""
    if isinstance(value, str) and value.strip() in names:
        return value
    return parse_dataset_spec(value).resolved(base_dir).to_value()


def load_dataset_spec(
    spec: Any,
    base_dir: str | os.PathLike | None = None,
    *,
    image_size: int = DEMO_IMAGE_SIZE,
    cache_dir: str | os.PathLike | None = None,
    bad_records: BadRecords | None = None,
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """The dataset a spec names: ``train`` and, when the spec has one, ``test`` (its eval split).

    ``image_size`` is the side of the demo datasets' images (files keep their own sizes); ``cache_dir``
    holds the ``datasets`` cache; skipped records are added to ``bad_records`` (a fresh tally by default)."""
    spec = parse_dataset_spec(spec).resolved(base_dir)
    if spec.demo is not None:
        return load_demo_dataset(spec.demo, image_size, cache_dir=cache_dir)
    options = {
        "streaming": spec.streaming,
        "image_root": spec.image_root,
        "image_column": spec.image_column,
        "text_column": spec.text_column,
        "cache_dir": None if cache_dir is None else os.fspath(cache_dir),
        "bad_records": bad_records if bad_records is not None else BadRecords(),
    }
    train, held_out = _load_source(spec, spec.path, spec.data_files, "path", options)
    if spec.eval_path is not None:
        held_out, _ = _load_source(spec, spec.eval_path, (), "eval_path", options)
    elif spec.eval_fraction is not None:
        if spec.streaming:
            raise DatasetSpecError(
                "dataset.eval_fraction: a streamed dataset cannot be split by a fraction; give eval_path"
            )
        train, held_out = hold_out(train, spec.eval_fraction, spec.seed)
    splits = {TRAIN_SPLIT: train} if held_out is None else {TRAIN_SPLIT: train, EVAL_SPLIT: held_out}
    dict_class = datasets.IterableDatasetDict if spec.streaming else datasets.DatasetDict
    return dict_class(splits)


def hold_out(
    dataset: datasets.Dataset, size: float | int, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """``(rest, held_out)``: ``size`` rows (a fraction of the dataset, or a count) drawn by ``seed``.

    The same rows, seed and size give the same split on every machine."""
    rows = len(dataset)
    count = size if isinstance(size, int) else max(1, round(size * rows))
    if not 0 < count < rows:
        raise DatasetSpecError(
            f"dataset.eval_fraction: holding out {size} of {rows} row(s) leaves no training or no eval row"
        )
    held_out = np.sort(np.random.default_rng(seed).permutation(rows)[:count])
    rest = np.setdiff1d(np.arange(rows), held_out)
    # keep_in_memory: index lists, never files written next to the user's data; both keep the row order.
    return dataset.select(rest, keep_in_memory=True), dataset.select(held_out, keep_in_memory=True)


def load_image_splits(
    spec: Any,
    base_dir: str | os.PathLike | None = None,
    *,
    image_size: int = DEMO_IMAGE_SIZE,
    cache_dir: str | os.PathLike | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """``(train, eval)`` for the stages that learn from images alone (tokenizer, detokenizer).

    Rows without an image segment are dropped (and counted in the log). A spec without an eval split
    gets one held out from the training rows, with a warning: ``DEFAULT_EVAL_FRACTION`` of them, at most
    ``max_eval_samples``, drawn by the spec's ``seed`` (a one-row dataset is evaluated on nothing).
    Then each split is cut to its first ``max_*_samples`` rows."""
    parsed = parse_dataset_spec(spec, random_access=True)
    splits = load_dataset_spec(parsed, base_dir, image_size=image_size, cache_dir=cache_dir)
    train, held_out = splits[TRAIN_SPLIT], splits.get(EVAL_SPLIT)
    if parsed.demo is None:  # the demo datasets are image-caption pairs, every row has its image
        train = _rows_with_images(train, "training")
        held_out = None if held_out is None else _rows_with_images(held_out, "eval")
    if len(train) == 0:
        raise DatasetSpecError(
            "dataset: no training row has a usable image (see the bad-record report above)"
        )
    if held_out is None and len(train) == 1:
        logger.warning("dataset has a single row and no eval split: nothing is evaluated")
    return split_for_eval(
        train, held_out, DEFAULT_EVAL_FRACTION, parsed.seed, max_train_samples, max_eval_samples
    )


def split_for_eval(
    train: datasets.Dataset,
    held_out: datasets.Dataset | None,
    eval_fraction: float,
    seed: int,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """``(train, eval)``: ``held_out`` when the spec has an eval split, else ``eval_fraction`` of the
    training rows held out by ``seed`` (at most ``max_eval_samples``; none from a single row or a fraction
    of 0), with a warning; then each split cut to its first ``max_*_samples`` rows."""
    if held_out is None and eval_fraction and len(train) > 1:
        count = max(1, round(eval_fraction * len(train)))
        count = min(count, max_eval_samples or count, len(train) - 1)
        logger.warning(
            "dataset names no eval split: holding out %d of its %d training rows for evaluation "
            "(set eval_path or eval_fraction in the dataset mapping to choose)",
            count,
            len(train),
        )
        train, held_out = hold_out(train, count, seed)
    return _first_rows(train, max_train_samples), _first_rows(held_out, max_eval_samples)


def read_images(data_dir: str) -> Iterator[readers.RawRecord]:
    """Every image file under ``data_dir`` (any depth, sorted) as a sample of one image segment."""
    for path in sorted(Path(data_dir).rglob("*")):
        if path.suffix.lower().lstrip(".") in readers.IMAGE_EXTENSIONS and path.is_file():
            yield str(path), {"segments": [image_segment(str(path.absolute()))]}


def load_images(data_dir: str, **options: Any) -> datasets.Dataset | datasets.IterableDataset:
    """An image folder without captions: one sample per image (enough for the tokenizer stages)."""
    return load_records(read_images, [data_dir], SAMPLES, **options)


# --- parsing ----------------------------------------------------------------------------------------


def _parse_string(value: str, name: str) -> DatasetSpec:
    if value.startswith("{"):  # a JSON object given as a string (a command line, an environment variable)
        try:
            mapping = json.loads(value)
        except json.JSONDecodeError as error:
            raise DatasetSpecError(f"{name}: {value!r:.60} is not a JSON object ({error.msg})") from None
        return _parse_mapping(mapping, name)
    if not value:
        raise DatasetSpecError(f"{name}: expected a demo name {DEMO_DATASETS}, a path or a mapping, got ''")
    if value in DEMO_DATASETS:
        return DatasetSpec(demo=value)
    return DatasetSpec(path=value)


def _parse_mapping(mapping: Mapping[str, Any], name: str) -> DatasetSpec:
    unknown = sorted(set(mapping) - set(SPEC_KEYS))
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), SPEC_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DatasetSpecError(f"{name}: unknown key {unknown[0]!r}{hint}; expected some of {SPEC_KEYS}")
    values = {key: mapping.get(key) for key in SPEC_KEYS}
    for key in ("format", "path", "image_root", "image_column", "text_column", "eval_path"):
        if values[key] is not None and (not isinstance(values[key], str) or not values[key]):
            raise DatasetSpecError(f"{name}.{key}: expected a non-empty string, got {values[key]!r}")
    format_ = _parse_format(values["format"], name)
    data_files = _parse_data_files(values["data_files"], name)
    if (values["path"] is None) == (not data_files):
        raise DatasetSpecError(f"{name}: a mapping needs exactly one of `path` and `data_files`")
    if data_files and format_ in FOLDER_FORMATS:
        raise DatasetSpecError(f"{name}.data_files: format {format_!r} reads one folder; give it as `path`")
    seed = 0 if values["seed"] is None else values["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DatasetSpecError(f"{name}.seed: expected a whole number, got {seed!r}")
    streaming = False if values["streaming"] is None else values["streaming"]
    if not isinstance(streaming, bool):
        raise DatasetSpecError(f"{name}.streaming: expected true or false, got {streaming!r}")
    return DatasetSpec(
        **{key: values[key] for key in ("path", "image_root", "image_column", "text_column", "eval_path")},
        format=format_,
        data_files=data_files,
        eval_fraction=_parse_eval_fraction(values, name),
        seed=seed,
        streaming=streaming,
    )


def _parse_format(format_: str | None, name: str) -> str | None:
    if format_ is None or format_ in FORMATS:
        return format_
    demo_hint = (
        f"; a demo dataset is named on its own (dataset: {format_})" if format_ in DEMO_DATASETS else ""
    )
    raise DatasetSpecError(f"{name}.format: unknown format {format_!r}; expected one of {FORMATS}{demo_hint}")


def _parse_eval_fraction(values: dict[str, Any], name: str) -> float | None:
    fraction = values["eval_fraction"]
    if fraction is None:
        return None
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise DatasetSpecError(f"{name}.eval_fraction: expected a number in (0, 1), got {fraction!r}")
    if values["eval_path"] is not None:
        raise DatasetSpecError(f"{name}: give the eval split as eval_path or eval_fraction, not both")
    return float(fraction)


def _parse_data_files(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    files = [value] if isinstance(value, str) else value
    if not isinstance(files, list) or not files or not all(isinstance(f, str) and f for f in files):
        raise DatasetSpecError(
            f"{name}.data_files: expected a path or a non-empty list of paths, got {value!r}"
        )
    return tuple(files)


# --- loading ----------------------------------------------------------------------------------------


def _load_source(
    spec: DatasetSpec, path: str | None, data_files: Sequence[str], key: str, options: dict[str, Any]
) -> tuple[Any, Any]:
    """``(rows, held-out rows or None)`` of one path (or list of files) of the spec."""
    format_, paths = _resolve_format(spec.format, path, data_files, key)
    if format_ == DISK:
        return _load_disk(paths[0], key, spec.streaming)
    if format_ == IMAGEFOLDER:
        return load_image_folder(paths[0], **options), None
    if format_ == IMAGES:
        return load_images(paths[0], **options), None
    if format_ == WEBDATASET:
        return load_webdataset(paths, **options), None
    if format_ == LLAVA:
        return load_llava(paths, **options), None
    if format_ == INTERLEAVED_FORMAT:
        return load_interleaved(paths, **options), None
    kind = _record_kind(paths[0], format_)
    if kind == CONVERSATION:
        return load_llava(paths, **options), None
    if kind == INTERLEAVED:
        return load_interleaved(paths, **options), None
    loader = load_parquet if format_ == PARQUET else load_jsonl
    return loader(paths, kind, **options), None


def _resolve_format(
    format_: str | None, path: str | None, data_files: Sequence[str], key: str
) -> tuple[str, list[str]]:
    """The format and the paths to read: one folder for ``FOLDER_FORMATS``, else a list of files."""
    if path is not None and os.path.isdir(path):
        return _folder_format(format_, path, key)
    files = _expand_files([path] if path is not None else data_files, key)
    if format_ is None:
        found = {EXTENSION_FORMATS.get(Path(file).suffix.lower()) for file in files}
        if None in found or len(found) > 1:
            raise DatasetSpecError(
                f"dataset.{key}: cannot tell the format of {_shown(files)}; expected files ending in one of "
                f"{tuple(EXTENSION_FORMATS)}, or a folder, or set `format`"
            )
        format_ = found.pop()
    if format_ in FOLDER_FORMATS:
        raise DatasetSpecError(
            f"dataset.{key}: format {format_!r} reads a folder, got the file(s) {_shown(files)}"
        )
    return format_, files


def _folder_format(format_: str | None, folder: str, key: str) -> tuple[str, list[str]]:
    if format_ in FOLDER_FORMATS:
        return format_, [folder]
    if format_ is not None:
        files = _files_with_extensions(folder, FORMAT_EXTENSIONS[format_])
        if not files:
            raise DatasetSpecError(
                f"dataset.{key}: no {'/'.join(FORMAT_EXTENSIONS[format_])} files for format {format_!r} "
                f"at the top of {folder}"
            )
        return format_, files
    if any(os.path.isfile(os.path.join(folder, marker)) for marker in DISK_MARKERS):
        return DISK, [folder]
    if any(next(Path(folder).rglob(name), None) for name in readers.METADATA_FILES):
        return IMAGEFOLDER, [folder]
    for extension, found_format in EXTENSION_FORMATS.items():
        files = _files_with_extensions(folder, (extension,))
        if files:
            return found_format, files
    if next(read_images(folder), None) is not None:
        return IMAGES, [folder]
    raise DatasetSpecError(
        f"dataset.{key}: nothing recognisable in {folder}: expected images (with or without "
        f"{'/'.join(readers.METADATA_FILES)}), {'/'.join(EXTENSION_FORMATS)} files or a save_to_disk folder"
    )


def _expand_files(patterns: Sequence[str], key: str) -> list[str]:
    files = []
    for pattern in patterns:
        if GLOB_CHARACTERS & set(pattern):
            matched = sorted(path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path))
            if not matched:
                raise DatasetSpecError(f"dataset.{key}: no file matches {pattern}")
            files.extend(matched)
        elif os.path.isfile(pattern):
            files.append(pattern)
        else:
            not_demo = (
                f" (and {Path(pattern).name!r} is not a demo name {DEMO_DATASETS})" if key == "path" else ""
            )
            raise DatasetSpecError(f"dataset.{key}: no file or folder at {pattern}{not_demo}")
    return files


def _files_with_extensions(folder: str, extensions: Sequence[str]) -> list[str]:
    return sorted(
        str(path) for path in Path(folder).iterdir() if path.is_file() and path.suffix in extensions
    )


def _record_kind(path: str, format_: str) -> str:
    """What a JSONL/parquet file's rows are, read from the columns of its first record."""
    if format_ == PARQUET:
        columns = set(pyarrow.parquet.read_schema(path).names)
    else:
        _, record = next(readers.read_jsonl(path), (None, None))
        columns = set(record) if isinstance(record, dict) else set()
    if "segments" in columns:
        return SAMPLES
    if "conversations" in columns:
        return CONVERSATION
    if {"texts", "images"} <= columns:
        return INTERLEAVED
    return PAIR


def _load_disk(folder: str, key: str, streaming: bool) -> tuple[Any, Any]:
    """A ``save_to_disk`` folder of sample-schema rows; a ``DatasetDict``'s held-out split comes along."""
    loaded = datasets.load_from_disk(folder)
    held_out = None
    if isinstance(loaded, datasets.DatasetDict):
        if TRAIN_SPLIT not in loaded:
            raise DatasetSpecError(
                f"dataset.{key}: {folder} holds the splits {list(loaded)}, none named 'train'"
            )
        held_out = next((loaded[name] for name in EVAL_SPLIT_NAMES if name in loaded), None)
        loaded = loaded[TRAIN_SPLIT]
    if "segments" not in loaded.column_names:
        raise DatasetSpecError(
            f"dataset.{key}: {folder} holds the columns {loaded.column_names}, not sample-schema rows "
            "(a 'segments' column); save rows built with unimm.data.schema, or give the files it came from"
        )
    if streaming:
        return loaded.to_iterable_dataset(), None if held_out is None else held_out.to_iterable_dataset()
    return loaded, held_out


def _rows_with_images(dataset: datasets.Dataset, what: str) -> datasets.Dataset:
    # Read as Arrow, so no image is decoded to find the rows that have one; indices kept in memory.
    kept = (
        dataset.with_format("arrow")
        .filter(_has_image, batched=True, keep_in_memory=True, desc=f"{what} rows with an image")
        .with_format(None)
    )
    if len(kept) < len(dataset):
        logger.warning(
            "%d of %d %s rows have no image and are left out", len(dataset) - len(kept), len(dataset), what
        )
    return kept


def _has_image(table: pyarrow.Table) -> np.ndarray:
    segments = table.column("segments").combine_chunks()
    types = pyarrow.compute.struct_field(pyarrow.compute.list_flatten(segments), "type")
    rows = pyarrow.compute.list_parent_indices(segments).filter(pyarrow.compute.equal(types, IMAGE))
    mask = np.zeros(len(table), dtype=bool)
    mask[rows.to_numpy()] = True
    return mask


def _first_rows(dataset: datasets.Dataset | None, limit: int | None) -> datasets.Dataset | None:
    if dataset is None or limit is None or limit >= len(dataset):
        return dataset
    return dataset.select(range(limit))


def _shown(files: Sequence[str]) -> str:
    return files[0] if len(files) == 1 else f"{files[0]} and {len(files) - 1} more"
