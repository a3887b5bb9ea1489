"""Pre-tokenization: run a visual tokenizer over a dataset once and store the image token ids.

The dataset is cut into fixed shards of ``rows_per_shard`` rows. Each shard is written to
``output_dir`` as one parquet file, atomically (to a temporary name, then renamed), so a shard file
that exists is complete: a job restarted after a crash skips it and redoes only the shards that were
missing. Several processes (``torchrun --nproc_per_node N`` with ``ACCELERATE_USE_CPU=1`` on a CPU,
``accelerate launch`` on GPUs) take shards round-robin through accelerate's ``PartialState``.

Rows keep every column; each image segment loses its pixels and gets ``image_token_ids`` (the
``(h, w)`` grid flattened row-major) and ``image_grid``. Rows with an unreadable image are skipped and
reported like the loaders' bad records; the tally of each shard is stored next to it so that a
resumed job reports the whole dataset.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import datasets
import pyarrow.parquet
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from tqdm.auto import tqdm

from unimm.data.bad_records import MISSING_IMAGE, BadRecordError, BadRecords
from unimm.data.schema import IMAGE, open_image

logger = logging.getLogger(__name__)

MANIFEST_NAME = "pretokenize.json"
SHARD_PATTERN = "shard-{index:05d}-of-{count:05d}.parquet"
BAD_RECORDS_SUFFIX = ".bad_records.json"
TEMPORARY_MARK = ".tmp-"  # files being written are hidden and carry this mark until renamed


class VisualTokenizer(Protocol):
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image token ids (B, h, w) of normalised images (B, C, H, W)."""


