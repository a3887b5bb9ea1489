"""Loaders: data on disk → ``datasets`` in the sample schema, with bad records skipped and reported.

Formats: image folders with captions, JSONL, parquet, WebDataset-style tar shards, LLaVA conversation
JSON and interleaved documents (OBELICS-style ``texts``/``images`` lists). Each loader returns a
``datasets.Dataset`` (written once to the ``datasets`` cache, memory-mapped) or, with
``streaming=True``, an ``IterableDataset`` that reads the files lazily, one shard per file, so
``split_dataset_by_node`` and DataLoader workers divide the files among themselves.

Bad records never stop a job: each is counted per reason and reported (``BadRecords``) at the end of
loading, or at the end of each pass over a streaming dataset; ``strict=True`` raises at the first.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets

from unimm.data import readers
from unimm.data.bad_records import (
    BAD_JSON,
    MISSING_FIELD,
    MISSING_IMAGE,
    WRONG_TYPE,
    BadRecordError,
    BadRecords,
)
from unimm.data.schema import (
    IMAGE,
    SEGMENT_FIELDS,
    image_segment,
    sample_features,
    text_segment,
    validate_sample,
)

PAIR, CONVERSATION, INTERLEAVED, SAMPLES = "pair", "conversation", "interleaved", "samples"
KINDS = (PAIR, CONVERSATION, INTERLEAVED, SAMPLES)
TEXT_COLUMNS = ("caption", "text", "txt")
IMAGE_COLUMNS = ("image", "file_name", *readers.IMAGE_EXTENSIONS)
IMAGE_PLACEHOLDER = "<image>"
LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}

# Map-style datasets keep bad records as rows until they are counted, so a dataset loaded again from
# the ``datasets`` cache reports the same counts as the first load.
_BAD_COLUMNS = {"bad_reason": datasets.Value("string"), "bad_detail": datasets.Value("string")}
_LOCATION_COLUMN = {"location": datasets.Value("string")}


# --- public loaders ---------------------------------------------------------------------------------


def load_jsonl(paths: str | Sequence[str], kind: str = PAIR, **options: Any) -> datasets.Dataset:
    """JSON-lines files, one record per line. See ``load_records`` for ``kind`` and the options."""
    return load_records(readers.read_jsonl, paths, kind, **options)


def load_parquet(paths: str | Sequence[str], kind: str = PAIR, **options: Any) -> datasets.Dataset:
    """Parquet files; an image column holds a path, bytes or a ``{"bytes", "path"}`` struct."""
    return load_records(readers.read_parquet, paths, kind, **options)


def load_webdataset(paths: str | Sequence[str], kind: str = PAIR, **options: Any) -> datasets.Dataset:
    """WebDataset-style tar shards: ``key.jpg``/``key.png`` + ``key.txt`` or ``key.json`` per record.

    Read with ``tarfile`` rather than the ``datasets`` ``webdataset`` builder: that builder (datasets
    5.2) fails the whole load on one ``.json`` member that is not JSON, and loads a truncated image only
    to fail when it is decoded, mid-epoch; here each is a reported bad record."""
    return load_records(readers.read_tar, paths, kind, **options)


def load_image_folder(data_dir: str, **options: Any) -> datasets.Dataset:
    """An image folder with captions in ``metadata.jsonl`` or ``metadata.csv`` (``file_name`` + caption)."""
    readers.metadata_files(data_dir)  # fails now, clearly, when there is no metadata file at all
    return load_records(readers.read_image_folder, [data_dir], PAIR, **options)


def load_llava(paths: str | Sequence[str], **options: Any) -> datasets.Dataset:
    """LLaVA-style conversations: ``{"image": ..., "conversations": [{"from": "human", "value": ...}]}``
    in a JSON list (or JSONL); ``<image>`` in a turn marks where its image goes."""
    return load_records(readers.read_json_list, paths, CONVERSATION, **options)


def load_interleaved(paths: str | Sequence[str], **options: Any) -> datasets.Dataset:
    """OBELICS-style documents: parallel ``texts`` and ``images`` lists, one of the two set per position.
    Files ending in ``.parquet`` are read as parquet, others as JSONL."""
    paths = _as_list(paths)
    reader = readers.read_parquet if paths[0].endswith(".parquet") else readers.read_jsonl
    return load_records(reader, paths, INTERLEAVED, **options)


FORMATS: dict[str, Callable[..., datasets.Dataset]] = {
    "jsonl": load_jsonl,
    "parquet": load_parquet,
    "webdataset": load_webdataset,
    "imagefolder": load_image_folder,
    "llava": load_llava,
    "interleaved": load_interleaved,
}


def load_records(
    reader: Callable[[str], Iterator[readers.RawRecord]],
    paths: str | Sequence[str],
    kind: str = PAIR,
    *,
    streaming: bool = False,
    strict: bool = False,
    bad_records: BadRecords | None = None,
    image_root: str | None = None,
    text_column: str | None = None,
    image_column: str | None = None,
    cache_dir: str | None = None,
    num_proc: int | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Read ``paths`` with ``reader`` and convert each record to a sample of ``kind``.

    ``kind``: ``pair`` (one image + its caption → ``[image, text]``), ``conversation`` (LLaVA),
    ``interleaved`` (OBELICS) or ``samples`` (rows already in the schema, e.g. pre-tokenized shards).
    Relative image paths resolve against ``image_root`` (default: the data file's folder). The caption
    and image columns of pairs default to the first present of ``TEXT_COLUMNS`` / ``IMAGE_COLUMNS``.
    Skipped records are added to ``bad_records`` (a fresh tally by default) and logged."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    paths = _as_list(paths)
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"no data file or folder at {path}")
    convert = functools.partial(
        _convert_record, kind=kind, image_root=image_root, text_column=text_column, image_column=image_column
    )
    bad_records = bad_records if bad_records is not None else BadRecords(strict=strict)
    bad_records.strict = bad_records.strict or strict
    if streaming:
        return datasets.IterableDataset.from_generator(
            _generate_samples,
            features=sample_features(),
            gen_kwargs={"paths": paths, "reader": reader, "convert": convert, "bad_records": bad_records},
        )
    return _load_map_style(reader, paths, convert, bad_records, cache_dir, num_proc)


def mix_datasets(
    datasets_to_mix: Sequence[datasets.Dataset | datasets.IterableDataset],
    weights: Sequence[float],
    seed: int = 0,
    stopping_strategy: str = "all_exhausted",
) -> datasets.Dataset | datasets.IterableDataset:
    """Sample from several datasets with the given relative ``weights`` (``interleave_datasets``).

    Only the ``segments`` column is kept, so datasets with different metadata columns mix."""
    if len(datasets_to_mix) != len(weights) or not weights:
        raise ValueError(
            f"need one weight per dataset, got {len(weights)} weights for {len(datasets_to_mix)}"
        )
    if any(weight < 0 for weight in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    total = sum(weights)
    return datasets.interleave_datasets(
        [dataset.select_columns(["segments"]) for dataset in datasets_to_mix],
        probabilities=[weight / total for weight in weights],
        seed=seed,
        stopping_strategy=stopping_strategy,
    )


# --- building the datasets --------------------------------------------------------------------------


def _generate_samples(paths, reader, convert, bad_records: BadRecords) -> Iterator[dict[str, Any]]:
    """Streaming: yield good samples, tally the bad ones, report when the pass over these files ends.

    ``bad_records`` accumulates over passes (epochs); the report logged at the end is this pass's."""
    this_pass = BadRecords(strict=bad_records.strict)
    for path in paths:
        for location, record in reader(path):
            sample = _sample_or_error(path, location, record, convert)
            if isinstance(sample, BadRecordError):
                this_pass.add(sample)
                bad_records.add(sample)
            else:
                yield sample
    this_pass.log(f"end of a pass over {len(paths)} file(s)")


