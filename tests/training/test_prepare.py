"""`unimm prepare` (unimm.training.prepare) on coloured shapes, a tiny visual tokenizer and a tiny Llama."""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from unimm.cli import main as cli_main
from unimm.data.schema import IMAGE, TEXT
from unimm.llm import UniMMForCausalLM, UniMMProcessor
from unimm.llm.processing_unimm import IGNORE_INDEX
from unimm.llm.text_tokenizer import (
    END_OF_TURN,
    build_bpe_tokenizer,
    build_word_level_tokenizer,
    measure_unknown_tokens,
)
from unimm.tokenizer import DualCodebookConfig, DualCodebookImageProcessor, DualCodebookTokenizer
from unimm.training.prepare import (
    GENERATION,
    UNCONDITIONAL,
    UNDERSTANDING,
    PrepareArguments,
    SampleBuilder,
    load_prepare_recipe,
    parse_prepare_recipe,
    prepare,
)

REPOSITORY = Path(__file__).resolve().parents[2]
TINY_RECIPE = REPOSITORY / "recipes" / "prepare" / "tiny.yaml"
COLOURS = ("red", "green", "blue")
SHAPES = ("square", "circle")
NUM_IMAGES = 24
SIDE = 16  # the tiny tokenizer's image size: a 4x4 grid
WIDE_EVERY = 6  # every sixth image is 32x16 (a 4x8 grid when its aspect ratio is kept)
EVAL_FRACTION = 0.25  # 6 of the 24 images
GRIDS = {(4, 4), (4, 8)}
# The shared run: every image keeps its aspect ratio, a fifth of the train generations lose their prompt.
PREPARED = dict(condition_dropout=0.2, keep_aspect_ratio=True)
TINY_BACKBONE = dict(
    model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128,
)  # fmt: skip


def _caption(index: int) -> str:
    return f"a {COLOURS[index % len(COLOURS)]} {SHAPES[(index // len(COLOURS)) % len(SHAPES)]}"