def pretokenize_images(
    dataset: datasets.Dataset,
    visual_tokenizer: VisualTokenizer,
    image_processor: Callable[..., Any],
    output_dir: str | os.PathLike,
    rows_per_shard: int = 1000,
    batch_size: int = 32,
    strict: bool = False,
    bad_records: BadRecords | None = None,
) -> datasets.Dataset:
    """Tokenize every image of ``dataset`` into parquet shards under ``output_dir``; return them loaded.

    ``image_processor(images=[PIL images], return_tensors="pt")["pixel_values"]`` prepares images
    (any Hugging Face image processor, e.g. ``DualCodebookImageProcessor``); ``batch_size`` images go
    through ``visual_tokenizer.encode`` at once. Call it on every process of a distributed job: each
    does its share of the shards, and all return the whole pre-tokenized dataset."""
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"pre-tokenization needs a map-style datasets.Dataset (fixed shards), got {type(dataset).__name__}"
        )
    if rows_per_shard < 1 or batch_size < 1:
        raise ValueError(
            f"rows_per_shard and batch_size must be positive, got {rows_per_shard}, {batch_size}"
        )
    state = process_state()
    output_dir = Path(output_dir)
    shard_count = max(1, -(-len(dataset) // rows_per_shard))  # ceil, one (empty) shard for no rows
    if state.is_main_process:
        _check_manifest(output_dir, len(dataset), rows_per_shard)
        _remove_partial_files(output_dir)
    state.wait_for_everyone()

    my_shards = list(range(state.process_index, shard_count, state.num_processes))
    todo = [index for index in my_shards if not _shard_path(output_dir, index, shard_count).exists()]
    if len(todo) < len(my_shards):
        logger.info(
            "process %d: %d of its %d shards already done",
            state.process_index,
            len(my_shards) - len(todo),
            len(my_shards),
        )
    rows_todo = sum(len(_shard_rows(index, rows_per_shard, len(dataset))) for index in todo)
    with tqdm(
        total=rows_todo, desc="tokenizing images", unit="row", disable=not state.is_local_main_process
    ) as progress:
        for index in todo:
            shard = _ShardJob(dataset, index, shard_count, rows_per_shard, output_dir, strict)
            shard.run(visual_tokenizer, image_processor, batch_size, progress)
    state.wait_for_everyone()

    tally = bad_records if bad_records is not None else BadRecords()
    _collect_bad_records(output_dir, shard_count, tally)
    if state.is_main_process:
        tally.log(f"pre-tokenizing {len(dataset)} rows into {output_dir}")
    shard_files = [str(_shard_path(output_dir, index, shard_count)) for index in range(shard_count)]
    with state.main_process_first():  # the first load writes the ``datasets`` cache, the others read it
        result = _load_shards(shard_files, features=dataset.features)
    if len(dataset) and not len(result):
        # Nothing worth keeping: clear the job so that a rerun on repaired data starts over.
        state.wait_for_everyone()
        if state.is_main_process:
            for path in [output_dir / MANIFEST_NAME, *output_dir.glob("shard-*")]:
                path.unlink()
        raise ValueError(
            f"none of the {len(dataset)} rows could be tokenized ({output_dir}): {tally.report()}"
        )
    return result


def load_pretokenized(output_dir: str | os.PathLike, **load_options: Any) -> datasets.Dataset:
    """The shards of a finished ``pretokenize_images`` job (``streaming=True`` reads them lazily)."""
    shard_files = sorted(str(path) for path in Path(output_dir).glob("shard-*.parquet"))
    if not shard_files:
        raise FileNotFoundError(f"no pre-tokenized shards (shard-*.parquet) in {output_dir}")
    return _load_shards(shard_files, **load_options)


def _load_shards(shard_files: list[str], features: datasets.Features | None = None, **load_options: Any):
    """The shards as one dataset. A shard whose rows were all bad holds none, and ``datasets`` cannot
    read an empty parquet file, so those are left out (an empty dataset when every shard is empty)."""
    filled = [path for path in shard_files if pyarrow.parquet.ParquetFile(path).metadata.num_rows]
    if filled:
        return datasets.load_dataset("parquet", data_files=filled, split="train", **load_options)
    if features is None:  # the features every shard's schema carries
        features = datasets.Features.from_arrow_schema(pyarrow.parquet.read_schema(shard_files[0]))
    return datasets.Dataset.from_dict({name: [] for name in features}, features=features)


class _ShardJob:
    """One shard: decode its images, tokenize them in batches, write rows and tally atomically."""

    def __init__(self, dataset, index: int, count: int, rows_per_shard: int, output_dir: Path, strict: bool):
        self.rows_range = _shard_rows(index, rows_per_shard, len(dataset))
        self.dataset = dataset
        self.path = _shard_path(output_dir, index, count)
        self.bad_records = BadRecords(strict=strict)

    def run(self, visual_tokenizer, image_processor, batch_size: int, progress: tqdm) -> None:
        # Arrow rows keep images as stored ({"bytes", "path"}): decoding them is ours, to report bad ones.
        rows = self.dataset.with_format("arrow")[self.rows_range.start : self.rows_range.stop].to_pylist()
        image_keys = [  # (row, segment) of every image still in pixels
            (row_index, segment_index)
            for row_index, row in enumerate(rows)
            for segment_index, segment in enumerate(row["segments"])
            if segment["type"] == IMAGE and segment["image_token_ids"] is None
        ]
        token_ids, bad_rows = {}, set()
        for start in range(0, len(image_keys), batch_size):
            images = self._decode_batch(rows, image_keys[start : start + batch_size], bad_rows)
            pixel_values = _process(image_processor, list(images.values()))
            token_ids.update(_encode_by_shape(visual_tokenizer, dict(zip(images, pixel_values))))
        for (row_index, segment_index), ids in token_ids.items():  # ids: (h, w)
            segment = rows[row_index]["segments"][segment_index]
            segment.update(image=None, image_token_ids=ids.flatten().tolist(), image_grid=list(ids.shape))
        self._write([row for row_index, row in enumerate(rows) if row_index not in bad_rows])
        progress.update(len(rows))

    def _decode_batch(self, rows: list[dict], keys: list[tuple[int, int]], bad_rows: set[int]) -> dict:
        """Decoded images by key; a row with an unreadable image is tallied and joins ``bad_rows``."""
        images = {}
        for row_index, segment_index in keys:
            if row_index in bad_rows:
                continue
            try:
                images[(row_index, segment_index)] = _decode(
                    rows[row_index]["segments"][segment_index], segment_index
                )
            except BadRecordError as error:
                self.bad_records.add(error.at(f"row {self.rows_range[row_index]}"))
                bad_rows.add(row_index)
        # A bad image later in a row also drops the row's earlier images of this batch.
        return {key: image for key, image in images.items() if key[0] not in bad_rows}

    def _write(self, rows: list[dict]) -> None:
        tally_path = self.path.with_name(self.path.name + BAD_RECORDS_SUFFIX)
        tally = {"counts": dict(self.bad_records.counts), "examples": self.bad_records.examples}
        atomic_write(tally_path, lambda path: path.write_text(json.dumps(tally)))
        # The table's schema carries the ``datasets`` features, so the shard loads with the same columns.
        # ``from_list([])`` would give a table without columns, which ``datasets`` refuses to load.
        columns = rows or {name: [] for name in self.dataset.features}
        build = datasets.Dataset.from_list if rows else datasets.Dataset.from_dict
        table = build(columns, features=self.dataset.features).data.table
        # The shard file is renamed into place last: its existence means the shard is done.
        atomic_write(self.path, lambda path: pyarrow.parquet.write_table(table, path))


def _decode(segment: dict[str, Any], segment_index: int):
    if segment["image"] is None:
        raise BadRecordError(MISSING_IMAGE, f"segment {segment_index} has neither pixels nor token ids")
    try:
        return open_image(segment["image"])
    except BadRecordError as error:
        raise BadRecordError(error.reason, f"segment {segment_index}: {error.detail}") from None


def _process(image_processor, images: list) -> list[torch.Tensor]:
    """Pixel values (C, H, W) per image; without ``return_tensors`` images of any size come back."""
    if not images:
        return []
    return [
        torch.as_tensor(values)
        for values in image_processor(images=images, return_tensors=None)["pixel_values"]
    ]


def _encode_by_shape(visual_tokenizer, pixel_values: dict) -> dict[Any, torch.Tensor]:
    """Token ids (h, w) per key; images of one size go through the tokenizer together."""
    keys_by_shape = defaultdict(list)
    for key, values in pixel_values.items():
        keys_by_shape[tuple(values.shape)].append(key)
    token_ids = {}
    for keys in keys_by_shape.values():
        batch = torch.stack([pixel_values[key] for key in keys])  # (B, C, H, W)
        # float32 pixels: the tokenizer casts them for each of its branches (a teacher may differ in dtype)
        batch = batch.to(device=getattr(visual_tokenizer, "device", None))
        with torch.inference_mode():
            ids = visual_tokenizer.encode(batch).cpu()  # (B, h, w)
        token_ids.update(zip(keys, ids))
    return token_ids


def process_state() -> PartialState:
    # PartialState sees the processes of a CPU-only ``torchrun`` job only when told it runs on CPUs.
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def _check_manifest(output_dir: Path, num_rows: int, rows_per_shard: int) -> None:
    """Refuse to resume into a folder of shards cut from a different dataset size or shard size."""
    manifest = {"num_rows": num_rows, "rows_per_shard": rows_per_shard}
    path = output_dir / MANIFEST_NAME
    if path.exists():
        found = json.loads(path.read_text())
        if found != manifest:
            raise ValueError(
                f"{output_dir} holds shards of another job ({found}); this job has {manifest}. "
                "Use a new output folder or the same dataset and rows_per_shard."
            )
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(manifest)))