def _generate_rows(paths, file_signatures, reader, convert, strict: bool) -> Iterator[dict[str, Any]]:
    """Map-style: good samples and bad records alike become rows; bad ones carry their reason."""
    del file_signatures  # only part of the ``datasets`` cache key, so edited files are read again
    for path in paths:
        for location, record in reader(path):
            sample = _sample_or_error(path, location, record, convert)
            if isinstance(sample, BadRecordError):
                if strict:
                    raise sample
                yield {
                    "segments": [],
                    "location": location,
                    "bad_reason": sample.reason,
                    "bad_detail": sample.detail,
                }
            else:
                yield {**sample, "location": location, "bad_reason": None, "bad_detail": None}


def _load_map_style(reader, paths, convert, bad_records: BadRecords, cache_dir, num_proc) -> datasets.Dataset:
    gen_kwargs = {
        "paths": paths,
        "file_signatures": [_file_signature(path) for path in paths],
        "reader": reader,
        "convert": convert,
        "strict": bad_records.strict,
    }
    try:
        rows = datasets.Dataset.from_generator(
            _generate_rows,
            features=sample_features(**_LOCATION_COLUMN, **_BAD_COLUMNS),
            gen_kwargs=gen_kwargs,
            cache_dir=cache_dir,
            num_proc=num_proc,
        )
    except datasets.exceptions.DatasetGenerationError as error:
        if isinstance(error.__cause__, BadRecordError):
            raise error.__cause__ from None
        raise
    bad_rows = rows.filter(lambda reason: reason is not None, input_columns="bad_reason")
    for row in bad_rows.select_columns(["location", *_BAD_COLUMNS]):
        bad_records.add(BadRecordError(row["bad_reason"], row["bad_detail"], row["location"]))
    bad_records.log(f"loading {len(paths)} file(s)")
    good_rows = rows.filter(lambda reason: reason is None, input_columns="bad_reason")
    return good_rows.remove_columns([*_LOCATION_COLUMN, *_BAD_COLUMNS])