def _draw(index: int) -> Image.Image:
    size = (2 * SIDE, SIDE) if index % WIDE_EVERY == WIDE_EVERY - 1 else (SIDE, SIDE)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    box = (2 + index % 4, 2, 12 + index % 4, 12)
    colour, shape = _caption(index).split()[1:]
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=colour)
    return image


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder of coloured shapes (metadata.jsonl), with the same images as a LLaVA JSON and as
    interleaved documents next to it."""
    folder = tmp_path_factory.mktemp("shapes") / "pictures"
    folder.mkdir()
    for index in range(NUM_IMAGES):
        _draw(index).save(folder / f"{index}.png")
    metadata = [{"file_name": f"{i}.png", "text": _caption(i)} for i in range(NUM_IMAGES)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metadata))
    llava = [
        {
            "image": f"pictures/{i}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat shape is this?"},
                {"from": "gpt", "value": f"It is {_caption(i)}."},
            ],
        }
        for i in range(NUM_IMAGES)
    ]
    (folder.parent / "shapes.json").write_text(json.dumps(llava))
    documents = [
        {
            "texts": [f"First {_caption(i)}", None, "then", None],
            "images": [None, f"pictures/{i}.png", None, f"pictures/{i + 1}.png"],
        }
        for i in range(0, NUM_IMAGES - 1, 2)
    ]
    (folder.parent / "documents.jsonl").write_text("".join(json.dumps(row) + "\n" for row in documents))
    return folder


@pytest.fixture(scope="module")
def visual_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("vq") / "export"
    torch.manual_seed(0)
    vq_model = DualCodebookTokenizer(DualCodebookConfig.tiny()).eval()
    vq_model.save_pretrained(folder)
    DualCodebookImageProcessor.from_tokenizer_config(vq_model.config).save_pretrained(folder)
    return folder


def _arguments(
    shapes: Path, visual_tokenizer: Path, output_dir: Path, cache_dir: str, **values
) -> PrepareArguments:
    defaults = dict(
        dataset=str(shapes), visual_tokenizer=str(visual_tokenizer), output_dir=str(output_dir),
        backbone=TINY_BACKBONE, max_grid=8, eval_fraction=EVAL_FRACTION, encode_batch_size=8,
        cache_dir=cache_dir,
    )  # fmt: skip
    return parse_prepare_recipe({**defaults, **values})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, shapes, visual_tokenizer) -> Path:
    """One prepare run over the image folder, shared by the tests that only read its outputs."""
    output = tmp_path_factory.mktemp("prepared") / "out"
    cache = str(tmp_path_factory.mktemp("cache"))
    prepare(_arguments(shapes, visual_tokenizer, output, cache, **PREPARED))
    return output


def _table(folder: Path, split: str) -> datasets.Dataset:
    return datasets.load_from_disk(str(folder / split))


def _trained(row: dict) -> list[int]:
    return [token for token, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]


# --- the outputs ------------------------------------------------------------------------------------


def test_init_loads_and_its_vocabulary_covers_text_and_codes(prepared: Path) -> None:
    llm = UniMMForCausalLM.from_pretrained(prepared / "init")
    processor = UniMMProcessor.from_pretrained(prepared / "init")
    vocabulary = llm.vocabulary
    assert vocabulary.codebook_size == DualCodebookConfig.tiny().codebook_size
    assert llm.config.vocab_size == vocabulary.vocab_size == llm.get_input_embeddings().num_embeddings
    assert len(processor.tokenizer) <= vocabulary.text_vocab_size
    words = {word for index in range(NUM_IMAGES) for word in _caption(index).split()}
    assert processor.tokenizer.unk_token_id not in processor.tokenizer(" ".join(words))["input_ids"]
    assert (llm.config.default_grid_height, llm.config.default_grid_width) == (4, 4)  # the common grid
    end_of_turn = processor.tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert end_of_turn in llm.generation_config.eos_token_id  # chat answers stop at the turn's end
    # The code rows start from the codebook, not from one mean vector.
    codes = llm.get_input_embeddings().weight[vocabulary.code_token_offset :]
    assert not torch.allclose(codes[0], codes[1])


def test_tables_hold_two_sequences_per_image(prepared: Path) -> None:
    summary = json.loads((prepared / "prepare.json").read_text())
    train, evaluation = _table(prepared, "train"), _table(prepared, "eval")
    eval_images = round(EVAL_FRACTION * NUM_IMAGES)
    assert len(train) == 2 * (NUM_IMAGES - eval_images) and len(evaluation) == 2 * eval_images
    kinds = Counter(train["kind"])
    assert kinds[UNDERSTANDING] == kinds[GENERATION] + kinds[UNCONDITIONAL] == NUM_IMAGES - eval_images
    assert Counter(evaluation["kind"]) == {GENERATION: eval_images, UNDERSTANDING: eval_images}  # no dropout
    record = summary["tables"]["train"]
    assert record["rows"] == len(train) and record["rows_per_kind"] == dict(sorted(kinds.items()))
    assert record["longest"] == max(map(len, train["input_ids"])) and record["unknown_text_tokens"] == 0
    assert summary["init"]["unknown_text_tokens"]["count"] == 0


def test_a_generation_row_is_its_caption_then_its_image(prepared: Path) -> None:
    processor = UniMMProcessor.from_pretrained(prepared / "init")
    vocabulary = processor.vocabulary
    end_of_turn = processor.tokenizer.convert_tokens_to_ids(END_OF_TURN)
    captions = {_caption(index) for index in range(NUM_IMAGES)}
    rows = [row for row in _table(prepared, "train") if row["kind"] == GENERATION]
    for row in rows:
        texts, images = processor.batch_decode([row["input_ids"]])
        prompt = texts[0].split(processor.image_placeholder)[0]
        assert prompt in captions and len(images[0]) == 1 and tuple(images[0][0].shape) in GRIDS
        trained = _trained(row)
        image_tokens = [token for token in row["input_ids"] if token >= vocabulary.text_vocab_size]
        assert trained == [*image_tokens, end_of_turn]  # the loss is on the image (and the turn's end)
        assert trained[0] == vocabulary.boi_token_id and trained[-2] == vocabulary.eoi_token_id


def test_an_understanding_row_is_trained_on_its_answer_only(prepared: Path) -> None:
    processor = UniMMProcessor.from_pretrained(prepared / "init")
    answers = {_caption(index) + "." for index in range(NUM_IMAGES)}
    rows = [row for row in _table(prepared, "eval") if row["kind"] == UNDERSTANDING]
    assert rows
    for row in rows:
        assert processor.tokenizer.decode(_trained(row), skip_special_tokens=True) in answers
        _, images = processor.batch_decode([row["input_ids"]])
        assert len(images[0]) == 1  # the image is in the prompt, not in the loss
        assert not any(token >= processor.vocabulary.text_vocab_size for token in _trained(row))


def test_an_unconditional_row_has_no_prompt_text(prepared: Path) -> None:
    processor = UniMMProcessor.from_pretrained(prepared / "init")
    rows = [row for row in _table(prepared, "train") if row["kind"] == UNCONDITIONAL]
    assert rows  # 18 images at 20%
    for row in rows:
        texts, _ = processor.batch_decode([row["input_ids"]])
        assert texts[0].split(processor.image_placeholder)[0] == ""


def test_condition_dropout_rate() -> None:
    args = PrepareArguments(dataset="emoji", visual_tokenizer="vq", output_dir="out", backbone=TINY_BACKBONE)
    builder = SampleBuilder(args)
    pair = [
        {"type": IMAGE, "role": "", "image_token_ids": [1, 2, 3, 4], "image_grid": [2, 2]},
        {"type": TEXT, "role": "", "text": "a red circle"},
    ]
    rows = 4000
    for train, expected in ((True, args.condition_dropout), (False, 0.0)):
        kinds = Counter(
            kind for index in range(rows) for kind, _ in builder(pair, random.Random(index), train=train)
        )
        assert kinds[UNDERSTANDING] == rows
        assert abs(kinds[UNCONDITIONAL] / rows - expected) < 0.015


def test_chats_per_pair_weights_the_directions_of_train_pairs() -> None:
    args = PrepareArguments(
        dataset="emoji", visual_tokenizer="vq", output_dir="out", backbone=TINY_BACKBONE,
        chats_per_pair={"generation": 2, "understanding": 0.25}, condition_dropout=0.0,
    )  # fmt: skip
    builder = SampleBuilder(args)
    pair = [
        {"type": IMAGE, "role": "", "image_token_ids": [1, 2, 3, 4], "image_grid": [2, 2]},
        {"type": TEXT, "role": "", "text": "a red circle"},
    ]
    rows = 4000
    kinds = Counter(
        kind for index in range(rows) for kind, _ in builder(pair, random.Random(index), train=True)
    )
    assert kinds[GENERATION] == 2 * rows
    assert abs(kinds[UNDERSTANDING] / rows - 0.25) < 0.02
    # Held-out pairs measure both directions once, whatever the train mix.
    assert Counter(kind for kind, _ in builder(pair, random.Random(0), train=False)) == {
        GENERATION: 1, UNDERSTANDING: 1,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("chats_per_pair", "message"),
    [
        ({"captions": 1}, "unknown direction 'captions'"),
        ({"generation": -1}, "chats_per_pair.generation must be a number >= 0"),
        ({"generation": 0, "understanding": 0}, "at least one chat"),
    ],
)
def test_chats_per_pair_is_checked(chats_per_pair: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrepareArguments(
            dataset="emoji", visual_tokenizer="vq", output_dir="out", backbone=TINY_BACKBONE,
            chats_per_pair=chats_per_pair,
        )  # fmt: skip


def test_answers_keep_one_full_stop() -> None:
    args = PrepareArguments(dataset="emoji", visual_tokenizer="vq", output_dir="out", backbone=TINY_BACKBONE)
    builder, rng = SampleBuilder(args), random.Random(0)
    answers = {
        args.wording.name(builder.fields(caption), rng) for caption in ("A red circle.", " A red circle ")
    }
    assert answers == {"A red circle."}
    assert args.wording.prompt(builder.fields(" a red circle "), rng) == "a red circle"


def test_prompts_name_a_row_by_its_synonyms_and_answers_keep_the_label() -> None:
    source = {
        "dataset": "fashion_mnist",
        "label_column": "label",
        "label_names": ["bag", "ankle_boot"],
        "label_synonyms": {"bag": ["handbag", "purse"], "ankle boot": "boot"},
    }
    args = PrepareArguments(
        sources=[source], visual_tokenizer="vq", output_dir="out", backbone=TINY_BACKBONE,
        prompt_templates=["{subject}"], synonym_share=0.5,
    )  # fmt: skip
    builder = SampleBuilder(args)
    pair = [
        {"type": IMAGE, "role": "", "image_token_ids": [1, 2, 3, 4], "image_grid": [2, 2]},
        {"type": TEXT, "role": "", "text": "a photo of a bag"},
    ]
    prompts, answers = Counter(), Counter()
    for index in range(2000):
        chats = dict(builder(pair, random.Random(index), train=False, label="bag"))
        prompts[chats[GENERATION]["segments"][0]["text"]] += 1
        answers[chats[UNDERSTANDING]["segments"][-1]["text"]] += 1
    assert set(prompts) == {"a bag", "a handbag", "a purse"}
    assert abs(prompts["a bag"] / 2000 - 0.5) < 0.04
    assert answers == Counter({"a bag.": 2000})


@pytest.mark.parametrize(
    ("synonyms", "message"),
    [
        ({"handbag": ["purse"]}, "'handbag' is not one of label_names (did you mean 'bag'?)"),
        ({"bag": []}, "label_synonyms.bag: expected a list of non-empty names"),
        (["bag"], "label_synonyms: expected {label: [synonym, ...]}"),
    ],
)
def test_bad_synonyms_name_what_is_wrong(synonyms, message) -> None:
    source = {"dataset": "emoji", "label_column": "name", "label_names": ["bag"], "label_synonyms": synonyms}
    with pytest.raises(ValueError, match=re.escape(message)):
        PrepareArguments(sources=[source], visual_tokenizer="vq", output_dir="out", backbone=TINY_BACKBONE)


# --- resuming ---------------------------------------------------------------------------------------


def test_a_rerun_skips_finished_steps(prepared, shapes, visual_tokenizer, tmp_path, caplog) -> None:
    stamps = {
        name: (prepared / name / "prepare_step.json").stat().st_mtime_ns for name in ("init", "train", "eval")
    }
    with caplog.at_level(logging.INFO, logger="unimm.training.prepare"):
        summary = prepare(_arguments(shapes, visual_tokenizer, prepared, str(tmp_path), **PREPARED))
    for name, stamp in stamps.items():
        assert f"step {name}: done already" in caplog.text
        assert (prepared / name / "prepare_step.json").stat().st_mtime_ns == stamp
    assert summary["tables"]["train"]["rows"] == len(_table(prepared, "train"))
    with pytest.raises(ValueError, match="prepared with other arguments.*condition_dropout"):
        prepare(
            _arguments(
                shapes, visual_tokenizer, prepared, str(tmp_path), **{**PREPARED, "condition_dropout": 0.3}
            )
        )


def test_a_missing_table_is_rebuilt_from_the_kept_codes(shapes, visual_tokenizer, tmp_path, caplog) -> None:
    args = _arguments(shapes, visual_tokenizer, tmp_path / "out", str(tmp_path / "cache"))
    prepare(args)
    before = _table(tmp_path / "out", "eval")["input_ids"]
    (tmp_path / "out" / ".train.tmp-1").mkdir()  # a killed run's half-written folder
    shutil.rmtree(tmp_path / "out" / "eval")
    with caplog.at_level(logging.INFO):
        prepare(args)
    assert "step init: done already" in caplog.text and "step eval: written" in caplog.text
    assert "shards already done" in caplog.text  # the images are not encoded again
    assert _table(tmp_path / "out", "eval")["input_ids"] == before  # rebuilt the same
    assert not (tmp_path / "out" / ".train.tmp-1").exists()


# --- other data -------------------------------------------------------------------------------------


def test_images_keep_their_aspect_ratio(prepared: Path) -> None:
    processor = UniMMProcessor.from_pretrained(prepared / "init")
    grids = Counter()
    for split in ("train", "eval"):
        for row in _table(prepared, split):
            _, images = processor.batch_decode([row["input_ids"]])
            grids.update(tuple(image.shape) for image in images[0])
    wide = NUM_IMAGES // WIDE_EVERY
    assert grids == {(4, 8): 2 * wide, (4, 4): 2 * (NUM_IMAGES - wide)}  # two rows per image
    assert processor.image_processor.size.shortest_edge == SIDE  # chat images keep theirs too


def test_sequences_longer_than_the_lm_are_left_out(prepared, shapes, visual_tokenizer, tmp_path) -> None:
    lengths = sorted(map(len, _table(prepared, "train")["input_ids"]))
    limit = lengths[len(lengths) // 2]
    backbone = {**TINY_BACKBONE, "max_position_embeddings": limit}
    summary = prepare(
        _arguments(
            shapes,
            visual_tokenizer,
            tmp_path / "out",
            str(tmp_path / "cache"),
            backbone=backbone,
            **PREPARED,
        )
    )
    full = _table(prepared, "train")
    expected = Counter(kind for kind, ids in zip(full["kind"], full["input_ids"]) if len(ids) > limit)
    assert expected and summary["tables"]["train"]["too_long"] == dict(expected)
    assert max(map(len, _table(tmp_path / "out", "train")["input_ids"])) <= limit


def test_conversations_and_documents(shapes, visual_tokenizer, tmp_path) -> None:
    """LLaVA conversations are trained on the assistant's turns; interleaved documents on every token."""
    cache = str(tmp_path / "cache")
    prepare(_arguments(shapes.parent / "shapes.json", visual_tokenizer, tmp_path / "chat", cache))
    processor = UniMMProcessor.from_pretrained(tmp_path / "chat" / "init")
    table = _table(tmp_path / "chat", "train")
    assert set(table["kind"]) == {"conversation"}
    for row in table:
        answer = processor.tokenizer.decode(_trained(row), skip_special_tokens=True)
        assert answer.startswith("it is a ") and answer.endswith(".")  # the word-level tokenizer lowercases

    prepare(_arguments(shapes.parent / "documents.jsonl", visual_tokenizer, tmp_path / "docs", cache))
    processor = UniMMProcessor.from_pretrained(tmp_path / "docs" / "init")
    table = _table(tmp_path / "docs", "train")
    assert set(table["kind"]) == {"document"} and len(table) == 9  # 12 documents, 3 held out
    for row in table:
        assert row["labels"][1:] == row["input_ids"][1:] and row["labels"][0] == IGNORE_INDEX  # BOS
        texts, images = processor.batch_decode([row["input_ids"]])
        assert texts[0].startswith("first a ") and len(images[0]) == 2


