"""`unimm prepare` (unimm.training.prepare) on coloured shapes, a tiny visual tokenizer and a tiny Llama."""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections import Counter
from pathlib import Path

import datasets
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


def test_answers_keep_one_full_stop() -> None:
    args = PrepareArguments(dataset="emoji", visual_tokenizer="vq", output_dir="out", backbone=TINY_BACKBONE)
    builder = SampleBuilder(args)
    assert builder.answer("A red circle.") == builder.answer(" A red circle ") == "A red circle."
    assert builder.prompt(" a red circle ") == "a red circle"


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
        shapes, visual_tokenizer, tmp_path / "out", str(tmp_path / "cache"), text_tokenizer_min_frequency=3,
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
        (["prompt_template=Draw it"], "prompt_template 'Draw it' must contain {caption}"),
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
