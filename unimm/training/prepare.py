"""``unimm prepare``: the LLM stage's starting point from any dataset, visual tokenizer and base LM.

    unimm prepare recipes/prepare/tiny.yaml [key=value ...]

Writes, under ``output_dir``:

- ``codes/<split>/``  the images' token ids (``unimm.data.pretokenize``: sharded, resumable, bad images
  skipped and counted); ``codes/<split>-derived/`` those of the images skills derive (edits, compositions);
- ``init/``           the LLM's initial folder: ``UniMMForCausalLM`` (the base LM with the image vocabulary,
  code rows from the codebook) and its ``UniMMProcessor``; the LLM stage's ``model_name_or_path``;
- ``train/``, ``eval/``  token tables (``input_ids``, ``labels`` with -100 where no loss is taken, ``kind``):
  the LLM stage's ``train_dataset`` / ``eval_dataset``;
- ``prepare.json``    rows per kind and split, sequence lengths, bad records, unknown text tokens, and how
  the ``probe_prompts`` tokenize.

The data are one ``dataset`` spec or a list of ``sources`` (``unimm.data.sources``: each a spec with a label
column, a naming ``subject`` and ``repeats``). What each row teaches follows its layout (``row_kind``): an
image-caption pair gives two chats, a prompt → image (drawn from ``prompt_templates``; a ``condition_dropout``
share with the text dropped, for classifier-free guidance) and image + question → the answer naming it
(``answer_template``), or in training as many of each as ``chats_per_pair`` says; a conversation is trained on
its assistant turns; an interleaved document (or an image or text alone) on every token. ``skills`` add
multi-turn conversations, interleaved answers, edits and wide or tall compositions, planned from the labelled
pairs (``unimm.data.skills``).

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
import string
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image
import pyarrow
import pyarrow.compute
import torch
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
)

from unimm.data.bad_records import BadRecords
from unimm.data.pretokenize import TEMPORARY_MARK, atomic_write, pretokenize_images, process_state
from unimm.data.schema import IMAGE, TEXT, drop_text, image_segment, open_image, sample_features
from unimm.data.skills import (
    PIXEL_EDITS,
    ImageRef,
    PlannedChat,
    SkillPlan,
    SkillPlanner,
    SkillSettings,
    Thing,
    Wording,
    compose,
    edit_pixels,
    subject_template,
    thing_fields,
)
from unimm.data.sources import SourceSpec, load_sources, parse_source, parse_sources
from unimm.data.spec import parse_dataset_spec, resolve_spec_paths
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
from unimm.llm.processing_unimm import IGNORE_INDEX
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

# The kinds of sequences rows become (the tables' `kind` column); row layouts are unimm.data.templates', the
# skills' kinds unimm.data.skills'.
GENERATION, UNCONDITIONAL, UNDERSTANDING, TEXT_REPLAY = (
    "generation",
    "unconditional_generation",
    "understanding",
    "text_replay",
)
# chats_per_pair's default: a labelled pair gives one chat per direction.
ONE_CHAT_EACH = {GENERATION: 1.0, UNDERSTANDING: 1.0}
WORD_LEVEL, BPE = "word_level", "bpe"
TEXT_TOKENIZERS = (WORD_LEVEL, BPE)
SPLITS = ("train", "eval")  # output folders; the spec's held-out split ("test") becomes "eval"
STEP_FOLDERS = ("init", *SPLITS)
CODES_FOLDER, DERIVED_SUFFIX = "codes", "-derived"
SUMMARY_FILE, ARGUMENTS_FILE, STEP_FILE = "prepare.json", "arguments.json", "prepare_step.json"
INIT_FILES = ("config.json", "processor_config.json")  # what a complete init/ holds (besides weights)
REPLAY_FILE = "text_replay.jsonl"
# Fields that change how the work is done, not what it produces: a rerun may change them.
UNRECORDED_FIELDS = ("encode_batch_size", "cache_dir", "overwrite_output_dir", "probe_prompts")
LAYOUT_FIELDS = ("type", "role", "text", "image_grid")
ROW_COLUMNS = ("source", "label", "source_row")  # read besides the layout (unimm.data.sources)
ARROW_BATCH_ROWS = 1000
MAP_BATCH_ROWS = 256
SKILL_CHUNK_ROWS = 2000  # skill chats tokenized per in-memory Arrow chunk
CACHED_LAYOUTS = 20000  # chat layouts ChatTokens keeps (a few KB each)
TOKEN_FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "kind": datasets.Value("string"),
    }
)
DERIVED_FEATURES = sample_features(derived=datasets.Value("int64"))
REPLAY_EVAL_SHARE = 20  # one replayed chat in 20 is held out for evaluation
PROBE_EXAMPLES = 10  # words of the probe prompts shown per problem


@dataclass
class PrepareArguments:
    """``recipes/prepare/*.yaml``: the data, the visual tokenizer, the base LM and how sequences are built."""

    visual_tokenizer: str = field(metadata={"help": "a trained DualCodebookTokenizer folder (its export)"})
    output_dir: str = field(metadata={"help": "writes codes/, init/, train/, eval/ and prepare.json"})
    dataset: str | dict | None = field(
        default=None, metadata={"help": "a dataset spec (unimm.data.spec): a demo name, a path or a mapping"}
    )
    sources: list[dict] | None = field(
        default=None,
        metadata={
            "help": "or several: [{dataset, label_column, label_names, subject, repeats, ...}] "
            "(unimm.data.sources)"
        },
    )
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
    prompt_templates: list[str] = field(
        default_factory=lambda: ["{caption}"],
        metadata={
            "help": "the user turn that asks for a pair's image, one drawn per row: {caption}, {subject}, "
            "{label}, {article}, and [a|b] alternatives (unimm.data.skills)"
        },
    )
    questions: list[str] = field(
        default_factory=lambda: list(DEFAULT_QUESTIONS),
        metadata={"help": "asked about a pair's image, one drawn per row ([a|b] alternatives too)"},
    )
    answer_template: str = field(
        default="{subject}.",
        metadata={"help": "the answer naming an image (a field's final '.' is not doubled)"},
    )
    chats_per_pair: dict[str, float] = field(
        default_factory=lambda: dict(ONE_CHAT_EACH),
        metadata={
            "help": "chats a train pair gives per direction, {generation: n, understanding: n}: a fraction is "
            "a chance (0.5: every other pair), 0 leaves that direction out; each generation draws its own "
            "prompt"
        },
    )
    synonym_share: float = field(
        default=0.3,
        metadata={"help": "share of image prompts naming a row by one of its source's label_synonyms"},
    )
    upper_case_share: float = field(default=0.0, metadata={"help": "share of user turns in upper case"})
    capitalize_share: float = field(default=0.0, metadata={"help": "share of user turns capitalised"})
    skills: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "extra chats per labelled pair: {multi_turn, interleaved, edit, composition: share or "
            "{share, templates...}} (unimm.data.skills)"
        },
    )
    probe_prompts: list[str] = field(
        default_factory=list,
        metadata={"help": "wordings the data do not hold: prepare.json says how they tokenize"},
    )
    eval_fraction: float = field(
        default=0.05, metadata={"help": "held out when the spec has no eval split (0: no eval table)"}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "per source"})
    max_eval_samples: int | None = field(default=1000, metadata={"help": "per source"})
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
        if (self.dataset is None) == (self.sources is None):
            raise ValueError("set exactly one of dataset (one dataset spec) and sources (a list of them)")
        # A malformed spec, source or template fails with the recipe.
        if self.dataset is not None:
            parse_dataset_spec(self.dataset, random_access=True)  # its errors name `dataset`
            self.source_specs: list[SourceSpec] = [parse_source({"dataset": self.dataset}, "dataset")]
        else:
            self.source_specs = parse_sources(self.sources)
        self.subjects = [
            subject_template(source.subject, f"sources[{index}].subject")
            for index, source in enumerate(self.source_specs)
        ]
        if self.text_tokenizer not in TEXT_TOKENIZERS:
            raise ValueError(f"text_tokenizer must be one of {TEXT_TOKENIZERS}, got {self.text_tokenizer!r}")
        for name in (
            "condition_dropout",
            "text_replay_fraction",
            "eval_fraction",
            "max_unknown_rate",
            "synonym_share",
        ):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        self.chats_per_pair = {**ONE_CHAT_EACH, **(self.chats_per_pair or {})}
        for kind, share in self.chats_per_pair.items():
            if kind not in ONE_CHAT_EACH:
                raise ValueError(f"chats_per_pair: unknown direction {kind!r} (generation, understanding)")
            if isinstance(share, bool) or not isinstance(share, int | float) or share < 0:
                raise ValueError(f"chats_per_pair.{kind} must be a number >= 0, got {share!r}")
        if not any(self.chats_per_pair.values()):
            raise ValueError("chats_per_pair: a pair must give at least one chat")
        if self.upper_case_share + self.capitalize_share > 1.0:
            raise ValueError("upper_case_share + capitalize_share must be at most 1")
        for name in (
            "max_grid",
            "text_vocab_multiple",
            "encode_batch_size",
            "rows_per_shard",
            "bpe_vocab_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.prompt_templates, str):
            self.prompt_templates = [self.prompt_templates]
        if not self.questions:
            raise ValueError("questions must not be empty")
        self.wording = Wording.from_values(
            self.prompt_templates, self.questions, self.answer_template, self.upper_case_share,
            self.capitalize_share,
        )  # fmt: skip
        self.skill_settings = SkillSettings.from_value(self.skills)
        if self.text_replay_fraction and self.text_model_name_or_path is None:
            raise ValueError("text_replay_fraction needs text_model_name_or_path: it replays a pretrained LM")

    def recorded(self) -> dict[str, Any]:
        """The fields that decide the outputs (compared on a rerun)."""
        return {name: value for name, value in self.as_dict().items() if name not in UNRECORDED_FIELDS}

    def as_dict(self) -> dict[str, Any]:
        """The recipe's fields (not what ``__post_init__`` derives from them)."""
        return {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}


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
    if isinstance(values.get("sources"), list):
        values["sources"] = [
            {**item, "dataset": _dataset_with_base(item["dataset"], base)}
            if isinstance(item, Mapping) and item.get("dataset") is not None
            else item
            for item in values["sources"]
        ]
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
        self.args, self.wording = args, args.wording

    def fields(self, caption: str, source: int = 0, label: str | None = None) -> dict[str, str]:
        """The template fields of a pair row (``unimm.data.skills.thing_fields``)."""
        return thing_fields(caption, label, self.args.subjects[source])

    def prompt_fields(self, values: dict[str, str], source: int, rng: random.Random) -> dict[str, str]:
        """The fields an image prompt names the row by: now and then one of its label's synonyms ("handbag"
        for "bag"), so prompts generalise over names; the answer naming an image keeps the label."""
        synonyms = self.args.source_specs[source].label_synonyms.get(values["label"])
        if not synonyms or rng.random() >= self.args.synonym_share:
            return values
        return thing_fields(values["caption"], rng.choice(synonyms), self.args.subjects[source])

    def __call__(
        self,
        segments: Sequence[Mapping[str, Any]],
        rng: random.Random,
        train: bool,
        source: int = 0,
        label: str | None = None,
    ) -> list[tuple[str, dict]]:
        kind = row_kind(segments)
        if kind != PAIR:
            return [(kind, {"segments": list(segments)})]
        (image,) = (segment for segment in segments if segment["type"] == IMAGE)
        (caption,) = (segment["text"] for segment in segments if segment["type"] == TEXT)
        values = self.fields(caption, source, label)
        image_fields = {name: image.get(name) for name in ("image", "image_token_ids", "image_grid")}
        chats = []
        for _ in range(self._count(GENERATION, rng, train)):  # each with its own wording and dropout
            generation = generation_sample(
                self.wording.prompt(self.prompt_fields(values, source, rng), rng), image_fields
            )
            dropped = train and rng.random() < self.args.condition_dropout
            chats.append((UNCONDITIONAL, drop_text(generation)) if dropped else (GENERATION, generation))
        for _ in range(self._count(UNDERSTANDING, rng, train)):
            question = self.wording.question(rng)
            answer = self.wording.name(values, rng)
            chats.append((UNDERSTANDING, understanding_sample(question, answer, image_fields)))
        return chats

    def _count(self, kind: str, rng: random.Random, train: bool) -> int:
        """How many chats of ``kind`` a train pair gives: ``chats_per_pair``'s whole part, plus one with its
        fraction's probability (drawn only when there is a fraction, so whole counts draw nothing). A
        held-out pair gives one of each, so that the eval rows measure both directions whatever the mix."""
        if not train:
            return 1
        share = self.args.chats_per_pair[kind]
        whole = int(share)
        return whole + int(share > whole and rng.random() < share - whole)

    def texts(
        self,
        segments: Sequence[Mapping[str, Any]],
        rng: random.Random,
        source: int = 0,
        label: str | None = None,
    ) -> list[str]:
        """The texts the row's chats hold (for a text tokenizer learned from them)."""
        return [
            segment["text"]
            for _, sample in self(segments, rng, train=False, source=source, label=label)
            for segment in sample["segments"]
            if segment["type"] == TEXT and segment["text"]
        ]


# --- scanning the encoded rows ----------------------------------------------------------------------


@dataclass
class SplitScan:
    """What one pass over a split's encoded rows (their layout only, no token ids) tells."""

    rows: int = 0
    kept: list[int] = field(default_factory=list)  # rows whose image grids fit the vocabulary
    kept_sources: list[int] = field(default_factory=list)  # the source of each kept row
    grids: Counter = field(default_factory=Counter)  # (h, w) of every kept image
    grid_too_large: int = 0
    texts: list[str] = field(default_factory=list)  # every text its chats hold
    things: list[Thing] = field(default_factory=list)  # the kept pairs, as skills see them
    thing_source_rows: list[int] = field(default_factory=list)  # where each thing's pixels are


def row_layouts(dataset: datasets.Dataset) -> Iterator[tuple[list[dict[str, Any]], dict[str, Any]]]:
    """Each row's segments with ``LAYOUT_FIELDS`` only, and its ``ROW_COLUMNS``, read as Arrow (token ids
    are never converted)."""
    rows = dataset.select_columns(["segments", *ROW_COLUMNS]).with_format("arrow")
    for batch in rows.iter(batch_size=ARROW_BATCH_ROWS):
        segments = batch.column("segments").combine_chunks()
        values = pyarrow.compute.list_flatten(segments)
        columns = {name: pyarrow.compute.struct_field(values, name).to_pylist() for name in LAYOUT_FIELDS}
        metadata = {name: batch.column(name).to_pylist() for name in ROW_COLUMNS}
        offsets = segments.offsets.to_numpy()
        offsets = offsets - offsets[0]
        for row, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
            layout = [{name: columns[name][index] for name in LAYOUT_FIELDS} for index in range(start, end)]
            yield layout, {name: metadata[name][row] for name in ROW_COLUMNS}


def scan_split(dataset: datasets.Dataset, builder: SampleBuilder, max_grid: int, seed: str) -> SplitScan:
    scan = SplitScan(rows=len(dataset))
    for index, (segments, metadata) in enumerate(row_layouts(dataset)):
        grids = [tuple(s["image_grid"]) for s in segments if s["type"] == IMAGE]
        if any(max(grid) > max_grid for grid in grids):
            scan.grid_too_large += 1
            continue
        scan.kept.append(index)
        scan.kept_sources.append(metadata["source"])
        scan.grids.update(grids)
        rng = random.Random(f"{seed}:{index}")
        scan.texts.extend(builder.texts(segments, rng, metadata["source"], metadata["label"]))
        if row_kind(segments) == PAIR:
            (caption,) = (segment["text"] for segment in segments if segment["type"] == TEXT)
            fields = builder.fields(caption, metadata["source"], metadata["label"])
            key = metadata["label"] if metadata["label"] is not None else caption.strip()
            scan.things.append(Thing(index, metadata["source"], key, fields))
            scan.thing_source_rows.append(metadata["source_row"])
    return scan


def repeated(rows: Sequence[int], sources: Sequence[int], repeats: Sequence[int]) -> list[int]:
    """``rows`` once per pass, a row of source ``s`` in the first ``repeats[s]`` passes."""
    return [
        row for turn in range(max(repeats)) for row, source in zip(rows, sources) if repeats[source] > turn
    ]


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
        self.sources_record: list[dict[str, Any]] = []

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
        # 4. The summary, with how the probe prompts tokenize against what the train table holds.
        summary = {"arguments": self.args.as_dict(), "init": init, "tables": tables}
        if self.args.probe_prompts:
            summary["probe"] = probe_prompts(self.args.probe_prompts, processor, self.output / "train")
            logger.info("probe prompts: %s", _probe_line(summary["probe"]))
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
        """Every source's rows of each split in one table (``unimm.data.sources``)."""
        args = self.args
        splits, self.sources_record = load_sources(
            args.source_specs, image_size=args.image_size or self.visual_tokenizer[0].config.image_size,
            eval_fraction=args.eval_fraction, seed=args.seed, max_train_samples=args.max_train_samples,
            max_eval_samples=args.max_eval_samples, cache_dir=args.cache_dir, bad_records=self.loading_bad_records,
        )  # fmt: skip
        return splits

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
            split: scan_split(rows, self.builder, self.args.max_grid, f"{self.args.seed}:corpus:{split}")
            for split, rows in self.encoded.items()
        }
        for split, scan in scans.items():
            if scan.grid_too_large:
                logger.warning(
                    "%s: %d of %d rows hold an image larger than max_grid=%d codes per side and are left out",
                    split, scan.grid_too_large, scan.rows, self.args.max_grid,
                )  # fmt: skip
        if not scans["train"].kept:
            scan = _scan_line(scans["train"], self.args.max_grid)
            raise ValueError(f"the training data has no usable rows ({scan})")
        return scans

    def repeats(self, split: str) -> list[int]:
        """Passes over each source's rows: its ``repeats`` in training, one in evaluation."""
        return [source.repeats if split == "train" else 1 for source in self.args.source_specs]

    @cached_property
    def plans(self) -> dict[str, SkillPlan]:
        """The skill chats of each split, anchored on its labelled pairs (repeated as their sources are)."""
        settings, plans = self.args.skill_settings, {}
        if settings.composition.share:
            self._check_composition_grid()
        for split, scan in self.scans.items():
            planner = SkillPlanner(scan.things, settings, self.args.wording)
            things = range(len(scan.things))
            anchors = repeated(things, [thing.source for thing in scan.things], self.repeats(split))
            plans[split] = planner.plan(anchors, f"{self.args.seed}:{split}:skills")
            if settings.active():
                logger.info("%s: %d skill chats planned, %d derived images", split, len(plans[split].chats),
                            len(plans[split].derived))  # fmt: skip
        return plans

    def part_size(self) -> dict[str, int]:
        """The size each image of a composition is brought to: the processor's fixed size, or a square of
        its shortest edge (or of the tokenizer's side)."""
        vq_model, image_processor = self.visual_tokenizer
        size = image_processor.size
        if size is not None and getattr(size, "height", None) and getattr(size, "width", None):
            return {"height": size.height, "width": size.width}
        side = (
            getattr(size, "shortest_edge", None) if size is not None else None
        ) or vq_model.config.image_size
        return {"height": side, "width": side}

    def _check_composition_grid(self) -> None:
        factor = self.visual_tokenizer[0].config.downsample_factor
        part = self.part_size()
        largest = 2 * max(part["height"], part["width"]) // factor
        if largest > self.args.max_grid:
            raise ValueError(
                f"skills.composition: two {part['height']}x{part['width']} images in a row make a grid "
                f"{largest} codes long, more than max_grid={self.args.max_grid}: raise max_grid or leave "
                "composition out"
            )

    # -- step: init -------------------------------------------------------------------------------

    def build_init(self, folder: Path) -> dict[str, Any]:
        """The unified model and its processor, saved to ``folder``; returns the step's record."""
        args = self.args
        vq_model, image_processor = self.visual_tokenizer
        corpus = [
            *(_literal(text) for text in (*args.wording.fragments(), *args.skill_settings.fragments())),
            *(text for scan in self.scans.values() for text in scan.texts),
            *(text for plan in self.plans.values() for chat in plan.chats for text in chat.texts()),
        ]
        corpus = [text for text in corpus if text.strip()]
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
        grids = self.scans["train"].grids
        if grids:
            return grids.most_common(1)[0][0]
        side = vq_model.config.image_size // vq_model.config.downsample_factor
        return side, side

    # -- step: tables -----------------------------------------------------------------------------

    def build_table(
        self, split: str, folder: Path, processor: UniMMProcessor, max_positions: int | None
    ) -> dict[str, Any]:
        """The token table of one split (shuffled), saved to ``folder``; returns the step's record."""
        parts = [self._sequences(split, processor)]
        plan = self.plans[split]
        if plan.chats:
            parts.append(self._skill_sequences(split, processor))
        table = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        table, too_long = drop_too_long(table, max_positions, split)
        if not len(table):
            counts = f"{_scan_line(self.scans[split], self.args.max_grid)}, {sum(too_long.values())} too long"
            raise ValueError(f"{split}: no usable rows ({counts})")
        replay = self._replay_rows(split, len(table), processor)
        if replay is not None:
            table = datasets.concatenate_datasets([table, replay])
        table = table.shuffle(seed=self.args.seed, keep_in_memory=True).flatten_indices(keep_in_memory=True)
        table.save_to_disk(str(folder))
        record = {
            **table_record(table, processor), "too_long": too_long, **self._source_record(split),
            "skills": plan.variants(), "derived_images": len(plan.derived),
        }  # fmt: skip
        logger.info("%s: %s", split, _kinds_line(record))
        return record

    def _sequences(self, split: str, processor: UniMMProcessor) -> datasets.Dataset:
        """The split's usable rows as token rows (``chats_per_pair``), each source's rows ``repeats`` times."""
        args, scan = self.args, self.scans[split]
        positions = repeated(scan.kept, scan.kept_sources, self.repeats(split))
        rows = self.encoded[split].select(positions, keep_in_memory=True)
        options = {
            "builder": self.builder,
            "tokenize": ChatTokens(processor),
            "train": split == "train",
            "seed": args.seed,
        }
        # In memory: the table is saved to the output folder, not to a cache beside the data. A fingerprint
        # of our own spares `datasets` hashing the processor.
        return rows.map(
            tokenize_rows, batched=True, batch_size=MAP_BATCH_ROWS, with_indices=True, fn_kwargs=options,
            remove_columns=rows.column_names, features=TOKEN_FEATURES, keep_in_memory=True,
            new_fingerprint=f"prepare-{split}-{args.seed}", desc=f"{split} sequences",
        )  # fmt: skip

    def _skill_sequences(self, split: str, processor: UniMMProcessor) -> datasets.Dataset:
        """The split's planned skill chats as token rows, their images in place."""
        plan, scan = self.plans[split], self.scans[split]
        rows = FirstImages(self.encoded[split])
        derived = self.derived_images(split)

        def image(ref: ImageRef) -> tuple[np.ndarray, list[int]]:
            return derived[ref.index] if ref.derived else rows[scan.things[ref.index].row]

        chunks, columns, tokenize = [], _token_columns(), ChatTokens(processor)
        for chat in _progress(plan.chats, f"{split} skill sequences"):
            tokens = tokenize(resolve_chat(chat, image))
            columns["input_ids"].append(tokens["input_ids"])
            columns["labels"].append(tokens["labels"])
            columns["kind"].append(chat.kind)
            if len(columns["kind"]) == SKILL_CHUNK_ROWS:
                chunks.append(datasets.Dataset.from_dict(columns, features=TOKEN_FEATURES))
                columns = _token_columns()
        chunks.append(datasets.Dataset.from_dict(columns, features=TOKEN_FEATURES))
        return datasets.concatenate_datasets(chunks)

    def derived_images(self, split: str) -> DerivedCodes:
        """The codes of the images the split's skills derive, encoded once into ``codes/<split>-derived``."""
        plan, scan = self.plans[split], self.scans[split]
        if not plan.derived:
            return DerivedCodes({}, None)
        vq_model, image_processor = self.visual_tokenizer
        # Derived images are made at the size the model sees, which the encoding keeps (wide stays wide).
        as_they_are = type(image_processor)(**{**image_processor.to_dict(), "size": None})
        pixels = DerivedPixels(self.sources[split], image_processor, self.part_size(),
                               self.args.skill_settings.edit.darker_factor)  # fmt: skip
        chunks = []
        for start in range(0, len(plan.derived), SKILL_CHUNK_ROWS):
            batch = plan.derived[start : start + SKILL_CHUNK_ROWS]
            images = [
                pixels(image.op, [scan.thing_source_rows[thing] for thing in image.things]) for image in batch
            ]
            columns = {"segments": [[image_segment(image)] for image in images],
                       "derived": list(range(start, start + len(batch)))}  # fmt: skip
            chunks.append(datasets.Dataset.from_dict(columns, features=DERIVED_FEATURES))
        encoded = pretokenize_images(
            datasets.concatenate_datasets(chunks), vq_model, as_they_are,
            self.output / CODES_FOLDER / f"{split}{DERIVED_SUFFIX}", rows_per_shard=self.args.rows_per_shard,
            batch_size=self.args.encode_batch_size, bad_records=self.encoding_bad_records[split],
        )  # fmt: skip
        return DerivedCodes(dict(zip(encoded["derived"], range(len(encoded)))), FirstImages(encoded))

    def _source_record(self, split: str) -> dict[str, Any]:
        """Where a split's rows went before tokenization: read, skipped as bad, left out for their grid."""
        bad_records = {
            "loading": _tally(self.loading_bad_records),
            "encoding": _tally(self.encoding_bad_records[split]),
        }
        source_rows, grid_too_large = len(self.sources[split]), self.scans[split].grid_too_large
        sources = [
            {"name": item["name"], "rows": item["rows"][split], "repeats": self.repeats(split)[index]}
            for index, item in enumerate(self.sources_record)
        ]
        return {
            "source_rows": source_rows, "sources": sources, "grid_too_large": grid_too_large,
            "bad_records": bad_records,
        }  # fmt: skip

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
        columns = _token_columns()
        for index in range(count):
            row = rows[index % len(rows)]
            columns["input_ids"].append(row["input_ids"])
            columns["labels"].append(row["labels"])
            columns["kind"].append(TEXT_REPLAY)
        return datasets.Dataset.from_dict(columns, features=TOKEN_FEATURES)


def _token_columns() -> dict[str, list]:
    return {"input_ids": [], "labels": [], "kind": []}


def _progress(items: Sequence[Any], description: str) -> Iterator[Any]:
    return iter(tqdm(items, desc=description, leave=False))


def _literal(text: str) -> str:
    """A template fragment without its ``{field}`` names (their values are in the corpus already)."""
    return "".join(literal for literal, _, _, _ in string.Formatter().parse(text))


# --- images of the skills ---------------------------------------------------------------------------


class FirstImages:
    """The codes and grid of each row's first image in an encoded table, read from Arrow (the ids stay one
    numpy array: no Python list per row)."""

    def __init__(self, dataset: datasets.Dataset) -> None:
        segments = dataset.with_format("arrow")[:].column("segments").combine_chunks()
        values = pyarrow.compute.list_flatten(segments)
        parents = pyarrow.compute.list_parent_indices(segments).to_numpy()
        images = np.flatnonzero(
            pyarrow.compute.equal(pyarrow.compute.struct_field(values, "type"), IMAGE)
            .fill_null(False)
            .to_numpy(zero_copy_only=False)
        )
        rows, first = np.unique(parents[images], return_index=True)
        self.segment = np.full(len(dataset), -1, dtype=np.int64)
        self.segment[rows] = images[first]
        ids = pyarrow.compute.struct_field(values, "image_token_ids")
        self.offsets, self.ids = ids.offsets.to_numpy(), ids.values.to_numpy()
        self.grids = pyarrow.compute.struct_field(values, "image_grid")

    def __getitem__(self, row: int) -> tuple[np.ndarray, list[int]]:
        segment = int(self.segment[row])
        if segment < 0:
            raise ValueError(f"row {row} of the encoded table has no image")
        ids = self.ids[self.offsets[segment] : self.offsets[segment + 1]].copy()  # writable, for torch
        return ids, self.grids[segment].as_py()


@dataclass
class DerivedCodes:
    """Derived image index → ``(codes, grid)``; a derived image the encoding could not make is missing."""

    rows: dict[int, int]
    images: FirstImages | None

    def __getitem__(self, index: int) -> tuple[np.ndarray, list[int]]:
        if index not in self.rows or self.images is None:
            raise ValueError(f"derived image {index} was not encoded (see the bad records of prepare.json)")
        return self.images[self.rows[index]]


class DerivedPixels:
    """The pixels of a derived image, from the source rows' images as the model sees them (the image
    processor's resize, no normalisation), so that an edit is the exact transform of what it shows."""

    def __init__(
        self, sources: datasets.Dataset, image_processor: DualCodebookImageProcessor,
        part_size: dict[str, int], darker_factor: float,
    ) -> None:  # fmt: skip
        self.sources, self.image_processor = sources, image_processor
        self.part_size, self.darker_factor = part_size, darker_factor

    def view(self, source_row: int, size: dict[str, int] | None = None) -> np.ndarray:
        """``(H, W, C)`` uint8: the row's first image resized as the processor resizes it."""
        segment = next(s for s in self.sources[source_row]["segments"] if s["type"] == IMAGE)
        options = {} if size is None else {"size": size}
        values = self.image_processor(
            images=[open_image(segment["image"])],
            do_rescale=False,
            do_normalize=False,
            return_tensors=None,
            **options,
        )["pixel_values"][0]  # (C, H, W), 0..255
        return np.rint(np.asarray(values)).clip(0, 255).astype(np.uint8).transpose(1, 2, 0)

    def __call__(self, op: str, source_rows: Sequence[int]) -> PIL.Image.Image:
        if op in PIXEL_EDITS:
            pixels = edit_pixels(self.view(source_rows[0]), op, self.darker_factor)
        else:
            pixels = compose([self.view(row, self.part_size) for row in source_rows], op)
        return PIL.Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


class ChatTokens:
    """``processor.tokenize_sample`` for samples whose images are codes, remembered per layout: samples that
    differ only in their images' codes (the same texts, roles and grids) share one rendering of the chat
    template and the text tokenizer, and each image's tokens are put in its place. The result is the
    processor's, token for token; at most ``max_layouts`` layouts are kept (the least recently used go)."""

    def __init__(self, processor: UniMMProcessor, max_layouts: int = CACHED_LAYOUTS) -> None:
        self.processor, self.vocabulary, self.max_layouts = processor, processor.vocabulary, max_layouts
        self.layouts: OrderedDict[tuple, tuple[np.ndarray, np.ndarray, list[int]]] = OrderedDict()

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, list[int]]:
        segments = sample["segments"]
        images = [segment for segment in segments if segment["type"] == IMAGE]
        if any(
            segment.get("image_token_ids") is None or segment.get("image_grid") is None for segment in images
        ):
            return self.processor.tokenize_sample(dict(sample))  # pixels: the processor encodes them
        key = tuple(
            (segment["type"], segment.get("role") or "",
             segment.get("text") if segment["type"] == TEXT else tuple(segment["image_grid"]))
            for segment in segments
        )  # fmt: skip
        layout = self.layouts.get(key)
        if layout is None:
            layout = self._layout(segments)
            self.layouts[key] = layout
            if len(self.layouts) > self.max_layouts:
                self.layouts.popitem(last=False)
        else:
            self.layouts.move_to_end(key)
        template_ids, template_labels, starts = layout
        input_ids, labels = template_ids.copy(), template_labels.copy()
        for start, segment in zip(starts, images):
            height, width = segment["image_grid"]
            codes = torch.as_tensor(np.asarray(segment["image_token_ids"], dtype=np.int64)).view(
                height, width
            )
            tokens = self.vocabulary.image_to_token_ids(codes).numpy()
            stop = start + len(tokens)
            input_ids[start:stop] = tokens
            if labels[start] != IGNORE_INDEX:
                labels[start:stop] = tokens
        return {"input_ids": input_ids.tolist(), "labels": labels.tolist()}

    def _layout(self, segments: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """The sample rendered with code 0 in every image, and where each image's tokens start."""
        placeholder = [
            {**segment, "image_token_ids": [0] * (segment["image_grid"][0] * segment["image_grid"][1])}
            if segment["type"] == IMAGE
            else dict(segment)
            for segment in segments
        ]
        tokens = self.processor.tokenize_sample({"segments": placeholder})
        input_ids = np.asarray(tokens["input_ids"], dtype=np.int64)
        starts = np.flatnonzero(input_ids == self.vocabulary.boi_token_id).tolist()  # one per image, in order
        return input_ids, np.asarray(tokens["labels"], dtype=np.int64), starts


def resolve_chat(
    chat: PlannedChat, image: Callable[[ImageRef], tuple[np.ndarray, Sequence[int]]]
) -> dict[str, Any]:
    """A planned chat as a sample of the schema, each image reference replaced by its codes."""
    segments = []
    for role, content in chat.segments:
        if isinstance(content, ImageRef):
            ids, grid = image(content)
            segments.append({"type": IMAGE, "role": role, "image_token_ids": ids, "image_grid": list(grid)})
        else:
            segments.append({"type": TEXT, "role": role, "text": content})
    return {"segments": segments}


def tokenize_rows(
    batch: dict[str, list],
    indices: list[int],
    builder: SampleBuilder,
    tokenize: Callable[[dict], dict[str, list[int]]],
    train: bool,
    seed: int,
) -> dict[str, list]:
    """``datasets.map`` function: encoded rows → token rows (``chats_per_pair``). Each row draws its dropout and
    wording from its own generator, so the table does not depend on batching."""
    columns: dict[str, list] = _token_columns()
    for segments, source, label, index in zip(batch["segments"], batch["source"], batch["label"], indices):
        rng = random.Random(f"{seed}:{'train' if train else 'eval'}:{index}")
        for kind, sample in builder(segments, rng, train, source, label):
            tokens = tokenize(sample)
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
    """Rows per kind, sequence lengths (per kind too) and the (unknown) text tokens of a token table."""
    ids = table.data.column("input_ids")
    flat = pyarrow.compute.list_flatten(ids)
    unknown_id = unknown_token_id(processor.tokenizer)
    lengths = pyarrow.compute.list_value_length(ids).to_numpy()
    kinds = np.asarray(table["kind"])
    per_kind = {
        kind: {
            "mean": round(float(lengths[kinds == kind].mean()), 1),
            "longest": int(lengths[kinds == kind].max()),
        }
        for kind in sorted(set(kinds.tolist()))
    }
    return {
        "rows": len(table),
        "rows_per_kind": dict(sorted(Counter(kinds.tolist()).items())),
        "longest": int(lengths.max()),
        "lengths_per_kind": per_kind,
        "text_tokens": _count(pyarrow.compute.less(flat, processor.vocabulary.text_vocab_size)),
        "unknown_text_tokens": 0 if unknown_id is None else _count(pyarrow.compute.equal(flat, unknown_id)),
    }


def probe_prompts(prompts: Sequence[str], processor: UniMMProcessor, train_folder: Path) -> dict[str, Any]:
    """How wordings the data do not hold tokenize: unknown tokens, and tokens the train table never holds
    (known to the tokenizer, but never trained: as useless to the model)."""
    train = datasets.load_from_disk(str(train_folder))
    seen = set(
        pyarrow.compute.unique(pyarrow.compute.list_flatten(train.data.column("input_ids"))).to_pylist()
    )
    unknown_id = unknown_token_id(processor.tokenizer)
    total, unknown, unseen, prompts_hit = 0, 0, 0, 0
    examples: dict[str, list[str]] = {"unknown": [], "unseen": []}
    for prompt in prompts:
        encoded = processor.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        hit = False
        for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
            total += 1
            problem = "unknown" if token == unknown_id else "unseen" if token not in seen else None
            if problem is None:
                continue
            hit = True
            unknown += problem == "unknown"
            unseen += problem == "unseen"
            word = prompt[start:end]
            if word not in examples[problem] and len(examples[problem]) < PROBE_EXAMPLES:
                examples[problem].append(word)
        prompts_hit += hit
    return {
        "prompts": len(prompts), "tokens": total, "unknown_tokens": unknown, "unseen_tokens": unseen,
        "prompts_with_either": prompts_hit, "examples": examples,
    }  # fmt: skip


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


def _probe_line(probe: Mapping[str, Any]) -> str:
    return (
        f"{probe['prompts']} prompts, {probe['tokens']} tokens: {probe['unknown_tokens']} unknown "
        f"{probe['examples']['unknown']}, {probe['unseen_tokens']} never in the train table "
        f"{probe['examples']['unseen']}"
    )


__all__ = ["PrepareArguments", "SampleBuilder", "load_prepare_recipe", "parse_prepare_recipe", "prepare"]