def test_a_pretrained_text_model_keeps_its_weights_and_replays_its_chats(
    shapes, visual_tokenizer, tmp_path, caplog
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from unimm.data.text_replay import save_text_replay

    # A word-level "pretrained" LM that never saw the word "green": its unknown tokens are reported.
    text_tokenizer = build_word_level_tokenizer(["a red blue square circle", "What is this?", "A thing."])
    values = dict(TINY_BACKBONE)
    config = AutoConfig.for_model(values.pop("model_type"), vocab_size=len(text_tokenizer), **values)
    text_model = AutoModelForCausalLM.from_config(config)
    text_model.save_pretrained(tmp_path / "lm")
    text_tokenizer.save_pretrained(tmp_path / "lm")
    chats = [{"question": "What is this?", "answer": "A thing."}] * 4
    # The LM's own replies to the replay questions (generated when the file is missing: minutes).
    save_text_replay(chats, tmp_path / "out" / "text_replay.jsonl")
    with caplog.at_level(logging.WARNING):
        summary = prepare(
            _arguments(
                shapes, visual_tokenizer, tmp_path / "out", str(tmp_path / "cache"), backbone=None,
                text_model_name_or_path=str(tmp_path / "lm"), text_replay_fraction=0.25,
                questions=["What is this?"],
            )
        )  # fmt: skip
    llm = UniMMForCausalLM.from_pretrained(tmp_path / "out" / "init")
    text_rows = text_model.get_input_embeddings().weight
    assert torch.equal(llm.get_input_embeddings().weight[: text_rows.shape[0]], text_rows)
    unknown = summary["init"]["unknown_text_tokens"]
    assert unknown["count"] > 0 and unknown["examples"] == ["green"]
    assert "unknown to the text tokenizer" in caplog.text  # a warning: the pretrained tokenizer is kept
    kinds = summary["tables"]["train"]["rows_per_kind"]
    multimodal = sum(count for kind, count in kinds.items() if kind != "text_replay")
    assert kinds["text_replay"] == round(multimodal * 0.25 / 0.75)


# --- several sources and skills ---------------------------------------------------------------------

SQUARES = ("red", "green", "blue")  # a labelled source: a ClassLabel column "red_square", ...
TRIANGLES = ("yellow", "purple")  # an image folder: captions only, repeated twice
PER_CLASS = 3
SKILL_TEMPLATES = {
    "multi_turn": {"share": 1, "another": ["another one"], "what_drawn": ["what did you draw?"],
                   "draw_other": ["now {subject}"]},
    "interleaved": {"share": 1, "requests": ["show me {subject_1} and {subject_2}"],
                    "answers": ["{subject_1}:{image_1}{subject_2}:{image_2}"]},
    "edit": {"share": 1, "darker_factor": 0.5, "mirror": ["mirror it"], "darker": ["make it darker"],
             "invert": ["invert it"], "relabel": ["turn it into {subject}"]},
    "composition": {"share": 1, "wide": ["{subject_1} next to {subject_2}"],
                    "tall": ["{subject_1} above {subject_2}"]},
}  # fmt: skip
PROBES = ["a red square", "A RED SQUARE", "draw a pink square"]


def _shape_image(colour: str, shape: str, index: int) -> Image.Image:
    """16 px, square: what the model sees is these pixels exactly (no resize)."""
    image = Image.new("RGB", (SIDE, SIDE), "white")
    draw = ImageDraw.Draw(image)
    offset = index % PER_CLASS
    if shape == "square":
        draw.rectangle((2 + offset, 3, 10 + offset, 11), fill=colour)
    else:
        draw.polygon([(2 + offset, 13), (8 + offset, 2), (13, 13)], fill=colour)
    return image


@pytest.fixture(scope="module")
def skill_sources(tmp_path_factory) -> tuple[list[dict], dict[str, list[Image.Image]]]:
    """Two sources and every image by the subject that names it."""
    from unimm.data.schema import image_segment, sample_features, text_segment

    root = tmp_path_factory.mktemp("skill-data")
    by_subject: dict[str, list[Image.Image]] = {}
    rows = {"segments": [], "shape": []}
    for label, colour in enumerate(SQUARES):
        for index in range(PER_CLASS):
            image = _shape_image(colour, "square", index)
            rows["segments"].append([image_segment(image), text_segment(f"a photo of a {colour} square")])
            rows["shape"].append(label)
            by_subject.setdefault(f"a {colour} square", []).append(image)
    names = datasets.ClassLabel(names=[f"{colour}_square" for colour in SQUARES])
    datasets.Dataset.from_dict(rows, features=sample_features(shape=names)).save_to_disk(
        str(root / "squares")
    )
    folder = root / "triangles"
    folder.mkdir()
    metadata = []
    for colour in TRIANGLES:
        for index in range(PER_CLASS):
            image = _shape_image(colour, "triangle", index)
            image.save(folder / f"{colour}{index}.png")
            metadata.append({"file_name": f"{colour}{index}.png", "text": f"a {colour} triangle"})
            by_subject.setdefault(f"a {colour} triangle", []).append(image)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metadata))
    sources = [
        {"dataset": str(root / "squares"), "name": "squares", "label_column": "shape"},
        {"dataset": str(folder), "name": "triangles", "repeats": 2},
    ]
    return sources, by_subject


