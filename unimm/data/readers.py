"""Readers: data files → raw records with their locations, before any conversion to samples.

Each reader yields ``(location, record)`` where ``location`` names the record for a person
(``file.jsonl:12``, ``shard.tar:000123``, ``file.parquet:row 7``) and ``record`` is a dict, or a
``BadRecordError`` when the record cannot even be read (a line that is not JSON, a truncated tar).
A reader never stops at a bad record: the records after it are still read.
"""

from __future__ import annotations

import csv
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet

from unimm.data.bad_records import (
    BAD_JSON,
    MISSING_FIELD,
    OUTSIDE_ROOT,
    UNREADABLE_FILE,
    WRONG_TYPE,
    BadRecordError,
)

RawRecord = tuple[str, "dict[str, Any] | BadRecordError"]
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
PARQUET_BATCH_ROWS = 256


def resolve_inside(root: str | os.PathLike, relative: str, base: str | os.PathLike | None = None) -> str:
    """The absolute path of ``relative`` (taken from a data file) joined to ``base`` (default ``root``).

    A data record must not reach files outside its dataset's folder: a path that climbs out of ``root``
    with ``..`` is a bad record (``outside_root``). The check is on the path as written, so a symlink the
    dataset's owner put inside the folder still works."""
    root = os.path.abspath(root)
    path = os.path.abspath(os.path.join(base if base is not None else root, relative))
    if os.path.commonpath([root, path]) != root:
        raise BadRecordError(
            OUTSIDE_ROOT, f"the image path {relative!r} leads outside the dataset folder {root}"
        )
    return path


def read_jsonl(path: str) -> Iterator[RawRecord]:
    """One record per non-blank line; a line that is not a JSON object is a bad record."""
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            location = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                yield (
                    location,
                    BadRecordError(BAD_JSON, f"not JSON ({error.msg} at column {error.colno})", location),
                )
                continue
            yield location, _require_dict(record, location)


def read_json_list(path: str) -> Iterator[RawRecord]:
    """A JSON file holding a list of records (the LLaVA layout); a ``.jsonl`` file is read line by line."""
    if path.endswith(".jsonl"):
        yield from read_jsonl(path)
        return
    try:
        with open(path, encoding="utf-8") as file:
            records = json.load(file)
    except json.JSONDecodeError as error:
        location = f"{path}:{error.lineno}"
        yield (
            location,
            BadRecordError(BAD_JSON, f"the file is not JSON ({error.msg}); none of it was read", location),
        )
        return
    if not isinstance(records, list):
        yield (
            path,
            BadRecordError(
                WRONG_TYPE, f"expected a JSON list of records, got {type(records).__name__}", path
            ),
        )
        return
    for index, record in enumerate(records):
        location = f"{path}[{index}]"
        yield location, _require_dict(record, location)


def read_parquet(path: str) -> Iterator[RawRecord]:
    """One record per row, read in batches so a large file is never held in memory at once."""
    try:
        parquet_file = pyarrow.parquet.ParquetFile(path)
    except (OSError, pyarrow.ArrowException) as error:
        yield path, BadRecordError(UNREADABLE_FILE, f"not a parquet file ({error})", path)
        return
    row = 0
    for batch in parquet_file.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for record in batch.to_pylist():
            yield f"{path}:row {row}", record
            row += 1


def read_tar(path: str) -> Iterator[RawRecord]:
    """WebDataset-style shards: the members sharing a key (the name up to the first dot of its basename)
    form one record ``{"__key__": key, extension: bytes, ...}``; members of one key are adjacent."""
    key, record = None, {}
    try:
        with tarfile.open(path, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                member_key, extension = _split_key(member.name)
                if member_key != key and record:
                    yield f"{path}:{key}", record
                    record = {}
                key = member_key
                record["__key__"] = key
                record[extension] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        location = f"{path}:{key}" if key else path
        yield (
            location,
            BadRecordError(UNREADABLE_FILE, f"the tar file is damaged after this point ({error})", location),
        )
        return
    if record:
        yield f"{path}:{key}", record


def read_image_folder(data_dir: str) -> Iterator[RawRecord]:
    """Images with captions in ``metadata.jsonl`` / ``metadata.csv`` files (the ``imagefolder`` layout).

    ``file_name`` is resolved against the metadata file's folder into an absolute path (one that leaves
    ``data_dir`` is a bad record); an image that no metadata file lists is a bad record (it has no
    caption), so no file is skipped silently."""
    listed: set[str] = set()
    for metadata_path in metadata_files(data_dir):
        for location, record in _read_metadata(metadata_path):
            if isinstance(record, dict) and isinstance(record.get("file_name"), str):
                try:
                    record["file_name"] = resolve_inside(data_dir, record["file_name"], metadata_path.parent)
                except BadRecordError as error:
                    record = error.at(location)
                else:
                    listed.add(record["file_name"])
            yield location, record
    for image_path in sorted(Path(data_dir).rglob("*")):
        if (
            image_path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
            and os.path.abspath(image_path) not in listed
        ):
            location = str(image_path)
            yield location, BadRecordError(MISSING_FIELD, "no metadata file lists this image", location)


def metadata_files(data_dir: str) -> list[Path]:
    """The ``metadata.jsonl`` / ``metadata.csv`` files of an image folder, at any depth."""
    paths = sorted(path for name in METADATA_FILES for path in Path(data_dir).rglob(name))
    if not paths:
        raise FileNotFoundError(f"no {' or '.join(METADATA_FILES)} under {data_dir}")
    return paths


def _read_metadata(path: Path) -> Iterator[RawRecord]:
    if path.suffix == ".jsonl":
        yield from read_jsonl(str(path))
        return
    with open(path, encoding="utf-8", newline="") as file:
        # Line 1 is the header, so the first record is on line 2.
        for line_number, row in enumerate(csv.DictReader(file), start=2):
            yield f"{path}:{line_number}", row


def _split_key(member_name: str) -> tuple[str, str]:
    directory, basename = os.path.split(member_name)
    stem, _, extension = basename.partition(".")
    return os.path.join(directory, stem), extension.lower()


def _require_dict(record: Any, location: str) -> dict[str, Any] | BadRecordError:
    if isinstance(record, dict):
        return record
    return BadRecordError(WRONG_TYPE, f"expected a JSON object, got {type(record).__name__}", location)