def _file_signature(path: str) -> list[tuple[str, int, int]]:
    files = [Path(path)] if os.path.isfile(path) else sorted(p for p in Path(path).rglob("*") if p.is_file())
    return [(str(file), file.stat().st_size, file.stat().st_mtime_ns) for file in files]


def _sample_or_error(path: str, location: str, record, convert) -> dict[str, Any] | BadRecordError:
    if isinstance(record, BadRecordError):
        return record
    try:
        sample = convert(record, path)
        validate_sample(sample)
    except BadRecordError as error:
        return error.at(location)
    return sample


# --- records → samples ------------------------------------------------------------------------------


def _convert_record(record: dict[str, Any], path: str, kind: str, image_root, text_column, image_column):
    # Relative image paths resolve against the data file's folder unless an image root is given.
    root = image_root if image_root is not None else os.path.dirname(path)
    if kind == PAIR:
        return _pair_sample(record, root, text_column, image_column)
    if kind == CONVERSATION:
        return _conversation_sample(record, root)
    if kind == INTERLEAVED:
        return _interleaved_sample(record, root)
    return _schema_sample(record, root)


def _pair_sample(record: dict[str, Any], root: str, text_column, image_column) -> dict[str, Any]:
    image = _image_value(_field(record, image_column, IMAGE_COLUMNS, "image"), root)
    text_value = _field(record, text_column, (*TEXT_COLUMNS, "json"), "caption")
    caption = _caption_text(text_value)
    return {"segments": [image_segment(image), text_segment(caption)]}


def _conversation_sample(record: dict[str, Any], root: str) -> dict[str, Any]:
    turns = _field(record, None, ("conversations",), "conversations")
    if not isinstance(turns, list):
        raise BadRecordError(WRONG_TYPE, f"'conversations' must be a list, got {type(turns).__name__}")
    images = record.get("image")
    images = [] if images is None else images if isinstance(images, list) else [images]
    images = [_image_value(image, root) for image in images]
    placeholders = sum(
        str(turn.get("value", "")).count(IMAGE_PLACEHOLDER) for turn in turns if isinstance(turn, dict)
    )
    if placeholders not in (0, len(images)):
        raise BadRecordError(
            WRONG_TYPE, f"{placeholders} '{IMAGE_PLACEHOLDER}' placeholders for {len(images)} images"
        )
    segments = []
    if placeholders == 0 and images:  # no placeholder: the images open the first user turn
        segments = [image_segment(image, "user") for image in images]
        images = []
    for index, turn in enumerate(turns):
        segments.extend(_turn_segments(turn, index, images))
    return {"segments": segments}