def _remove_partial_files(output_dir: Path) -> None:
    """Delete what a killed job was writing; no process writes yet (the others wait at a barrier)."""
    for partial in output_dir.glob(f".*{TEMPORARY_MARK}*"):
        logger.info("removing %s, left by an interrupted job", partial)
        partial.unlink()


def _collect_bad_records(output_dir: Path, shard_count: int, tally: BadRecords) -> None:
    for index in range(shard_count):
        tally_path = _shard_path(output_dir, index, shard_count)
        shard_tally = json.loads(tally_path.with_name(tally_path.name + BAD_RECORDS_SUFFIX).read_text())
        tally.counts.update(shard_tally["counts"])
        for reason, examples in shard_tally["examples"].items():
            kept = tally.examples.setdefault(reason, [])
            kept.extend(examples[: tally.max_examples - len(kept)])


def _shard_rows(index: int, rows_per_shard: int, num_rows: int) -> Sequence[int]:
    return range(index * rows_per_shard, min((index + 1) * rows_per_shard, num_rows))


def _shard_path(output_dir: Path, index: int, count: int) -> Path:
    return output_dir / SHARD_PATTERN.format(index=index, count=count)


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(temporary path)``, then the file renamed into place: readers see it whole or not at all."""
    temporary = path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}")
    write(temporary)
    os.replace(temporary, path)
