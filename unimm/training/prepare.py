"""``unimm prepare``: the LLM stage's starting point from any dataset, visual tokenizer and base LM.

    unimm prepare recipes/prepare/tiny.yaml [key=value ...]

Writes, under ``output_dir``:

- ``codes/<split>/``  the images' token ids (``unimm.data.pretokenize``: sharded, resumable, bad images
  skipped and counted);
- ``init/``           the LLM's initial folder: ``UniMMForCausalLM`` (the base LM with the image vocabulary,
  code rows from the codebook) and its ``UniMMProcessor``; the LLM stage's ``model_name_or_path``;
- ``train/``, ``eval/``  token tables (``input_ids``, ``labels`` with -100 where no loss is taken, ``kind``):
  the LLM stage's ``train_dataset`` / ``eval_dataset``;
- ``prepare.json``    rows per kind and split, the longest sequence, bad records, unknown text tokens.

What each row teaches follows its layout (``row_kind``): an image-caption pair gives two chats, caption →
image (a ``condition_dropout`` share with the text dropped, for classifier-free guidance) and image +
question → the caption as the answer; a conversation is trained on its assistant turns; an interleaved
document (or an image or text alone) on every token.

Each step is skipped when its output exists, and every output is written under a temporary name and renamed
when complete, so a rerun after a crash resumes. ``arguments.json`` records the arguments of the first run: a
rerun with other arguments is refused (``overwrite_output_dir=true`` starts over).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import glob
import json
import logging
import os
import random
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow
import pyarrow.compute
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
)

from unimm.data.bad_records import BadRecords
from unimm.data.pretokenize import TEMPORARY_MARK, atomic_write, pretokenize_images, process_state
from unimm.data.schema import IMAGE, TEXT, drop_text
from unimm.data.spec import (
    EVAL_SPLIT,
    TRAIN_SPLIT,
    load_dataset_spec,
    parse_dataset_spec,
    resolve_spec_paths,
    split_for_eval,
)
from unimm.data.templates import (
    DEFAULT_QUESTIONS,
    PAIR,
    generation_sample,
    row_kind,
    understanding_sample,
)
from unimm.data.text_replay import (
    load_text_replay,
    replay_questions,
    save_text_replay,
    text_chat_sample,
)
from unimm.llm import UniMMForCausalLM, UniMMProcessor
from unimm.llm.text_chat import generate_text_replay
from unimm.llm.text_tokenizer import (
    CHAT_TEMPLATE,
    UnknownTokens,
    build_bpe_tokenizer,
    build_word_level_tokenizer,
    measure_unknown_tokens,
    unknown_token_id,
)
from unimm.pipelines.assembly import stop_at_end_of_turn
from unimm.tokenizer import DualCodebookImageProcessor, DualCodebookTokenizer
from unimm.training.arguments import read_recipe_file, recipe_search_folders

logger = logging.getLogger(__name__)

# The kinds of sequences rows become (the tables' `kind` column); row layouts are unimm.data.templates'.
GENERATION, UNCONDITIONAL, UNDERSTANDING, TEXT_REPLAY = (
    "generation",
    "unconditional_generation",
    "understanding",
    "text_replay",
)
WORD_LEVEL, BPE = "word_level", "bpe"
TEXT_TOKENIZERS = (WORD_LEVEL, BPE)
SPLITS = ("train", "eval")  # output folders; the spec's held-out split ("test") becomes "eval"
STEP_FOLDERS = ("init", *SPLITS)
CODES_FOLDER = "codes"
SUMMARY_FILE, ARGUMENTS_FILE, STEP_FILE = "prepare.json", "arguments.json", "prepare_step.json"
INIT_FILES = ("config.json", "processor_config.json")  # what a complete init/ holds (besides weights)
REPLAY_FILE = "text_replay.jsonl"
# Fields that change how the work is done, not what it produces: a rerun may change them.
UNRECORDED_FIELDS = ("encode_batch_size", "cache_dir", "overwrite_output_dir")
LAYOUT_FIELDS = ("type", "role", "text", "image_grid")
ARROW_BATCH_ROWS = 1000
MAP_BATCH_ROWS = 256
TOKEN_FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "kind": datasets.Value("string"),
    }
)
REPLAY_EVAL_SHARE = 20  # one replayed chat in 20 is held out for evaluation


@dataclass
class PrepareArguments:
    """``recipes/prepare/*.yaml``: the data, the visual tokenizer, the base LM and how sequences are built."""

    dataset: str | dict[str, Any] = field(
        metadata={"help": "a dataset spec (unimm.data.spec): a demo name, a path or a mapping"}
    )
    visual_tokenizer: str = field(metadata={"help": "a trained DualCodebookTokenizer folder (its export)"})
    output_dir: str = field(metadata={"help": "writes codes/, init/, train/, eval/ and prepare.json"})
    text_model_name_or_path: str | None = field(
        default=None, metadata={"help": "a pretrained causal LM (folder or Hub id): its tokenizer too"}
    )
    backbone: dict[str, Any] | None = field(
        default=None, metadata={"help": "or a config to train from scratch ({model_type: llama, ...})"}
    )
    text_tokenizer: str = field(
        default=WORD_LEVEL, metadata={"help": f"from scratch: {TEXT_TOKENIZERS}, learned from every text"}
    )
    bpe_vocab_size: int = field(default=4096, metadata={"help": "largest vocabulary of a bpe tokenizer"})
    text_tokenizer_min_frequency: int = field(
        default=1, metadata={"help": "from scratch: rarer words (word_level) or pairs (bpe) are left out"}
    )
    max_unknown_rate: float = field(
        default=0.01, metadata={"help": "from scratch: share of unknown text tokens that is an error"}
    )
    chat_template: str | None = field(
        default=None, metadata={"help": "a Jinja chat template (default: the text tokenizer's own)"}
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "side images are resized to (default: the visual tokenizer's); demo data's size"},
    )
    keep_aspect_ratio: bool = field(
        default=False, metadata={"help": "resize the shortest edge to image_size: each image keeps its grid"}
    )
    max_grid: int = field(
        default=32, metadata={"help": "largest grid (codes per side) the vocabulary writes"}
    )
    image_loss_weight: float = field(default=1.0, metadata={"help": "loss weight of image tokens vs text"})
    text_vocab_multiple: int = field(default=64, metadata={"help": "from scratch: round the vocabulary up"})
    condition_dropout: float = field(default=0.1, metadata={"help": "share of train generations, no text"})
    questions: list[str] = field(
        default_factory=lambda: list(DEFAULT_QUESTIONS), metadata={"help": "asked about a pair's image"}
    )
    prompt_template: str = field(
        default="{caption}", metadata={"help": "the user turn that asks for an image"}
    )
    answer_template: str = field(
        default="{caption}.",
        metadata={"help": "the answer about an image (the caption's final '.' is not doubled)"},
    )
    eval_fraction: float = field(
        default=0.05, metadata={"help": "held out when the spec has no eval split (0: no eval table)"}
    )
    max_train_samples: int | None = None
    max_eval_samples: int | None = 1000
    text_replay_fraction: float = field(
        default=0.0,
        metadata={
            "help": "share of train rows that are the pretrained LM's own text chats (keeps its skills)"
        },
    )
    text_replay_max_new_tokens: int = 64
    encode_batch_size: int = field(default=32, metadata={"help": "images per visual tokenizer forward"})
    rows_per_shard: int = field(default=1000, metadata={"help": "rows per codes/ shard (the resume unit)"})
    seed: int = 0
    cache_dir: str | None = field(default=None, metadata={"help": "the `datasets` cache"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "delete output_dir and start over"})

    def __post_init__(self) -> None:
        if (self.backbone is None) == (self.text_model_name_or_path is None):
            raise ValueError("set exactly one of backbone (train from scratch) and text_model_name_or_path")
        if self.backbone is not None and "model_type" not in self.backbone:
            raise ValueError("backbone needs a model_type (e.g. {model_type: llama, hidden_size: 64})")
        parse_dataset_spec(self.dataset, random_access=True)  # a malformed spec fails with the recipe
        if self.text_tokenizer not in TEXT_TOKENIZERS:
            raise ValueError(f"text_tokenizer must be one of {TEXT_TOKENIZERS}, got {self.text_tokenizer!r}")
        for name in ("condition_dropout", "text_replay_fraction", "eval_fraction", "max_unknown_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in (
            "max_grid",
            "text_vocab_multiple",
            "encode_batch_size",
            "rows_per_shard",
            "bpe_vocab_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.questions:
            raise ValueError("questions must not be empty")
        for name in ("prompt_template", "answer_template"):
            _check_template(name, getattr(self, name))
        if self.text_replay_fraction and self.text_model_name_or_path is None:
            raise ValueError("text_replay_fraction needs text_model_name_or_path: it replays a pretrained LM")

    def recorded(self) -> dict[str, Any]:
        """The fields that decide the outputs (compared on a rerun)."""
        values = dataclasses.asdict(self)
        return {name: value for name, value in values.items() if name not in UNRECORDED_FIELDS}


def _check_template(name: str, template: str) -> None:
    try:
        filled = template.format(caption="")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"{name} {template!r}: only {{caption}} may stand in braces ({error})") from None
    if filled == template:
        raise ValueError(f"{name} {template!r} must contain {{caption}}")


# --- recipes ----------------------------------------------------------------------------------------


def load_prepare_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> PrepareArguments:
    """A prepare recipe YAML with ``key=value`` overrides (values read as YAML) applied."""
    path = Path(path)
    return parse_prepare_recipe(read_recipe_file(path, overrides), source=str(path), base_dir=path.parent)


def parse_prepare_recipe(
    values: Mapping[str, Any], source: str = "<dict>", base_dir: str | os.PathLike | None = None
) -> PrepareArguments:
    """Check the keys, find the input paths (see :func:`find_input`) and build the arguments."""
    values = dict(values)
    known = [item.name for item in dataclasses.fields(PrepareArguments)]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"recipe {source}: unknown key {key!r}{hint}")
    base = Path(base_dir) if base_dir is not None else None
    for key in ("visual_tokenizer", "text_model_name_or_path"):
        if isinstance(values.get(key), str):
            values[key] = find_input(values[key], base)
    if values.get("dataset") is not None:
        values["dataset"] = _dataset_with_base(values["dataset"], base)
    try:
        (args,) = HfArgumentParser(PrepareArguments).parse_dict(values, allow_extra_keys=False)
    except (ValueError, TypeError) as error:  # a missing field, or a check of __post_init__
        raise type(error)(f"recipe {source}: {error}") from None
    return args


def find_input(value: str, base_dir: Path | None) -> str:
    """An input path as a recipe writes it, looked for where ``resolve_recipe_path`` looks (absolute, under
    the working directory, or under the recipe's folder or one of its parents). Files and folders alike; a
    value found nowhere is kept (a Hub id, or a path whose absence the step reports)."""
    path = os.path.expanduser(value)
    base = _found_under(path, base_dir)
    return str(base / path) if base is not None else path


def _found_under(path: str, base_dir: Path | None) -> Path | None:
    """The first of the recipe's search folders where ``path`` (or a glob) exists."""
    return next((base for base in recipe_search_folders(base_dir) if glob.glob(str(base / path))), None)


def _dataset_with_base(value: Any, base_dir: Path | None) -> Any:
    """A dataset spec with its relative paths made absolute against the folder its main path is found under
    (see :func:`find_input`); the working directory when it is found nowhere (the loader reports it)."""
    spec = parse_dataset_spec(value)
    if spec.demo is not None:
        return value
    main = spec.path or spec.eval_path or spec.data_files[0]
    return resolve_spec_paths(value, _found_under(os.path.expanduser(main), base_dir) or Path.cwd())


# --- samples ----------------------------------------------------------------------------------------


class SampleBuilder:
    """Rows of the sample schema → the ``(kind, sample)`` chats they teach (see the module docstring)."""

    def __init__(self, args: PrepareArguments) -> None:
        self.args = args

    def prompt(self, caption: str) -> str:
        return self.args.prompt_template.format(caption=caption.strip())

    def answer(self, caption: str) -> str:
        # "{caption}." must not turn "A red circle." into "A red circle.."
        return self.args.answer_template.format(caption=caption.strip().rstrip("."))

    def __call__(
        self, segments: Sequence[Mapping[str, Any]], rng: random.Random, train: bool
    ) -> list[tuple[str, dict]]:
        kind = row_kind(segments)
        if kind != PAIR:
            return [(kind, {"segments": list(segments)})]
        (image,) = (segment for segment in segments if segment["type"] == IMAGE)
        (caption,) = (segment["text"] for segment in segments if segment["type"] == TEXT)
        fields = {name: image.get(name) for name in ("image", "image_token_ids", "image_grid")}
        generation = generation_sample(self.prompt(caption), fields)
        dropped = train and rng.random() < self.args.condition_dropout
        question = rng.choice(self.args.questions)
        return [
            (UNCONDITIONAL, drop_text(generation)) if dropped else (GENERATION, generation),
            (UNDERSTANDING, understanding_sample(question, self.answer(caption), fields)),
        ]

    def texts(self, segments: Sequence[Mapping[str, Any]]) -> list[str]:
        """The texts the row's chats hold (for a text tokenizer learned from them)."""
        if row_kind(segments) != PAIR:
            return [segment["text"] for segment in segments if segment["type"] == TEXT and segment["text"]]
        (caption,) = (segment["text"] for segment in segments if segment["type"] == TEXT)
        return [self.prompt(caption), self.answer(caption)]


# --- scanning the encoded rows ----------------------------------------------------------------------


@dataclass
class SplitScan:
    """What one pass over a split's encoded rows (their layout only, no token ids) tells."""

    rows: int = 0
    kept: list[int] = field(default_factory=list)  # rows whose image grids fit the vocabulary
    grids: Counter = field(default_factory=Counter)  # (h, w) of every kept image
    grid_too_large: int = 0
    texts: list[str] = field(default_factory=list)  # every text its chats hold


def row_layouts(dataset: datasets.Dataset) -> Iterator[list[dict[str, Any]]]:
    """Each row's segments with ``LAYOUT_FIELDS`` only, read as Arrow (token ids are never converted)."""
    rows = dataset.select_columns(["segments"]).with_format("arrow")
    for batch in rows.iter(batch_size=ARROW_BATCH_ROWS):
        segments = batch.column("segments").combine_chunks()
        values = pyarrow.compute.list_flatten(segments)
        columns = {name: pyarrow.compute.struct_field(values, name).to_pylist() for name in LAYOUT_FIELDS}
        offsets = segments.offsets.to_numpy()
        offsets = offsets - offsets[0]
        for start, end in zip(offsets[:-1], offsets[1:]):
            yield [{name: columns[name][index] for name in LAYOUT_FIELDS} for index in range(start, end)]


def scan_split(dataset: datasets.Dataset, builder: SampleBuilder, max_grid: int) -> SplitScan:
    scan = SplitScan(rows=len(dataset))
    for index, segments in enumerate(row_layouts(dataset)):
        grids = [tuple(s["image_grid"]) for s in segments if s["type"] == IMAGE]
        if any(max(grid) > max_grid for grid in grids):
            scan.grid_too_large += 1
            continue
        scan.kept.append(index)
        scan.grids.update(grids)
        scan.texts.extend(builder.texts(segments))
    return scan


# --- the steps --------------------------------------------------------------------------------------


def prepare(args: PrepareArguments) -> dict[str, Any]:
    """Run every step that has no output yet; write and return the summary (``prepare.json``)."""
    return Preparation(args).run()


class Preparation:
    """The steps of one ``prepare`` run; inputs are loaded only when a step needs them."""

    def __init__(self, args: PrepareArguments) -> None:
        self.args = args
        self.output = Path(args.output_dir)
        self.builder = SampleBuilder(args)
        self.loading_bad_records = BadRecords()
        self.encoding_bad_records = {split: BadRecords() for split in SPLITS}

    def run(self) -> dict[str, Any]:
        # 1. The output folder: refused if made with other arguments; leftovers of a killed run removed.
        self._start()
        # 2. The initial model and its processor (the data are encoded first, when this step runs).
        init = run_step(self.output / "init", self.build_init, INIT_FILES)
        processor = UniMMProcessor.from_pretrained(self.output / "init")
        # 3. The token tables (no eval table when the data hold no eval split).
        tables: dict[str, dict[str, Any] | None] = {}
        for split in SPLITS:
            if not (self.output / split).exists() and self.sources[split] is None:
                tables[split] = None
                continue
            build = functools.partial(
                self.build_table, split, processor=processor, max_positions=init["max_position_embeddings"]
            )
            tables[split] = run_step(self.output / split, build)
        # 4. The summary.
        summary = {"arguments": dataclasses.asdict(self.args), "init": init, "tables": tables}
        atomic_write(
            self.output / SUMMARY_FILE, lambda path: path.write_text(json.dumps(summary, indent=2) + "\n")
        )
        logger.info("prepared %s: %s", self.output, _table_line(tables))
        return summary

    def _start(self) -> None:
        if self.args.overwrite_output_dir and self.output.exists():
            logger.info("overwrite_output_dir: removing %s", self.output)
            shutil.rmtree(self.output)
        self.output.mkdir(parents=True, exist_ok=True)
        for leftover in self.output.glob(f".*{TEMPORARY_MARK}*"):
            logger.info("removing %s, left by an interrupted run", leftover)
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        self._record_arguments()

    def _record_arguments(self) -> None:
        """``arguments.json``: while an output of an earlier run is kept, a run with other arguments is
        refused (it would mix the two)."""
        recorded = json.loads(json.dumps(self.args.recorded()))  # as JSON reads it back (tuples as lists)
        path = self.output / ARGUMENTS_FILE
        kept = any((self.output / name).exists() for name in (*STEP_FOLDERS, CODES_FOLDER))
        if path.exists() and kept:
            previous = json.loads(path.read_text())
            changed = sorted(
                name for name in recorded.keys() | previous.keys() if recorded.get(name) != previous.get(name)
            )
            if changed:
                raise ValueError(
                    f"{self.output} was prepared with other arguments ({', '.join(changed)} differ, see "
                    f"{ARGUMENTS_FILE}): set overwrite_output_dir=true or choose another output_dir"
                )
            return
        atomic_write(path, lambda temporary: temporary.write_text(json.dumps(recorded, indent=2) + "\n"))

    # -- inputs, loaded on first use --------------------------------------------------------------

    @cached_property
    def visual_tokenizer(self) -> tuple[DualCodebookTokenizer, DualCodebookImageProcessor]:
        return load_visual_tokenizer(self.args)

    @cached_property
    def sources(self) -> dict[str, datasets.Dataset | None]:
        side = self.args.image_size or self.visual_tokenizer[0].config.image_size
        return load_splits(self.args, side, self.loading_bad_records)

    @cached_property
    def encoded(self) -> dict[str, datasets.Dataset]:
        vq_model, image_processor = self.visual_tokenizer
        return {
            split: pretokenize_images(
                dataset,
                vq_model,
                image_processor,
                self.output / CODES_FOLDER / split,
                rows_per_shard=self.args.rows_per_shard,
                batch_size=self.args.encode_batch_size,
                bad_records=self.encoding_bad_records[split],
            )  # fmt: skip
            for split, dataset in self.sources.items()
            if dataset is not None
        }

    @cached_property
    def scans(self) -> dict[str, SplitScan]:
        scans = {
            split: scan_split(rows, self.builder, self.args.max_grid) for split, rows in self.encoded.items()
        }
        for split, scan in scans.items():
            if scan.grid_too_large:
                logger.warning(
                    "%s: %d of %d rows hold an image larger than max_grid=%d codes per side and are left out",
                    split, scan.grid_too_large, scan.rows, self.args.max_grid,
                )  # fmt: skip
        if not scans[TRAIN_SPLIT].kept:
            scan = _scan_line(scans[TRAIN_SPLIT], self.args.max_grid)
            raise ValueError(f"the training data has no usable rows ({scan})")
        return scans

    # -- step: init -------------------------------------------------------------------------------

    def build_init(self, folder: Path) -> dict[str, Any]:
        """The unified model and its processor, saved to ``folder``; returns the step's record."""
        args = self.args
        vq_model, image_processor = self.visual_tokenizer
        corpus = [*args.questions, *(text for scan in self.scans.values() for text in scan.texts)]
        text_model, text_tokenizer = load_text_model(args, corpus)
        unknown = check_unknown_tokens(args, text_tokenizer, corpus)
        if args.text_replay_fraction:  # before the vocabulary grows: the replies are the untouched LM's own
            replay_chats(
                text_model.eval(), text_tokenizer, self.output / REPLAY_FILE, args.text_replay_max_new_tokens
            )
        grid = self._default_grid(vq_model)
        torch.manual_seed(args.seed)
        llm = UniMMForCausalLM.from_text_model(
            text_model, codebook_size=vq_model.config.codebook_size, max_grid_height=args.max_grid,
            max_grid_width=args.max_grid, default_grid_height=grid[0], default_grid_width=grid[1],
            image_loss_weight=args.image_loss_weight, codebook_vectors=vq_model.get_codebook_vectors(),
            seed=args.seed,
        )  # fmt: skip
        processor = UniMMProcessor.from_config(llm.config, text_tokenizer, image_processor)
        check_processor(processor)
        stop_at_end_of_turn(llm, text_tokenizer)
        llm.save_pretrained(folder)
        processor.save_pretrained(folder)
        logger.info(
            "init model: %.2fM parameters, text vocabulary %d (%d tokens), default grid %s",
            llm.num_parameters() / 1e6, llm.vocabulary.text_vocab_size, len(text_tokenizer), grid,
        )  # fmt: skip
        return {
            "text_vocab_size": llm.vocabulary.text_vocab_size,
            "text_tokenizer": args.text_tokenizer
            if args.backbone is not None
            else args.text_model_name_or_path,
            "text_tokenizer_size": len(text_tokenizer),
            "vocab_size": llm.config.vocab_size,
            "max_position_embeddings": getattr(llm.config.text_config, "max_position_embeddings", None),
            "default_grid": list(grid),
            "unknown_text_tokens": unknown.to_dict(),
        }

    def _default_grid(self, vq_model: DualCodebookTokenizer) -> tuple[int, int]:
        """The most common grid of the training images (the grid generation uses when none is asked)."""
        grids = self.scans[TRAIN_SPLIT].grids
        if grids:
            return grids.most_common(1)[0][0]
        side = vq_model.config.image_size // vq_model.config.downsample_factor
        return side, side

    # -- step: tables -----------------------------------------------------------------------------

    def build_table(
        self, split: str, folder: Path, processor: UniMMProcessor, max_positions: int | None
    ) -> dict[str, Any]:
        """The token table of one split (shuffled), saved to ``folder``; returns the step's record."""
        table, too_long = self._sequences(split, processor, max_positions)
        replay = self._replay_rows(split, len(table), processor)
        if replay is not None:
            table = datasets.concatenate_datasets([table, replay])
        table = table.shuffle(seed=self.args.seed, keep_in_memory=True).flatten_indices(keep_in_memory=True)
        table.save_to_disk(str(folder))
        record = {**table_record(table, processor), "too_long": too_long, **self._source_record(split)}
        logger.info("%s: %s", split, _kinds_line(record))
        return record

    def _sequences(
        self, split: str, processor: UniMMProcessor, max_positions: int | None
    ) -> tuple[datasets.Dataset, dict[str, int]]:
        """The split's usable rows as token rows (two per pair); those longer than ``max_positions`` (the
        LM's) left out and counted per kind."""
        args, scan = self.args, self.scans[split]
        rows = self.encoded[split].select(scan.kept, keep_in_memory=True)
        options = {
            "builder": self.builder,
            "processor": processor,
            "train": split == "train",
            "seed": args.seed,
        }
        # In memory: the table is saved to the output folder, not to a cache beside the data. A fingerprint
        # of our own spares `datasets` hashing the processor.
        table = rows.map(
            tokenize_rows, batched=True, batch_size=MAP_BATCH_ROWS, with_indices=True, fn_kwargs=options,
            remove_columns=rows.column_names, features=TOKEN_FEATURES, keep_in_memory=True,
            new_fingerprint=f"prepare-{split}-{args.seed}", desc=f"{split} sequences",
        )  # fmt: skip
        table, too_long = drop_too_long(table, max_positions, split)
        if not len(table):
            counts = f"{_scan_line(scan, args.max_grid)}, {sum(too_long.values())} too long"
            raise ValueError(f"{split}: no usable rows ({counts})")
        return table, too_long

    def _source_record(self, split: str) -> dict[str, Any]:
        """Where a split's rows went before tokenization: read, skipped as bad, left out for their grid."""
        bad_records = {
            "loading": _tally(self.loading_bad_records),
            "encoding": _tally(self.encoding_bad_records[split]),
        }
        source_rows, grid_too_large = len(self.sources[split]), self.scans[split].grid_too_large
        return {"source_rows": source_rows, "grid_too_large": grid_too_large, "bad_records": bad_records}

    def _replay_rows(
        self, split: str, multimodal_rows: int, processor: UniMMProcessor
    ) -> datasets.Dataset | None:
        """Text-only chats of the pretrained LM: a ``text_replay_fraction`` share of the train table (the
        chats cycled), and each held-out chat once in eval."""
        fraction = self.args.text_replay_fraction
        if not fraction:
            return None
        chats = load_text_replay(self.output / REPLAY_FILE)
        chats = random.Random(self.args.seed).sample(chats, len(chats))
        held_out = max(1, len(chats) // REPLAY_EVAL_SHARE)
        chats = chats[held_out:] if split == "train" else chats[:held_out]
        count = round(multimodal_rows * fraction / (1 - fraction)) if split == "train" else len(chats)
        rows = [
            processor.tokenize_sample(text_chat_sample(chat["question"], chat["answer"])) for chat in chats
        ]
        logger.info("%s: %d text replay sequences from %d chats", split, count, len(rows))
        columns = {"input_ids": [], "labels": [], "kind": []}
        for index in range(count):
            row = rows[index % len(rows)]
            columns["input_ids"].append(row["input_ids"])
            columns["labels"].append(row["labels"])
            columns["kind"].append(TEXT_REPLAY)
        return datasets.Dataset.from_dict(columns, features=TOKEN_FEATURES)


def tokenize_rows(
    batch: dict[str, list],
    indices: list[int],
    builder: SampleBuilder,
    processor: UniMMProcessor,
    train: bool,
    seed: int,
) -> dict[str, list]:
    """``datasets.map`` function: encoded rows → token rows (two per pair). Each row draws its dropout and
    question from its own generator, so the table does not depend on batching."""
    columns: dict[str, list] = {"input_ids": [], "labels": [], "kind": []}
    for segments, index in zip(batch["segments"], indices):
        rng = random.Random(f"{seed}:{'train' if train else 'eval'}:{index}")
        for kind, sample in builder(segments, rng, train):
            tokens = processor.tokenize_sample(sample)
            columns["input_ids"].append(tokens["input_ids"])
            columns["labels"].append(tokens["labels"])
            columns["kind"].append(kind)
    return columns


def drop_too_long(
    table: datasets.Dataset, max_positions: int | None, split: str
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Rows the LM cannot hold (longer than its ``max_position_embeddings``) left out; counted per kind."""
    if max_positions is None:
        return table, {}
    lengths = pyarrow.compute.list_value_length(table.data.column("input_ids")).to_numpy()
    too_long = lengths > max_positions
    if not too_long.any():
        return table, {}
    counts = Counter(np.asarray(table["kind"])[too_long].tolist())
    logger.warning(
        "%s: %d sequences are longer than the LM's %d positions (longest %d) and are left out: %s",
        split, int(too_long.sum()), max_positions, int(lengths.max()), dict(counts),
    )  # fmt: skip
    return table.select(np.flatnonzero(~too_long), keep_in_memory=True), dict(counts)


def table_record(table: datasets.Dataset, processor: UniMMProcessor) -> dict[str, Any]:
    """Rows per kind, the longest sequence and the (unknown) text tokens of a token table."""
    ids = table.data.column("input_ids")
    flat = pyarrow.compute.list_flatten(ids)
    unknown_id = unknown_token_id(processor.tokenizer)
    return {
        "rows": len(table),
        "rows_per_kind": dict(sorted(Counter(table["kind"]).items())),
        "longest": int(pyarrow.compute.max(pyarrow.compute.list_value_length(ids)).as_py()),
        "text_tokens": _count(pyarrow.compute.less(flat, processor.vocabulary.text_vocab_size)),
        "unknown_text_tokens": 0 if unknown_id is None else _count(pyarrow.compute.equal(flat, unknown_id)),
    }


def _count(mask: pyarrow.Array) -> int:
    return int(pyarrow.compute.sum(mask).as_py() or 0)  # a sum over no rows is null


def run_step(
    folder: Path, build: Callable[[Path], dict[str, Any]], required: Sequence[str] = ()
) -> dict[str, Any]:
    """``build(temporary folder)`` renamed to ``folder`` when it returns, its record saved inside as
    ``prepare_step.json``; skipped (the saved record returned) when ``folder`` exists."""
    if folder.exists():
        missing = [name for name in (*required, STEP_FILE) if not (folder / name).exists()]
        if missing:
            raise ValueError(f"{folder} exists but lacks {missing}: it was not written by prepare; remove it")
        logger.info("step %s: done already (%s)", folder.name, folder)
        return json.loads((folder / STEP_FILE).read_text())
    temporary = folder.with_name(f".{folder.name}{TEMPORARY_MARK}{os.getpid()}")
    record = build(temporary)
    (temporary / STEP_FILE).write_text(json.dumps(record, indent=2) + "\n")
    os.replace(temporary, folder)
    logger.info("step %s: written to %s", folder.name, folder)
    return record


# --- loading ----------------------------------------------------------------------------------------


def load_visual_tokenizer(args: PrepareArguments) -> tuple[DualCodebookTokenizer, DualCodebookImageProcessor]:
    """The frozen visual tokenizer and the image processor of its folder, resized as the arguments ask."""
    folder = Path(args.visual_tokenizer)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"visual_tokenizer {args.visual_tokenizer!r}: no trained tokenizer folder there"
        )
    vq_model = DualCodebookTokenizer.from_pretrained(folder).to(process_state().device).eval()
    size = _processor_size(args, vq_model.config.image_size)
    overrides = {"size": size} if size is not None else {}
    if (folder / "preprocessor_config.json").is_file():
        image_processor = DualCodebookImageProcessor.from_pretrained(folder, **overrides)
    else:  # a tokenizer saved without its processor: the one its config implies
        image_processor = DualCodebookImageProcessor.from_tokenizer_config(vq_model.config, **overrides)
    return vq_model, image_processor


def _processor_size(args: PrepareArguments, trained_side: int) -> dict[str, int] | None:
    """The images' size: the shortest edge (aspect ratio kept), a square, or ``None`` (as saved)."""
    if args.keep_aspect_ratio:
        return {"shortest_edge": args.image_size or trained_side}
    if args.image_size:
        return {"height": args.image_size, "width": args.image_size}
    return None


def load_splits(
    args: PrepareArguments, image_size: int, bad_records: BadRecords
) -> dict[str, datasets.Dataset | None]:
    """``{"train", "eval"}`` of the spec: its own eval split, else ``eval_fraction`` of train held out (at
    most ``max_eval_samples``); each cut to its first ``max_*_samples`` rows. ``image_size``: the side of
    the demo datasets' images."""
    spec = parse_dataset_spec(args.dataset, random_access=True)
    loaded = load_dataset_spec(spec, image_size=image_size, cache_dir=args.cache_dir, bad_records=bad_records)
    train, held_out = loaded[TRAIN_SPLIT], loaded.get(EVAL_SPLIT)
    if not len(train):
        raise ValueError(f"dataset {spec.to_value()!r} has no usable rows: {bad_records.report()}")
    train, held_out = split_for_eval(
        train, held_out, args.eval_fraction, args.seed, args.max_train_samples, args.max_eval_samples
    )
    return {"train": train, "eval": held_out}


def load_text_model(args: PrepareArguments, corpus: Sequence[str]) -> tuple[Any, Any]:
    """The text LM and its tokenizer: pretrained, or from ``backbone`` with a tokenizer learned from
    ``corpus`` (every text the model will see)."""
    if args.text_model_name_or_path is not None:
        text_tokenizer = AutoTokenizer.from_pretrained(args.text_model_name_or_path)
        if args.chat_template is not None:
            text_tokenizer.chat_template = args.chat_template
        if text_tokenizer.chat_template is None:
            raise ValueError(
                f"the tokenizer of {args.text_model_name_or_path} has no chat template: set chat_template"
            )
        return AutoModelForCausalLM.from_pretrained(args.text_model_name_or_path), text_tokenizer
    template = args.chat_template or CHAT_TEMPLATE
    if args.text_tokenizer == BPE:
        text_tokenizer = build_bpe_tokenizer(
            corpus, args.bpe_vocab_size, args.text_tokenizer_min_frequency, template
        )
    else:
        text_tokenizer = build_word_level_tokenizer(corpus, args.text_tokenizer_min_frequency, template)
    backbone = dict(args.backbone)
    multiple = args.text_vocab_multiple
    text_config = AutoConfig.for_model(
        backbone.pop("model_type"), vocab_size=-(-len(text_tokenizer) // multiple) * multiple,
        pad_token_id=text_tokenizer.pad_token_id, bos_token_id=text_tokenizer.bos_token_id,
        eos_token_id=text_tokenizer.eos_token_id, **backbone,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    return AutoModelForCausalLM.from_config(text_config), text_tokenizer


def check_unknown_tokens(args: PrepareArguments, text_tokenizer: Any, corpus: Sequence[str]) -> UnknownTokens:
    """Unknown tokens of the corpus: an error above ``max_unknown_rate`` for a tokenizer learned here (it
    saw every text), a warning for a pretrained one."""
    unknown = measure_unknown_tokens(text_tokenizer, corpus)
    if not unknown.count:
        return unknown
    message = (
        f"{unknown.count} of {unknown.total} text tokens ({unknown.rate:.2%}) are unknown to the text "
        f"tokenizer, e.g. {unknown.examples}"
    )
    if args.backbone is not None and unknown.rate > args.max_unknown_rate:
        raise ValueError(
            f"{message}: more than max_unknown_rate={args.max_unknown_rate:.2%} (lower "
            "text_tokenizer_min_frequency, or use text_tokenizer: bpe)"
        )
    logger.warning("%s", message)
    return unknown


def check_processor(processor: UniMMProcessor) -> None:
    """Fail before anything is saved when the chat template cannot mark turns (see UniMMProcessor)."""
    image = {"image_token_ids": [0], "image_grid": [1, 1]}
    processor.tokenize_sample(understanding_sample("a question?", "an answer.", image))


def replay_chats(
    text_model: Any, text_tokenizer: Any, path: Path, max_new_tokens: int
) -> list[dict[str, str]]:
    """The pretrained LM's own replies to the replay questions, cached in ``path`` (generating them takes
    minutes)."""
    from unimm.evaluation.text_questions import load_text_questions

    if path.exists():
        chats = load_text_replay(path)
        logger.info("text replay: %d chats from %s", len(chats), path)
    else:
        evaluation = [question.question for question in load_text_questions()]
        chats = generate_text_replay(text_model, text_tokenizer, replay_questions(evaluation), max_new_tokens)
        save_text_replay(chats, path)
    if len(chats) < 2:
        raise ValueError(f"text replay: {len(chats)} usable chats in {path}; need at least 2")
    return chats


# --- reporting --------------------------------------------------------------------------------------


def _tally(bad_records: BadRecords) -> dict[str, Any]:
    return {"counts": dict(bad_records.counts), "examples": bad_records.examples}


def _scan_line(scan: SplitScan, max_grid: int) -> str:
    return f"{scan.rows} rows, {scan.grid_too_large} with images over max_grid={max_grid}"


def _kinds_line(record: dict[str, Any]) -> str:
    kinds = ", ".join(f"{count} {kind}" for kind, count in record["rows_per_kind"].items())
    return f"{record['rows']} sequences ({kinds}), longest {record['longest']} tokens"


def _table_line(tables: Mapping[str, dict[str, Any] | None]) -> str:
    return "; ".join(f"{split} {record['rows']} rows" for split, record in tables.items() if record)


__all__ = ["PrepareArguments", "SampleBuilder", "load_prepare_recipe", "parse_prepare_recipe", "prepare"]