def _turn_segments(turn: Any, index: int, images: list[Any]) -> list[dict[str, Any]]:
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
        raise BadRecordError(
            WRONG_TYPE, f"turn {index} must be {{'from': ..., 'value': str}}, got {turn!r:.80}"
        )
    role = LLAVA_ROLES.get(turn.get("from"))
    if role is None:
        raise BadRecordError(WRONG_TYPE, f"turn {index}: 'from' must be one of {sorted(LLAVA_ROLES)}")
    segments = []
    for piece_index, piece in enumerate(turn["value"].split(IMAGE_PLACEHOLDER)):
        if piece_index > 0:
            segments.append(image_segment(images.pop(0), role))
        if piece.strip():
            segments.append(text_segment(piece.strip(), role))
    if not segments:
        raise BadRecordError(WRONG_TYPE, f"turn {index} is empty")
    return segments


def _interleaved_sample(record: dict[str, Any], root: str) -> dict[str, Any]:
    texts = _field(record, None, ("texts",), "texts")
    images = _field(record, None, ("images",), "images")
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise BadRecordError(WRONG_TYPE, "'texts' and 'images' must be lists of the same length")
    segments = []
    for index, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            raise BadRecordError(WRONG_TYPE, f"position {index} must hold exactly one of a text and an image")
        segments.append(text_segment(text) if text is not None else image_segment(_image_value(image, root)))
    return {"segments": segments}


def _schema_sample(record: dict[str, Any], root: str) -> dict[str, Any]:
    segments = _field(record, None, ("segments",), "segments")
    if not isinstance(segments, list):
        raise BadRecordError(WRONG_TYPE, f"'segments' must be a list, got {type(segments).__name__}")
    filled = []
    for segment in segments:
        if not isinstance(segment, dict):
            raise BadRecordError(WRONG_TYPE, f"a segment must be a dict, got {type(segment).__name__}")
        segment = {name: segment.get(name) for name in SEGMENT_FIELDS}
        segment["role"] = segment["role"] or ""
        if segment["type"] == IMAGE and segment["image"] is not None:
            segment["image"] = _image_value(segment["image"], root)
        filled.append(segment)
    return {"segments": filled}  # other columns are dropped: every loader yields the same features


def _field(record: dict[str, Any], column: str | None, candidates: Sequence[str], what: str) -> Any:
    names = [column] if column else candidates
    for name in names:
        if record.get(name) is not None:
            return record[name]
    reason = MISSING_IMAGE if what == "image" else MISSING_FIELD
    raise BadRecordError(reason, f"no {what}: none of the fields {list(names)} is set")


def _caption_text(value: Any) -> str:
    if isinstance(value, bytes):  # a tar member (``.txt`` / ``.json``)
        value = value.decode("utf-8", errors="strict")
        if value.lstrip().startswith("{"):
            return _caption_from_json(value)
    if isinstance(value, dict):
        return _field(value, None, TEXT_COLUMNS, "caption")
    if not isinstance(value, str):
        raise BadRecordError(WRONG_TYPE, f"a caption must be a string, got {type(value).__name__}")
    return value


def _caption_from_json(text: str) -> str:
    try:
        return _caption_text(json.loads(text))
    except json.JSONDecodeError as error:
        raise BadRecordError(BAD_JSON, f"the .json member is not JSON ({error.msg})") from None


def _image_value(value: Any, root: str) -> Any:
    """An image as ``datasets.Image`` stores it: an absolute path, or bytes (tar members, parquet)."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return {"bytes": value["bytes"], "path": value.get("path")}
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value), "path": None}
    if isinstance(value, str) and value:
        # An absolute path is the data file's own choice; a relative one must stay inside the root.
        path = value if os.path.isabs(value) else readers.resolve_inside(root, value)
        return {"bytes": None, "path": path}
    raise BadRecordError(WRONG_TYPE, f"an image must be a path or bytes, got {type(value).__name__}")


def _as_list(paths: str | Sequence[str]) -> list[str]:
    return (
        [os.fspath(paths)] if isinstance(paths, (str, os.PathLike)) else [os.fspath(path) for path in paths]
    )