@pytest.fixture(scope="module")
def skilled(tmp_path_factory, skill_sources, visual_tokenizer) -> Path:
    output = tmp_path_factory.mktemp("skilled") / "out"
    values = dict(
        sources=skill_sources[0], visual_tokenizer=str(visual_tokenizer), output_dir=str(output),
        backbone={**TINY_BACKBONE, "max_position_embeddings": 512}, max_grid=8, eval_fraction=0.25,
        encode_batch_size=8, cache_dir=str(tmp_path_factory.mktemp("cache")), condition_dropout=0.0,
        prompt_templates=["{subject}"], questions=["what is this?"], skills=SKILL_TEMPLATES,
        probe_prompts=PROBES,
    )  # fmt: skip
    prepare(parse_prepare_recipe(values))
    return output


class Codes:
    """Which subjects' images a code grid can be (the tiny tokenizer may give two images one grid)."""

    def __init__(self, visual_tokenizer: Path, by_subject: dict[str, list[Image.Image]]) -> None:
        self.model = DualCodebookTokenizer.from_pretrained(visual_tokenizer).eval()
        saved = DualCodebookImageProcessor.from_pretrained(visual_tokenizer)
        self.processor = DualCodebookImageProcessor(**{**saved.to_dict(), "size": None})  # as prepare encodes
        self.by_subject = by_subject
        self.subjects: dict[tuple, set[str]] = {}
        for subject, images in by_subject.items():
            for image in images:
                self.subjects.setdefault(self.encode(np.asarray(image)), set()).add(subject)

    def encode(self, pixels: np.ndarray) -> tuple:
        image = Image.fromarray(np.ascontiguousarray(pixels))
        values = self.processor(images=[image], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            codes = self.model.encode(values)[0]  # (h, w)
        return tuple(codes.shape), tuple(codes.flatten().tolist())

    def edits(self, shown: tuple, transform) -> set[tuple]:
        """The grids of ``transform`` applied to every image that encodes to ``shown``."""
        return {
            self.encode(transform(np.asarray(image)))
            for images in self.by_subject.values()
            for image in images
            if self.encode(np.asarray(image)) == shown
        }


def _turns(row: dict, processor: UniMMProcessor) -> list[tuple[str, bool, Any]]:
    """A chat row as ``(role, trained, text or (grid shape, codes))`` pieces; a piece's tokens are all trained
    or none. Size tokens are part of an image's trained tokens."""
    vocabulary, tokenizer = processor.vocabulary, processor.tokenizer
    markers = {tokenizer.convert_tokens_to_ids(f"<|{role}|>"): role for role in ("user", "assistant")}
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    ids, labels = row["input_ids"], row["labels"]
    pieces, role, position = [], None, 0
    while position < len(ids):
        token = ids[position]
        if token in markers:
            assert labels[position] == IGNORE_INDEX  # the header is prompt
            role, position = markers[token], position + 1
            continue
        if token == vocabulary.boi_token_id:
            stop = ids.index(vocabulary.eoi_token_id, position) + 1
            grid = vocabulary.token_ids_to_image(ids[position:stop])
            content = (tuple(grid.shape), tuple(grid.flatten().tolist()))
        else:
            stop = position + 1
            while (
                stop < len(ids)
                and ids[stop] not in markers
                and ids[stop] not in (end, vocabulary.boi_token_id)
            ):
                stop += 1
            stop += ids[stop] == end if stop < len(ids) else 0  # the turn's end belongs to its text
            content = tokenizer.decode([t for t in ids[position:stop] if t != end])
        trained = role == "assistant"  # the loss is on the assistant's turns, all of them
        assert labels[position:stop] == (
            ids[position:stop] if trained else [IGNORE_INDEX] * (stop - position)
        )
        pieces.append((role, trained, content))
        position = stop
    return [(role, trained, content) for role, trained, content in pieces if content != ""]


def test_sources_repeat_and_label_their_rows(skilled: Path) -> None:
    summary = json.loads((skilled / "prepare.json").read_text())
    train, evaluation = summary["tables"]["train"], summary["tables"]["eval"]
    # 9 squares and 6 triangles, a quarter held out per source; triangles twice per pass in training.
    assert train["sources"] == [{"name": "squares", "rows": 7, "repeats": 1},
                                {"name": "triangles", "rows": 4, "repeats": 2}]  # fmt: skip
    assert evaluation["sources"] == [{"name": "squares", "rows": 2, "repeats": 1},
                                     {"name": "triangles", "rows": 2, "repeats": 1}]  # fmt: skip
    kinds = train["rows_per_kind"]
    assert kinds["generation"] == kinds["understanding"] == 7 + 2 * 4
    assert set(kinds) == {"generation", "understanding", "multi_turn", "interleaved", "edit", "composition"}
    assert train["skills"]["composition"].keys() == {"wide", "tall"} and train["derived_images"] > 0
    for kind, lengths in train["lengths_per_kind"].items():
        assert lengths["longest"] <= 512 and lengths["mean"] <= lengths["longest"], kind
    # Answers name the label ("red_square" read as "a red square"); captions only where there is no label.
    processor = UniMMProcessor.from_pretrained(skilled / "init")
    answers = {
        _turns(row, processor)[-1][2] for row in _table(skilled, "train") if row["kind"] == UNDERSTANDING
    }
    assert answers == {f"a {colour} square." for colour in SQUARES} | {f"a {c} triangle." for c in TRIANGLES}


def test_every_skill_chat_follows_its_request(skilled, skill_sources, visual_tokenizer) -> None:
    processor = UniMMProcessor.from_pretrained(skilled / "init")
    codes = Codes(visual_tokenizer, skill_sources[1])
    assert len(codes.subjects) >= 10  # the 15 images are told apart by their codes (else this test is weak)
    transforms = {
        "mirror it": lambda pixels: pixels[:, ::-1],
        "make it darker": lambda pixels: np.rint(pixels * 0.5).astype(np.uint8),
        "invert it": lambda pixels: 255 - pixels,
    }
    checked = Counter()
    for split in ("train", "eval"):
        for row in _table(skilled, split):
            if row["kind"] in (GENERATION, UNDERSTANDING):
                continue
            turns = _turns(row, processor)
            checked[row["kind"]] += 1
            _check_skill_row(row["kind"], turns, codes, transforms, processor)
    assert set(checked) == {"multi_turn", "interleaved", "edit", "composition"}


def _check_skill_row(kind, turns, codes: Codes, transforms, processor) -> None:
    def subjects(image) -> set[str]:
        return codes.subjects.get(image, set())

    if kind == "composition":
        (user, _, prompt), (assistant, trained, image) = turns
        first, word, second = (
            prompt.partition(" next to ") if " next to " in prompt else prompt.partition(" above ")
        )
        axis = 1 if word == " next to " else 0
        assert (
            image[0] == ((4, 8) if axis else (8, 4)) and trained
        )  # the size tokens are the model's to write
        assert image in {
            codes.encode(np.concatenate([np.asarray(a), np.asarray(b)], axis=axis))
            for a in codes.by_subject[first]
            for b in codes.by_subject[second]
        }
        return
    if kind == "edit":
        (_, _, shown), (_, _, instruction), (assistant, trained, result) = turns
        assert assistant == "assistant" and trained and not isinstance(shown, str)
        if instruction.startswith("turn it into "):
            target = instruction.removeprefix("turn it into ")
            assert target in subjects(result) and target not in subjects(shown)
        else:
            assert result in codes.edits(shown, transforms[instruction])  # the exact transform, encoded
        return
    if kind == "interleaved":
        (_, _, request), *answer = turns
        first, second = request.removeprefix("show me ").split(" and ")
        assert [content for _, _, content in answer][0::2] == [f"{first}:", f"{second}:"]
        assert first in subjects(answer[1][2]) and second in subjects(answer[3][2]) and first != second
        return
    # multi_turn: every answer follows from the turns before it
    last_image, drawn, answers = None, None, 0
    for index, (role, _, content) in enumerate(turns):
        if role == "user" and not isinstance(content, str):
            last_image, drawn = content, None
        if role != "assistant":
            continue
        answers += 1
        request = turns[index - 1][2]
        if isinstance(content, str):
            named = content.removesuffix(".")
            assert named in subjects(drawn if request == "what did you draw?" else last_image)
            drawn = None
            continue
        if request == "another one":
            assert subjects(content) & subjects(last_image)
        else:  # the opening request, or "now <another class>"
            assert request.removeprefix("now ") in subjects(content)
        last_image = drawn = content
    assert 2 <= answers <= 4


def test_probe_prompts_show_what_the_model_never_saw(skilled: Path) -> None:
    probe = json.loads((skilled / "prepare.json").read_text())["probe"]
    # Word-level, lower-cased: the upper-case prompt reads as the trained one. No text holds "pink"; "draw"
    # is known (from "what did you draw?") but never opens a turn, so its no-space form is never trained.
    assert probe["prompts"] == len(PROBES) and probe["prompts_with_either"] == 1
    assert probe["unknown_tokens"] == probe["unseen_tokens"] == 1
    assert probe["examples"] == {"unknown": [" pink"], "unseen": ["draw"]}


def test_derived_images_are_kept_for_a_rerun(skilled: Path, tmp_path: Path) -> None:
    before = _table(skilled, "train")[:]
    shards = {path: path.stat().st_mtime_ns for path in (skilled / "codes" / "train-derived").glob("shard-*")}
    assert shards
    shutil.rmtree(skilled / "train")
    values = json.loads((skilled / "arguments.json").read_text())
    prepare(parse_prepare_recipe({**values, "probe_prompts": PROBES, "cache_dir": str(tmp_path)}))
    assert {path: path.stat().st_mtime_ns for path in shards} == shards  # not encoded again
    assert _table(skilled, "train")[:] == before


# --- text tokenizers --------------------------------------------------------------------------------


def test_bpe_and_word_level_unknown_rates_on_held_out_captions() -> None:
    train = [_caption(index) for index in range(NUM_IMAGES)]
    held_out = ["a purple triangle", "a red hexagon", "a green circle"]
    word_level = build_word_level_tokenizer(train)
    bpe = build_bpe_tokenizer(train, vocab_size=300)
    word_unknown = measure_unknown_tokens(word_level, held_out)
    bpe_unknown = measure_unknown_tokens(bpe, held_out)
    assert word_unknown.examples == ["purple", "triangle", "hexagon"]
    assert word_unknown.count == 3 and word_unknown.rate == pytest.approx(3 / 9)
    assert bpe_unknown.count == 0 and bpe_unknown.total > word_unknown.total  # unseen words in pieces
    for text in held_out + ["A Red Circle!"]:
        assert bpe.decode(bpe(text)["input_ids"]) == text  # case and punctuation kept
    rendered = bpe.apply_chat_template([{"role": "user", "content": "a red circle"}], tokenize=False)
    assert bpe.convert_tokens_to_ids(END_OF_TURN) in bpe(rendered, add_special_tokens=False)["input_ids"]
    # A word opening a turn is the token it is in mid-sentence.
    opening = bpe.apply_chat_template([{"role": "user", "content": "circle"}], tokenize=False)
    opening_ids = bpe(opening, add_special_tokens=False)["input_ids"]
    sentence_ids = bpe("a red circle")["input_ids"]
    assert opening_ids[1:-1] == sentence_ids[len(bpe("a red")["input_ids"]) :]  # between <|user|> and <|end|>


def test_prepare_with_a_bpe_tokenizer(shapes, visual_tokenizer, tmp_path) -> None:
    summary = prepare(
        _arguments(shapes, visual_tokenizer, tmp_path / "out", str(tmp_path / "cache"), text_tokenizer="bpe")
    )
    processor = UniMMProcessor.from_pretrained(tmp_path / "out" / "init")
    row = next(row for row in _table(tmp_path / "out", "eval") if row["kind"] == UNDERSTANDING)
    assert processor.tokenizer.decode(_trained(row), skip_special_tokens=True) in {
        _caption(i) + "." for i in range(NUM_IMAGES)
    }
    assert summary["init"]["unknown_text_tokens"]["count"] == 0


def test_a_tokenizer_that_leaves_words_out_is_an_error(shapes, visual_tokenizer, tmp_path) -> None:
    args = _arguments(
        shapes, visual_tokenizer, tmp_path / "out", str(tmp_path / "cache"), text_tokenizer_min_frequency=100,
        questions=["Whatever is this gizmo?"],
    )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"unknown to the text tokenizer, e\.g\. \['Whatever', .*'gizmo'.*max_unknown_rate"
    ):
        prepare(args)
    assert not (tmp_path / "out" / "init").exists()


# --- recipes, the command and its errors ------------------------------------------------------------


@pytest.mark.parametrize(
    "path", sorted((REPOSITORY / "recipes" / "prepare").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_recipes_parse(path: Path) -> None:
    args = load_prepare_recipe(path)
    assert (args.backbone is None) != (args.text_model_name_or_path is None)
    assert not (args.text_model_name_or_path or "").startswith("~")  # expanded


def test_the_command_runs_the_tiny_recipe_with_overrides(shapes, visual_tokenizer, tmp_path) -> None:
    output = tmp_path / "out"
    overrides = [
        f"dataset={shapes}", f"visual_tokenizer={visual_tokenizer}", f"output_dir={output}", "max_grid=4",
        "max_train_samples=10", "max_eval_samples=4", "eval_fraction=0.25", f"cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    assert cli_main(["prepare", str(TINY_RECIPE), *overrides]) == 0
    summary = json.loads((output / "prepare.json").read_text())
    assert summary["tables"]["train"]["rows"] == 20 and summary["tables"]["eval"]["rows"] == 8
    assert summary["tables"]["train"]["grid_too_large"] == 0  # a fixed size: every grid is 4x4


def test_relative_paths_are_found_next_to_the_recipe(shapes, visual_tokenizer, tmp_path, monkeypatch) -> None:
    recipe = shapes.parent / "prepare.yaml"
    recipe.write_text(
        f"dataset: pictures\nvisual_tokenizer: {visual_tokenizer}\noutput_dir: out\n"
        "backbone: {model_type: llama}\n"
    )
    monkeypatch.chdir(tmp_path)
    args = load_prepare_recipe(recipe, ["dataset={format: imagefolder, path: pictures}"])
    assert args.dataset == {"format": "imagefolder", "path": str(shapes)}
    assert args.output_dir == "out"  # outputs go under the working directory, as every recipe's


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["visual_tokenizer=missing"], "visual_tokenizer 'missing': no trained tokenizer folder there"),
        (["condition_dropuot=0.2"], "unknown key 'condition_dropuot' (did you mean 'condition_dropout'?)"),
        (["text_model_name_or_path=some/lm"], "set exactly one of backbone"),
        (["dataset=no/such/folder"], "dataset.path: no file or folder at"),
        (["condition_dropout=1.5"], "condition_dropout must be in [0, 1)"),
        (["prompt_templates=[Draw it]"], "prompt_templates[0]: 'Draw it' must always contain {subject}"),
        (["dataset=null"], "set exactly one of dataset (one dataset spec) and sources"),
        (
            ["dataset=null", "sources=[{dataset: emoji, repeats: 0}]"],
            "sources[0].repeats must be a whole number >= 1",
        ),
        (["skills={edit: {share: 1, ops: [blur]}}"], "skills.edit.ops: unknown 'blur'"),
    ],
)
def test_bad_inputs_are_one_line_errors(
    overrides, message, shapes, visual_tokenizer, tmp_path, caplog
) -> None:
    base = [f"dataset={shapes}", f"visual_tokenizer={visual_tokenizer}", f"output_dir={tmp_path / 'out'}"]
    with caplog.at_level(logging.ERROR):
        assert cli_main(["prepare", str(TINY_RECIPE), *base, *overrides]) == 1
    (record,) = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert message in record.getMessage() and "\n" not in record.getMessage()


# --- the LLM stage on the prepared tables ------------------------------------------------------------


@pytest.mark.integration
def test_the_llm_stage_learns_from_the_prepared_tables(prepared, tmp_path) -> None:
    from unimm.training.arguments import parse_recipe
    from unimm.training.loop import train

    recipe = parse_recipe(
        {
            "stage": "llm_sft", "output_dir": str(tmp_path / "run"),
            "model_name_or_path": str(prepared / "init"),
            "train_dataset": str(prepared / "train"), "eval_dataset": str(prepared / "eval"),
            "deepspeed_config": str(REPOSITORY / "recipes/deepspeed/zero0.json"), "max_steps": 15,
            "per_device_train_batch_size": 8, "learning_rate": 1e-2, "lr_scheduler_type": "constant",
            "logging_steps": 1, "max_length": 64, "save_steps": 15,
        }
    )  # fmt: skip
    result = train(recipe)
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records if record["split"] == "train"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    assert records[-1]["split"] == "eval" and records[-1]["loss"] < losses[0]
    exported = UniMMForCausalLM.from_pretrained(result.export_dir)
    processor = UniMMProcessor.from_pretrained(result.export_dir)  # carried over from init/
    assert processor.vocabulary.vocab_size == exported.config.vocab_size


def test_remembered_layouts_tokenize_as_the_processor(skilled: Path) -> None:
    from unimm.training.prepare import ChatTokens

    processor = UniMMProcessor.from_pretrained(skilled / "init")
    tokenize = ChatTokens(processor, max_layouts=2)
    rng = random.Random(0)

    def image(role: str, grid: tuple[int, int]) -> dict:
        codes = [rng.randrange(processor.vocabulary.codebook_size) for _ in range(grid[0] * grid[1])]
        return {"type": IMAGE, "role": role, "image_token_ids": codes, "image_grid": list(grid)}

    def chat() -> dict:  # a shown image, a question, then an answer of text and two images (one wide)
        return {"segments": [
            image("user", (4, 4)), {"type": TEXT, "role": "user", "text": "what is this?"},
            {"type": TEXT, "role": "assistant", "text": "a red square:"}, image("assistant", (4, 4)),
            {"type": TEXT, "role": "assistant", "text": "and"}, image("assistant", (4, 8)),
        ]}  # fmt: skip

    samples = [chat() for _ in range(4)] + [{"segments": [{"type": TEXT, "role": "user", "text": "hi"}]}]
    for sample in samples * 2:  # the second pass finds every layout remembered but the oldest
        assert tokenize(sample) == processor.tokenize_sample(sample)
    assert len(tokenize.layouts) == 2
